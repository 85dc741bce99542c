"""Scenario files: TOML descriptions of a VM and a list of steps, each one call of the public API,
run against any backend (the model or the real KVM).

Format (see README "Scenario format" and examples/)::

    description = "what this checks"

    [vm]                      # keyword arguments of apicv.Vm
    vcpus = 2
    x2apic_api = ["USE_32BIT_IDS"]

    [[step]]
    do = "mmio_write"         # the method to call
    vcpu = 0                  # which vCPU (vcpu_id) for vCPU methods
    offset = "SPIV"           # register names, MSR names and constants are accepted
    value = 0x1ff

    [[step]]
    do = "take_interrupts"
    vcpu = 0
    expect = [0x41]           # optional: the return value must equal this

Optional on any step: ``expect`` (return value; for get_lapic a table of register values),
``expect_fault`` (the guest #GP vector), ``expect_errno`` (an errno name such as "EINVAL"),
``save`` (get_lapic: keep the page under a name for a later set_lapic ``from``), ``note``.
Unknown keys and bad values are errors that name the file, the step and the field.
"""

from __future__ import annotations

import errno as _errno
import struct
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from . import apicdef as A
from . import uapi as U
from .errors import ApicvError, GuestFault, KvmError, ScenarioError
from .regs import BY_NAME, lookup
from .state import LapicState, vectors_of

# ---------------------------------------------------------------- name tables
MSR_NAMES = {
    "IA32_APICBASE": A.MSR_IA32_APICBASE, "APICBASE": A.MSR_IA32_APICBASE,
    "APIC_BASE": A.MSR_IA32_APICBASE,
    "IA32_TSC_DEADLINE": A.MSR_IA32_TSC_DEADLINE, "TSC_DEADLINE": A.MSR_IA32_TSC_DEADLINE,
    "IA32_TSC": A.MSR_IA32_TSC, "TSC": A.MSR_IA32_TSC,
    "KVM_PV_EOI_EN": U.MSR_KVM_PV_EOI_EN, "PV_EOI_EN": U.MSR_KVM_PV_EOI_EN,
}
for _r in BY_NAME.values():
    MSR_NAMES[f"X2APIC_{_r.short.upper()}"] = _r.msr
    MSR_NAMES[f"X2APIC_{_r.name.upper()}"] = _r.msr

MP_STATES = {name: num for num, name in U.MP_STATE_NAMES.items()}
CHIPS = {"PIC_MASTER": U.KVM_IRQCHIP_PIC_MASTER, "PIC_SLAVE": U.KVM_IRQCHIP_PIC_SLAVE,
         "IOAPIC": U.KVM_IRQCHIP_IOAPIC}
# struct kvm_pic_state / struct kvm_ioapic_state field names (lower case in scenarios)
PIC_FIELDS = ("last_irr", "irr", "imr", "isr", "priority_add", "irq_base", "read_reg_select",
              "poll", "special_mask", "init_state", "auto_eoi", "rotate_on_auto_eoi",
              "special_fully_nested_mode", "init4", "elcr", "elcr_mask")
IOAPIC_FIELDS = ("base_address", "ioregsel", "id", "irr", "pad") + tuple(
    f"rte{i}" for i in range(U.KVM_IOAPIC_NUM_PINS))
_IOAPIC_FMT = "<QIIII24Q"


def chip_fields(chip: int) -> tuple[str, ...]:
    return IOAPIC_FIELDS if chip == U.KVM_IRQCHIP_IOAPIC else PIC_FIELDS


def decode_irqchip(chip: int, data: bytes) -> dict[str, int]:
    """KVM_GET_IRQCHIP bytes as a field table (struct kvm_pic_state / kvm_ioapic_state)."""
    if chip == U.KVM_IRQCHIP_IOAPIC:
        vals = struct.unpack_from(_IOAPIC_FMT, data)
    else:
        vals = tuple(data[:U.KVM_PIC_STATE_SIZE])
    return dict(zip(chip_fields(chip), vals, strict=True))


def encode_irqchip(chip: int, fields: dict[str, int]) -> bytes:
    vals = [fields[f] for f in chip_fields(chip)]
    if chip == U.KVM_IRQCHIP_IOAPIC:
        return struct.pack(_IOAPIC_FMT, *vals)
    return bytes(vals)
X2APIC_API_FLAGS = {
    "USE_32BIT_IDS": U.KVM_X2APIC_API_USE_32BIT_IDS,
    "DISABLE_BROADCAST_QUIRK": U.KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK,
    "ENABLE_SUPPRESS_EOI_BROADCAST": U.KVM_X2APIC_ENABLE_SUPPRESS_EOI_BROADCAST,
    "DISABLE_SUPPRESS_EOI_BROADCAST": U.KVM_X2APIC_DISABLE_SUPPRESS_EOI_BROADCAST,
}
CAPS = {n[len("KVM_CAP_"):]: v for n, v in vars(U).items() if n.startswith("KVM_CAP_")}
QUIRKS = {n[len("KVM_X86_QUIRK_"):]: v for n, v in vars(U).items()
          if n.startswith("KVM_X86_QUIRK_")}

VM_OPTIONS = {
    "vcpus": int, "x2apic_api": "x2apic_api", "vcpu_ids": list, "bsp_vcpu_id": int,
    "apic_bus_cycle_ns": int, "disabled_quirks": "quirks", "x2apic_cpuid": bool,
    "tsc_deadline_cpuid": bool, "maxphyaddr": int, "mcg_cap": int, "tsc_khz": int,
    "enable_apicv": bool, "flexpriority": bool, "vector_hashing": bool,
    "min_timer_period_us": int,
    "lapic_timer_advance": bool, "irqchip": ("kernel", "split"), "vm_type": ("default", "tdx"),
}

# op -> {field: (kind, required)}; kinds: int, bool, reg (register offset), msr, mp_state,
# vectors, regs (register table), str, ns
_V = ("vcpu", True)
OPS: dict[str, dict[str, tuple[str, bool]]] = {
    "mmio_read": {"vcpu": ("vcpu", True), "offset": ("reg", True), "size": ("int", False)},
    "mmio_write": {"vcpu": ("vcpu", True), "offset": ("reg", True), "value": ("int", True),
                   "size": ("int", False)},
    "rdmsr": {"vcpu": ("vcpu", True), "index": ("msr", True)},
    "wrmsr": {"vcpu": ("vcpu", True), "index": ("msr", True), "value": ("int", True)},
    "write_cr8": {"vcpu": ("vcpu", True), "value": ("int", True)},
    "read_cr8": {"vcpu": ("vcpu", True)},
    "take_interrupts": {"vcpu": ("vcpu", True), "limit": ("int", False), "eoi": ("bool", False)},
    "get_lapic": {"vcpu": ("vcpu", True), "save": ("str", False)},
    "set_lapic": {"vcpu": ("vcpu", True), "from": ("str", False), "file": ("str", False),
                  "patch": ("regs", False)},
    "get_msr": {"vcpu": ("vcpu", True), "index": ("msr", True)},
    "set_msr": {"vcpu": ("vcpu", True), "index": ("msr", True), "value": ("int", True)},
    "get_mp_state": {"vcpu": ("vcpu", True)},
    "set_mp_state": {"vcpu": ("vcpu", True), "state": ("mp_state", True)},
    "nmi": {"vcpu": ("vcpu", True)},
    "setup_mce": {"vcpu": ("vcpu", True), "mcg_cap": ("int", True)},
    "signal_msi": {"address_lo": ("int", True), "address_hi": ("int", False),
                   "data": ("int", True), "flags": ("int", False)},
    "advance": {"ns": ("int", True)},
    "enable_cap": {"cap": ("cap", True), "args": ("ints", False)},
    "set_or_clear_apicv_inhibit": {"reason": ("str", True), "set": ("bool", True)},
    # where a vCPU rests between steps (model only): each returns the vCPU's location
    "enter_guest": {"vcpu": ("vcpu", True), "interrupts": ("bool", False)},
    "halt": {"vcpu": ("vcpu", True), "interrupts": ("bool", False)},
    "leave_guest": {"vcpu": ("vcpu", True)},
    "location": {"vcpu": ("vcpu", True)},
    "run": {"vcpu": ("vcpu", True)},
    # the rest of the irqchip: IOAPIC and PIC (KVM_IRQ_LINE_STATUS, KVM_GET/SET_IRQCHIP, guest
    # MMIO and port I/O), guest memory, VAPIC
    "irq_line": {"irq": ("int", True), "level": ("int", True)},
    "get_irqchip": {"chip": ("chip", True)},
    "set_irqchip": {"chip": ("chip", True), "patch": ("chipfields", True)},
    "ioapic_read": {"vcpu": ("vcpu", True), "offset": ("int", True), "size": ("int", False)},
    "ioapic_write": {"vcpu": ("vcpu", True), "offset": ("int", True), "value": ("int", True),
                     "size": ("int", False)},
    "inb": {"vcpu": ("vcpu", True), "port": ("int", True)},
    "outb": {"vcpu": ("vcpu", True), "port": ("int", True), "value": ("int", True)},
    "guest_load": {"vcpu": ("vcpu", True), "gpa": ("int", True), "size": ("int", False)},
    "guest_store": {"vcpu": ("vcpu", True), "gpa": ("int", True), "value": ("int", True),
                    "size": ("int", False)},
    "read_guest": {"gpa": ("int", True), "size": ("int", False)},
    "write_guest": {"gpa": ("int", True), "value": ("int", True), "size": ("int", False)},
    "set_vapic_addr": {"vcpu": ("vcpu", True), "gpa": ("int", True)},
}
# steps the real-KVM backend cannot take (it never leaves a vCPU resting in KVM_RUN)
MODEL_ONLY_OPS = frozenset({"enter_guest", "halt", "leave_guest", "location"})
LOCATIONS = ("host", "guest", "halted")
COMMON = {"do", "expect", "expect_fault", "expect_errno", "note"}
VCPU_OPS = {op for op, f in OPS.items() if "vcpu" in f}


@dataclass
class Step:
    index: int  # 1-based
    op: str
    args: dict[str, Any]
    expect: Any = None
    has_expect: bool = False
    expect_fault: int | None = None
    expect_errno: int | None = None
    save: str | None = None
    note: str = ""

    def describe(self) -> str:
        parts = []
        for k, v in self.args.items():
            if k == "patch":
                parts.append("patch={" + ", ".join(f"{a}=..." for a in v) + "}")
            elif isinstance(v, int) and not isinstance(v, bool) and k not in ("vcpu", "size",
                                                                              "limit"):
                parts.append(f"{k}={v:#x}")
            else:
                parts.append(f"{k}={v}")
        return f"{self.op}(" + ", ".join(parts) + ")"


@dataclass
class Scenario:
    file: str
    description: str
    vm: dict[str, Any]
    steps: list[Step] = field(default_factory=list)

    def make_vm(self, backend: str = "model", **extra):
        from .vm import Vm

        opts = dict(self.vm)
        nr = opts.pop("vcpus", 1)
        opts.update(extra)
        return Vm(nr, backend=backend, **opts)


# ---------------------------------------------------------------- parsing
def _err(file, step, fld, msg):
    return ScenarioError(file, step, fld, msg)


def parse_int(v: Any, file: str, step: int | None, fld: str, names: dict | None = None) -> int:
    if isinstance(v, bool):
        raise _err(file, step, fld, f"expected an integer, got {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        key = v.strip()
        if names is not None and key.upper() in names:
            return names[key.upper()]
        try:
            return int(key, 0)
        except ValueError:
            pass
    known = f" (known names: {', '.join(sorted(names)[:12])}...)" if names else ""
    raise _err(file, step, fld, f"expected an integer{' or a name' if names else ''}, "
                                f"got {v!r}{known}")


def _parse_reg(v: Any, file, step, fld) -> int:
    if isinstance(v, str):
        try:
            return lookup(v).offset
        except KeyError:
            pass
    off = parse_int(v, file, step, fld)
    if not 0 <= off <= 0xFFF:
        raise _err(file, step, fld, f"offset {off:#x} outside the 4 KiB APIC page")
    return off


def _parse_value(kind: str, v: Any, file: str, step: int | None, fld: str) -> Any:
    if kind == "int":
        return parse_int(v, file, step, fld)
    if kind == "vcpu":
        n = parse_int(v, file, step, fld)
        if n < 0:
            raise _err(file, step, fld, "vCPU ids are >= 0")
        return n
    if kind == "bool":
        if not isinstance(v, bool):
            raise _err(file, step, fld, f"expected true or false, got {v!r}")
        return v
    if kind == "str":
        if not isinstance(v, str):
            raise _err(file, step, fld, f"expected a string, got {v!r}")
        return v
    if kind == "reg":
        return _parse_reg(v, file, step, fld)
    if kind == "msr":
        return parse_int(v, file, step, fld, MSR_NAMES)
    if kind == "mp_state":
        return parse_int(v, file, step, fld, MP_STATES)
    if kind == "cap":
        return parse_int(v, file, step, fld, CAPS)
    if kind == "ints":
        if not isinstance(v, list):
            raise _err(file, step, fld, "expected a list of integers")
        return [parse_int(x, file, step, fld) for x in v]
    if kind == "regs":
        return parse_regs(v, file, step, fld)
    if kind == "chip":
        return parse_int(v, file, step, fld, CHIPS)
    if kind == "chipfields":
        if not isinstance(v, dict):
            raise _err(file, step, fld, "expected a table of field = value")
        return {k.lower(): parse_int(x, file, step, f"{fld}.{k}") for k, x in v.items()}
    raise AssertionError(kind)


def parse_vectors(v: Any, file, step, fld) -> int:
    if not isinstance(v, list):
        raise _err(file, step, fld, "expected a list of vectors")
    bits = 0
    for x in v:
        n = parse_int(x, file, step, fld)
        if not 0 <= n <= 255:
            raise _err(file, step, fld, f"vector {n} out of range 0-255")
        bits |= 1 << n
    return bits


def parse_regs(v: Any, file, step, fld) -> dict[str, int]:
    """A table of register name -> value (IRR/ISR/TMR take vector lists)."""
    if not isinstance(v, dict):
        raise _err(file, step, fld, "expected a table of register = value")
    out: dict[str, int] = {}
    for k, val in v.items():
        sub = f"{fld}.{k}"
        name = k.upper()
        if name in ("IRR", "ISR", "TMR"):
            out[name] = parse_vectors(val, file, step, sub)
            continue
        try:
            lookup(k)
        except KeyError:
            raise _err(file, step, sub, f"unknown register {k!r}") from None
        out[k] = parse_int(val, file, step, sub)
    return out


def _parse_vm(t: Any, file: str) -> dict[str, Any]:
    if t is None:
        return {}
    if not isinstance(t, dict):
        raise _err(file, None, "vm", "expected a table")
    out: dict[str, Any] = {}
    for k, v in t.items():
        kind = VM_OPTIONS.get(k)
        if kind is None:
            raise _err(file, None, f"vm.{k}", f"unknown VM option (known: {', '.join(VM_OPTIONS)})")
        if kind == "x2apic_api":
            if isinstance(v, list):
                flags = 0
                for name in v:
                    flags |= parse_int(name, file, None, "vm.x2apic_api", X2APIC_API_FLAGS)
                v = flags
            else:
                v = parse_int(v, file, None, "vm.x2apic_api", X2APIC_API_FLAGS)
        elif kind == "quirks":
            if isinstance(v, list):
                q = 0
                for name in v:
                    q |= parse_int(name, file, None, f"vm.{k}", QUIRKS)
                v = q
            else:
                v = parse_int(v, file, None, f"vm.{k}", QUIRKS)
        elif kind is int:
            v = parse_int(v, file, None, f"vm.{k}")
        elif kind is bool:
            if not isinstance(v, bool):
                raise _err(file, None, f"vm.{k}", "expected true or false")
        elif kind is list:
            if not isinstance(v, list):
                raise _err(file, None, f"vm.{k}", "expected a list")
            v = [parse_int(x, file, None, f"vm.{k}") for x in v]
        elif isinstance(kind, tuple) and v not in kind:
            raise _err(file, None, f"vm.{k}", f"one of {', '.join(map(repr, kind))}")
        out[k] = v
    if out.get("vcpus", 1) < 0 or out.get("vcpus", 1) > 1024:
        raise _err(file, None, "vm.vcpus", "between 0 and 1024")
    return out


def parse(text: str, file: str = "<scenario>") -> Scenario:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _err(file, None, None, f"not valid TOML: {e}") from None
    return parse_doc(doc, file)


def parse_doc(doc: dict[str, Any], file: str = "<scenario>") -> Scenario:
    """Validate a scenario given as the table TOML would produce."""
    for k in doc:
        if k not in ("description", "vm", "step"):
            raise _err(file, None, k, "unknown top-level key (expected description, vm, step)")
    sc = Scenario(file, str(doc.get("description", "")), _parse_vm(doc.get("vm"), file))
    steps = doc.get("step", [])
    if not isinstance(steps, list):
        raise _err(file, None, "step", "use [[step]] tables")
    nr = sc.vm.get("vcpus", 1)
    ids = sc.vm.get("vcpu_ids", list(range(nr)))
    for i, t in enumerate(steps, 1):
        if not isinstance(t, dict):
            raise _err(file, i, None, "a step must be a table")
        op = t.get("do")
        if op is None:
            raise _err(file, i, "do", "missing (which method to call)")
        if op not in OPS:
            raise _err(file, i, "do", f"unknown operation {op!r} (known: {', '.join(OPS)})")
        spec = OPS[op]
        args: dict[str, Any] = {}
        st = Step(i, op, args)
        for k, v in t.items():
            if k in COMMON:
                continue
            if k == "save" and op == "get_lapic":
                st.save = _parse_value("str", v, file, i, k)
                continue
            if k not in spec:
                raise _err(file, i, k, f"unknown field for {op} (fields: "
                                       f"{', '.join(list(spec) + sorted(COMMON))})")
            args[k] = _parse_value(spec[k][0], v, file, i, k)
        for k, (_, required) in spec.items():
            if required and k not in args:
                raise _err(file, i, k, f"missing (required by {op})")
        if "vcpu" in args and args["vcpu"] not in ids:
            raise _err(file, i, "vcpu", f"no vCPU {args['vcpu']} (the VM has {ids})")
        if op == "set_irqchip":
            _check_chip_fields(args["chip"], args["patch"], file, i, "patch")
        if op == "set_lapic" and ("from" in args) == ("file" in args):
            raise _err(file, i, "from", "set_lapic needs exactly one of 'from' or 'file'")
        if "expect" in t:
            st.has_expect = True
            st.expect = _parse_expect(op, t["expect"], file, i)
            if op == "get_irqchip":
                _check_chip_fields(args["chip"], st.expect, file, i, "expect")
        if "expect_fault" in t:
            st.expect_fault = parse_int(t["expect_fault"], file, i, "expect_fault")
        if "expect_errno" in t:
            st.expect_errno = parse_int(t["expect_errno"], file, i, "expect_errno",
                                        {n: v for v, n in _errno.errorcode.items()})
        st.note = str(t.get("note", ""))
        sc.steps.append(st)
    return sc


def _check_chip_fields(chip: int, table: dict[str, int], file, i, fld) -> None:
    names = chip_fields(chip)
    for k, val in table.items():
        if k not in names:
            raise _err(file, i, f"{fld}.{k}", f"unknown field (known: {', '.join(names[:6])}"
                                              f"{', rte0..rte23' if len(names) > 16 else ''}"
                                              f"{', ...' if len(names) <= 16 else ''})")
        width = 64 if k.startswith("rte") or k == "base_address" else (
            32 if chip == U.KVM_IRQCHIP_IOAPIC else 8)
        if not 0 <= val < 1 << width:
            raise _err(file, i, f"{fld}.{k}", f"{val:#x} does not fit in {width} bits")


def _parse_expect(op: str, v: Any, file: str, i: int) -> Any:
    if op == "get_lapic":
        return parse_regs(v, file, i, "expect")
    if op == "get_irqchip":
        return _parse_value("chipfields", v, file, i, "expect")
    if op in ("take_interrupts",):
        if not isinstance(v, list):
            raise _err(file, i, "expect", "expected a list of vectors")
        return [parse_int(x, file, i, "expect") for x in v]
    if op == "get_mp_state":
        return parse_int(v, file, i, "expect", MP_STATES)
    if op in ("enter_guest", "halt", "leave_guest", "location"):
        if v not in LOCATIONS:
            raise _err(file, i, "expect", f"one of {', '.join(map(repr, LOCATIONS))}")
        return v
    if op == "run":
        if not isinstance(v, list):
            raise _err(file, i, "expect", "expected a list of vectors")
        return [parse_int(x, file, i, "expect") for x in v]
    if op == "set_msr":
        if not isinstance(v, bool):
            raise _err(file, i, "expect", "expected true or false")
        return v
    return parse_int(v, file, i, "expect")


def load(path: str) -> Scenario:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ScenarioError(path, None, None, f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ScenarioError(path, None, None, "not a UTF-8 text file") from None
    return parse(text, path)


# ---------------------------------------------------------------- running
@dataclass
class Outcome:
    """What one step did: its return value or the error it raised, and a failed expectation."""

    step: Step
    value: Any = None
    error: ApicvError | None = None
    failure: str | None = None
    skipped: str | None = None  # not run on this backend (and the run stops here)

    def result_text(self) -> str:
        if self.skipped is not None:
            return "not run"
        if self.error is not None:
            if isinstance(self.error, GuestFault):
                return f"guest fault vector {self.error.vector}"
            if isinstance(self.error, KvmError):
                return f"{self.error.ioctl} -> {self.error.errno_name}"
            return f"{type(self.error).__name__}: {self.error}"
        v = self.value
        if self.step.op == "get_lapic":
            return "1024-byte state"
        if isinstance(v, bytes):
            return f"{len(v)}-byte state {v.hex()}"
        if self.step.op == "get_mp_state" and isinstance(v, int):
            return U.MP_STATE_NAMES.get(v, str(v))
        if isinstance(v, list):
            return "[" + ", ".join(f"{x:#x}" for x in v) + "]"
        if isinstance(v, bool) or v is None:
            return str(v)
        if isinstance(v, int):
            return f"{v:#x}"
        return str(v)


def _patched(base: bytes, patch: dict[str, int]) -> bytes:
    s = LapicState(base)
    for k, v in patch.items():
        if k in ("IRR", "ISR", "TMR"):
            s.set_vectors(k, v)
        else:
            s[k] = v
    return bytes(s)


def check_state_expect(page: bytes, expect: dict[str, int]) -> str | None:
    s = LapicState(page)
    bad = []
    for k, want in expect.items():
        if k in ("IRR", "ISR", "TMR"):
            got = s.get_vectors(k)
            if got != want:
                bad.append(f"{k} = {[hex(x) for x in vectors_of(got)]}, expected "
                           f"{[hex(x) for x in vectors_of(want)]}")
        elif s[k] != want:
            bad.append(f"{k} = {s[k]:#x}, expected {want:#x}")
    return "; ".join(bad) or None


class Runner:
    """Runs a scenario's steps one at a time on one VM (any backend)."""

    def __init__(self, scenario: Scenario, vm) -> None:
        self.sc = scenario
        self.vm = vm
        self.saved: dict[str, bytes] = {}

    def call(self, st: Step) -> Any:
        vm = self.vm
        a = st.args
        cpu = vm.vcpu(a["vcpu"]) if "vcpu" in a else None
        op = st.op
        if op == "mmio_read":
            return cpu.mmio_read(a["offset"], a.get("size", 4))
        if op == "mmio_write":
            return cpu.mmio_write(a["offset"], a["value"], a.get("size", 4))
        if op == "rdmsr":
            return cpu.rdmsr(a["index"])
        if op == "wrmsr":
            return cpu.wrmsr(a["index"], a["value"])
        if op == "write_cr8":
            return cpu.write_cr8(a["value"])
        if op == "read_cr8":
            return cpu.read_cr8()
        if op == "take_interrupts":
            return cpu.take_interrupts(a.get("limit"), a.get("eoi", True))
        if op == "get_lapic":
            page = cpu.get_lapic()
            if st.save:
                self.saved[st.save] = page
            return page
        if op == "set_lapic":
            return cpu.set_lapic(self.lapic_page(st))
        if op == "get_msr":
            return cpu.get_msr(a["index"])
        if op == "set_msr":
            return cpu.set_msr(a["index"], a["value"])
        if op == "get_mp_state":
            return cpu.get_mp_state()
        if op == "set_mp_state":
            return cpu.set_mp_state(a["state"])
        if op == "nmi":
            return cpu.nmi()
        if op == "setup_mce":
            return cpu.setup_mce(a["mcg_cap"])
        if op == "signal_msi":
            return vm.signal_msi(a["address_lo"], a.get("address_hi", 0), a["data"],
                                 a.get("flags", 0))
        if op == "advance":
            vm.clock.advance(a["ns"])
            return None
        if op == "enable_cap":
            return vm.enable_cap(a["cap"], *a.get("args", []))
        if op == "set_or_clear_apicv_inhibit":
            return vm.set_or_clear_apicv_inhibit(a["reason"], a["set"])
        if op == "enter_guest":
            cpu.enter_guest(a.get("interrupts", True))
            return cpu.location
        if op == "halt":
            cpu.halt(a.get("interrupts", True))
            return cpu.location
        if op == "leave_guest":
            cpu.leave_guest()
            return cpu.location
        if op == "location":
            return cpu.location
        if op == "run":
            return cpu.run()
        if op == "irq_line":
            return vm.irq_line(a["irq"], a["level"])
        if op == "get_irqchip":
            return vm.get_irqchip(a["chip"])
        if op == "set_irqchip":
            fields = decode_irqchip(a["chip"], vm.get_irqchip(a["chip"]))
            fields.update(a["patch"])
            return vm.set_irqchip(a["chip"], encode_irqchip(a["chip"], fields))
        if op == "ioapic_read":
            return cpu.ioapic_read(a["offset"], a.get("size", 4))
        if op == "ioapic_write":
            return cpu.ioapic_write(a["offset"], a["value"], a.get("size", 4))
        if op == "inb":
            return cpu.inb(a["port"])
        if op == "outb":
            return cpu.outb(a["port"], a["value"])
        if op == "guest_load":
            return cpu.guest_load(a["gpa"], a.get("size", 4))
        if op == "guest_store":
            return cpu.guest_store(a["gpa"], a["value"], a.get("size", 4))
        if op == "read_guest":
            return int.from_bytes(vm.read_guest(a["gpa"], a.get("size", 4)), "little")
        if op == "write_guest":
            size = a.get("size", 4)
            if not 0 <= a["value"] < 1 << (8 * size):
                raise ValueError(f"value {a['value']:#x} does not fit in {size} bytes")
            return vm.write_guest(a["gpa"], a["value"].to_bytes(size, "little"))
        if op == "set_vapic_addr":
            return cpu.set_vapic_addr(a["gpa"])
        raise AssertionError(op)

    def lapic_page(self, st: Step) -> bytes:
        """The page a set_lapic step loads: a saved or file state with its patch applied."""
        a = st.args
        if "from" in a:
            if a["from"] not in self.saved:
                raise ScenarioError(self.sc.file, st.index, "from",
                                    f"no state saved as {a['from']!r} by an earlier step")
            base = self.saved[a["from"]]
        else:
            base = bytes(LapicState.load(_relative(self.sc.file, a["file"])))
        return _patched(base, a.get("patch", {}))

    def step(self, st: Step) -> Outcome:
        out = Outcome(st)
        try:
            out.value = self.call(st)
        except ScenarioError:
            raise
        except ApicvError as e:
            out.error = e
        except ValueError as e:
            raise ScenarioError(self.sc.file, st.index, None, str(e)) from None
        out.failure = self.check(st, out)
        return out

    @staticmethod
    def check(st: Step, out: Outcome) -> str | None:
        e = out.error
        if st.expect_fault is not None:
            if not isinstance(e, GuestFault) or e.vector != st.expect_fault:
                return f"expected guest fault {st.expect_fault}, got {out.result_text()}"
            return None
        if st.expect_errno is not None:
            if not isinstance(e, KvmError) or e.errno != st.expect_errno:
                return (f"expected errno {_errno.errorcode.get(st.expect_errno)}, "
                        f"got {out.result_text()}")
            return None
        if e is not None:
            return f"unexpected error: {out.result_text()}"
        if st.has_expect:
            if st.op == "get_lapic":
                return check_state_expect(out.value, st.expect)
            if st.op == "get_irqchip":
                got = decode_irqchip(st.args["chip"], out.value)
                bad = [f"{k} = {got[k]:#x}, expected {w:#x}" for k, w in st.expect.items()
                       if got[k] != w]
                return "; ".join(bad) or None
            if out.value != st.expect:
                return f"returned {out.result_text()}, expected {_fmt(st.expect)}"
        return None

    def run(self) -> Iterator[Outcome]:
        """Every step's outcome; on a backend that cannot take a model-only step (a vCPU
        resting in guest mode or HLT), that step is reported as skipped and the run ends."""
        model = getattr(self.vm, "backend", "model") == "model"
        for st in self.sc.steps:
            if not model and st.op in MODEL_ONLY_OPS:
                yield Outcome(st, skipped=f"{st.op} is model-only: the {self.vm.backend} "
                                          "backend never leaves a vCPU resting in KVM_RUN; "
                                          "the run stops here")
                return
            yield self.step(st)


def _fmt(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(f"{x:#x}" for x in v) + "]"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:#x}"
    return str(v)


def _relative(base_file: str, path: str) -> str:
    import os

    if os.path.isabs(path):
        return path
    return os.path.join(os.path.dirname(os.path.abspath(base_file)), path)
