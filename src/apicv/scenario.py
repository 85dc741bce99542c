"""Scenario files: TOML descriptions of a VM and a list of steps, each one call of the public API,
run against any backend (the model or the real KVM).

Format (see README "Scenario format" and examples/)::

    description = "what this checks"

    [vm]                      # apicv.VmConfig fields ("vcpus" is nr_vcpus)
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
Unknown keys and bad values are errors that name the file, the step and the field; the
whole file is checked (values, ranges, state files) before any step runs.

Why this module is long: the name tables, the operation table and the parser that checks every
field against it, and the runner that calls the table, are one format's definition; the
table keeps each operation's facts on one line, the rest is what reading TOML safely costs.
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import os
import struct
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from . import apicdef as A
from . import uapi as U
from .api import IrqchipRoute, MsiRoute, VmConfig, default_routing
from .errors import ApicvError, GuestFault, KvmError, ScenarioError, StateError
from .kvm_host import ApicvInhibit
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

# the [vm] table: VmConfig's fields, with "vcpus" for nr_vcpus
VM_OPTIONS: dict[str, str] = {
    ("vcpus" if f.name == "nr_vcpus" else f.name): f.metadata["kind"]
    for f in dataclasses.fields(VmConfig) if f.name != "trace"}

# ---------------------------------------------------------------- the operation table
# One row per operation a step can take: its fields ({name: (kind, required)}), what it runs on
# (a vCPU or the VM), how its ``expect`` is read, and the call itself. Kinds: int, u8, u32, u64,
# size (1/2/4/8), vcpu, bool, str, reg (register offset), msr, mp_state, cap, ints, regs
# (register table), chip, chipfields, inhibit, ns.
_V = ("vcpu", True)


@dataclass(frozen=True)
class Op:
    name: str
    fields: dict[str, tuple[str, bool]]
    call: Callable[[Runner, Any, dict[str, Any]], Any]
    target: str = "vcpu"  # "vcpu": the step names one; "vm": the VM itself
    expect: str = "int"  # int, vectors, regs, chipfields, mp_state, location, bool
    guest: bool = False  # a guest operation: one KVM_RUN
    model_only: bool = False  # a vCPU left resting in KVM_RUN (the real backend has none)
    doc: str = ""


def _set_irqchip(r: Runner, vm, a: dict[str, Any]) -> None:
    fields = decode_irqchip(a["chip"], vm.get_irqchip(a["chip"]))
    fields.update(a["patch"])
    return vm.set_irqchip(a["chip"], encode_irqchip(a["chip"], fields))


def _get_lapic(r: Runner, cpu, a: dict[str, Any]) -> bytes:
    page = cpu.get_lapic()
    if a.get("save"):
        r.saved[a["save"]] = page
    return page


def _advance(r: Runner, vm, a: dict[str, Any]) -> None:
    vm.clock.advance(a["ns"])


def _set_gsi_routing(r: Runner, vm, a: dict[str, Any]) -> None:
    routes = (default_routing() if a.get("default", False) else ()) + tuple(a.get("routes", ()))
    return vm.set_gsi_routing(routes)


def _irqfd(r: Runner, vm, a: dict[str, Any]) -> None:
    resample = a.get("resample")
    return vm.irqfd(r.eventfd(a["eventfd"]), a["gsi"],
                    resamplefd=None if resample is None else r.eventfd(resample),
                    deassign=a.get("deassign", False))


def _eventfd_write(r: Runner, vm, a: dict[str, Any]) -> None:
    """The device signals its eventfd; then the backend lets the irqfd deliver it."""
    os.eventfd_write(r.eventfd(a["eventfd"]), a.get("value", 1))
    vm.poll_irqfds()


def _eventfd_read(r: Runner, vm, a: dict[str, Any]) -> int:
    """The VMM reads an eventfd (a resamplefd): its count, 0 if it was not signalled."""
    vm.poll_irqfds()
    try:
        return os.eventfd_read(r.eventfd(a["eventfd"]))
    except BlockingIOError:
        return 0


def _location(method: str) -> Callable[[Runner, Any, dict[str, Any]], str]:
    def call(r: Runner, cpu, a: dict[str, Any]) -> str:
        if method == "enter_guest" or method == "halt":
            getattr(cpu, method)(a.get("interrupts", True))
        elif method == "leave_guest":
            cpu.leave_guest()
        return cpu.location
    return call


_SIZE = ("size", False)
OP_TABLE: tuple[Op, ...] = (
    # the guest: one KVM_RUN each
    Op("mmio_read", {"vcpu": _V, "offset": ("reg", True), "size": _SIZE},
       lambda r, c, a: c.mmio_read(a["offset"], a.get("size", 4)), guest=True),
    Op("mmio_write", {"vcpu": _V, "offset": ("reg", True), "value": ("u64", True), "size": _SIZE},
       lambda r, c, a: c.mmio_write(a["offset"], a["value"], a.get("size", 4)), guest=True),
    Op("rdmsr", {"vcpu": _V, "index": ("msr", True)},
       lambda r, c, a: c.rdmsr(a["index"]), guest=True),
    Op("wrmsr", {"vcpu": _V, "index": ("msr", True), "value": ("u64", True)},
       lambda r, c, a: c.wrmsr(a["index"], a["value"]), guest=True),
    Op("write_cr8", {"vcpu": _V, "value": ("u64", True)},
       lambda r, c, a: c.write_cr8(a["value"]), guest=True),
    Op("read_cr8", {"vcpu": _V}, lambda r, c, a: c.read_cr8(), guest=True),
    Op("take_interrupts", {"vcpu": _V, "limit": ("u32", False), "eoi": ("bool", False)},
       lambda r, c, a: c.take_interrupts(a.get("limit"), a.get("eoi", True)),
       expect="vectors", guest=True),
    Op("run", {"vcpu": _V}, lambda r, c, a: c.run(), expect="vectors", guest=True),
    Op("ioapic_read", {"vcpu": _V, "offset": ("u32", True), "size": _SIZE},
       lambda r, c, a: c.ioapic_read(a["offset"], a.get("size", 4)), guest=True),
    Op("ioapic_write", {"vcpu": _V, "offset": ("u32", True), "value": ("u64", True),
                        "size": _SIZE},
       lambda r, c, a: c.ioapic_write(a["offset"], a["value"], a.get("size", 4)), guest=True),
    Op("inb", {"vcpu": _V, "port": ("u32", True)}, lambda r, c, a: c.inb(a["port"]), guest=True),
    Op("outb", {"vcpu": _V, "port": ("u32", True), "value": ("u8", True)},
       lambda r, c, a: c.outb(a["port"], a["value"]), guest=True),
    Op("guest_load", {"vcpu": _V, "gpa": ("u64", True), "size": _SIZE},
       lambda r, c, a: c.guest_load(a["gpa"], a.get("size", 4)), guest=True),
    Op("guest_store", {"vcpu": _V, "gpa": ("u64", True), "value": ("u64", True), "size": _SIZE},
       lambda r, c, a: c.guest_store(a["gpa"], a["value"], a.get("size", 4)), guest=True),
    # vCPU ioctls
    Op("get_lapic", {"vcpu": _V, "save": ("str", False)}, _get_lapic, expect="regs"),
    Op("set_lapic", {"vcpu": _V, "from": ("str", False), "file": ("str", False),
                     "patch": ("regs", False)},
       lambda r, c, a: c.set_lapic(r.lapic_page(a))),
    Op("get_msr", {"vcpu": _V, "index": ("msr", True)}, lambda r, c, a: c.get_msr(a["index"])),
    Op("set_msr", {"vcpu": _V, "index": ("msr", True), "value": ("u64", True)},
       lambda r, c, a: c.set_msr(a["index"], a["value"]), expect="bool"),
    Op("get_mp_state", {"vcpu": _V}, lambda r, c, a: c.get_mp_state(), expect="mp_state"),
    Op("set_mp_state", {"vcpu": _V, "state": ("mp_state", True)},
       lambda r, c, a: c.set_mp_state(a["state"])),
    Op("nmi", {"vcpu": _V}, lambda r, c, a: c.nmi()),
    Op("setup_mce", {"vcpu": _V, "mcg_cap": ("u64", True)},
       lambda r, c, a: c.setup_mce(a["mcg_cap"])),
    Op("set_vapic_addr", {"vcpu": _V, "gpa": ("u64", True)},
       lambda r, c, a: c.set_vapic_addr(a["gpa"])),
    # VM ioctls and the VMM
    Op("signal_msi", {"address_lo": ("u32", True), "address_hi": ("u32", False),
                      "data": ("u32", True), "flags": ("u32", False)},
       lambda r, vm, a: vm.signal_msi(a["address_lo"], a.get("address_hi", 0), a["data"],
                                      a.get("flags", 0)), target="vm"),
    Op("advance", {"ns": ("ns", True)}, _advance, target="vm"),
    Op("enable_cap", {"cap": ("cap", True), "args": ("ints", False)},
       lambda r, vm, a: vm.enable_cap(a["cap"], *a.get("args", [])), target="vm"),
    Op("set_or_clear_apicv_inhibit", {"reason": ("inhibit", True), "set": ("bool", True)},
       lambda r, vm, a: vm.set_or_clear_apicv_inhibit(a["reason"], a["set"]), target="vm"),
    Op("irq_line", {"irq": ("u32", True), "level": ("u32", True)},
       lambda r, vm, a: vm.irq_line(a["irq"], a["level"]), target="vm"),
    Op("get_irqchip", {"chip": ("chip", True)}, lambda r, vm, a: vm.get_irqchip(a["chip"]),
       target="vm", expect="chipfields"),
    Op("set_irqchip", {"chip": ("chip", True), "patch": ("chipfields", True)}, _set_irqchip,
       target="vm"),
    # GSI routing and irqfds (KVM_SET_GSI_ROUTING, KVM_IRQFD); eventfds are named in the
    # scenario and created on first use
    Op("set_gsi_routing", {"routes": ("routes", False), "default": ("bool", False)},
       _set_gsi_routing, target="vm"),
    Op("irqfd", {"eventfd": ("name", True), "gsi": ("u32", True), "resample": ("name", False),
                 "deassign": ("bool", False)}, _irqfd, target="vm"),
    Op("eventfd_write", {"eventfd": ("name", True), "value": ("u64", False)}, _eventfd_write,
       target="vm"),
    Op("eventfd_read", {"eventfd": ("name", True)}, _eventfd_read, target="vm"),
    Op("poll_irqfds", {}, lambda r, vm, a: vm.poll_irqfds(), target="vm"),
    Op("pop_exits", {"vcpu": _V}, lambda r, c, a: c.pop_exits(), expect="exits"),
    Op("read_guest", {"gpa": ("u64", True), "size": _SIZE},
       lambda r, vm, a: int.from_bytes(vm.read_guest(a["gpa"], a.get("size", 4)), "little"),
       target="vm"),
    Op("write_guest", {"gpa": ("u64", True), "value": ("u64", True), "size": _SIZE},
       lambda r, vm, a: vm.write_guest(a["gpa"], a["value"].to_bytes(a.get("size", 4),
                                                                      "little")),
       target="vm"),
    # where a vCPU rests between steps (model only): each returns the vCPU's location
    Op("enter_guest", {"vcpu": _V, "interrupts": ("bool", False)}, _location("enter_guest"),
       expect="location", model_only=True),
    Op("halt", {"vcpu": _V, "interrupts": ("bool", False)}, _location("halt"),
       expect="location", model_only=True),
    Op("leave_guest", {"vcpu": _V}, _location("leave_guest"), expect="location",
       model_only=True),
    Op("location", {"vcpu": _V}, _location("location"), expect="location", model_only=True),
)
OPS: dict[str, Op] = {op.name: op for op in OP_TABLE}
MODEL_ONLY_OPS = frozenset(op.name for op in OP_TABLE if op.model_only)
GUEST_OPS = frozenset(op.name for op in OP_TABLE if op.guest)
VCPU_OPS = frozenset(op.name for op in OP_TABLE if op.target == "vcpu")
LOCATIONS = ("host", "guest", "halted")
COMMON = {"do", "expect", "expect_fault", "expect_errno", "note"}
# the largest time step a scenario may take (the real backend sleeps that long)
MAX_ADVANCE_NS = 3_600 * 10**9


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
            if k == "page":
                continue
            if k == "routes":
                parts.append("routes=[" + ", ".join(
                    f"{r.gsi}->msi {r.address_lo:#x}/{r.data:#x}" if isinstance(r, MsiRoute)
                    else f"{r.gsi}->chip{r.irqchip}:{r.pin}" for r in v) + "]")
                continue
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
    vm: VmConfig
    steps: list[Step] = field(default_factory=list)

    def make_vm(self, backend: str = "model", **extra):
        """The scenario's VM on *backend* (*extra*: VmConfig fields to replace)."""
        from .backends import Vm

        return Vm(self.vm.replace(**extra) if extra else self.vm, backend=backend)


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


_BITS = {"u8": 8, "u32": 32, "u64": 64}


def _parse_value(kind: str, v: Any, file: str, step: int | None, fld: str) -> Any:
    if kind == "int":
        return parse_int(v, file, step, fld)
    if kind in _BITS:
        n = parse_int(v, file, step, fld)
        if not 0 <= n < 1 << _BITS[kind]:
            raise _err(file, step, fld, f"{n:#x} does not fit in {_BITS[kind]} bits")
        return n
    if kind == "size":
        n = parse_int(v, file, step, fld)
        if n not in (1, 2, 4, 8):
            raise _err(file, step, fld, f"an access size is 1, 2, 4 or 8 bytes, not {n}")
        return n
    if kind == "ns":
        n = parse_int(v, file, step, fld)
        if not 0 <= n <= MAX_ADVANCE_NS:
            raise _err(file, step, fld, f"0 to {MAX_ADVANCE_NS} ns (an hour), not {n}")
        return n
    if kind == "name":
        if not isinstance(v, str) or not v:
            raise _err(file, step, fld, f"expected a name, got {v!r}")
        return v
    if kind == "routes":
        if not isinstance(v, list):
            raise _err(file, step, fld, "expected a list of route tables")
        return tuple(_parse_route(x, file, step, f"{fld}[{i}]") for i, x in enumerate(v))
    if kind == "inhibit":
        try:
            return ApicvInhibit.parse(v).name
        except ValueError as e:
            raise _err(file, step, fld, str(e)) from None
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
        n = parse_int(v, file, step, fld, MSR_NAMES)
        if not 0 <= n <= 0xFFFFFFFF:
            raise _err(file, step, fld, f"MSR index {n:#x} does not fit in 32 bits")
        return n
    if kind == "mp_state":
        return parse_int(v, file, step, fld, MP_STATES)
    if kind == "cap":
        return parse_int(v, file, step, fld, CAPS)
    if kind == "ints":
        if not isinstance(v, list):
            raise _err(file, step, fld, "expected a list of integers")
        return [_parse_value("u64", x, file, step, fld) for x in v]
    if kind == "regs":
        return parse_regs(v, file, step, fld)
    if kind == "chip":
        return parse_int(v, file, step, fld, CHIPS)
    if kind == "chipfields":
        if not isinstance(v, dict):
            raise _err(file, step, fld, "expected a table of field = value")
        return {k.lower(): parse_int(x, file, step, f"{fld}.{k}") for k, x in v.items()}
    raise AssertionError(kind)


def _parse_route(v: Any, file, step, fld) -> MsiRoute | IrqchipRoute:
    """{gsi, address_lo, address_hi?, data?, devid?} (MSI) or {gsi, irqchip, pin}."""
    if not isinstance(v, dict):
        raise _err(file, step, fld, "expected a table (gsi and address_lo/data, or irqchip/pin)")
    msi = {"gsi", "address_lo", "address_hi", "data", "devid"}
    chip = {"gsi", "irqchip", "pin"}
    keys = set(v)
    if not keys <= msi and not keys <= chip:
        raise _err(file, step, fld, f"unknown fields {sorted(keys - msi - chip)} (an MSI route "
                                    "has gsi, address_lo, address_hi, data, devid; an irqchip "
                                    "route gsi, irqchip, pin)")
    need = {"gsi", "address_lo"} if keys <= msi and "irqchip" not in keys else chip
    if not need <= keys:
        raise _err(file, step, fld, f"missing {sorted(need - keys)}")
    vals = {k: (parse_int(x, file, step, f"{fld}.{k}", CHIPS) if k == "irqchip"
                else _parse_value("u32", x, file, step, f"{fld}.{k}")) for k, x in v.items()}
    return MsiRoute(**vals) if "address_lo" in vals else IrqchipRoute(**vals)


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
        out[k] = _parse_value("u32", val, file, step, sub)  # a 32-bit register
    return out


def _parse_flags(v: Any, file: str, fld: str, names: dict[str, int]) -> int:
    if isinstance(v, list):
        flags = 0
        for name in v:
            flags |= parse_int(name, file, None, fld, names)
        return flags
    return parse_int(v, file, None, fld, names)


def parse_vm_table(t: Any, file: str) -> VmConfig:
    """A scenario's [vm] table as a VmConfig (each field named in an error)."""
    if t is None:
        return VmConfig()
    if not isinstance(t, dict):
        raise _err(file, None, "vm", "expected a table")
    out: dict[str, Any] = {}
    for k, v in t.items():
        kind = VM_OPTIONS.get(k)
        fld = f"vm.{k}"
        if kind is None:
            raise _err(file, None, fld, f"unknown VM option (known: {', '.join(VM_OPTIONS)})")
        if kind == "x2apic_api":
            v = _parse_flags(v, file, fld, X2APIC_API_FLAGS)
        elif kind == "quirks":
            v = _parse_flags(v, file, fld, QUIRKS)
        elif kind == "int":
            v = parse_int(v, file, None, fld)
        elif kind == "bool":
            if not isinstance(v, bool):
                raise _err(file, None, fld, "expected true or false")
        elif kind == "ints":
            if not isinstance(v, list):
                raise _err(file, None, fld, "expected a list")
            v = tuple(parse_int(x, file, None, fld) for x in v)
        elif kind in ("irqchip", "vm_type") and not isinstance(v, str | int):
            raise _err(file, None, fld, "expected a name")
        out["nr_vcpus" if k == "vcpus" else k] = v
    try:
        return VmConfig(**out)
    except ValueError as e:
        name = str(e).split("=", 1)[0]
        raise _err(file, None, "vm." + ("vcpus" if name == "nr_vcpus" else name),
                   str(e)) from None


def parse(text: str, file: str = "<scenario>") -> Scenario:
    """Parse and validate a scenario; any defect is a :class:`ScenarioError` naming *file*
    (a document nested too deeply for the parser, e.g. ``x = [[[...]]]`` or an ``expect``
    table hundreds deep, included)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _err(file, None, None, f"not valid TOML: {e}") from None
    except RecursionError:
        raise _err(file, None, None, "not valid TOML: nested too deeply") from None
    try:
        return parse_doc(doc, file)
    except RecursionError:
        raise _err(file, None, None, "nested too deeply") from None


def parse_doc(doc: dict[str, Any], file: str = "<scenario>") -> Scenario:
    """Validate a scenario given as the table TOML would produce."""
    for k in doc:
        if k not in ("description", "vm", "step"):
            raise _err(file, None, k, "unknown top-level key (expected description, vm, step)")
    sc = Scenario(file, str(doc.get("description", "")), parse_vm_table(doc.get("vm"), file))
    steps = doc.get("step", [])
    if not isinstance(steps, list):
        raise _err(file, None, "step", "use [[step]] tables")
    ids = list(sc.vm.ids)
    for i, t in enumerate(steps, 1):
        if not isinstance(t, dict):
            raise _err(file, i, None, "a step must be a table")
        op = t.get("do")
        if op is None:
            raise _err(file, i, "do", "missing (which method to call)")
        if op not in OPS:
            raise _err(file, i, "do", f"unknown operation {op!r} (known: {', '.join(OPS)})")
        spec = OPS[op].fields
        args: dict[str, Any] = {}
        st = Step(i, op, args)
        for k, v in t.items():
            if k in COMMON:
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
        if op == "get_lapic":
            st.save = args.get("save")
        if op == "set_lapic":
            if ("from" in args) == ("file" in args):
                raise _err(file, i, "from", "set_lapic needs exactly one of 'from' or 'file'")
            if "file" in args:
                args["page"] = _load_state_file(file, i, args["file"])
        if op == "write_guest" and not args["value"] < 1 << (8 * args.get("size", 4)):
            raise _err(file, i, "value", f"{args['value']:#x} does not fit in "
                                         f"{args.get('size', 4)} bytes")
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


def _load_state_file(file: str, i: int, path: str) -> bytes:
    """A set_lapic step's state file, read when the scenario is parsed."""
    full = _relative(file, path)
    try:
        return bytes(LapicState.load(full))
    except (StateError, OSError, ValueError) as e:
        raise _err(file, i, "file", f"{path}: {e}") from None


def _parse_expect(op: str, v: Any, file: str, i: int) -> Any:
    kind = OPS[op].expect
    if kind == "regs":
        return parse_regs(v, file, i, "expect")
    if kind == "chipfields":
        return _parse_value("chipfields", v, file, i, "expect")
    if kind == "vectors":
        if not isinstance(v, list):
            raise _err(file, i, "expect", "expected a list of vectors")
        return [parse_int(x, file, i, "expect") for x in v]
    if kind == "mp_state":
        return parse_int(v, file, i, "expect", MP_STATES)
    if kind == "location":
        if v not in LOCATIONS:
            raise _err(file, i, "expect", f"one of {', '.join(map(repr, LOCATIONS))}")
        return v
    if kind == "bool":
        if not isinstance(v, bool):
            raise _err(file, i, "expect", "expected true or false")
        return v
    if kind == "exits":
        if not isinstance(v, list) or not all(
                isinstance(x, list) and len(x) == 2 and isinstance(x[0], str) for x in v):
            raise _err(file, i, "expect", 'expected a list of ["NAME", value] pairs')
        return [(x[0], parse_int(x[1], file, i, "expect")) for x in v]
    return parse_int(v, file, i, "expect")


def load(path: str) -> Scenario:
    """Read and parse a scenario file: a regular UTF-8 file of at most 256 MiB (a million
    steps are ~60 MiB); a directory, a FIFO (which would block) or /dev/zero (which never
    ends) is refused before it is read."""
    import os
    import stat

    limit = 256 << 20

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise ScenarioError(path, None, None, "cannot read: is a directory")
            if not stat.S_ISREG(st.st_mode):
                raise ScenarioError(path, None, None, "cannot read: not a regular file")
            if st.st_size > limit:
                raise ScenarioError(path, None, None, f"{st.st_size} bytes: larger than "
                                    f"{limit >> 20} MiB")
            data = f.read(limit + 1)
    except OSError as e:
        raise ScenarioError(path, None, None, f"cannot read: {e.strerror}") from None
    if len(data) > limit:
        raise ScenarioError(path, None, None, f"larger than {limit >> 20} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ScenarioError(path, None, None, "not a UTF-8 text file") from None
    del data
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
            return _fmt(v)
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
        self.eventfds: dict[str, int] = {}  # the scenario's named eventfds (irqfds)

    def eventfd(self, name: str) -> int:
        """The eventfd a scenario calls *name* (created, non-blocking, on first use)."""
        fd = self.eventfds.get(name)
        if fd is None:
            fd = self.eventfds[name] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        return fd

    def close(self) -> None:
        """Close the scenario's eventfds (a run closes them when it ends)."""
        fds, self.eventfds = self.eventfds, {}
        for fd in fds.values():
            os.close(fd)

    def call(self, st: Step) -> Any:
        """Carry out one step (its row of OP_TABLE) on the VM or on the vCPU it names."""
        op = OPS[st.op]
        a = st.args
        target = self.vm.vcpu(a["vcpu"]) if op.target == "vcpu" else self.vm
        return op.call(self, target, a)

    def lapic_page(self, a: dict[str, Any]) -> bytes:
        """The page a set_lapic step loads: a saved or file state with its patch applied."""
        if "from" in a:
            if a["from"] not in self.saved:
                raise ValueError(f"no state saved as {a['from']!r} by an earlier step")
            base = self.saved[a["from"]]
        else:
            base = a["page"]
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
            kind = OPS[st.op].expect
            if kind == "regs":
                return check_state_expect(out.value, st.expect)
            if kind == "chipfields":
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
        try:
            for st in self.sc.steps:
                if not model and st.op in MODEL_ONLY_OPS:
                    yield Outcome(st, skipped=f"{st.op} is model-only: the {self.vm.backend} "
                                              "backend never leaves a vCPU resting in "
                                              "KVM_RUN; the run stops here")
                    return
                yield self.step(st)
        finally:
            self.close()


def _fmt(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, tuple):
        return "(" + ", ".join(_fmt(x) for x in v) + ")"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:#x}"
    return str(v)


def _relative(base_file: str, path: str) -> str:
    if os.path.isabs(path):
        return path
    return os.path.join(os.path.dirname(os.path.abspath(base_file)), path)
