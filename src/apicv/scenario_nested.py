"""The scenario format's nested-VMX part (model only): the calls behind the nested rows of
:data:`apicv.scenario_ops.OP_TABLE`, the field and ``expect`` kinds they use, and how a
nested expectation is checked. The model is :mod:`apicv.nested_guest` and
:mod:`apicv.vmx.nested`; this module only reads TOML into their calls.

Kinds: ``kvm_version`` ("6.9", "6.13", "6.18", "6.19"), ``vmcs12`` (a table of
:meth:`Vmcs12.build` keywords), ``vmcs`` ("vmcs01"/"vmcs02"), and the expect kinds ``level``
("L1"/"L2"), ``nested_exits`` (a list of {reason, qualification?, intr_info?,
idt_vectoring_info?, vector?}) and ``vmcs12_fields`` (a table of vmcs12 fields).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from .errors import ScenarioError
from .nested_guest import NestedVcpu, enable_nested
from .vmx.nested import (
    KVM_6_9,
    KVM_6_13,
    KVM_6_18,
    KVM_6_19,
    NESTED_EXIT_REASONS,
    Vmcs12,
    VmFail,
)

KVM_VERSIONS = {"6.9": KVM_6_9, "6.13": KVM_6_13, "6.18": KVM_6_18, "6.19": KVM_6_19}
LEVELS = ("L1", "L2")
VMCS_NAMES = ("vmcs01", "vmcs02")
# Vmcs12.build's keywords by kind: flags, MSR lists, vectors (or a 256-bit mask), numbers
BUILD_KINDS: dict[str, str] = {
    name: ("bool" if isinstance(p.default, bool) else
           "msrs" if name == "msr_intercepts" else
           "bits256" if name == "eoi_exit_bitmap" else "u64")
    for name, p in inspect.signature(Vmcs12.build).parameters.items() if name != "cls"}
VMCS12_FIELDS = tuple(f.name for f in dataclasses.fields(Vmcs12) if f.name != "msr_intercepts")
EXIT_KEYS = ("reason", "qualification", "intr_info", "idt_vectoring_info", "vector")
NESTED_KINDS = frozenset({"kvm_version", "vmcs12", "vmcs", "level", "nested_exits",
                          "vmcs12_fields"})
DEFAULT_VMCS_GPA = 0x10000


def nested_why() -> str:
    """Why a nested step does not run on the real backend, with what this host offers."""
    try:
        with open("/sys/module/kvm_intel/parameters/nested") as f:
            val = f.read().strip()
    except OSError:
        host = "this host's KVM offers no nested VMX: kvm_intel is not loaded"
    else:
        host = ("this host's kvm_intel has nested VMX, but no L1 runs on it here"
                if val in ("Y", "1") else f"this host's kvm_intel has nested={val}")
    return ("nested VMX runs on the model only: the real backend's guest agent cannot act as "
            f"an L1 hypervisor, and {host}")


# ---------------------------------------------------------------- parsing
def _err(file, step, fld, msg) -> ScenarioError:
    return ScenarioError(file, step, fld, msg)


def parse_nested(kind: str, v: Any, file: str, step: int | None, fld: str) -> Any:
    """A value of one of :data:`NESTED_KINDS` (a :class:`ScenarioError` naming *fld*)."""
    from .scenario import parse_int, parse_vectors

    if kind == "kvm_version":
        key = str(v) if isinstance(v, str | float) else None
        if key not in KVM_VERSIONS:
            raise _err(file, step, fld, f"a KVM version: one of {', '.join(KVM_VERSIONS)} "
                                        f"(as a string), not {v!r}")
        return key
    if kind in ("level", "vmcs"):
        names = LEVELS if kind == "level" else VMCS_NAMES
        if v not in names:
            raise _err(file, step, fld, f"one of {', '.join(map(repr, names))}, not {v!r}")
        return v
    if kind == "vmcs12":
        if not isinstance(v, dict):
            raise _err(file, step, fld, "expected a table of vmcs12 controls (Vmcs12.build "
                                        "keywords)")
        out: dict[str, Any] = {}
        for k, x in v.items():
            sub = f"{fld}.{k}"
            what = BUILD_KINDS.get(k)
            if what is None:
                raise _err(file, step, sub, f"not a vmcs12 control (known: "
                                            f"{', '.join(BUILD_KINDS)})")
            if what == "bool":
                if not isinstance(x, bool):
                    raise _err(file, step, sub, f"expected true or false, got {x!r}")
                out[k] = x
            elif what == "msrs":
                from .scenario_ops import MSR_NAMES

                if not isinstance(x, list):
                    raise _err(file, step, sub, "expected a list of MSRs that exit to L1 "
                                                "([] : none does)")
                out[k] = frozenset(parse_int(m, file, step, sub, MSR_NAMES) for m in x)
            elif what == "bits256" and isinstance(x, list):
                out[k] = parse_vectors(x, file, step, sub)
            else:
                n = parse_int(x, file, step, sub)
                width = 256 if what == "bits256" else 64
                if not 0 <= n < 1 << width:
                    raise _err(file, step, sub, f"{n:#x} does not fit in {width} bits")
                out[k] = n
        return out
    if kind == "vmcs12_fields":
        if not isinstance(v, dict):
            raise _err(file, step, fld, "expected a table of vmcs12 field = value")
        out = {}
        for k, x in v.items():
            if k not in VMCS12_FIELDS:
                raise _err(file, step, f"{fld}.{k}", f"not a vmcs12 field (known: "
                                                     f"{', '.join(VMCS12_FIELDS)})")
            out[k] = parse_int(x, file, step, f"{fld}.{k}")
        return out
    if kind == "nested_exits":
        if not isinstance(v, list):
            raise _err(file, step, fld, "expected a list of exit tables {reason, "
                                        "qualification?, intr_info?, vector?}")
        return [_parse_exit(x, file, step, f"{fld}[{i}]") for i, x in enumerate(v)]
    raise AssertionError(kind)


def _parse_exit(x: Any, file, step, fld) -> dict[str, Any]:
    from .scenario import parse_int

    if not isinstance(x, dict) or "reason" not in x:
        raise _err(file, step, fld, "expected a table with a reason (and qualification, "
                                    "intr_info, idt_vectoring_info, vector)")
    out: dict[str, Any] = {}
    for k, y in x.items():
        sub = f"{fld}.{k}"
        if k not in EXIT_KEYS:
            raise _err(file, step, sub, f"unknown exit field (known: {', '.join(EXIT_KEYS)})")
        if k == "reason":
            if y not in NESTED_EXIT_REASONS:
                raise _err(file, step, sub, f"unknown exit reason {y!r} (known: "
                                            f"{', '.join(NESTED_EXIT_REASONS)})")
            out[k] = y
        else:
            out[k] = parse_int(y, file, step, sub)
    return out


def check_nested_step(op: str, args: dict[str, Any], enabled: set[int], vm_type: str,
                      file: str, i: int) -> None:
    """Before any step runs: a nested step names a vCPU an earlier enable_nested gave VMX;
    a TD vCPU has none. *enabled* collects the vCPUs enable_nested steps name."""
    vid = args["vcpu"]
    if op == "enable_nested":
        if vm_type != "default":
            raise _err(file, i, "do", f"a {vm_type} VM's vCPUs have no VMX")
        enabled.add(vid)
    elif vid not in enabled:
        raise _err(file, i, "vcpu", f"vCPU {vid} has no nested VMX: {op} needs an "
                                    "enable_nested step for it first")


# ---------------------------------------------------------------- checking
class FieldTable(dict):
    """vmcs12's fields as a step's result: printed with the non-zero ones in hex."""

    def __str__(self) -> str:
        return "{" + ", ".join(f"{k}={v:#x}" for k, v in self.items() if v) + "}"


def check_vmfail(e: Exception | None, want: int, got_text: str) -> str | None:
    if not isinstance(e, VmFail) or e.error != want:
        return f"expected VMfail with VM-instruction error {want}, got {got_text}"
    return None


def check_nested(kind: str, value: Any, expect: Any, got_text: str) -> str | None:
    """A failed nested expectation as text, or None."""
    if kind == "vmcs12_fields":
        bad = [f"{k} = {value[k]:#x}, expected {w:#x}" for k, w in expect.items()
               if value[k] != w]
        return "; ".join(bad) or None
    if kind == "nested_exits":
        if len(value) != len(expect):
            return f"{len(value)} nested exits {got_text}, expected {len(expect)}"
        bad = []
        for i, (ex, want) in enumerate(zip(value, expect, strict=True)):
            got = {"reason": ex.reason, "qualification": ex.exit_qualification,
                   "intr_info": ex.intr_info, "idt_vectoring_info": ex.idt_vectoring_info,
                   "vector": ex.vector}
            bad += [f"exit {i}: {k} = {_show(got[k])}, expected {_show(w)}"
                    for k, w in want.items() if got[k] != w]
        return "; ".join(bad) or None
    if value != expect:  # level
        return f"returned {got_text}, expected {expect}"
    return None


def _show(v: Any) -> str:
    return f"{v:#x}" if isinstance(v, int) else str(v)


# ---------------------------------------------------------------- the calls
def _nv(cpu) -> NestedVcpu:
    if not isinstance(cpu, NestedVcpu):
        raise ValueError(f"vCPU {cpu.vcpu_id} has no nested VMX (enable_nested it first)")
    return cpu


def enable(r, cpu, a: dict[str, Any]) -> None:
    enable_nested(cpu, KVM_VERSIONS[a.get("version", "6.18")])


def vmx_instruction(name: str):
    """vmxon, vmxoff, vmlaunch, vmresume: L1 executes it; VMLAUNCH/VMRESUME return the level
    that runs afterwards (a VmFail is the step's error)."""
    def call(r, cpu, a: dict[str, Any]) -> str | None:
        v = _nv(cpu)
        getattr(v, name)()
        return v.level if name in ("vmlaunch", "vmresume") else None
    return call


def vmptrld(r, cpu, a: dict[str, Any]) -> None:
    _nv(cpu).vmptrld(Vmcs12.build(**a.get("controls", {})), a.get("gpa", DEFAULT_VMCS_GPA))


def l2_op(name: str):
    """A guest operation run by L2 (``vcpu.l2``): its result, or where the vCPU rests."""
    def call(r, cpu, a: dict[str, Any]) -> Any:
        l2 = _nv(cpu).l2
        if name in ("mmio_read", "mmio_write"):
            args = ((a["offset"], a["value"]) if name == "mmio_write" else (a["offset"],))
            return getattr(l2, name)(*args, a.get("size", 4))
        if name == "rdmsr":
            return l2.rdmsr(a["index"])
        if name == "wrmsr":
            return l2.wrmsr(a["index"], a["value"])
        if name == "take_interrupts":
            return l2.take_interrupts(a.get("limit"), a.get("eoi", True))
        if name == "run":
            return l2.run()
        getattr(l2, name)(a.get("interrupts", True))  # halt, enter_guest
        return cpu.location
    return call


def nested_exits(r, cpu, a: dict[str, Any]) -> list:
    """The nested VM exits L1 was given since the last nested_exits step."""
    return _nv(cpu).nested.pop_exits()


def level(r, cpu, a: dict[str, Any]) -> str:
    return _nv(cpu).level


def vmcs12_fields(r, cpu, a: dict[str, Any]) -> FieldTable:
    """L1's current vmcs12 (kept by the vCPU's nested state since the VMPTRLD), as L1 would
    VMREAD it."""
    v12 = _nv(cpu).vmcs12
    if v12 is None:
        raise ValueError(f"vCPU {cpu.vcpu_id}: no vmcs12 yet (a vmptrld step loads one)")
    return FieldTable((k, getattr(v12, k)) for k in VMCS12_FIELDS)


def guest_intr_status(r, cpu, a: dict[str, Any]) -> int:
    """GUEST_INTR_STATUS (RVI | SVI << 8) of vmcs01 (L1's) or vmcs02 (L2's, the last one)."""
    v = _nv(cpu)
    if a.get("vmcs", "vmcs01") == "vmcs01":
        return v.guest_intr_status
    if v.nested.vmcs02 is None:
        raise ValueError(f"vCPU {cpu.vcpu_id}: no vmcs02 yet (L1 has not entered L2)")
    return v.nested.vmcs02.guest_intr_status
