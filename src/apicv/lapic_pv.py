"""VAPIC and PV EOI: the lapic.c functions that share state with the guest through memory.

:class:`LapicPvMixin` is part of :class:`apicv.lapic.LocalApic`. It holds
``kvm_lapic_set_vapic_addr``, ``kvm_lapic_set_pv_eoi``, ``pv_eoi_enabled``, ``pv_eoi_pending``,
the PV-EOI guest address (``pv_eoi_msr`` bits 63:1), ``apic_sync_pv_eoi_to_guest`` (with
``pv_eoi_set_pending``), ``apic_sync_pv_eoi_from_guest`` (with
``pv_eoi_test_and_clr_pending``), ``kvm_lapic_sync_to_vapic`` and
``kvm_lapic_sync_from_vapic``, under their KVM names.

Guest memory (the VAPIC word, the PV-EOI byte) is passed in as *mem*: KVM reaches it through
``gfn_to_hva`` caches, whose usability is modelled by ``vapic_cache_ok`` and
``pv_eoi_cache_ok``; the register file itself owns no memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import apicdef as A
from .kvm_host import KVM_APIC_CHECK_VAPIC, KVM_APIC_PV_EOI_PENDING
from .uapi import EINVAL as _EINVAL
from .uapi import KVM_MSR_ENABLED, KVM_PV_EOI_ENABLED

if TYPE_CHECKING:
    from .arch import VcpuArch
    from .lapic_msgs import EoiBroadcast
    from .trace import Tracer


class LapicPvMixin:
    """The VAPIC word and PV EOI (mixed into LocalApic)."""

    __slots__ = ()

    # fields of LocalApic this code reads
    arch: VcpuArch
    vcpu_id: int
    trace: Tracer | None
    irr_pending: bool
    highest_isr_cache: int
    vapic_addr: int
    vapic_cache_ok: bool
    pv_eoi_cache_ok: bool

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

