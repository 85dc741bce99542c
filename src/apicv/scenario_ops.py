"""The scenario format's tables: the names a scenario may use (MSRs, mp_states, irqchips,
capabilities, quirks, x2APIC API flags, VM options) and the operation table -- one row per
operation a step can take: its fields, what it runs on, how its ``expect`` reads, and the call.
:mod:`apicv.scenario` parses against these rows and calls them.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import apicdef as A
from . import scenario_nested as N
from . import uapi as U
from .api import VmConfig, default_routing
from .regs import BY_NAME

if TYPE_CHECKING:
    from .scenario import Runner

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
# (register table), chip, chipfields, inhibit, ns; the nested ones (kvm_version, vmcs12, vmcs,
# level, nested_exits, vmcs12_fields) are read by apicv.scenario_nested.
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
    nested: bool = False  # nested VMX (L1 and L2): model only, see scenario_nested


def _nested(name: str, fields: dict[str, tuple[str, bool]], call, expect: str = "int",
            guest: bool = False) -> Op:
    """A nested-VMX row: a vCPU op, model-only (nested_why says why)."""
    return Op(name, {"vcpu": _V, **fields}, call, expect=expect, guest=guest, model_only=True,
              nested=True)


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


def _set_vcpu_events(r: Runner, cpu, a: dict[str, Any]) -> None:
    """KVM_GET_VCPU_EVENTS, the patch applied, KVM_SET_VCPU_EVENTS (flags as patched, else
    the ones KVM_GET_VCPU_EVENTS reported)."""
    return cpu.set_vcpu_events(cpu.get_vcpu_events().replace(**a["patch"]))


def _set_pit2(r: Runner, vm, a: dict[str, Any]) -> None:
    """KVM_GET_PIT2, the patch applied (channel tables ch0..ch2, flags), KVM_SET_PIT2."""
    from .i8254 import pack_pit_state2, unpack_pit_state2

    st = unpack_pit_state2(vm.get_pit2())
    patch = a["patch"]
    for i, ch in enumerate(st["channels"]):
        ch.update(patch.get(f"ch{i}", {}))
    return vm.set_pit2(pack_pit_state2(st["channels"], patch.get("flags", st["flags"])))


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
    # KVM_INTERRUPT (split irqchip: the userspace PIC's ExtINT) and struct kvm_vcpu_events
    # the in-kernel PIT (KVM_CREATE_PIT2, KVM_GET/SET_PIT2, KVM_REINJECT_CONTROL)
    Op("create_pit2", {"flags": ("u32", False)},
       lambda r, vm, a: vm.create_pit2(a.get("flags", 0)), target="vm"),
    Op("get_pit2", {}, lambda r, vm, a: vm.get_pit2(), target="vm", expect="pit"),
    Op("set_pit2", {"patch": ("pit", True)}, _set_pit2, target="vm"),
    Op("reinject_control", {"reinject": ("bool", True)},
       lambda r, vm, a: vm.reinject_control(a["reinject"]), target="vm"),
    Op("interrupt", {"vcpu": _V, "vector": ("u32", True)},
       lambda r, c, a: c.interrupt(a["vector"])),
    Op("get_vcpu_events", {"vcpu": _V}, lambda r, c, a: c.get_vcpu_events(), expect="events"),
    Op("set_vcpu_events", {"vcpu": _V, "patch": ("events", True)}, _set_vcpu_events),
    # the restore-side ioctls around the LAPIC (vcpu_state.py): the APIC part of struct
    # kvm_sregs, the guest TSC rate, kvmclock
    Op("get_sregs", {"vcpu": _V}, lambda r, c, a: c.get_sregs(), expect="sregs"),
    Op("set_sregs", {"vcpu": _V, "apic_base": ("u64", False), "cr8": ("u64", False)},
       lambda r, c, a: c.set_sregs(c.get_sregs().replace(
           **{k: a[k] for k in ("apic_base", "cr8") if k in a}))),
    Op("get_tsc_khz", {"vcpu": _V}, lambda r, c, a: c.get_tsc_khz()),
    Op("set_tsc_khz", {"vcpu": _V, "khz": ("u32", True)},
       lambda r, c, a: c.set_tsc_khz(a["khz"])),
    Op("get_clock", {}, lambda r, vm, a: vm.get_clock(), target="vm"),
    Op("set_clock", {"ns": ("u64", True), "flags": ("u32", False)},
       lambda r, vm, a: vm.set_clock(a["ns"], a.get("flags", 0)), target="vm"),
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
    # nested VMX (model only): L1's VMX instructions, L2's guest operations, what L1 sees
    _nested("enable_nested", {"version": ("kvm_version", False)}, N.enable),
    _nested("vmxon", {}, N.vmx_instruction("vmxon"), guest=True),
    _nested("vmxoff", {}, N.vmx_instruction("vmxoff"), guest=True),
    _nested("vmptrld", {"controls": ("vmcs12", False), "gpa": ("u64", False)}, N.vmptrld,
            guest=True),
    _nested("vmlaunch", {}, N.vmx_instruction("vmlaunch"), "level", guest=True),
    _nested("vmresume", {}, N.vmx_instruction("vmresume"), "level", guest=True),
    _nested("l2_mmio_read", {"offset": ("reg", True), "size": _SIZE}, N.l2_op("mmio_read"),
            guest=True),
    _nested("l2_mmio_write", {"offset": ("reg", True), "value": ("u64", True), "size": _SIZE},
            N.l2_op("mmio_write"), guest=True),
    _nested("l2_rdmsr", {"index": ("msr", True)}, N.l2_op("rdmsr"), guest=True),
    _nested("l2_wrmsr", {"index": ("msr", True), "value": ("u64", True)}, N.l2_op("wrmsr"),
            guest=True),
    _nested("l2_take_interrupts", {"limit": ("u32", False), "eoi": ("bool", False)},
            N.l2_op("take_interrupts"), "vectors", guest=True),
    _nested("l2_run", {}, N.l2_op("run"), "vectors", guest=True),
    _nested("l2_halt", {"interrupts": ("bool", False)}, N.l2_op("halt"), "location",
            guest=True),
    _nested("l2_enter_guest", {"interrupts": ("bool", False)}, N.l2_op("enter_guest"),
            "location", guest=True),
    _nested("nested_exits", {}, N.nested_exits, "nested_exits"),
    _nested("level", {}, N.level, "level"),
    _nested("vmcs12", {}, N.vmcs12_fields, "vmcs12_fields"),
    _nested("guest_intr_status", {"vmcs": ("vmcs", False)}, N.guest_intr_status),
)
OPS: dict[str, Op] = {op.name: op for op in OP_TABLE}
MODEL_ONLY_OPS = frozenset(op.name for op in OP_TABLE if op.model_only)
GUEST_OPS = frozenset(op.name for op in OP_TABLE if op.guest)
NESTED_OPS = frozenset(op.name for op in OP_TABLE if op.nested)
VCPU_OPS = frozenset(op.name for op in OP_TABLE if op.target == "vcpu")
LOCATIONS = ("host", "guest", "halted")
COMMON = {"do", "expect", "expect_fault", "expect_errno", "expect_vmfail", "note"}
RESTING_WHY = "the real backend never leaves a vCPU resting in KVM_RUN"


def model_only_reason(op: str) -> str:
    """Why a model-only op does not run on the real backend (nested VMX: what the host has)."""
    return N.nested_why() if op in NESTED_OPS else RESTING_WHY
# the largest time step a scenario may take (the real backend sleeps that long)
MAX_ADVANCE_NS = 3_600 * 10**9
