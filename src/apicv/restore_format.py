"""The file format of ``apicv restore-check`` (see :mod:`apicv.restore`): the save and restore
ioctl tables, the KVM versions whose restore rules differ, and the parser -- every field
checked, errors naming file, section, step and field.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from typing import Any

from . import apicdef as A
from .errors import ScenarioError
from .scenario import Scenario, parse_doc, parse_int
from .scenario_ops import CHIPS, MP_STATES, MSR_NAMES

# the KVM releases whose restore rules differ, with what changed (kvm_version in [vm])
KVM_VERSION_RULES = {
    (6, 3): "8e6ed96cdd50 (6.3): KVM_SET_LAPIC fires an expired one-shot timer (TMCCT 0) at "
            "once; before, it restarted it with a whole period",
    (6, 6): "9cfec6d097c6 (6.6): KVM_SET_LAPIC clears the PIR before restoring "
            "(vmx_apicv_pre_state_restore); from 967235d32032 (4.11) until then it cleared it "
            "afterwards, dropping a timer that fired inside the ioctl on an APICv host",
}
MODEL_KVM_VERSION = (6, 18)
OLDEST_KVM_VERSION = (4, 11)

# ---------------------------------------------------------------- the save/restore ioctls
# name -> (target, {field: kind}); kinds: int, msr, mp_state, chip, value (anything, "$...")
_VCPU, _VM = "vcpu", "vm"
SAVE_OPS: dict[str, tuple[str, dict[str, str]]] = {
    "get_lapic": (_VCPU, {}), "get_sregs": (_VCPU, {}), "get_msr": (_VCPU, {"index": "msr"}),
    "get_mp_state": (_VCPU, {}), "get_vcpu_events": (_VCPU, {}), "get_tsc_khz": (_VCPU, {}),
    "get_clock": (_VM, {}), "get_irqchip": (_VM, {"chip": "chip"}), "get_pit2": (_VM, {}),
}
RESTORE_OPS: dict[str, tuple[str, dict[str, str]]] = {
    "set_lapic": (_VCPU, {"state": "value"}),
    "set_sregs": (_VCPU, {"sregs": "value", "apic_base": "int", "cr8": "int"}),
    "set_msr": (_VCPU, {"index": "msr", "value": "int"}),
    "set_mp_state": (_VCPU, {"state": "mp_state"}),
    "set_vcpu_events": (_VCPU, {"events": "value"}),
    "set_tsc_khz": (_VCPU, {"khz": "int"}),
    "resend_irr": (_VCPU, {"state": "value"}),
    "set_clock": (_VM, {"ns": "int"}),
    "set_irqchip": (_VM, {"chip": "chip", "state": "value"}),
    "create_pit2": (_VM, {"flags": "int"}),
    "set_pit2": (_VM, {"state": "value"}),
}
_REQUIRED = {"get_msr": ("index",), "set_lapic": ("state",), "set_msr": ("index", "value"),
             "set_mp_state": ("state",), "set_vcpu_events": ("events",), "set_tsc_khz": ("khz",),
             "resend_irr": ("state",), "set_clock": ("ns",), "get_irqchip": ("chip",),
             "set_irqchip": ("chip", "state"), "set_pit2": ("state",)}


@dataclass
class IoctlStep:
    """One save or restore step: *vcpu* None on a vCPU ioctl means every vCPU in turn."""

    section: str
    index: int  # 1-based within its section
    op: str
    vcpu: int | None
    args: dict[str, Any]
    save: str | None = None

    def describe(self, vcpu: int | None = None) -> str:
        who = self.vcpu if self.vcpu is not None else vcpu
        parts = [f"vcpu {who}"] if who is not None else []
        for k, v in self.args.items():
            if k == "index" and isinstance(v, int):
                name = _MSR_SHORT.get(v, f"{v:#x}")
                parts.append(name)
            elif isinstance(v, int) and not isinstance(v, bool):
                parts.append(f"{k}={v:#x}")
            else:
                parts.append(f"{k}={v}")
        return f"[{self.section} {self.index}] {self.op}(" + ", ".join(parts) + ")"


_MSR_SHORT = {A.MSR_IA32_TSC: "IA32_TSC", A.MSR_IA32_TSC_DEADLINE: "IA32_TSC_DEADLINE",
              A.MSR_IA32_APICBASE: "IA32_APICBASE"}


@dataclass
class RestoreScenario:
    file: str
    description: str
    workload: Scenario
    snapshots: list[int]  # workload steps done before each snapshot point
    save: list[IoctlStep]
    restore: list[IoctlStep]
    kvm_version: tuple[int, int] = MODEL_KVM_VERSION
    expect: str | None = None


def parse_version(v: Any, file: str = "<restore>") -> tuple[int, int]:
    """"6.5" -> (6, 5); a KVM release the switch knows (4.11 .. 6.18)."""
    try:
        major, minor = (int(x) for x in str(v).strip().split("."))
    except ValueError:
        raise ScenarioError(file, None, "kvm_version",
                            f"expected a release such as \"6.5\", got {v!r}") from None
    ver = (major, minor)
    if not OLDEST_KVM_VERSION <= ver <= MODEL_KVM_VERSION:
        raise ScenarioError(file, None, "kvm_version", "the model covers 4.11 to 6.18")
    return ver


def _parse_arg(kind: str, v: Any, file: str, where: str, i: int) -> Any:
    if isinstance(v, str) and v.startswith("$"):
        return v  # resolved when the step runs
    if kind == "value":
        raise ScenarioError(file, i, where, f"expected a saved value (\"$name\"), got {v!r}")
    names = {"msr": MSR_NAMES, "mp_state": MP_STATES, "chip": CHIPS}.get(kind)
    return parse_int(v, file, i, where, names)


def _parse_ioctls(section: str, rows: Any, ops: dict, file: str,
                  ids: list[int]) -> list[IoctlStep]:
    if not isinstance(rows, list):
        raise ScenarioError(file, None, section, f"use [[{section}]] tables")
    out = []
    for i, t in enumerate(rows, 1):
        where = f"{section}[{i}]"
        if not isinstance(t, dict) or "do" not in t:
            raise ScenarioError(file, None, where, "a table with 'do' (the ioctl)")
        op = t["do"]
        if op not in ops:
            raise ScenarioError(file, None, f"{where}.do",
                                f"unknown {section} ioctl {op!r} (known: {', '.join(ops)})")
        target, spec = ops[op]
        args: dict[str, Any] = {}
        vcpu = None
        save = None
        for k, v in t.items():
            if k in ("do", "note"):
                continue
            if k == "vcpu" and target == _VCPU:
                vcpu = parse_int(v, file, None, f"{where}.vcpu")
                if vcpu not in ids:
                    raise ScenarioError(file, None, f"{where}.vcpu",
                                        f"no vCPU {vcpu} (the VM has {ids})")
            elif k == "save" and section == "save":
                if not isinstance(v, str) or not v.isidentifier():
                    raise ScenarioError(file, None, f"{where}.save", "a name (letters, _)")
                save = v
            elif k in spec:
                args[k] = _parse_arg(spec[k], v, file, f"{where}.{k}", i)
            else:
                known = sorted(spec) + (["vcpu"] if target == _VCPU else []) + (
                    ["save"] if section == "save" else [])
                raise ScenarioError(file, None, f"{where}.{k}",
                                    f"unknown field for {op} (fields: {', '.join(known)})")
        for k in _REQUIRED.get(op, ()):
            if k not in args:
                raise ScenarioError(file, None, f"{where}.{k}", f"missing (required by {op})")
        if section == "save" and save is None:
            raise ScenarioError(file, None, f"{where}.save", "name the saved value (save = ...)")
        out.append(IoctlStep(section, i, op, vcpu, args, save))
    return out


def parse(text: str, file: str = "<restore>") -> RestoreScenario:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(file, None, None, f"not valid TOML: {e}") from None
    for k in doc:
        if k not in ("description", "vm", "workload", "save", "restore", "expect"):
            raise ScenarioError(file, None, k, "unknown top-level key (expected description, "
                                "vm, workload, save, restore, expect)")
    vm = dict(doc.get("vm", {}))
    version = parse_version(vm.pop("kvm_version"), file) if "kvm_version" in vm else (
        MODEL_KVM_VERSION)
    steps, snaps = [], []
    for t in doc.get("workload", []):
        if isinstance(t, dict) and t.get("do") == "snapshot":
            snaps.append(len(steps))
        else:
            steps.append(t)
    sc = parse_doc({"description": doc.get("description", ""), "vm": vm, "step": steps}, file)
    ids = list(sc.vm.ids)
    expect = doc.get("expect")
    if expect not in (None, "same", "lost", "differs"):
        raise ScenarioError(file, None, "expect", "one of \"same\", \"lost\", \"differs\"")
    return RestoreScenario(file, str(doc.get("description", "")), sc, snaps,
                           _parse_ioctls("save", doc.get("save", []), SAVE_OPS, file, ids),
                           _parse_ioctls("restore", doc.get("restore", []), RESTORE_OPS, file,
                                         ids),
                           version, expect)


def load(path: str) -> RestoreScenario:
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        raise ScenarioError(path, None, None, f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ScenarioError(path, None, None, "not a UTF-8 text file") from None
    return parse(text, path)


# ---------------------------------------------------------------- observing a run
