"""What a VM and a vCPU offer, declared once for both backends (the model and the real KVM).

Read this module to know the whole public surface. :class:`VmConfig` is the one list of VM
options: ``apicv.Vm(config)``, the real backend and a scenario's ``[vm]`` table all take it.
:class:`VmAPI` and :class:`VcpuAPI` are the protocols both backends implement, one method per
KVM ioctl (host side) or per guest action (guest side, carried out by the model's simulated
processor or by the real backend's guest agent). They are ``runtime_checkable``:
``isinstance(vm, apicv.api.VmAPI)`` holds for either backend, and the conformance suite
(``tests/test_conformance.py``) runs the same checks on both.

Errors are part of the API: an ioctl KVM refuses raises :class:`~apicv.errors.KvmError` with
KVM's errno; a guest #GP raises :class:`~apicv.errors.GuestFault`; a value that cannot be
expressed in the UAPI structure (a 33-bit MSI address, an MSR value over 64 bits) raises
``ValueError`` before anything changes, on both backends.

Standard library only: this module is the layer every face (CLI, scenarios, crosscheck, fuzz,
``apicv boot``) talks to.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from . import uapi as U

__all__ = ["ClockAPI", "IrqchipRoute", "MsiRoute", "RestingVcpuAPI", "Sregs", "VcpuAPI",
           "VcpuEvents", "VmAPI", "VmConfig", "MAX_VCPUS", "KVM_MAX_IRQ_ROUTES", "default_routing",
           "mmio_offset"]

MAX_VCPUS = 1024  # KVM_CAP_MAX_VCPUS on these hosts
MAX_VCPU_ID = 4096  # KVM_CAP_MAX_VCPU_ID
KVM_MAX_IRQ_ROUTES = 4096  # KVM_CAP_IRQ_ROUTING on x86
_U32 = 0xFFFFFFFF


def _opt(default: Any, kind: str, doc: str) -> Any:
    """A VmConfig field: *kind* is how a scenario's [vm] table spells it (see
    :func:`apicv.scenario.parse_vm_table`), *doc* what it selects."""
    return field(default=default, metadata={"kind": kind, "doc": doc})


@dataclass(frozen=True)
class VmConfig:
    """How a VM is created and configured, for either backend.

    ``None`` means "the backend's own value": the model takes upstream KVM's default, the real
    backend takes what this host has (its module parameters, TSC frequency, MAXPHYADDR, SMM
    support). A value the real KVM cannot honour (a module parameter that differs from the
    host's) is refused by the real backend with ``ValueError``.
    """

    nr_vcpus: int = _opt(1, "int", "vCPUs created with ids 0..n-1 (KVM_CREATE_VCPU)")
    x2apic_api: int = _opt(0, "x2apic_api", "KVM_CAP_X2APIC_API flags, enabled before the vCPUs")
    vcpu_ids: tuple[int, ...] | None = _opt(None, "ints", "explicit vCPU ids (instead of 0..n-1)")
    bsp_vcpu_id: int = _opt(0, "int", "KVM_SET_BOOT_CPU_ID")
    apic_bus_cycle_ns: int = _opt(1, "int", "KVM_CAP_X86_APIC_BUS_CYCLES_NS")
    disabled_quirks: int = _opt(0, "quirks", "KVM_CAP_DISABLE_QUIRKS2")
    x2apic_cpuid: bool = _opt(True, "bool", "guest CPUID.1:ECX.x2APIC")
    tsc_deadline_cpuid: bool = _opt(True, "bool", "guest CPUID.1:ECX.TSC_DEADLINE")
    maxphyaddr: int | None = _opt(None, "int", "guest MAXPHYADDR (model: 48)")
    mcg_cap: int = _opt(0, "int", "initial MCG_CAP (KVM_X86_SETUP_MCE changes it)")
    tsc_khz: int | None = _opt(None, "int", "guest TSC frequency (model: 1 GHz)")
    enable_apicv: bool | None = _opt(None, "bool", "module parameter (model: True)")
    flexpriority: bool | None = _opt(None, "bool", "kvm_intel.flexpriority (model: True)")
    vector_hashing: bool | None = _opt(None, "bool", "module parameter (model: True)")
    min_timer_period_us: int | None = _opt(None, "int", "module parameter (model: 200)")
    lapic_timer_advance: bool | None = _opt(None, "bool", "module parameter (model: True)")
    smm: bool | None = _opt(None, "bool", "CONFIG_KVM_SMM / KVM_CAP_X86_SMM (model: True)")
    supported_mce_cap: int | None = _opt(None, "int", "KVM_X86_GET_MCE_CAP_SUPPORTED")
    irqchip: str = _opt("kernel", "irqchip", "'kernel' (KVM_CREATE_IRQCHIP) or 'split'")
    reserved_ioapic_pins: int = _opt(24, "int", "KVM_CAP_SPLIT_IRQCHIP: GSIs below this are "
                                     "the userspace IOAPIC's (split irqchip only)")
    vm_type: str | int = _opt("default", "vm_type", "KVM_CREATE_VM type: 'default' or 'tdx'")
    trace: bool = _opt(False, "bool", "record the model's trace (the real backend has none)")

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, what: str) -> None:
            if not cond:
                raise ValueError(f"{name}={getattr(self, name)!r}: {what}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            kind = f.metadata["kind"]
            if v is None:
                need(f.default is None, f.name, "must be given")
            elif kind in ("int", "x2apic_api", "quirks"):
                need(is_int(v), f.name, "expected an integer")
            elif kind == "bool":
                need(isinstance(v, bool), f.name, "expected True or False")
        need(0 <= self.nr_vcpus <= MAX_VCPUS, "nr_vcpus", f"0 to {MAX_VCPUS} vCPUs")
        if self.vcpu_ids is not None:
            ids = tuple(self.vcpu_ids)
            need(all(is_int(i) for i in ids), "vcpu_ids", "expected integers")
            object.__setattr__(self, "vcpu_ids", ids)
        need(0 <= self.x2apic_api <= 0xFFFFFFFFFFFFFFFF, "x2apic_api", "a 64-bit flag word")
        need(0 <= self.bsp_vcpu_id <= MAX_VCPU_ID, "bsp_vcpu_id", f"0 to {MAX_VCPU_ID}")
        need(0 <= self.apic_bus_cycle_ns <= 0xFFFFFFFFFFFFFFFF, "apic_bus_cycle_ns",
             "a 64-bit count of ns")
        need(0 <= self.disabled_quirks <= 0xFFFFFFFFFFFFFFFF, "disabled_quirks",
             "a 64-bit quirk mask")
        need(self.maxphyaddr is None or 32 <= self.maxphyaddr <= 52, "maxphyaddr", "32 to 52")
        need(0 <= self.mcg_cap <= 0xFFFFFFFFFFFFFFFF, "mcg_cap", "a 64-bit MCG_CAP")
        need(self.tsc_khz is None or 1 <= self.tsc_khz <= 0xFFFFFFFF, "tsc_khz",
             "1 to 2^32-1 kHz")
        need(self.min_timer_period_us is None or self.min_timer_period_us >= 0,
             "min_timer_period_us", "at least 0")
        need(self.supported_mce_cap is None or 0 <= self.supported_mce_cap < 1 << 64,
             "supported_mce_cap", "a 64-bit MCG_CAP mask")
        need(self.irqchip in ("kernel", "split"), "irqchip", "'kernel' or 'split'")
        # KVM_CAP_SPLIT_IRQCHIP: args[0] > MAX_NR_RESERVED_IOAPIC_PINS is EINVAL
        need(0 <= self.reserved_ioapic_pins <= KVM_MAX_IRQ_ROUTES, "reserved_ioapic_pins",
             f"0 to {KVM_MAX_IRQ_ROUTES}")
        if isinstance(self.vm_type, str):
            need(self.vm_type.lower() in U.VM_TYPE_NAMES, "vm_type",
                 f"one of {', '.join(U.VM_TYPE_NAMES)}")
        else:
            need(is_int(self.vm_type) and self.vm_type >= 0, "vm_type", "a VM type number")

    @classmethod
    def from_options(cls, nr_vcpus: int | VmConfig = 1, x2apic_api: int = 0,
                     **options: Any) -> VmConfig:
        """A config from ``Vm(...)``-style arguments: a VmConfig as the first argument (then
        *options* replace its fields), or the fields as arguments. Unknown options raise
        TypeError naming them and the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(options) - known)
        if bad:
            raise TypeError(f"unknown VM option{'s' if len(bad) > 1 else ''} "
                            f"{', '.join(bad)} (known: {', '.join(sorted(known))})")
        if isinstance(nr_vcpus, VmConfig):
            if x2apic_api:
                options["x2apic_api"] = x2apic_api
            return dataclasses.replace(nr_vcpus, **options) if options else nr_vcpus
        return cls(nr_vcpus=nr_vcpus, x2apic_api=x2apic_api, **options)

    def replace(self, **changes: Any) -> VmConfig:
        return dataclasses.replace(self, **changes)

    def given(self) -> dict[str, Any]:
        """The fields that differ from the defaults (what a scenario would have to say)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default}

    @property
    def ids(self) -> tuple[int, ...]:
        """The vCPU ids the VM starts with."""
        return self.vcpu_ids if self.vcpu_ids is not None else tuple(range(self.nr_vcpus))

    @property
    def vm_type_number(self) -> int:
        if isinstance(self.vm_type, str):
            return U.VM_TYPE_NAMES[self.vm_type.lower()]
        return self.vm_type


def mmio_offset(offset: int | str, size: int) -> int:
    """The offset of a guest access to the APIC page -- an int, or a register name such as
    ``"TPR"`` or ``"APIC_ICR"`` -- checked on both backends: ValueError for a size other than
    1, 2, 4, 8 or an access that leaves the 4 KiB page."""
    if isinstance(size, bool) or size not in (1, 2, 4, 8):
        raise ValueError(f"MMIO size must be 1, 2, 4 or 8, not {size!r}")
    if isinstance(offset, str):
        from .regs import lookup

        try:
            offset = lookup(offset).offset
        except KeyError:
            raise ValueError(f"no APIC register is called {offset!r}") from None
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise ValueError(f"an APIC offset is an int or a register name, not {offset!r}")
    if not 0 <= offset <= 0x1000 - size:
        raise ValueError(f"offset {offset:#x} is outside the 4 KiB APIC page")
    return offset


def _u32(owner: str, **fields: int) -> None:
    for name, v in fields.items():
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= _U32:
            raise ValueError(f"{owner}.{name}={v!r}: a u32 field of struct kvm_irq_routing_entry")


@dataclass(frozen=True, slots=True)
class MsiRoute:
    """A KVM_IRQ_ROUTING_MSI entry of KVM_SET_GSI_ROUTING (``struct kvm_irq_routing_msi``).
    *devid* sets KVM_MSI_VALID_DEVID with that device id (x86 KVM accepts and ignores it)."""

    gsi: int
    address_lo: int
    address_hi: int = 0
    data: int = 0
    devid: int | None = None

    def __post_init__(self) -> None:
        _u32("MsiRoute", gsi=self.gsi, address_lo=self.address_lo, address_hi=self.address_hi,
             data=self.data, **({} if self.devid is None else {"devid": self.devid}))


@dataclass(frozen=True, slots=True)
class IrqchipRoute:
    """A KVM_IRQ_ROUTING_IRQCHIP entry: GSI *gsi* drives *pin* of *irqchip*
    (0 PIC master, 1 PIC slave, 2 IOAPIC)."""

    gsi: int
    irqchip: int
    pin: int

    def __post_init__(self) -> None:
        _u32("IrqchipRoute", gsi=self.gsi, irqchip=self.irqchip, pin=self.pin)


def default_routing() -> tuple[IrqchipRoute, ...]:
    """KVM's default routing (``default_routing[]``, ROUTING_ENTRY2/ROUTING_ENTRY1): GSI 0-15 to
    the IOAPIC pin of the same number and to pin n % 8 of the master (0-7) or slave (8-15) PIC,
    GSI 16-23 to the IOAPIC only. KVM_CREATE_IRQCHIP installs it; a split irqchip starts with
    no routes."""
    routes: list[IrqchipRoute] = []
    for gsi in range(24):
        routes.append(IrqchipRoute(gsi, 2, gsi))
        if gsi < 8:
            routes.append(IrqchipRoute(gsi, 0, gsi))
        elif gsi < 16:
            routes.append(IrqchipRoute(gsi, 1, gsi - 8))
    return tuple(routes)



# struct kvm_vcpu_events (arch/x86/include/uapi/asm/kvm.h), flattened: name, C type, offset.
# nmi.pad and reserved[26] are not fields: pack() writes zeros there, unpack() ignores them.
_EVENT_FIELDS = (
    ("exception_injected", "B", 0), ("exception_nr", "B", 1),
    ("exception_has_error_code", "B", 2), ("exception_pending", "B", 3),
    ("exception_error_code", "I", 4),
    ("interrupt_injected", "B", 8), ("interrupt_nr", "B", 9), ("interrupt_soft", "B", 10),
    ("interrupt_shadow", "B", 11),
    ("nmi_injected", "B", 12), ("nmi_pending", "B", 13), ("nmi_masked", "B", 14),
    ("sipi_vector", "I", 16), ("flags", "I", 20),
    ("smi_smm", "B", 24), ("smi_pending", "B", 25), ("smi_inside_nmi", "B", 26),
    ("smi_latched_init", "B", 27),
    ("triple_fault_pending", "B", 28),
    ("exception_has_payload", "B", 55), ("exception_payload", "Q", 56),
)
_EVENT_BITS = {"B": 8, "I": 32, "Q": 64}  # the field's width in bits


@dataclass(frozen=True, slots=True)
class VcpuEvents:
    """``struct kvm_vcpu_events`` for KVM_GET_VCPU_EVENTS / KVM_SET_VCPU_EVENTS, one field per
    member (``exception.nr`` is ``exception_nr``, ``smi.smm_inside_nmi`` is ``smi_inside_nmi``).

    Each field has its C width (u8, u32 for ``exception_error_code``, ``sipi_vector`` and
    ``flags``, u64 for ``exception_payload``); a value that does not fit raises ``ValueError``
    here, before any ioctl. :meth:`pack` gives the 64-byte structure, :meth:`unpack` reads it.
    ``flags`` takes the ``KVM_VCPUEVENT_VALID_*`` bits of :mod:`apicv.uapi`; which fields
    KVM_SET_VCPU_EVENTS reads and which it refuses is ``kvm_vcpu_ioctl_x86_set_vcpu_events``'s
    business (both backends' ``set_vcpu_events`` raise KvmError as KVM does)."""

    exception_injected: int = 0
    exception_nr: int = 0
    exception_has_error_code: int = 0
    exception_pending: int = 0
    exception_error_code: int = 0
    interrupt_injected: int = 0
    interrupt_nr: int = 0
    interrupt_soft: int = 0
    interrupt_shadow: int = 0
    nmi_injected: int = 0
    nmi_pending: int = 0
    nmi_masked: int = 0
    sipi_vector: int = 0
    flags: int = 0
    smi_smm: int = 0
    smi_pending: int = 0
    smi_inside_nmi: int = 0
    smi_latched_init: int = 0
    triple_fault_pending: int = 0
    exception_has_payload: int = 0
    exception_payload: int = 0

    def __post_init__(self) -> None:
        for name, ctype, _ in _EVENT_FIELDS:
            v = getattr(self, name)
            if isinstance(v, bool):
                object.__setattr__(self, name, int(v))
                continue
            bits = _EVENT_BITS[ctype]
            if not isinstance(v, int) or not 0 <= v < 1 << bits:
                raise ValueError(f"VcpuEvents.{name}={v!r}: a u{bits} field of "
                                 "struct kvm_vcpu_events")

    def pack(self) -> bytes:
        """The 64-byte ``struct kvm_vcpu_events`` (x86-64 layout, little-endian)."""
        buf = bytearray(U.KVM_VCPU_EVENTS_SIZE)
        for name, ctype, off in _EVENT_FIELDS:
            n = _EVENT_BITS[ctype] // 8
            buf[off:off + n] = getattr(self, name).to_bytes(n, "little")
        return bytes(buf)

    @classmethod
    def unpack(cls, data: bytes) -> VcpuEvents:
        """A VcpuEvents from the 64 bytes KVM_GET_VCPU_EVENTS fills (ValueError for any other
        length)."""
        data = bytes(data)
        if len(data) != U.KVM_VCPU_EVENTS_SIZE:
            raise ValueError(f"a kvm_vcpu_events is {U.KVM_VCPU_EVENTS_SIZE} bytes, "
                             f"got {len(data)}")
        return cls(**{name: int.from_bytes(data[off:off + _EVENT_BITS[ctype] // 8], "little")
                      for name, ctype, off in _EVENT_FIELDS})

    def replace(self, **changes: int) -> VcpuEvents:
        return dataclasses.replace(self, **changes)

@dataclass(frozen=True, slots=True)
class Sregs:
    """The APIC part of ``struct kvm_sregs`` (KVM_GET_SREGS / KVM_SET_SREGS): ``apic_base``
    (IA32_APIC_BASE, restored through ``kvm_apic_set_base`` with host_initiated) and ``cr8``
    (TPR[7:4]; KVM_SET_SREGS writes TPR = cr8 << 4 through ``kvm_set_cr8``). Both backends'
    ``set_sregs`` change only these two fields of what KVM_GET_SREGS returned."""

    apic_base: int
    cr8: int = 0

    def __post_init__(self) -> None:
        for name in ("apic_base", "cr8"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= (1 << 64) - 1:
                raise ValueError(f"Sregs.{name}={v!r}: a u64 field of struct kvm_sregs")

    def replace(self, **changes: int) -> Sregs:
        return dataclasses.replace(self, **changes)


@runtime_checkable
class ClockAPI(Protocol):
    """``vm.clock``: the model's virtual clock, or wall time on the real backend."""

    @property
    def now(self) -> int: ...
    def advance(self, ns: int) -> Any: ...
    def advance_to(self, t: int) -> Any: ...
    def next_expiry(self) -> int | None: ...


@runtime_checkable
class VcpuAPI(Protocol):
    """One vCPU. Host side: the vCPU ioctls. Guest side: one KVM_RUN in which the guest does
    one thing and exits back to userspace."""

    vcpu_id: int

    @property
    def location(self) -> str: ...
    @property
    def apicv_active(self) -> bool: ...

    # -- vCPU ioctls --
    def get_lapic(self) -> bytes: ...                         # KVM_GET_LAPIC
    def set_lapic(self, page: bytes) -> None: ...             # KVM_SET_LAPIC
    def get_mp_state(self) -> int: ...                        # KVM_GET_MP_STATE
    def set_mp_state(self, state: int) -> None: ...           # KVM_SET_MP_STATE
    def get_msr(self, index: int) -> int: ...                 # KVM_GET_MSRS (one)
    def set_msr(self, index: int, value: int) -> bool: ...    # KVM_SET_MSRS (one)
    def nmi(self) -> None: ...                                # KVM_NMI
    def setup_mce(self, mcg_cap: int) -> None: ...            # KVM_X86_SETUP_MCE
    def set_cpuid(self, *, x2apic: bool = True, tsc_deadline: bool = True) -> None: ...
    def set_tpr_access_reporting(self, enabled: bool, flags: int = 0) -> None: ...
    def set_vapic_addr(self, gpa: int) -> None: ...           # KVM_SET_VAPIC_ADDR
    def set_guest_debug(self, enable: bool = False, blockirq: bool = False) -> None: ...

    # -- the guest --
    def mmio_read(self, offset: int, size: int = 4) -> int: ...
    def mmio_write(self, offset: int, value: int, size: int = 4) -> None: ...
    def rdmsr(self, index: int) -> int: ...
    def wrmsr(self, index: int, value: int) -> None: ...
    def write_cr8(self, value: int) -> None: ...
    def read_cr8(self) -> int: ...
    def take_interrupts(self, limit: int | None = None, eoi: bool = True) -> list[int]: ...
    def run(self) -> list[int]: ...
    def ioapic_read(self, offset: int, size: int = 4) -> int: ...
    def ioapic_write(self, offset: int, value: int, size: int = 4) -> None: ...
    def inb(self, port: int) -> int: ...
    def outb(self, port: int, value: int) -> None: ...
    def guest_load(self, gpa: int, size: int = 4) -> int: ...
    def guest_store(self, gpa: int, value: int, size: int = 4) -> None: ...

    def interrupt(self, vector: int) -> None: ...             # KVM_INTERRUPT
    def get_vcpu_events(self) -> VcpuEvents: ...              # KVM_GET_VCPU_EVENTS
    def set_vcpu_events(self, events: VcpuEvents) -> None: ...  # KVM_SET_VCPU_EVENTS
    def get_sregs(self) -> Sregs: ...                         # KVM_GET_SREGS (APIC part)
    def set_sregs(self, sregs: Sregs) -> None: ...            # KVM_SET_SREGS (APIC part)
    def get_tsc_khz(self) -> int: ...                         # KVM_GET_TSC_KHZ
    def set_tsc_khz(self, khz: int) -> None: ...              # KVM_SET_TSC_KHZ

    # -- what KVM_RUN returned to userspace for on the way (split irqchip) --
    def pop_exits(self) -> list[tuple[str, int]]: ...         # e.g. [("IOAPIC_EOI", vector)]


@runtime_checkable
class RestingVcpuAPI(VcpuAPI, Protocol):
    """Model only: a vCPU left resting inside KVM_RUN between calls (in guest mode or in HLT),
    so that what reaches it meanwhile is delivered as on hardware. The real backend's agent
    always returns to userspace, so it does not offer these."""

    def enter_guest(self, interrupts: bool = True) -> None: ...
    def halt(self, interrupts: bool = True) -> None: ...
    def leave_guest(self) -> None: ...


@runtime_checkable
class VmAPI(Protocol):
    """A VM with its vCPUs. Each method is one VM ioctl (or a VMM access to guest RAM)."""

    backend: str  # "model" or "kvm"
    config: VmConfig
    vcpus: Sequence[Any]  # VcpuAPI, in creation order
    clock: Any  # ClockAPI
    trace: Any  # apicv.trace.Tracer or None

    def create_vcpu(self, vcpu_id: int) -> Any: ...           # KVM_CREATE_VCPU
    def vcpu(self, vcpu_id: int) -> Any: ...                  # by vcpu_id (ValueError if none)
    def set_boot_cpu_id(self, vcpu_id: int) -> None: ...      # KVM_SET_BOOT_CPU_ID
    def check_extension(self, cap: int) -> int: ...           # KVM_CHECK_EXTENSION
    def enable_cap(self, cap: int, *args: int) -> None: ...   # KVM_ENABLE_CAP
    def signal_msi(self, address_lo: int, address_hi: int = 0, data: int = 0,
                   flags: int = 0, devid: int = 0) -> int: ...  # KVM_SIGNAL_MSI
    def irq_line(self, irq: int, level: int) -> int: ...      # KVM_IRQ_LINE_STATUS
    def get_irqchip(self, chip_id: int) -> bytes: ...         # KVM_GET_IRQCHIP
    def set_irqchip(self, chip_id: int, data: bytes) -> None: ...  # KVM_SET_IRQCHIP
    def set_gsi_routing(self, routes: Sequence[MsiRoute | IrqchipRoute]) -> None: ...
    def get_gsi_routing(self) -> tuple[MsiRoute | IrqchipRoute, ...]: ...  # the table in force
    def irqfd(self, fd: int, gsi: int, *, resamplefd: int | None = None,
              deassign: bool = False) -> None: ...            # KVM_IRQFD
    def poll_irqfds(self) -> None: ...                        # let irqfd writes reach the guest
    def create_pit2(self, flags: int = 0) -> None: ...        # KVM_CREATE_PIT2
    def get_pit2(self) -> bytes: ...                          # KVM_GET_PIT2 (kvm_pit_state2)
    def set_pit2(self, data: bytes) -> None: ...              # KVM_SET_PIT2
    def reinject_control(self, reinject: bool) -> None: ...   # KVM_REINJECT_CONTROL
    def get_clock(self) -> int: ...                           # KVM_GET_CLOCK (kvmclock ns)
    def set_clock(self, ns: int, flags: int = 0) -> None: ...  # KVM_SET_CLOCK
    def read_guest(self, gpa: int, size: int) -> bytes: ...
    def write_guest(self, gpa: int, data: bytes) -> None: ...
    @property
    def apicv_inhibits(self) -> int | None: ...
    def set_or_clear_apicv_inhibit(self, reason: Any, set_: bool) -> None: ...
    def enable_tracing(self, limit: int | None = None) -> Any: ...
    def close(self) -> None: ...
