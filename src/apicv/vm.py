"""The model's VM: the KVM-UAPI-shaped surface of the model (one ioctl, one method), the
owner of the vCPUs, the clock, the optimized APIC map, the router and the in-kernel devices.

Every operation runs inside :meth:`Vm.vcpu_ioctl` or :meth:`Vm.vm_ioctl` and its effects are
settled in one place, :meth:`Vm.settle`: the optimized map is recalculated when it is dirty (with
the inhibits it implies and KVM_REQ_SCAN_IOAPIC), inhibits the LAPICs asked for are set, the PIC's
output wakes a vCPU (``pic_unlock``), timers that fell due fire, and -- once the outermost
operation is over -- vCPUs that were kicked meanwhile (resting in guest mode or in HLT) take what
was sent to them. A timer expiry only marks work pending (IRR, a request, a kick); it never runs
another vCPU's delivery in the middle of an operation. Devices (the IOAPIC) see the VM through a
narrow :class:`DevicePort`.

``apicv.Vm(..., backend=...)`` (:mod:`apicv.backends`) chooses between this class and the real
KVM backend; both implement :class:`apicv.api.VmAPI`.

Why this module is long: it is ``struct kvm`` -- the VM ioctls, the APICv inhibit and IOAPIC-scan
machinery and the settle point all act on the same VM-wide state, and keeping them together
keeps the one place where an operation's effects are settled visible beside what it settles.
"""

from __future__ import annotations

from contextlib import contextmanager

from . import uapi as U
from .api import KVM_MAX_IRQ_ROUTES, MAX_VCPU_ID, MAX_VCPUS, VmConfig
from .apic_map import kvm_recalculate_apic_map
from .arch import SEB_DISABLED, SEB_ENABLED, KvmArch
from .clock import Clock
from .delivery import Router
from .errors import KvmError
from .i8254 import PitIoctlsMixin
from .i8259 import KvmPic
from .ioapic import KvmIoapic
from .irq_routing import IrqRoutingMixin
from .kvm_host import (
    KVM_REQ_APICV_UPDATE,
    KVM_REQ_EVENT,
    KVM_REQ_IOAPIC_EOI_EXIT,
    KVM_REQ_LOAD_EOI_EXITMAP,
    KVM_REQ_SCAN_IOAPIC,
    VMX_REQUIRED_APICV_INHIBITS,
    ApicvInhibit,
)
from .lapic import VendorOps
from .memory import GuestMemory
from .trace import VM_CONTEXT, Tracer
from .vcpu import KVM_MCE_CAP_SUPPORTED, Vcpu
from .vcpu_state import VmClockMixin
from .vmx.tdx import TdxOps
from .vmx.vmx import VmxOps

_VMX_OPS = VmxOps()
_TDX_OPS = TdxOps()

KVM_MAX_VCPUS = MAX_VCPUS  # KVM_CAP_MAX_VCPUS on these hosts
KVM_MAX_VCPU_IDS = MAX_VCPU_ID  # KVM_CAP_MAX_VCPU_ID
KVM_MSI_VALID_DEVID = 1 << 0
# KVM_CAP_DISABLE_QUIRKS2 as these hosts report it
KVM_X86_VALID_QUIRKS = 0x5FF
_U32 = 0xFFFFFFFF

# what the model takes for a VmConfig field left at None: upstream KVM's defaults
MODEL_DEFAULTS = {
    "maxphyaddr": 48, "tsc_khz": 1_000_000, "enable_apicv": True, "flexpriority": True,
    "vector_hashing": True, "min_timer_period_us": 200, "lapic_timer_advance": True,
    "smm": True, "supported_mce_cap": KVM_MCE_CAP_SUPPORTED,
}


def resolve_model_config(cfg: VmConfig) -> VmConfig:
    """*cfg* with every field left to the backend (None) set to the model's value."""
    return cfg.replace(**{k: v for k, v in MODEL_DEFAULTS.items() if getattr(cfg, k) is None})


class DevicePort:
    """What an in-kernel device (the IOAPIC) may ask of the VM -- and nothing else: deliver an
    interrupt to the APICs, find the vCPUs an interrupt would reach, request an IOAPIC scan,
    ask whether APICv is activated VM-wide, and the clock (now, timers). Tests give a device a
    fake port."""

    __slots__ = ("kvm", "clock", "vcpus", "deliver", "dest_vcpus", "scan_ioapic",
                 "apicv_activated", "notify_acked", "fire_mask_notifiers", "has_notifier")

    def __init__(self, vm: Vm) -> None:
        self.kvm = vm.kvm
        self.clock = vm.clock
        self.vcpus = vm.vcpus  # the live list: vCPUs created later are seen
        self.deliver = vm.router.kvm_irq_delivery_to_apic
        self.dest_vcpus = vm.router.kvm_bitmap_or_dest_vcpus
        self.scan_ioapic = vm.kvm_make_scan_ioapic_request
        self.apicv_activated = vm.kvm_apicv_activated
        self.notify_acked = vm.kvm_notify_acked_irq  # ack notifiers (resamplers, the PIT)
        self.fire_mask_notifiers = vm.kvm_fire_mask_notifiers
        self.has_notifier = vm.kvm_irq_has_notifier


class Vm(IrqRoutingMixin, PitIoctlsMixin, VmClockMixin):
    """The model of a KVM VM with *nr_vcpus* vCPUs, configured by a :class:`~apicv.api.VmConfig`
    (or the same fields as keyword arguments).

    ``irqchip="kernel"`` is KVM_CREATE_IRQCHIP (in-kernel PIC and IOAPIC); ``"split"`` is
    KVM_CAP_SPLIT_IRQCHIP (LAPICs only). ``vm_type="tdx"`` (KVM_X86_TDX_VM, split irqchip) makes a
    trust domain whose APIC state is protected (see :mod:`apicv.vmx.tdx`); each vCPU is created
    and initialized (KVM_TDX_INIT_VCPU). Fields left at None take upstream KVM's defaults
    (``MODEL_DEFAULTS``); ``vm.config`` is the resolved configuration. ``trace`` may also be a
    :class:`~apicv.trace.Tracer` to record into.
    """

    backend = "model"

    def __init__(self, nr_vcpus: int | VmConfig = 1, x2apic_api: int = 0,
                 **options) -> None:
        trace = options.pop("trace", None)
        tracer = trace if isinstance(trace, Tracer) else None
        if trace is not None:
            options["trace"] = bool(trace)
        cfg = VmConfig.from_options(nr_vcpus, x2apic_api, **options)
        self.config = cfg = resolve_model_config(cfg)
        if cfg.enable_apicv and not cfg.flexpriority:
            raise ValueError("enable_apicv needs flexpriority (virtualized APIC accesses)")
        vm_type = cfg.vm_type_number
        if vm_type not in U.VM_TYPE_NAMES.values():
            # KVM_CREATE_VM: types outside kvm_caps.supported_vm_types (SEV, SNP, ...)
            raise KvmError(U.EINVAL, "KVM_CREATE_VM", f"VM type {vm_type} is not supported")
        if vm_type == U.KVM_X86_TDX_VM and not cfg.enable_apicv:
            # tdx_bringup(): "APICv is required for TDX" -- no TDX, so no such VM type
            raise KvmError(U.EINVAL, "KVM_CREATE_VM", "TDX VMs need enable_apicv")
        self.closed = False
        self.supported_mce_cap = cfg.supported_mce_cap  # KVM_X86_GET_MCE_CAP_SUPPORTED
        self.clock = Clock()
        self.clock.after_fire = self._after_timer
        self.flexpriority = cfg.flexpriority
        self.kvm = KvmArch(enable_apicv=cfg.enable_apicv, vector_hashing=cfg.vector_hashing,
                           flexpriority=cfg.flexpriority,
                           min_timer_period_us=cfg.min_timer_period_us,
                           lapic_timer_advance=cfg.lapic_timer_advance, smm=cfg.smm,
                           vm_type=vm_type)
        if vm_type == U.KVM_X86_TDX_VM:
            # tdx_vm_init(): protected state, protected EOIs; SMM is not available to a TD
            self.kvm.has_protected_state = True
            self.kvm.has_protected_eoi = True
            self.kvm.smm = False
        self.x2apic_cpuid = cfg.x2apic_cpuid
        self.tsc_deadline_cpuid = cfg.tsc_deadline_cpuid
        self.maxphyaddr = cfg.maxphyaddr
        self.mcg_cap = cfg.mcg_cap
        self.tsc_khz = cfg.tsc_khz
        self._tsc_sync_init()  # kvmclock and the TSC sync state (vcpu_state.py)
        self.trace: Tracer | None = (tracer if tracer is not None
                                     else Tracer(self.clock) if trace else None)
        self.router = Router(self.kvm)
        self.router.trace = self.trace
        self.vcpus: list[Vcpu] = []
        self._by_id: dict[int, Vcpu] = {}
        self._depth = 0  # operations in progress (settle() delivers kicks at depth 0)
        self.kick_handler = None  # a VMM's delivery of kvm_vcpu_kick (set_kick_handler)
        self.mem = GuestMemory()  # guest RAM (VAPIC words, PV-EOI bytes)
        self.ioapic: KvmIoapic | None = None  # the in-kernel IOAPIC (irqchip="kernel")
        self.pic: KvmPic | None = None  # the in-kernel i8259 pair (irqchip="kernel")
        self.pit = None  # the in-kernel i8254 (KVM_CREATE_PIT2)
        self.eoi_broadcasts: list[tuple[int, int, bool]] = []  # (vcpu_id, vector, level)
        # kvm_apicv_init(): ABSENT until the irqchip exists, DISABLED without enable_apicv
        # (set_or_clear_apicv_inhibit traces it, whatever enable_apicv is)
        reason = ApicvInhibit.ABSENT if cfg.enable_apicv else ApicvInhibit.DISABLED
        self.kvm.apicv_inhibit_reasons = 1 << reason
        if self.trace is not None:
            self.trace.kvm_apicv_inhibit_changed(int(reason), True, 1 << reason)
        # KVM_CREATE_IRQCHIP / KVM_CAP_SPLIT_IRQCHIP
        irqchip = cfg.irqchip
        if irqchip == "kernel" and self.kvm.has_protected_eoi:
            # KVM_CREATE_IRQCHIP: no in-kernel IOAPIC when KVM cannot intercept EOIs
            raise KvmError(U.ENOTTY, "KVM_CREATE_IRQCHIP",
                           "EOIs are protected (TDX): use irqchip='split'")
        self.kvm.irqchip_mode = irqchip
        self.port = DevicePort(self)
        if irqchip == "kernel":
            # KVM_CREATE_IRQCHIP: kvm_pic_init() and kvm_ioapic_init(), default GSI routing
            self.pic = KvmPic()
            self.pic.trace = self.trace
            self.ioapic = KvmIoapic(self.port)
            self.ioapic.trace = self.trace
        self.irq_routing_init()
        self.kvm_set_or_clear_apicv_inhibit(ApicvInhibit.ABSENT, False)
        if cfg.apic_bus_cycle_ns != 1:
            self.enable_cap(U.KVM_CAP_X86_APIC_BUS_CYCLES_NS, cfg.apic_bus_cycle_ns)
        if cfg.disabled_quirks:
            self.enable_cap(U.KVM_CAP_DISABLE_QUIRKS2, cfg.disabled_quirks)
        if cfg.x2apic_api:
            # before the vCPUs, as QEMU does: enabling it later does not refresh the map
            self.enable_cap(U.KVM_CAP_X2APIC_API, cfg.x2apic_api)
        if cfg.bsp_vcpu_id:
            self.set_boot_cpu_id(cfg.bsp_vcpu_id)
        for vid in cfg.ids:
            self.create_vcpu(vid)

    # ------------------------------------------------------------------ VM ioctls
    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """KVM_CREATE_VCPU."""
        self.check_open()
        if not 0 <= vcpu_id < KVM_MAX_VCPU_IDS:
            raise KvmError(U.EINVAL, "KVM_CREATE_VCPU", f"vcpu_id {vcpu_id} out of range")
        if len(self.vcpus) >= KVM_MAX_VCPUS:
            raise KvmError(U.EINVAL, "KVM_CREATE_VCPU", f"at most {KVM_MAX_VCPUS} vCPUs")
        if vcpu_id in self._by_id:
            raise KvmError(U.EEXIST, "KVM_CREATE_VCPU", f"vcpu_id {vcpu_id} exists")
        # kvm_arch_vcpu_create() resets the vCPU (kvm_lapic_reset recalculates the map) before
        # the vCPU is online, and nothing recalculates it afterwards: the newest vCPU is not in
        # the optimized map until something marks the map dirty again.
        if self.kvm.is_td and not self.kvm.irqchip_split:
            # tdx_vcpu_create(): the TDX module mandates APICv, and the IOAPIC cannot be
            # emulated without EOI exits
            raise KvmError(U.EINVAL, "KVM_CREATE_VCPU", "a TD vCPU needs a split irqchip")
        with self.vm_ioctl():
            vcpu = Vcpu(self, vcpu_id, len(self.vcpus))
            self.vcpus.append(vcpu)
            self._by_id[vcpu_id] = vcpu
            self.router.apics.append(vcpu.apic)
            if self.kvm.is_td:
                vcpu.tdx_vcpu_init()
        return vcpu

    def vcpu(self, vcpu_id: int) -> Vcpu:
        """The vCPU with this vcpu_id (``vm.vcpus[i]`` indexes by creation order)."""
        v = self._by_id.get(vcpu_id)
        if v is None:
            raise ValueError(f"no vCPU with id {vcpu_id} (vCPU ids: "
                             f"{', '.join(map(str, self._by_id)) or 'none'})")
        return v

    def set_boot_cpu_id(self, vcpu_id: int) -> None:
        """KVM_SET_BOOT_CPU_ID."""
        self.check_open()
        if self.vcpus:
            raise KvmError(U.EBUSY, "KVM_SET_BOOT_CPU_ID", "vCPUs already created")
        if not 0 <= vcpu_id <= KVM_MAX_VCPU_IDS:
            raise KvmError(U.EINVAL, "KVM_SET_BOOT_CPU_ID", f"{vcpu_id} out of range")
        self.kvm.bsp_vcpu_id = vcpu_id

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd, for the capabilities the model implements."""
        return {
            U.KVM_CAP_IRQCHIP: 1,
            U.KVM_CAP_SET_BOOT_CPU_ID: 1,
            U.KVM_CAP_SPLIT_IRQCHIP: 1,
            U.KVM_CAP_X2APIC_API: U.KVM_X2APIC_API_VALID_FLAGS & ~(
                0 if self.kvm.irqchip_split else U.KVM_X2APIC_ENABLE_SUPPRESS_EOI_BROADCAST),
            U.KVM_CAP_DISABLE_QUIRKS2: KVM_X86_VALID_QUIRKS,
            U.KVM_CAP_X86_APIC_BUS_CYCLES_NS: 1,
            U.KVM_CAP_X86_SMM: int(self.kvm.smm),
            U.KVM_CAP_IRQ_ROUTING: KVM_MAX_IRQ_ROUTES,
            U.KVM_CAP_IRQFD: 1,
            U.KVM_CAP_IRQFD_RESAMPLE: 1,
        }.get(cap, 0)

    def enable_cap(self, cap: int, *args: int) -> None:
        """KVM_ENABLE_CAP on the VM fd (struct kvm_enable_cap: at most 4 u64 arguments)."""
        self.check_open()
        if len(args) > 4 or any(not 0 <= a <= (1 << 64) - 1 for a in args):
            raise ValueError("KVM_ENABLE_CAP takes at most 4 arguments of 64 bits")
        arg0 = args[0] if args else 0
        kvm = self.kvm
        if cap == U.KVM_CAP_X2APIC_API:
            enable = arg0 & U.KVM_X2APIC_ENABLE_SUPPRESS_EOI_BROADCAST
            disable = arg0 & U.KVM_X2APIC_DISABLE_SUPPRESS_EOI_BROADCAST
            if arg0 & ~U.KVM_X2APIC_API_VALID_FLAGS or (enable and disable):
                raise KvmError(U.EINVAL, "KVM_ENABLE_CAP", "bad KVM_X2APIC_API flags")
            if enable and not kvm.irqchip_split:
                raise KvmError(U.EINVAL, "KVM_ENABLE_CAP",
                               "ENABLE_SUPPRESS_EOI_BROADCAST needs a split irqchip")
            if arg0 & U.KVM_X2APIC_API_USE_32BIT_IDS:
                kvm.x2apic_format = True
            if arg0 & U.KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK:
                kvm.x2apic_broadcast_quirk_disabled = True
            if enable:
                kvm.suppress_eoi_broadcast_mode = SEB_ENABLED
            if disable:
                kvm.suppress_eoi_broadcast_mode = SEB_DISABLED
            return
        if cap == U.KVM_CAP_X86_APIC_BUS_CYCLES_NS:
            if not arg0 or (0xFFFFFFFF * 128 * arg0) >> 64:
                raise KvmError(U.EINVAL, "KVM_ENABLE_CAP", "bad APIC bus cycle length")
            if self.vcpus:
                raise KvmError(U.EINVAL, "KVM_ENABLE_CAP", "vCPUs already created")
            kvm.apic_bus_cycle_ns = arg0
            return
        if cap == U.KVM_CAP_DISABLE_QUIRKS2:
            if arg0 & ~KVM_X86_VALID_QUIRKS:
                raise KvmError(U.EINVAL, "KVM_ENABLE_CAP", "unknown quirks")
            kvm.disabled_quirks |= arg0
            return
        raise KvmError(U.EINVAL, "KVM_ENABLE_CAP", f"capability {cap} not supported")

    def signal_msi(self, address_lo: int, address_hi: int = 0, data: int = 0,
                   flags: int = 0, devid: int = 0) -> int:
        """KVM_SIGNAL_MSI: the number of APICs that accepted the interrupt.

        Raises KvmError(EINVAL) for a bad flag or an invalid x2APIC-format route and
        KvmError(EPERM) when no APIC matched at all (KVM returns -1)."""
        if not (0 <= address_lo <= _U32 and 0 <= address_hi <= _U32 and 0 <= data <= _U32
                and 0 <= flags <= _U32 and 0 <= devid <= _U32):
            raise ValueError("struct kvm_msi: address_lo, address_hi, data, flags and devid "
                             "are 32-bit fields")
        if self.closed:
            self.check_open()
        if self.irqfds and not self._depth:
            self.irqfds_at_operation_start()
        if flags & ~KVM_MSI_VALID_DEVID:
            raise KvmError(U.EINVAL, "KVM_SIGNAL_MSI", "unknown flags")
        r = self.router.kvm_set_msi(address_lo, address_hi, data)
        self.settle()
        tr = self.trace
        if tr is not None:
            for v in self.vcpus:
                tr.apic_state(v.apic)
        if r < 0:
            raise KvmError(-r, "KVM_SIGNAL_MSI",
                           "no APIC matched the destination" if r == -1
                           else "address_hi bits 7:0 must be 0 with 32-bit IDs")
        return r

    # ------------------------------------------------------------------ APICv inhibits
    @property
    def apicv_inhibits(self) -> int:
        return self.kvm.apicv_inhibit_reasons

    def kvm_set_or_clear_apicv_inhibit(self, reason: int, set_: bool) -> None:
        """kvm_set_or_clear_apicv_inhibit(): a zero <-> nonzero change of the mask raises
        KVM_REQ_APICV_UPDATE on every vCPU."""
        kvm = self.kvm
        if not kvm.enable_apicv:
            return
        if not VMX_REQUIRED_APICV_INHIBITS >> reason & 1:
            return
        old = kvm.apicv_inhibit_reasons
        new = (old | (1 << reason)) if set_ else (old & ~(1 << reason))
        tr = self.trace
        if tr is not None:
            tr.kvm_apicv_inhibit_changed(int(reason), set_, new)
        if bool(old) != bool(new):
            for v in self.vcpus:
                v.arch.requests |= KVM_REQ_APICV_UPDATE
                v.apic.kvm_vcpu_kick()
        kvm.apicv_inhibit_reasons = new

    def set_or_clear_apicv_inhibit(self, reason, set_: bool) -> None:
        """User-driven inhibit toggle (names as in enum kvm_apicv_inhibit, no prefix);
        ValueError for a reason KVM does not have."""
        reason = ApicvInhibit.parse(reason)
        with self.vm_ioctl():
            self.kvm_set_or_clear_apicv_inhibit(reason, bool(set_))

    def kvm_vcpu_update_apicv(self, vcpu: Vcpu) -> None:
        """__kvm_vcpu_update_apicv(): (de)activate APICv on this vCPU at its next entry."""
        apic = vcpu.apic
        activate = (self.kvm.enable_apicv and self.kvm.apicv_inhibit_reasons == 0
                    and apic.hw_enabled)
        if apic.apicv_active == activate:
            return
        apic.apicv_active = activate
        apic.kvm_apic_update_apicv()
        apic.ops.refresh_apicv_exec_ctrl(apic)
        if not activate:
            vcpu.arch.requests |= KVM_REQ_EVENT
        tr = self.trace
        if tr is not None:
            tr.timeline.append((self.clock.now, vcpu.vcpu_id, "apicv", int(activate)))

    def vendor_ops(self) -> VendorOps:
        return _TDX_OPS if self.kvm.is_td else _VMX_OPS

    @property
    def vm_type(self) -> int:
        """The KVM_CREATE_VM machine type (0 default, 5 KVM_X86_TDX_VM)."""
        return self.kvm.vm_type

    # ------------------------------------------------------------------ settling
    def settle(self) -> None:
        """The one place where the effects of an operation are settled.

        What KVM does at the end of a register write, an APIC-base write, a reset or a state
        restore: ``kvm_recalculate_apic_map`` when the map is dirty (with the inhibits it
        implies and KVM_REQ_SCAN_IOAPIC), the inhibits a LAPIC asked for, ``pic_unlock`` when
        the PIC's output rose, and the timers that fell due. Inside an operation that is all
        (called again by the vCPU code where KVM would have done it). When no operation is in
        progress, the vCPUs kicked meanwhile -- resting in guest mode or in HLT -- then take
        what was sent to them (:meth:`deliver_kicks`), until nothing is left to do."""
        kvm = self.kvm
        self._depth += 1
        try:
            if kvm.apic_map_dirty:
                self.kvm_recalculate_apic_map()
            if kvm.inhibit_requests:
                req, kvm.inhibit_requests = kvm.inhibit_requests, 0
                for reason in ApicvInhibit:
                    if req >> reason & 1:
                        self.kvm_set_or_clear_apicv_inhibit(reason, True)
            pic = self.pic
            if pic is not None and (pic.wakeup_needed or pic.acked or pic.mask_notified):
                self.pic_unlock()
            clock = self.clock
            nxt = clock.next_expiry()
            if nxt is not None and nxt <= clock.now:
                clock.advance(0)  # a timer's callback only marks work (IRR, requests, kicks)
        finally:
            self._depth -= 1
        if not self._depth and kvm.kicked:
            self.deliver_kicks()

    def set_kick_handler(self, handler) -> None:
        """Let a VMM deliver ``kvm_vcpu_kick``: *handler(vcpu)* is called, when the operation
        that kicked is settled, for each vCPU the model kicked (instead of the simulated
        processor taking the interrupt). None restores the simulated processor."""
        self.kick_handler = handler

    def deliver_kicks(self) -> None:
        """Deliver what was sent to vCPUs resting in guest mode or in HLT (their kick IPIs and
        posted-interrupt notifications), now that no operation is in progress."""
        kicked = self.kvm.kicked
        handler = self.kick_handler
        vcpus = self.vcpus
        if handler is not None:
            while kicked:
                handler(vcpus[kicked.pop(0).vcpu_idx])
            return
        rounds = 0
        while kicked:
            rounds += 1
            if rounds > 100_000:
                raise RuntimeError("kicks did not settle")
            vcpu = vcpus[kicked.pop(0).vcpu_idx]
            if vcpu.location != "host":
                with self.vcpu_ioctl(vcpu, service=False):
                    vcpu.service_kick()

    def _after_timer(self) -> None:
        """A timer fired (clock.after_fire). Inside an operation its kick only waits in
        ``kvm.kicked``; outside one (the user advanced the clock) it is delivered now, each
        expiry at its own instant."""
        if not self._depth and self.kvm.kicked:
            self.deliver_kicks()

    def kvm_recalculate_apic_map(self) -> None:
        kvm = self.kvm
        kvm.apic_map_dirty = False
        res = kvm_recalculate_apic_map(kvm, self.router.apics)
        self.router.map = res.map
        self.kvm_set_or_clear_apicv_inhibit(ApicvInhibit.PHYSICAL_ID_ALIASED,
                                            res.physical_id_aliased)
        self.kvm_set_or_clear_apicv_inhibit(ApicvInhibit.LOGICAL_ID_ALIASED,
                                            res.logical_id_aliased)
        self.kvm_set_or_clear_apicv_inhibit(ApicvInhibit.APIC_ID_MODIFIED,
                                            res.xapic_id_mismatch)
        self.kvm_make_scan_ioapic_request()

    def kvm_make_scan_ioapic_request(self, vcpu_idxs: set[int] | None = None) -> None:
        """kvm_make_scan_ioapic_request(_mask)(): KVM_REQ_SCAN_IOAPIC on every vCPU (or those
        indexes). The request is NO_WAKEUP: a vCPU in guest mode is kicked out to take it, a
        halted one is not woken."""
        for v in self.vcpus:
            if vcpu_idxs is not None and v.arch.vcpu_idx not in vcpu_idxs:
                continue
            arch = v.arch
            arch.requests |= KVM_REQ_SCAN_IOAPIC
            if arch.in_guest_mode and not arch.kick_pending:
                arch.kick_pending = True
                self.kvm.kicked.append(arch)

    def kvm_apicv_activated(self) -> bool:
        """kvm_apicv_activated(): APICv enabled and not inhibited VM-wide."""
        return self.kvm.apicv_inhibit_reasons == 0

    @property
    def apic_map(self):
        """The current optimized map (None while physical IDs alias: slow path only)."""
        return self.router.map

    def process_vcpu_requests(self, vcpu: Vcpu) -> None:
        """Requests a vCPU handles at entry that belong to VM-level devices, in
        vcpu_enter_guest()'s order."""
        arch = vcpu.arch
        if arch.requests & KVM_REQ_IOAPIC_EOI_EXIT:
            arch.requests &= ~KVM_REQ_IOAPIC_EOI_EXIT
            vector = arch.pending_ioapic_eoi
            if arch.ioapic_handled_vectors >> vector & 1:
                # KVM_EXIT_IOAPIC_EOI: KVM_RUN returns to the split irqchip's userspace
                # IOAPIC, which re-enters; the guest operation goes on
                vcpu.user_exit("IOAPIC_EOI", vector)
        if arch.requests & KVM_REQ_SCAN_IOAPIC:
            arch.requests &= ~KVM_REQ_SCAN_IOAPIC
            self.vcpu_scan_ioapic(vcpu)
        if arch.requests & KVM_REQ_LOAD_EOI_EXITMAP:
            arch.requests &= ~KVM_REQ_LOAD_EOI_EXITMAP
            self.vcpu_load_eoi_exitmap(vcpu)

    def vcpu_scan_ioapic(self, vcpu: Vcpu) -> None:
        """Which vectors need an EOI exit for the IOAPIC; then KVM_REQ_LOAD_EOI_EXITMAP."""
        apic = vcpu.apic
        if not apic.hw_enabled:
            return
        vcpu.arch.ioapic_handled_vectors = 0
        vcpu.arch.highest_stale_pending_ioapic_eoi = -1
        apic.ops.sync_pir_to_irr(apic)
        if self.kvm.irqchip_split:
            vcpu.arch.ioapic_handled_vectors = self.kvm_scan_ioapic_routes(vcpu)
        elif self.ioapic is not None:
            vcpu.arch.ioapic_handled_vectors = self.ioapic.kvm_ioapic_scan_entry(vcpu)
        vcpu.arch.requests |= KVM_REQ_LOAD_EOI_EXITMAP

    def vcpu_load_eoi_exitmap(self, vcpu: Vcpu) -> None:
        apic = vcpu.apic
        if apic.hw_enabled:
            apic.ops.load_eoi_exitmap(apic, vcpu.arch.ioapic_handled_vectors)

    def kvm_ioapic_update_eoi(self, vcpu: Vcpu, vector: int, level: bool) -> None:
        """kvm_ioapic_send_eoi() -> kvm_ioapic_update_eoi(): an EOI for a vector the IOAPIC
        handles (recorded in ``eoi_broadcasts`` too)."""
        self.eoi_broadcasts.append((vcpu.vcpu_id, vector, level))
        if self.ioapic is not None:
            self.ioapic.kvm_ioapic_update_eoi(vcpu, vector, int(level))

    def kvm_cpu_has_extint(self, vcpu: Vcpu) -> bool:
        """kvm_cpu_has_extint(): an ExtINT for a vCPU that accepts PIC interrupts (LVT0
        unmasked ExtINT, or its APIC hardware-disabled: kvm_apic_accept_pic_intr) -- the
        in-kernel PIC's output, or with a split irqchip the vector userspace gave with
        KVM_INTERRUPT (pending_userspace_extint). (The cheap test goes first; the answer is
        KVM's.)"""
        pic = self.pic
        if pic is not None:
            return bool(pic.output) and vcpu.apic.kvm_apic_accept_pic_intr()
        if vcpu.arch.pending_external_vector == -1:
            return False
        return vcpu.apic.kvm_apic_accept_pic_intr()

    def kvm_cpu_get_extint(self, vcpu: Vcpu) -> int:
        """kvm_cpu_get_extint(): the PIC's INTA cycle (kvm_pic_read_irq), or with a split
        irqchip the KVM_INTERRUPT vector, taken (get_userspace_extint); -1 if none."""
        if not self.kvm_cpu_has_extint(vcpu):
            return -1
        if self.pic is None:
            vector = vcpu.arch.pending_external_vector
            vcpu.arch.pending_external_vector = -1
            return vector
        vector = self.pic.kvm_pic_read_irq()
        self.pic_unlock()
        return vector

    def kvm_lapic_sync_to_vapic(self, vcpu: Vcpu) -> None:
        """kvm_lapic_sync_to_vapic(): the PV-EOI flag and the VAPIC word, before entry."""
        vcpu.apic.kvm_lapic_sync_to_vapic(self.mem)

    # ------------------------------------------------------------------ irqchip ioctls
    def irq_line(self, irq: int, level: int) -> int:
        """KVM_IRQ_LINE_STATUS from userspace (KVM_USERSPACE_IRQ_SOURCE_ID): the status
        kvm_set_irq() returns -- -1 if no route took it (masked, waiting for EOI, no route
        for the GSI), 0 if coalesced, else a positive count (1 for a lowered line)."""
        if not 0 <= irq <= _U32:
            raise ValueError(f"GSI {irq} does not fit in 32 bits")
        if not 0 <= level <= _U32:
            raise ValueError(f"level {level} does not fit in 32 bits")
        with self.vm_ioctl():
            # kvm_vm_ioctl_irq_line(): the GSI's routes (KVM_SET_GSI_ROUTING, or the default
            # one), line status reported
            ret = self.kvm_set_irq(U.KVM_USERSPACE_IRQ_SOURCE_ID, irq, level, True)
        tr = self.trace
        if tr is not None:
            for v in self.vcpus:
                tr.apic_state(v.apic)
        return ret

    def get_irqchip(self, chip_id: int) -> bytes:
        """KVM_GET_IRQCHIP: struct kvm_pic_state (16 bytes) for chips 0/1, struct
        kvm_ioapic_state (216 bytes) for chip 2."""
        self.check_open()
        if self.ioapic is None:
            raise KvmError(U.ENXIO, "KVM_GET_IRQCHIP", "no in-kernel PIC/IOAPIC (split irqchip)")
        if chip_id in (U.KVM_IRQCHIP_PIC_MASTER, U.KVM_IRQCHIP_PIC_SLAVE):
            return self.pic.get_state(chip_id)
        if chip_id == U.KVM_IRQCHIP_IOAPIC:
            return self.ioapic.kvm_get_ioapic()
        raise KvmError(U.EINVAL, "KVM_GET_IRQCHIP", f"chip_id {chip_id}")

    def set_irqchip(self, chip_id: int, data: bytes) -> None:
        """KVM_SET_IRQCHIP (the used bytes of the chip, or the whole 512-byte union)."""
        self.check_open()
        if self.ioapic is None:
            raise KvmError(U.ENXIO, "KVM_SET_IRQCHIP", "no in-kernel PIC/IOAPIC (split irqchip)")
        data = bytes(data)
        size = (U.KVM_IOAPIC_STATE_SIZE if chip_id == U.KVM_IRQCHIP_IOAPIC
                else U.KVM_PIC_STATE_SIZE)
        if len(data) not in (size, U.KVM_IRQCHIP_STATE_SIZE):
            raise ValueError(f"chip {chip_id} state is {size} (or "
                             f"{U.KVM_IRQCHIP_STATE_SIZE}) bytes, not {len(data)}")
        err = None
        if chip_id in (U.KVM_IRQCHIP_PIC_MASTER, U.KVM_IRQCHIP_PIC_SLAVE):
            self.pic.set_state(chip_id, data[:U.KVM_PIC_STATE_SIZE])
        elif chip_id == U.KVM_IRQCHIP_IOAPIC:
            self.ioapic.kvm_set_ioapic(data)
        else:
            err = KvmError(U.EINVAL, "KVM_SET_IRQCHIP", f"chip_id {chip_id}")
        self.pic.kvm_pic_update_irq()  # whatever the chip
        self.after_vm_ioctl()
        if err is not None:
            raise err

    def read_guest(self, gpa: int, size: int) -> bytes:
        """The VMM reads guest RAM (ValueError outside the RAM memslot)."""
        return self.mem.read(gpa, size)

    def write_guest(self, gpa: int, data: bytes) -> None:
        """The VMM writes guest RAM (ValueError outside the RAM memslot)."""
        self.mem.write(gpa, bytes(data))

    def picdev_read(self, port: int) -> int:
        """A read of an in-kernel PIC port (picdev_read under pic_lock; pic_unlock after)."""
        out = self.pic.picdev_read(port)
        self.pic_unlock()
        return out

    def picdev_write(self, port: int, value: int) -> None:
        """A write to an in-kernel PIC port (picdev_write; pic_unlock after). kvm_pic_reset()
        (ICW1) asks whether any vCPU accepts PIC interrupts."""
        pic = self.pic
        pic.accept_pic_intr = any(v.apic.kvm_apic_accept_pic_intr() for v in self.vcpus)
        pic.picdev_write(port, value)
        self.pic_unlock()

    def pic_unlock(self) -> None:
        """pic_unlock(): when the PIC's output rose, KVM_REQ_EVENT and a kick for the first
        vCPU that accepts PIC interrupts; then the acks and (un)maskings the PIC operation
        made reach their notifiers (pic_clear_isr drops the lock for kvm_notify_acked_irq,
        an IMR write fires kvm_fire_mask_notifiers), which may drive the PIC again."""
        pic = self.pic
        if pic is None:
            return
        while True:
            if pic.wakeup_needed:
                pic.wakeup_needed = False
                for v in self.vcpus:
                    if v.apic.kvm_apic_accept_pic_intr():
                        v.arch.requests |= KVM_REQ_EVENT
                        v.apic.kvm_vcpu_kick()
                        break
            if not (pic.acked or pic.mask_notified):
                return
            acked, pic.acked = pic.acked, []
            masked, pic.mask_notified = pic.mask_notified, []
            for irq in acked:  # 0-15; SELECT_PIC(irq)
                self.kvm_notify_acked_irq(U.KVM_IRQCHIP_PIC_SLAVE if irq >= 8
                                          else U.KVM_IRQCHIP_PIC_MASTER, irq)
            for irq, mask in masked:
                self.kvm_fire_mask_notifiers(U.KVM_IRQCHIP_PIC_SLAVE if irq >= 8
                                             else U.KVM_IRQCHIP_PIC_MASTER, irq, mask)

    def after_vm_ioctl(self) -> None:
        """The end of a VM ioctl that changed a device: settle, then sample the timeline."""
        self.settle()
        tr = self.trace
        if tr is not None:
            for v in self.vcpus:
                tr.apic_state(v.apic)

    def ioapic_mmio(self, gpa: int, size: int, value: int | None) -> int | None:
        """A guest access to the IOAPIC window: the value read (or 0 for a write), or None
        when no in-kernel device claims it (it goes to userspace as KVM_EXIT_MMIO)."""
        ioapic = self.ioapic
        if ioapic is None:
            return None
        if value is None:
            return ioapic.ioapic_mmio_read(gpa, size)
        return 0 if ioapic.ioapic_mmio_write(gpa, size, value) else None

    # ------------------------------------------------------------------ plumbing
    @contextmanager
    def vcpu_ioctl(self, vcpu: Vcpu, service: bool = True):
        """A vCPU ioctl (or one guest operation) on *vcpu*: ``vcpu->mutex``. With *service*
        the VMM first takes a vCPU resting in KVM_RUN out of it. The operation's effects are
        settled when it ends (:meth:`settle`)."""
        self.check_open()
        if self.kvm.vm_bugged:
            raise KvmError(U.EIO, "vCPU ioctl", "the VM is dead (KVM_BUG_ON fired)")
        if self.irqfds and not self._depth:
            self.irqfds_at_operation_start()
        if service:
            # a vCPU ioctl needs vcpu->mutex: the VMM takes the vCPU out of KVM_RUN first
            vcpu.leave_guest()
        if self.clock.source is not None:
            self.clock.sync()
        tr = self.trace
        old = VM_CONTEXT
        if tr is not None:
            old = tr.context
            tr.context = vcpu.vcpu_id
        self._depth += 1
        try:
            yield
        finally:
            try:
                self.settle()  # still counted as in progress: kicks wait for the trace sample
            finally:
                self._depth -= 1
            if tr is not None:
                tr.context = old
                tr.apic_state(vcpu.apic)
        if service and not self._depth and self.kvm.kicked:
            self.deliver_kicks()

    @contextmanager
    def vm_ioctl(self):
        """A VM ioctl: its effects are settled when it ends."""
        self.check_open()
        if self.irqfds and not self._depth:
            self.irqfds_at_operation_start()
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        self.settle()

    def check_open(self) -> None:
        """ValueError once the VM is closed (as the real backend says)."""
        if self.closed:
            raise ValueError("the VM is closed")

    def enable_tracing(self, limit: int | None = None) -> Tracer:
        """Attach a tracer (tracing is off, and free, until this is called)."""
        tr = Tracer(self.clock, limit=limit)
        tr.context = VM_CONTEXT
        self.trace = tr
        self.router.trace = tr
        if self.ioapic is not None:
            self.ioapic.trace = tr
            self.pic.trace = tr
        for v in self.vcpus:
            v.apic.trace = tr
        return tr

    def close(self) -> None:
        """Close the VM: later calls raise ValueError, as on the real backend (the model
        holds no fds; its timers are cancelled)."""
        if self.closed:
            return
        self.closed = True
        for v in self.vcpus:
            v.apic.cancel_apic_timer()
        if self.ioapic is not None:
            self.ioapic.eoi_inject.cancel()
        if self.pit is not None:
            self.pit.kvm_free_pit()

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Vm(backend='model', vcpus={[v.vcpu_id for v in self.vcpus]})"
