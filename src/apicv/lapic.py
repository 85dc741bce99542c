"""The in-kernel local APIC: KVM's ``struct kvm_lapic`` and the functions of arch/x86/kvm/lapic.c
that work on one APIC, under their KVM names.

Why this module is long: it is the model of one C file whose functions share one structure, and
keeping its core together (IRR/ISR, priorities, EOI, acceptance, IA32_APIC_BASE, reset) keeps
the KVM-name-to-code map one-to-one. The rest of lapic.c is mixed into :class:`LocalApic` from
beside it: the timer from :mod:`apicv.timer`, register reads and writes, x2APIC MSRs and
KVM_GET/SET_LAPIC from :mod:`apicv.lapic_access`, VAPIC and PV EOI from :mod:`apicv.lapic_pv`.
The routing half of lapic.c is in :mod:`apicv.apic_map` and :mod:`apicv.delivery`.

The register file never calls its peers. A write returns what must happen next
(:mod:`apicv.lapic_msgs`, re-exported here):

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
    KVM_APIC_INIT,
    KVM_APIC_SIPI,
    KVM_REQ_APF_READY,
    KVM_REQ_APICV_UPDATE,
    KVM_REQ_EVENT,
    KVM_REQ_IOAPIC_EOI_EXIT,
    KVM_REQ_NMI,
    KVM_REQ_SCAN_IOAPIC,
    KVM_REQ_SMI,
    ApicvInhibit,
    LapicMode,
)
from .lapic_access import (
    LAPIC_MMIO_LENGTH,
    LapicAccessMixin,
    for_each_set_bit,
    kvm_apic_calc_x2apic_ldr,
)
from .lapic_msgs import REJECTED, EoiBroadcast, SendIpi, VendorOps
from .lapic_pv import LapicPvMixin
from .regs import LVT_OFFSETS
from .timer import LAPIC_TIMER_ADVANCE_NS_INIT, LapicTimerMixin
from .uapi import KVM_APIC_REG_SIZE, KVM_X86_QUIRK_LINT0_REENABLED

if TYPE_CHECKING:
    from .clock import Clock
    from .trace import Tracer

__all__ = [
    "APIC_VERSION", "LAPIC_MMIO_LENGTH", "REJECTED", "EoiBroadcast", "LocalApic", "SendIpi",
    "VendorOps", "kvm_apic_calc_x2apic_ldr", "kvm_apic_mode",
]

APIC_VERSION = 0x14
_U32 = 0xFFFFFFFF


def kvm_apic_mode(apic_base: int) -> LapicMode:
    return LapicMode(apic_base & (A.MSR_IA32_APICBASE_ENABLE | A.X2APIC_ENABLE))


class LocalApic(LapicTimerMixin, LapicAccessMixin, LapicPvMixin):
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
        if self.arch.highest_stale_pending_ioapic_eoi == vector:
            # the EOI owed from an older routing came: the EOI exits may no longer be needed
            self.arch.requests |= KVM_REQ_SCAN_IOAPIC
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
            for v in for_each_set_bit(self.isr):
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

    # ------------------------------------------------------------------ views
    @property
    def apic_base(self) -> int:
        return self.arch.apic_base

    def reg(self, offset: int) -> int:
        """The stored value of a register as the model holds it (no side effects)."""
        if A.APIC_ISR <= offset < A.APIC_ESR and not offset & 0xF:
            return self.vector_dword(offset)
        return self.r[offset >> 2]

