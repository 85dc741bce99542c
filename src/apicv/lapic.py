"""The in-kernel local APIC: KVM's ``struct kvm_lapic`` and the functions of arch/x86/kvm/lapic.c
that work on one APIC, under their KVM names.

This module is larger than the others on purpose: it is the model of one C file whose functions
share one structure, and keeping them together keeps the KVM-name-to-code map one-to-one.
(The timer half of lapic.c is in :mod:`apicv.timer`, the routing half in :mod:`apicv.apic_map`
and :mod:`apicv.delivery`.)

The register file never calls its peers. A write returns what must happen next:

* :class:`SendIpi` - an IPI for the VM to route (``kvm_apic_send_ipi``),
* :class:`EoiBroadcast` - an EOI for the in-kernel IOAPIC (``kvm_ioapic_send_eoi``),
* :data:`REJECTED` - KVM's "ret 1": dropped for MMIO, a #GP for an x2APIC MSR,
* ``None`` - nothing more.

Requests for this vCPU (``kvm_make_request``) are bits in ``self.arch.requests``; VM-wide
consequences are flags in ``self.kvm`` (``apic_map_dirty``, ``inhibit_requests``) that the VM
acts on after the operation, as ``kvm_recalculate_apic_map`` runs at the end of a register write.

Vector sets (IRR, ISR, TMR) are 256-bit Python ints; the rest of the 1 KiB register page is a
``bytearray`` viewed as 32-bit words, so KVM_GET/SET_LAPIC are byte-exact, reserved bytes
included.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import apicdef as A
from .arch import SEB_DISABLED, SEB_ENABLED, KvmArch, VcpuArch
from .kvm_host import (
    KVM_APIC_CHECK_VAPIC,
    KVM_APIC_INIT,
    KVM_APIC_PV_EOI_PENDING,
    KVM_APIC_SIPI,
    KVM_REQ_APF_READY,
    KVM_REQ_APICV_UPDATE,
    KVM_REQ_EVENT,
    KVM_REQ_IOAPIC_EOI_EXIT,
    KVM_REQ_NMI,
    KVM_REQ_REPORT_TPR_ACCESS,
    KVM_REQ_SMI,
    ApicvInhibit,
    LapicMode,
)
from .regs import LVT_OFFSETS, LVT_WRITE_MASK, readable_reg_mask
from .timer import LAPIC_TIMER_ADVANCE_NS_INIT, LapicTimerMixin
from .uapi import EINVAL as _EINVAL
from .uapi import (
    KVM_APIC_REG_SIZE,
    KVM_MSR_ENABLED,
    KVM_PV_EOI_ENABLED,
    KVM_X86_QUIRK_LINT0_REENABLED,
)

if TYPE_CHECKING:
    from .clock import Clock
    from .trace import Tracer

APIC_VERSION = 0x14
LAPIC_MMIO_LENGTH = 1 << 12
_U32 = 0xFFFFFFFF
_ALL_VECTORS = (1 << 256) - 1


class SendIpi:
    """An IPI the VM must route: kvm_apic_send_ipi(apic, icr_low, icr_high).

    ``dest_id`` is already taken from ICR2[31:24] (xAPIC) or ICR[63:32] (x2APIC).
    ``x2apic_icr`` is the 64-bit value of an x2APIC ICR write, which KVM traces only after the
    IPI has been delivered (kvm_x2apic_icr_write)."""

    __slots__ = ("source", "icr_low", "dest_id", "x2apic_icr")

    def __init__(self, source: LocalApic, icr_low: int, dest_id: int,
                 x2apic_icr: int | None = None) -> None:
        self.source = source
        self.icr_low = icr_low
        self.dest_id = dest_id
        self.x2apic_icr = x2apic_icr

    def __repr__(self) -> str:
        return f"SendIpi(icr_low={self.icr_low:#x}, dest_id={self.dest_id:#x})"


class EoiBroadcast:
    """An EOI for the in-kernel IOAPIC (kvm_ioapic_update_eoi(vcpu, vector, trigger))."""

    __slots__ = ("source", "vector", "level")

    def __init__(self, source: LocalApic, vector: int, level: bool) -> None:
        self.source = source
        self.vector = vector
        self.level = level

    def __repr__(self) -> str:
        return f"EoiBroadcast(vector={self.vector:#x}, level={self.level})"


class _Rejected:
    __slots__ = ()

    def __repr__(self) -> str:
        return "REJECTED"

    def __bool__(self) -> bool:
        return False


REJECTED = _Rejected()


class VendorOps:
    """The kvm_x86_ops hooks lapic.c calls (``kvm_x86_call(...)``), as VMX behaves with APICv
    inactive. :mod:`apicv.vmx` supplies the APICv-active behaviour."""

    def deliver_interrupt(self, apic: LocalApic, dm: int, trig: int, vector: int) -> None:
        """vmx_deliver_interrupt() when posting fails (APICv inactive): IRR, event, kick."""
        apic.kvm_lapic_set_irr(vector)
        apic.arch.requests |= KVM_REQ_EVENT
        apic.kvm_vcpu_kick()

    def sync_pir_to_irr(self, apic: LocalApic) -> int:
        return apic.apic_find_highest_irr()

    def hwapic_irr_update(self, apic: LocalApic, max_irr: int) -> None:
        pass

    def hwapic_isr_update(self, apic: LocalApic, max_isr: int) -> None:
        pass

    def apicv_pre_state_restore(self, apic: LocalApic) -> None:
        pass

    def apicv_post_state_restore(self, apic: LocalApic) -> None:
        pass

    def refresh_apicv_exec_ctrl(self, apic: LocalApic) -> None:
        pass

    def load_eoi_exitmap(self, apic: LocalApic, bitmap: int) -> None:
        pass

    def update_cr8_intercept(self, apic: LocalApic, tpr: int, max_irr: int) -> None:
        pass

    def set_virtual_apic_mode(self, apic: LocalApic) -> None:
        pass


def kvm_apic_calc_x2apic_ldr(id_: int) -> int:
    return ((id_ >> 4) << 16) | (1 << (id_ & 0xF))


def kvm_apic_mode(apic_base: int) -> LapicMode:
    return LapicMode(apic_base & (A.MSR_IA32_APICBASE_ENABLE | A.X2APIC_ENABLE))


class LocalApic(LapicTimerMixin):
    """struct kvm_lapic for one vCPU (plus the lapic.c functions that operate on it)."""

    __slots__ = (
        "vcpu_id", "arch", "kvm", "clock", "ops", "trace", "page", "r", "irr", "isr", "tmr",
        "base_address", "hw_enabled", "x2apic", "sw_enabled", "irr_pending", "isr_count",
        "highest_isr_cache", "apicv_active", "lvt0_in_nmi_mode", "nr_lvt_entries",
        "pending_events", "sipi_vector", "divide_count", "vapic_addr", "vapic_cache_ok",
        "pv_eoi_cache_ok", "guest_apic_protected",
        "tpr_access_write", "vmx",
        # struct kvm_timer
        "timer", "period", "target_expiration", "timer_mode", "timer_mode_mask", "tscdeadline",
        "expired_tscdeadline", "timer_advance_ns", "timer_pending", "hv_timer_in_use",
    )

    def __init__(self, arch: VcpuArch, kvm: KvmArch, clock: Clock,
                 ops: VendorOps | None = None) -> None:
        """kvm_create_lapic(): a zeroed page, apic_base = ENABLE, software-disabled.

        The RESET values are put in place by :meth:`kvm_lapic_reset` (kvm_vcpu_reset)."""
        self.vcpu_id = arch.vcpu_id
        self.arch = arch
        self.kvm = kvm
        self.clock = clock
        self.ops = ops or VendorOps()
        self.trace: Tracer | None = None
        self.vmx = None
        self.page = bytearray(KVM_APIC_REG_SIZE)
        self.r = memoryview(self.page).cast("I")
        self.irr = 0
        self.isr = 0
        self.tmr = 0
        self.sw_enabled = False
        self.irr_pending = False
        self.isr_count = 0
        self.highest_isr_cache = -1
        self.apicv_active = False
        self.lvt0_in_nmi_mode = False
        self.nr_lvt_entries = self.kvm_apic_calc_nr_lvt_entries()
        self.pending_events = 0
        self.sipi_vector = 0
        self.divide_count = 2
        self.vapic_addr = 0
        # the gfn_to_hva caches behind the VAPIC word and the PV-EOI byte: a failed
        # (re)initialisation leaves them unusable until the next successful one
        self.vapic_cache_ok = True
        self.pv_eoi_cache_ok = True
        self.guest_apic_protected = False
        self.tpr_access_write: bool | None = None
        # struct kvm_timer
        self.timer = clock.timer(self.apic_timer_fn)
        self.period = 0
        self.target_expiration = 0
        self.timer_mode = 0
        self.timer_mode_mask = self.timer_mode_mask_for_cpuid()
        self.tscdeadline = 0
        self.expired_tscdeadline = 0
        self.timer_advance_ns = LAPIC_TIMER_ADVANCE_NS_INIT if kvm.lapic_timer_advance else 0
        self.timer_pending = 0
        self.hv_timer_in_use = False
        # "Stuff the APIC ENABLE bit in lieu of temporarily incrementing apic_hw_disabled"
        arch.apic_base = A.MSR_IA32_APICBASE_ENABLE
        self.hw_enabled = True
        self.x2apic = False
        self.base_address = 0
        if kvm.enable_apicv:
            self.apicv_active = True
            arch.requests |= KVM_REQ_APICV_UPDATE

    # ------------------------------------------------------------------ configuration
    def kvm_apic_calc_nr_lvt_entries(self) -> int:
        from .uapi import MCG_CMCI_P

        return A.KVM_APIC_MAX_NR_LVT_ENTRIES - (0 if self.arch.mcg_cap & MCG_CMCI_P else 1)

    def timer_mode_mask_for_cpuid(self) -> int:
        """kvm_vcpu_after_set_cpuid -> apic->lapic_timer.timer_mode_mask."""
        if not self.arch.cpuid_set:
            return 0
        return (3 << 17) if self.arch.cpuid_tsc_deadline else (1 << 17)

    def kvm_apic_set_version(self) -> None:
        v = APIC_VERSION | ((self.nr_lvt_entries - 1) << 16)
        # KVM's IOAPIC has no EOI register: directed EOI only without an in-kernel IOAPIC, and
        # not when userspace disabled it (KVM_X2APIC_DISABLE_SUPPRESS_EOI_BROADCAST)
        if (self.arch.cpuid_x2apic and self.kvm.suppress_eoi_broadcast_mode != SEB_DISABLED
                and not self.kvm.ioapic_in_kernel):
            v |= A.APIC_LVR_DIRECTED_EOI
        self.kvm_lapic_set_reg(A.APIC_LVR, v)

    def kvm_apic_after_set_mcg_cap(self) -> None:
        nr = self.kvm_apic_calc_nr_lvt_entries()
        if nr == self.nr_lvt_entries:
            return
        for i in range(self.nr_lvt_entries, nr):
            self.kvm_lapic_set_reg(A.APIC_LVTx(i), A.APIC_LVT_MASKED)
        self.nr_lvt_entries = nr
        self.kvm_apic_set_version()

    # ------------------------------------------------------------------ raw register access
    def kvm_lapic_get_reg(self, off: int) -> int:
        return self.r[off >> 2]

    def kvm_lapic_set_reg(self, off: int, val: int) -> None:
        self.r[off >> 2] = val & _U32

    def kvm_lapic_get_reg64(self, off: int) -> int:
        return self.r[off >> 2] | (self.r[(off >> 2) + 1] << 32)

    def kvm_lapic_set_reg64(self, off: int, val: int) -> None:
        self.r[off >> 2] = val & _U32
        self.r[(off >> 2) + 1] = (val >> 32) & _U32

    def kvm_xapic_id(self) -> int:
        return self.r[A.APIC_ID >> 2] >> 24

    def kvm_x2apic_id(self) -> int:
        return self.vcpu_id

    def apic_enabled(self) -> bool:
        return self.sw_enabled and self.hw_enabled

    def kvm_apic_present(self) -> bool:
        return self.hw_enabled

    def kvm_get_apic_mode(self) -> LapicMode:
        return kvm_apic_mode(self.arch.apic_base)

    def _mark_map_dirty(self) -> None:
        self.kvm.apic_map_dirty = True

    def _make_request(self, req: int) -> None:
        self.arch.requests |= req

    # ------------------------------------------------------------------ IRR / ISR
    def kvm_lapic_set_irr(self, vec: int) -> None:
        self.irr |= 1 << vec
        self.irr_pending = True

    def apic_search_irr(self) -> int:
        return self.irr.bit_length() - 1

    def apic_find_highest_irr(self) -> int:
        """irr_pending is a hint (always true under APICv)."""
        if not self.irr_pending:
            return -1
        return self.irr.bit_length() - 1

    def kvm_lapic_find_highest_irr(self) -> int:
        return self.apic_find_highest_irr()

    def apic_clear_irr(self, vec: int) -> None:
        if self.apicv_active:
            self.irr &= ~(1 << vec)  # (6.18: no RVI update here; the next entry syncs it)
        else:
            self.irr &= ~(1 << vec)
            self.irr_pending = self.irr != 0

    def apic_set_isr(self, vec: int) -> None:
        bit = 1 << vec
        if self.isr & bit:
            return
        self.isr |= bit
        if self.apicv_active:
            self.ops.hwapic_isr_update(self, vec)
        else:
            self.isr_count += 1
            # "The highest vector is injected. Thus the latest bit set matches the highest bit"
            self.highest_isr_cache = vec
        tr = self.trace
        if tr is not None:
            tr.in_service(self.vcpu_id, vec, True)

    def apic_find_highest_isr(self) -> int:
        """isr_count is always 1 and highest_isr_cache always -1 under APICv."""
        if not self.isr_count:
            return -1
        if self.highest_isr_cache != -1:
            return self.highest_isr_cache
        return self.isr.bit_length() - 1

    def apic_clear_isr(self, vec: int) -> None:
        bit = 1 << vec
        if not self.isr & bit:
            return
        self.isr &= ~bit
        if self.apicv_active:
            self.ops.hwapic_isr_update(self, self.apic_find_highest_isr())
        else:
            self.isr_count -= 1
            self.highest_isr_cache = -1
        tr = self.trace
        if tr is not None:
            tr.in_service(self.vcpu_id, vec, False)

    def kvm_apic_update_hwapic_isr(self) -> None:
        if not self.apicv_active:
            return
        self.ops.hwapic_isr_update(self, self.apic_find_highest_isr())

    def kvm_apic_pending_eoi(self, vector: int) -> bool:
        return bool((self.isr | self.irr) >> vector & 1)

    def kvm_apic_update_irr(self, pir: int) -> tuple[bool, int]:
        """kvm_apic_update_irr(vcpu, pir, &max_irr) / __kvm_apic_update_irr: OR the posted
        vectors into IRR; returns (the highest IRR is newly set, max_irr)."""
        prev = self.irr
        new = prev | pir
        self.irr = new
        max_irr = new.bit_length() - 1
        changed = new ^ prev
        irr_updated = changed != 0 and changed.bit_length() - 1 == max_irr
        if not self.apicv_active and irr_updated:
            self.irr_pending = True
        return irr_updated, max_irr

    def kvm_apic_update_apicv(self) -> None:
        """Refresh the caches after APICv is toggled or state restored; with APICv active,
        SVI is set to the highest ISR vector."""
        self.irr_pending = True
        if self.apicv_active:
            self.isr_count = 1
            self.ops.hwapic_isr_update(self, self.isr.bit_length() - 1)
        else:
            self.isr_count = self.isr.bit_count()
        self.highest_isr_cache = -1

    # ------------------------------------------------------------------ priorities
    def __apic_update_ppr(self) -> tuple[bool, int]:
        """Returns (PPR dropped, new PPR). PPR is written only when it changes."""
        r = self.r
        old_ppr = r[A.APIC_PROCPRI >> 2]
        tpr = r[A.APIC_TASKPRI >> 2]
        isr = self.apic_find_highest_isr()
        isrv = isr if isr != -1 else 0
        if (tpr & 0xF0) >= (isrv & 0xF0):
            ppr = tpr & 0xFF
        else:
            ppr = isrv & 0xF0
        if old_ppr != ppr:
            r[A.APIC_PROCPRI >> 2] = ppr
            tr = self.trace
            if tr is not None:
                tr.priority(self.vcpu_id, tpr & 0xFF, ppr)
        return ppr < old_ppr, ppr

    def apic_has_interrupt_for_ppr(self, ppr: int) -> int:
        highest_irr = self.ops.sync_pir_to_irr(self)
        if highest_irr == -1 or (highest_irr & 0xF0) <= ppr:
            return -1
        return highest_irr

    def apic_update_ppr(self) -> None:
        """(6.18: the CR8-intercept update moved to vcpu_enter_guest and KVM_SET_LAPIC.)"""
        dropped, ppr = self.__apic_update_ppr()
        if dropped and self.apic_has_interrupt_for_ppr(ppr) != -1:
            self.arch.requests |= KVM_REQ_EVENT

    def kvm_apic_update_ppr(self) -> None:
        self.apic_update_ppr()

    def kvm_lapic_update_cr8_intercept(self) -> None:
        if self.apicv_active:
            return
        max_irr = self.kvm_lapic_find_highest_irr() if not self.vapic_addr else -1
        if max_irr != -1:
            max_irr >>= 4
        self.ops.update_cr8_intercept(self, self.kvm_lapic_get_cr8(), max_irr)

    def apic_set_tpr(self, tpr: int) -> None:
        self.kvm_lapic_set_reg(A.APIC_TASKPRI, tpr)
        self.apic_update_ppr()

    def kvm_lapic_set_tpr(self, cr8: int) -> None:
        """A guest MOV to CR8: TPR = (cr8 & 0xf) << 4 (no TPR-access report)."""
        self.apic_set_tpr((cr8 & 0x0F) << 4)

    def kvm_lapic_get_cr8(self) -> int:
        return (self.kvm_lapic_get_reg(A.APIC_TASKPRI) & 0xF0) >> 4

    def kvm_apic_has_interrupt(self) -> int:
        """Highest deliverable vector above PPR, or -1."""
        if not self.hw_enabled or self.guest_apic_protected:
            return -1
        _, ppr = self.__apic_update_ppr()
        return self.apic_has_interrupt_for_ppr(ppr)

    def kvm_apic_ack_interrupt(self, vector: int) -> None:
        """The interrupt is injected: IRR -> ISR, PPR raised (no new KVM_REQ_EVENT)."""
        self.apic_clear_irr(vector)
        self.apic_set_isr(vector)
        self.__apic_update_ppr()

    def kvm_ioapic_handles_vector(self, vector: int) -> bool:
        return bool(self.arch.ioapic_handled_vectors >> vector & 1)

    def kvm_ioapic_send_eoi(self, vector: int) -> EoiBroadcast | None:
        if not self.kvm_ioapic_handles_vector(vector):
            return None
        if self.kvm.irqchip_split:
            # No exit when the guest suppresses EOI broadcasts (SPIV bit 12), but only if
            # userspace enabled that (KVM_X2APIC_ENABLE_SUPPRESS_EOI_BROADCAST); the legacy
            # quirk ignores the bit.
            if (self.kvm_lapic_get_reg(A.APIC_SPIV) & A.APIC_SPIV_DIRECTED_EOI
                    and self.kvm.suppress_eoi_broadcast_mode == SEB_ENABLED):
                return None
            # Request a KVM exit to inform the userspace IOAPIC.
            self.arch.pending_ioapic_eoi = vector
            self.arch.requests |= KVM_REQ_IOAPIC_EOI_EXIT
            return None
        return EoiBroadcast(self, vector, bool(self.tmr >> vector & 1))

    def apic_set_eoi(self) -> EoiBroadcast | None:
        """EOI: clear the highest ISR bit, recompute PPR, tell the IOAPIC."""
        vector = self.apic_find_highest_isr()
        tr = self.trace
        if tr is not None:
            tr.kvm_eoi(self.vcpu_id, vector)
        # "Not every write EOI will has corresponding ISR"
        if vector == -1:
            return None
        self.apic_clear_isr(vector)
        self.apic_update_ppr()
        eoi = self.kvm_ioapic_send_eoi(vector)
        self.arch.requests |= KVM_REQ_EVENT
        return eoi

    def kvm_apic_set_eoi_accelerated(self, vector: int) -> EoiBroadcast | None:
        """APICv EOI-induced exit: the CPU already updated vISR/vPPR."""
        tr = self.trace
        if tr is not None:
            tr.kvm_eoi(self.vcpu_id, vector)
        eoi = self.kvm_ioapic_send_eoi(vector)
        self.arch.requests |= KVM_REQ_EVENT
        return eoi

    # ------------------------------------------------------------------ acceptance
    def __apic_accept_irq(self, delivery_mode: int, vector: int, level: int, trig_mode: int,
                          dest_map=None) -> int:
        """Add a pending interrupt. Returns 1 if accepted, 0 if discarded."""
        tr = self.trace
        if tr is not None:
            tr.kvm_apic_accept_irq(self.vcpu_id, delivery_mode, trig_mode, vector)
        arch = self.arch
        if delivery_mode == A.APIC_DM_FIXED or delivery_mode == A.APIC_DM_LOWEST:
            if delivery_mode == A.APIC_DM_LOWEST:
                arch.apic_arb_prio += 1
            if trig_mode and not level:
                return 0
            if not (self.sw_enabled and self.hw_enabled):
                return 0
            if dest_map is not None:
                dest_map.record(self.vcpu_id, vector)
            bit = 1 << vector
            if trig_mode:
                self.tmr |= bit
            elif self.tmr & bit:
                self.tmr &= ~bit
            self.ops.deliver_interrupt(self, delivery_mode, trig_mode, vector)
            return 1
        if delivery_mode == A.APIC_DM_NMI:
            # kvm_inject_nmi()
            arch.nmi_queued += 1
            arch.requests |= KVM_REQ_NMI
            self.kvm_vcpu_kick()
            return 1
        if delivery_mode == A.APIC_DM_INIT:
            if not trig_mode or level:
                # an assignment: a pending SIPI is dropped
                self.pending_events = 1 << KVM_APIC_INIT
                arch.requests |= KVM_REQ_EVENT
                self.kvm_vcpu_kick()
                return 1
            return 0
        if delivery_mode == A.APIC_DM_STARTUP:
            self.sipi_vector = vector
            self.pending_events |= 1 << KVM_APIC_SIPI
            arch.requests |= KVM_REQ_EVENT
            self.kvm_vcpu_kick()
            return 1
        if delivery_mode == A.APIC_DM_SMI:
            # kvm_inject_smi(): KVM_REQ_SMI with CONFIG_KVM_SMM=y, else -ENOTTY (dropped)
            if not self.kvm.smm:
                return 0
            arch.requests |= KVM_REQ_SMI
            self.kvm_vcpu_kick()
            return 1
        if delivery_mode == A.APIC_DM_REMRD:
            # used by the PV kick hypercall
            arch.pv_unhalted = True
            arch.requests |= KVM_REQ_EVENT
            self.kvm_vcpu_kick()
            return 1
        # APIC_DM_EXTINT: handled by kvm_apic_accept_pic_intr(); nothing to do here
        return 0

    # kvm_apic_set_irq(vcpu, irq, dest_map) is a direct wrapper of __apic_accept_irq
    kvm_apic_set_irq = __apic_accept_irq

    def kvm_apic_local_deliver(self, lvt_type: int) -> int:
        """Deliver through an LVT entry (timer, LINT0/1, error, PMC, thermal, CMCI)."""
        reg = self.kvm_lapic_get_reg(lvt_type)
        if self.hw_enabled and not reg & A.APIC_LVT_MASKED:
            r = self.__apic_accept_irq(reg & A.APIC_MODE_MASK, reg & A.APIC_VECTOR_MASK, 1,
                                       reg & A.APIC_LVT_LEVEL_TRIGGER)
            if r and lvt_type == A.APIC_LVTPC and self.arch.intel_compatible:
                self.kvm_lapic_set_reg(A.APIC_LVTPC, reg | A.APIC_LVT_MASKED)
            return r
        return 0

    def kvm_apic_accept_pic_intr(self) -> bool:
        lvt0 = self.kvm_lapic_get_reg(A.APIC_LVT0)
        if not self.hw_enabled:
            return True
        return (lvt0 & A.APIC_LVT_MASKED) == 0 and ((lvt0 >> 8) & 7) == A.APIC_MODE_EXTINT

    def kvm_apic_has_pending_init_or_sipi(self) -> bool:
        return self.pending_events != 0

    # ------------------------------------------------------------------ register reads
    def report_tpr_access(self, write: bool) -> None:
        if self.arch.tpr_access_reporting:
            self.arch.requests |= KVM_REQ_REPORT_TPR_ACCESS
            self.tpr_access_write = write

    def __apic_read(self, offset: int) -> int:
        if offset >= LAPIC_MMIO_LENGTH:
            return 0
        if offset == A.APIC_ARBPRI:
            return 0
        if offset == A.APIC_TMCCT:
            if self.apic_lvtt_tscdeadline():
                return 0
            return self.apic_get_tmcct()
        if offset == A.APIC_PROCPRI:
            self.apic_update_ppr()
        elif offset == A.APIC_TASKPRI:
            self.report_tpr_access(False)
        elif A.APIC_ISR <= offset < A.APIC_ESR:
            return self._vector_dword(offset)
        return self.r[offset >> 2]

    def _vector_dword(self, offset: int) -> int:
        """ISR/TMR/IRR word at *offset* (0x100-0x270, 16-byte aligned)."""
        bank, idx = divmod(offset - A.APIC_ISR, 0x80)
        vec = (self.isr, self.tmr, self.irr)[bank]
        return (vec >> (32 * (idx >> 4))) & _U32

    def kvm_lapic_readable_reg_mask(self) -> int:
        return readable_reg_mask(self.x2apic, self.nr_lvt_entries)

    def kvm_lapic_reg_read_rejected(self, offset: int, length: int) -> bool:
        """kvm_lapic_reg_read()'s checks before it reads: misaligned/too wide, past 0x3F0, or
        not in kvm_lapic_readable_reg_mask()."""
        if (offset & 0xF) + length > 4 or offset > 0x3F0:
            return True
        return not (self.kvm_lapic_readable_reg_mask() >> (offset >> 4)) & 1

    def kvm_lapic_reg_read(self, offset: int, length: int) -> int | None:
        """Returns the value, or None where KVM's kvm_lapic_reg_read returns 1 (rejected; the
        caller's buffer is left untouched)."""
        if self.kvm_lapic_reg_read_rejected(offset, length):
            return None
        alignment = offset & 0xF
        result = self.__apic_read(offset & ~0xF)
        tr = self.trace
        if tr is not None:
            tr.kvm_apic(0, offset, result)
        if length not in (1, 2, 4):
            return None  # "Local APIC read with len = %x, should be 1,2, or 4 instead"
        return (result >> (8 * alignment)) & ((1 << (8 * length)) - 1)

    def apic_mmio_in_range(self, address: int) -> bool:
        return self.base_address <= address < self.base_address + LAPIC_MMIO_LENGTH

    # ------------------------------------------------------------------ register writes
    def apic_set_spiv(self, val: int) -> None:
        enabled = bool(val & A.APIC_SPIV_APIC_ENABLED)
        self.kvm_lapic_set_reg(A.APIC_SPIV, val)
        if enabled != self.sw_enabled:
            self.sw_enabled = enabled
            self._mark_map_dirty()
        if enabled:
            self.arch.requests |= KVM_REQ_APF_READY

    def kvm_apic_set_xapic_id(self, id_: int) -> None:
        self.kvm_lapic_set_reg(A.APIC_ID, (id_ & 0xFF) << 24)
        self._mark_map_dirty()

    def kvm_apic_set_ldr(self, val: int) -> None:
        self.kvm_lapic_set_reg(A.APIC_LDR, val)
        self._mark_map_dirty()

    def kvm_apic_set_dfr(self, val: int) -> None:
        self.kvm_lapic_set_reg(A.APIC_DFR, val)
        self._mark_map_dirty()

    def kvm_apic_set_x2apic_id(self, id_: int) -> None:
        self.kvm_lapic_set_reg(A.APIC_ID, id_)
        self.kvm_lapic_set_reg(A.APIC_LDR, kvm_apic_calc_x2apic_ldr(id_))
        self._mark_map_dirty()

    def apic_manage_nmi_watchdog(self, lvt0_val: int) -> None:
        in_nmi = (lvt0_val & (A.APIC_MODE_MASK | A.APIC_LVT_MASKED)) == A.APIC_DM_NMI
        if self.lvt0_in_nmi_mode != in_nmi:
            self.lvt0_in_nmi_mode = in_nmi
            self.kvm.vapics_in_nmi_mode += 1 if in_nmi else -1

    def kvm_apic_send_ipi(self, icr_low: int, icr_high: int,
                          x2apic_icr: int | None = None) -> SendIpi:
        """Build the IPI (kvm_icr_to_lapic_irq's destination rule); the VM routes it."""
        dest = icr_high if self.x2apic else (icr_high >> 24) & 0xFF
        return SendIpi(self, icr_low, dest, x2apic_icr)

    def kvm_lapic_reg_write(self, reg: int, val: int):
        """kvm_lapic_reg_write(): returns None, a SendIpi/EoiBroadcast, or REJECTED ("ret 1")."""
        tr = self.trace
        if tr is not None:
            tr.kvm_apic(1, reg, val)
        x2apic = self.x2apic
        if reg == A.APIC_TASKPRI:
            self.report_tpr_access(True)
            self.apic_set_tpr(val & 0xFF)
            return None
        if reg == A.APIC_EOI:
            return self.apic_set_eoi()
        if reg == A.APIC_ICR:
            val &= ~A.APIC_ICR_BUSY  # no delay: the BUSY/pending bit always reads 0
            self.kvm_lapic_set_reg(A.APIC_ICR, val)
            return self.kvm_apic_send_ipi(val, self.kvm_lapic_get_reg(A.APIC_ICR2))
        if reg == A.APIC_ID:
            if x2apic:
                return REJECTED
            self.kvm_apic_set_xapic_id(val >> 24)
            return None
        if reg == A.APIC_LDR:
            if x2apic:
                return REJECTED
            self.kvm_apic_set_ldr(val & A.APIC_LDR_MASK)
            return None
        if reg == A.APIC_DFR:
            if x2apic:
                return REJECTED
            self.kvm_apic_set_dfr(val | 0x0FFFFFFF)
            return None
        if reg == A.APIC_SPIV:
            mask = 0x3FF
            if self.kvm_lapic_get_reg(A.APIC_LVR) & A.APIC_LVR_DIRECTED_EOI:
                mask |= A.APIC_SPIV_DIRECTED_EOI
            self.apic_set_spiv(val & mask)
            if not val & A.APIC_SPIV_APIC_ENABLED:
                r = self.r
                for i in range(self.nr_lvt_entries):
                    off = LVT_OFFSETS[i] >> 2
                    r[off] = r[off] | A.APIC_LVT_MASKED
                self.apic_update_lvtt()
                self.timer_pending = 0
            return None
        if reg == A.APIC_ICR2:
            if x2apic:
                return REJECTED
            self.kvm_lapic_set_reg(A.APIC_ICR2, val & 0xFF000000)
            return None
        if reg == A.APIC_LVTT:
            if not self.sw_enabled:
                val |= A.APIC_LVT_MASKED
            val &= LVT_WRITE_MASK[A.LVT_TIMER] | self.timer_mode_mask
            self.kvm_lapic_set_reg(A.APIC_LVTT, val)
            self.apic_update_lvtt()
            return None
        if reg in (A.APIC_LVT0, A.APIC_LVTTHMR, A.APIC_LVTPC, A.APIC_LVT1, A.APIC_LVTERR,
                   A.APIC_LVTCMCI):
            if reg == A.APIC_LVT0:
                self.apic_manage_nmi_watchdog(val)
            index = A.LVT_CMCI if reg == A.APIC_LVTCMCI else (reg - A.APIC_LVTT) >> 4
            if self.nr_lvt_entries <= index:
                return REJECTED
            if not self.sw_enabled:
                val |= A.APIC_LVT_MASKED
            self.kvm_lapic_set_reg(reg, val & LVT_WRITE_MASK[index])
            return None
        if reg == A.APIC_TMICT:
            if self.apic_lvtt_tscdeadline():
                return None
            self.cancel_apic_timer()
            self.kvm_lapic_set_reg(A.APIC_TMICT, val)
            self.start_apic_timer()
            return None
        if reg == A.APIC_TDCR:
            old_divisor = self.divide_count
            self.kvm_lapic_set_reg(A.APIC_TDCR, val & 0xB)
            self.update_divide_count()
            if self.divide_count != old_divisor and self.period:
                self.timer.cancel()
                self.update_target_expiration(old_divisor)
                self.restart_apic_timer()
            return None
        if reg == A.APIC_ESR:
            return REJECTED if x2apic and val != 0 else None
        if reg == A.APIC_SELF_IPI:
            # exists only in x2APIC mode; bits 31:8 are reserved
            if not x2apic or val & ~A.APIC_VECTOR_MASK:
                return REJECTED
            return self.kvm_apic_send_ipi(A.APIC_DEST_SELF | val, 0)
        return REJECTED

    def apic_mmio_write_reg(self, offset: int, length: int, val: int):
        """apic_mmio_write() after the range/hole checks: only aligned 4-byte writes count."""
        if length != 4 or offset & 0xF:
            return None
        return self.kvm_lapic_reg_write(offset & 0xFF0, val & _U32)

    def kvm_x2apic_icr_write(self, data: int):
        if data & A.X2APIC_ICR_RESERVED_BITS:
            return REJECTED
        data &= ~A.APIC_ICR_BUSY
        self.kvm_lapic_set_reg64(A.APIC_ICR, data)  # VMX: one 64-bit register
        return self.kvm_apic_send_ipi(data & _U32, data >> 32, x2apic_icr=data)

    def kvm_x2apic_icr_read(self) -> int:
        return self.kvm_lapic_get_reg64(A.APIC_ICR)

    def kvm_lapic_msr_read(self, reg: int) -> int | None:
        if reg == A.APIC_ICR:
            return self.kvm_x2apic_icr_read()
        return self.kvm_lapic_reg_read(reg, 4)

    def kvm_lapic_msr_write(self, reg: int, data: int):
        if reg == A.APIC_ICR:
            return self.kvm_x2apic_icr_write(data)
        if data >> 32:
            return REJECTED  # bits 63:32 are reserved in all other registers
        return self.kvm_lapic_reg_write(reg, data)

    def kvm_x2apic_msr_read(self, msr: int) -> int | None:
        if not self.x2apic:
            return None
        return self.kvm_lapic_msr_read((msr - A.APIC_BASE_MSR) << 4)

    def kvm_x2apic_msr_write(self, msr: int, data: int):
        if not self.x2apic:
            return REJECTED
        return self.kvm_lapic_msr_write((msr - A.APIC_BASE_MSR) << 4, data)

    def kvm_apic_write_nodecode(self, offset: int):
        """Trap-like APIC-write VM exit: replay the value already in the page."""
        if self.x2apic and offset == A.APIC_ICR:
            return self.kvm_x2apic_icr_write(self.kvm_x2apic_icr_read())
        return self.kvm_lapic_reg_write(offset, self.kvm_lapic_get_reg(offset))

    # ------------------------------------------------------------------ IA32_APIC_BASE
    def __kvm_apic_set_base(self, value: int) -> None:
        arch = self.arch
        old_value = arch.apic_base
        arch.apic_base = value
        changed = old_value ^ value
        if changed & A.MSR_IA32_APICBASE_ENABLE:
            if value & A.MSR_IA32_APICBASE_ENABLE:
                self.hw_enabled = True
                self.kvm_apic_set_xapic_id(self.vcpu_id)
                arch.requests |= KVM_REQ_APF_READY
            else:
                self.hw_enabled = False
                self._mark_map_dirty()
        if changed & A.X2APIC_ENABLE:
            self.x2apic = bool(value & A.X2APIC_ENABLE)
            if value & A.X2APIC_ENABLE:
                self.kvm_apic_set_x2apic_id(self.vcpu_id)
            elif value & A.MSR_IA32_APICBASE_ENABLE:
                self.kvm_apic_set_xapic_id(self.vcpu_id)
        if changed & (A.MSR_IA32_APICBASE_ENABLE | A.X2APIC_ENABLE):
            arch.requests |= KVM_REQ_APICV_UPDATE
            self.ops.set_virtual_apic_mode(self)
        self.base_address = value & A.MSR_IA32_APICBASE_BASE
        if value & A.MSR_IA32_APICBASE_ENABLE and self.base_address != A.APIC_DEFAULT_PHYS_BASE:
            self.kvm.inhibit_requests |= 1 << ApicvInhibit.APIC_BASE_MODIFIED

    def kvm_apic_set_base(self, value: int, host_initiated: bool) -> int:
        """kvm_apic_set_base(): 0 on success, 1 to reject (#GP / KVM_SET_MSRS returns 0).

        An unchanged value returns 0 before any check (6.13+)."""
        if value == self.arch.apic_base:
            return 0
        old_mode = self.kvm_get_apic_mode()
        reserved_bits = (((1 << 64) - (1 << self.arch.maxphyaddr)) | 0x2FF
                         | (0 if self.arch.cpuid_x2apic else A.X2APIC_ENABLE))
        if value & reserved_bits or (value >> 64):
            return 1
        new_mode = kvm_apic_mode(value)
        if new_mode == LapicMode.INVALID:
            return 1
        if not host_initiated:
            if old_mode == LapicMode.X2APIC and new_mode == LapicMode.XAPIC:
                return 1
            if old_mode == LapicMode.DISABLED and new_mode == LapicMode.X2APIC:
                return 1
        self.__kvm_apic_set_base(value)
        return 0

    # ------------------------------------------------------------------ reset
    def kvm_lapic_reset(self, init_event: bool) -> None:
        """kvm_lapic_reset(): RESET (creation) or INIT."""
        self.ops.apicv_pre_state_restore(self)
        if not init_event:
            msr_val = A.APIC_DEFAULT_PHYS_BASE | A.MSR_IA32_APICBASE_ENABLE
            if self.kvm.bsp_vcpu_id == self.vcpu_id:
                msr_val |= A.MSR_IA32_APICBASE_BSP
            self.__kvm_apic_set_base(msr_val)
        self.timer.cancel()
        if not init_event:
            self.kvm_apic_set_xapic_id(self.vcpu_id)
        self.kvm_apic_set_version()
        r = self.r
        for i in range(self.nr_lvt_entries):
            r[LVT_OFFSETS[i] >> 2] = A.APIC_LVT_MASKED
        self.apic_update_lvtt()
        if (self.kvm.bsp_vcpu_id == self.vcpu_id
                and self.kvm.has_quirk(KVM_X86_QUIRK_LINT0_REENABLED)):
            self.kvm_lapic_set_reg(A.APIC_LVT0, A.APIC_MODE_EXTINT << 8)
        self.apic_manage_nmi_watchdog(self.kvm_lapic_get_reg(A.APIC_LVT0))
        self.kvm_apic_set_dfr(0xFFFFFFFF)
        self.apic_set_spiv(0xFF)
        self.kvm_lapic_set_reg(A.APIC_TASKPRI, 0)
        if not self.x2apic:
            self.kvm_apic_set_ldr(0)
        self.kvm_lapic_set_reg(A.APIC_ESR, 0)
        if not self.x2apic:
            self.kvm_lapic_set_reg(A.APIC_ICR, 0)
            self.kvm_lapic_set_reg(A.APIC_ICR2, 0)
        else:
            self.kvm_lapic_set_reg64(A.APIC_ICR, 0)
        self.kvm_lapic_set_reg(A.APIC_TDCR, 0)
        self.kvm_lapic_set_reg(A.APIC_TMICT, 0)
        tr = self.trace
        if tr is not None:
            for v in _bits(self.isr):
                tr.in_service(self.vcpu_id, v, False)
        self.irr = self.isr = self.tmr = 0
        self.kvm_apic_update_apicv()
        self.update_divide_count()
        self.timer_pending = 0
        self.arch.pv_eoi_msr = 0
        self.apic_update_ppr()
        if self.apicv_active:
            self.ops.apicv_post_state_restore(self)
        self.arch.apic_arb_prio = 0
        self.arch.apic_attention = 0

    # ------------------------------------------------------------------ kicks
    def kvm_vcpu_kick(self) -> None:
        """kvm_vcpu_kick(): wake the vCPU if it blocks, else IPI it out of guest mode. The
        model records it; the VM delivers it after the current operation (kvm.kicked)."""
        arch = self.arch
        if arch.blocked:
            self.kvm.kicked.append(arch)
        elif arch.in_guest_mode:
            arch.kick_pending = True
            self.kvm.kicked.append(arch)

    def kvm_vcpu_wake_up(self) -> None:
        if self.arch.blocked:
            self.kvm.kicked.append(self.arch)

    # ------------------------------------------------------------------ KVM_GET/SET_LAPIC
    def kvm_apic_state_fixup(self, s: bytearray, set_: bool) -> int:
        """x2APIC ID/LDR/ICR translation between the model and userspace; -EINVAL or 0."""
        if not self.x2apic:
            return 0
        from .uapi import EINVAL

        mv = memoryview(s).cast("I")
        x2apic_id = self.kvm_x2apic_id()
        if self.kvm.x2apic_format:
            if mv[A.APIC_ID >> 2] != x2apic_id:
                return -EINVAL
        else:
            # "KVM's model is that the x2APIC ID is readonly"
            mv[A.APIC_ID >> 2] = x2apic_id if set_ else (x2apic_id << 24) & _U32
        if set_:
            mv[A.APIC_LDR >> 2] = kvm_apic_calc_x2apic_ldr(x2apic_id)
        # VMX keeps ICR as one 64-bit register; userspace sees it split into ICR + ICR2
        if set_:
            mv[(A.APIC_ICR >> 2) + 1] = mv[A.APIC_ICR2 >> 2]
        else:
            mv[A.APIC_ICR2 >> 2] = mv[(A.APIC_ICR >> 2) + 1]
        return 0

    def _compose_page(self) -> bytearray:
        s = bytearray(self.page)
        mv = memoryview(s).cast("I")
        for bank, vec in ((A.APIC_ISR, self.isr), (A.APIC_TMR, self.tmr), (A.APIC_IRR, self.irr)):
            for i in range(8):
                mv[(bank + 0x10 * i) >> 2] = (vec >> (32 * i)) & _U32
        return s

    def kvm_apic_get_state(self) -> bytes:
        s = self._compose_page()
        memoryview(s).cast("I")[A.APIC_TMCCT >> 2] = self.__apic_read(A.APIC_TMCCT)
        self.kvm_apic_state_fixup(s, False)
        return bytes(s)

    def kvm_apic_set_state(self, regs: bytes) -> int:
        """kvm_apic_set_state(): the sequence step by step; returns 0 or -EINVAL."""
        s = bytearray(regs)
        self.ops.apicv_pre_state_restore(self)
        # set SPIV separately to get count of SW disabled APICs right
        self.apic_set_spiv(memoryview(s).cast("I")[A.APIC_SPIV >> 2])
        r = self.kvm_apic_state_fixup(s, True)
        if r:
            return r  # the caller recalculates the map (kvm_recalculate_apic_map)
        tr = self.trace
        old_isr = self.isr
        self.page[:] = s
        mv = self.r
        vecs = []
        for bank in (A.APIC_ISR, A.APIC_TMR, A.APIC_IRR):
            v = 0
            for i in range(8):
                v |= mv[(bank + 0x10 * i) >> 2] << (32 * i)
            vecs.append(v)
        self.isr, self.tmr, self.irr = vecs
        if tr is not None:
            for v in _bits(old_isr & ~self.isr):
                tr.in_service(self.vcpu_id, v, False)
            for v in _bits(self.isr & ~old_isr):
                tr.in_service(self.vcpu_id, v, True)
        self._mark_map_dirty()
        self.kvm_apic_set_version()
        # note: PPR is computed here with the *old* isr_count/highest_isr_cache
        self.apic_update_ppr()
        self.cancel_apic_timer()
        self.expired_tscdeadline = 0
        self.apic_update_lvtt()
        self.apic_manage_nmi_watchdog(self.kvm_lapic_get_reg(A.APIC_LVT0))
        self.update_divide_count()
        self.start_apic_timer_from(A.APIC_TMCCT)
        self.kvm_lapic_set_reg(A.APIC_TMCCT, 0)
        self.kvm_apic_update_apicv()
        if self.apicv_active:
            self.ops.apicv_post_state_restore(self)
        self.arch.requests |= KVM_REQ_EVENT
        self.arch.apic_arb_prio = 0
        return 0

    # ------------------------------------------------------------------ VAPIC / PV EOI
    # Guest memory (the VAPIC word, the PV-EOI byte) is passed in: KVM reaches it through
    # gfn_to_hva caches; the register file itself owns no memory.
    def kvm_lapic_set_vapic_addr(self, vapic_addr: int, mapped: bool = True) -> int:
        """kvm_lapic_set_vapic_addr(): -EINVAL when the 4-byte word is not in a writable
        memslot (*mapped* False); a nonzero address sets KVM_APIC_CHECK_VAPIC, zero clears it."""
        if vapic_addr:
            self.vapic_cache_ok = mapped
            if not mapped:
                # the cache now holds an error hva: VAPIC reads and writes fail (silently) until
                # a successful KVM_SET_VAPIC_ADDR, though KVM_APIC_CHECK_VAPIC stays as it was
                return -_EINVAL
            self.arch.apic_attention |= 1 << KVM_APIC_CHECK_VAPIC
        else:
            self.arch.apic_attention &= ~(1 << KVM_APIC_CHECK_VAPIC)
        self.vapic_addr = vapic_addr
        return 0

    def kvm_lapic_set_pv_eoi(self, data: int, mapped: bool) -> bool:
        """kvm_lapic_set_pv_eoi() for MSR_KVM_PV_EOI_EN: the address (bits 63:1) must be
        4-byte aligned and, when bit 0 enables PV EOI, in a writable memslot (*mapped*);
        False where the WRMSR takes #GP."""
        addr = data & ~KVM_MSR_ENABLED
        if addr & 3:
            return False
        if data & KVM_MSR_ENABLED:
            self.pv_eoi_cache_ok = mapped
            if not mapped:
                return False  # the MSR keeps its value; the cache is broken (see below)
        self.arch.pv_eoi_msr = data
        return True

    def pv_eoi_enabled(self) -> bool:
        return bool(self.arch.pv_eoi_msr & KVM_MSR_ENABLED)

    def pv_eoi_pending(self) -> bool:
        return bool(self.arch.apic_attention >> KVM_APIC_PV_EOI_PENDING & 1)

    @property
    def pv_eoi_gpa(self) -> int:
        return self.arch.pv_eoi_msr & ~KVM_MSR_ENABLED

    def apic_sync_pv_eoi_to_guest(self, mem) -> None:
        """Arm PV EOI (guest byte = KVM_PV_EOI_ENABLED, KVM_APIC_PV_EOI_PENDING) only when the
        EOI can be skipped safely: nothing in IRR, exactly one known vector in service (the
        ISR cache; always -1 under APICv), and the IOAPIC does not need that EOI."""
        if (not self.pv_eoi_enabled() or self.irr_pending or self.highest_isr_cache == -1
                or self.kvm_ioapic_handles_vector(self.highest_isr_cache)):
            return
        # pv_eoi_set_pending(): not armed if the write fails
        if not self.pv_eoi_cache_ok:
            return
        mem.kvm_write_guest_cached(self.pv_eoi_gpa, 1, KVM_PV_EOI_ENABLED)
        self.arch.apic_attention |= 1 << KVM_APIC_PV_EOI_PENDING

    def apic_sync_pv_eoi_from_guest(self, mem) -> EoiBroadcast | None:
        """After an exit with PV EOI armed: the byte still set means the guest has not EOI'd
        (KVM clears it and disarms); a cleared byte means it did, and KVM performs the EOI
        (apic_set_eoi, traced as kvm_pv_eoi)."""
        # pv_eoi_test_and_clr_pending(): if the byte cannot be read (the cache broke after
        # arming) it returns false with PENDING still set -- KVM does the EOI, at every exit
        if not self.pv_eoi_cache_ok:
            return self._pv_eoi(mem)
        val = mem.kvm_read_guest_cached(self.pv_eoi_gpa, 1) & KVM_PV_EOI_ENABLED
        if val:
            mem.kvm_write_guest_cached(self.pv_eoi_gpa, 1, 0)
        self.arch.apic_attention &= ~(1 << KVM_APIC_PV_EOI_PENDING)
        if val:
            return None
        return self._pv_eoi(mem)

    def _pv_eoi(self, mem) -> EoiBroadcast | None:
        vector = self.apic_find_highest_isr()
        eoi = self.apic_set_eoi()
        tr = self.trace
        if tr is not None:
            tr.kvm_pv_eoi(self.vcpu_id, vector)
        return eoi

    def kvm_lapic_sync_to_vapic(self, mem) -> None:
        """kvm_lapic_sync_to_vapic(): before entry (on a KVM_REQ_EVENT pass with the LAPIC
        enabled), arm PV EOI, then write the VAPIC word: TPR | (highest ISR & 0xf0) << 8 |
        highest IRR << 24."""
        self.apic_sync_pv_eoi_to_guest(mem)
        if not self.arch.apic_attention >> KVM_APIC_CHECK_VAPIC & 1 or not self.vapic_cache_ok:
            return
        tpr = self.kvm_lapic_get_reg(A.APIC_TASKPRI) & 0xFF
        max_irr = max(self.apic_find_highest_irr(), 0)
        max_isr = max(self.apic_find_highest_isr(), 0)
        mem.kvm_write_guest_cached(self.vapic_addr, 4,
                                   tpr | (max_isr & 0xF0) << 8 | max_irr << 24)

    def kvm_lapic_sync_from_vapic(self, mem) -> EoiBroadcast | None:
        """kvm_lapic_sync_from_vapic(): after every exit with apic_attention set -- the PV-EOI
        check, then TPR = the VAPIC word's low byte (apic_set_tpr, PPR updated)."""
        eoi = None
        if self.arch.apic_attention >> KVM_APIC_PV_EOI_PENDING & 1:
            eoi = self.apic_sync_pv_eoi_from_guest(mem)
        if self.arch.apic_attention >> KVM_APIC_CHECK_VAPIC & 1 and self.vapic_cache_ok:
            self.apic_set_tpr(mem.kvm_read_guest_cached(self.vapic_addr, 4) & 0xFF)
        return eoi

    # ------------------------------------------------------------------ views
    @property
    def apic_base(self) -> int:
        return self.arch.apic_base

    def reg(self, offset: int) -> int:
        """The stored value of a register as the model holds it (no side effects)."""
        if A.APIC_ISR <= offset < A.APIC_ESR and not offset & 0xF:
            return self._vector_dword(offset)
        return self.r[offset >> 2]


def _bits(v: int):
    while v:
        low = v & -v
        yield low.bit_length() - 1
        v ^= low
