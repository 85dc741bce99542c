"""Register access from outside the APIC's own logic: MMIO, x2APIC MSRs, APIC-write exits and
KVM_GET/SET_LAPIC.

:class:`LapicAccessMixin` is part of :class:`apicv.lapic.LocalApic`. It holds these functions of
lapic.c, under their KVM names:

* reads: ``report_tpr_access``, ``__apic_read``, ``kvm_lapic_readable_reg_mask``,
  ``kvm_lapic_reg_read`` (its checks as ``kvm_lapic_reg_read_rejected``),
  ``apic_mmio_in_range``, and :meth:`~LapicAccessMixin.vector_dword` (an ISR/TMR/IRR word,
  which KVM reads straight from the page);
* writes: ``kvm_lapic_reg_write`` and the setters it calls (``apic_set_spiv``,
  ``kvm_apic_set_xapic_id``, ``kvm_apic_set_ldr``, ``kvm_apic_set_dfr``,
  ``kvm_apic_set_x2apic_id``, ``apic_manage_nmi_watchdog``, ``kvm_apic_send_ipi``),
  ``apic_mmio_write`` (as ``apic_mmio_write_reg``), ``kvm_apic_write_nodecode``;
* x2APIC MSRs: ``kvm_x2apic_icr_write``, ``kvm_x2apic_icr_read``, ``kvm_lapic_msr_read``,
  ``kvm_lapic_msr_write``, ``kvm_x2apic_msr_read``, ``kvm_x2apic_msr_write``;
* KVM_GET/SET_LAPIC: ``kvm_apic_state_fixup``, ``kvm_apic_get_state``, ``kvm_apic_set_state``.

KVM_GET_LAPIC reads TMCCT through ``__apic_read``, so the ioctls live with the register reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import apicdef as A
from .kvm_host import KVM_REQ_APF_READY, KVM_REQ_EVENT, KVM_REQ_REPORT_TPR_ACCESS
from .lapic_msgs import REJECTED, SendIpi
from .regs import LVT_OFFSETS, LVT_WRITE_MASK, readable_reg_mask

if TYPE_CHECKING:
    from .arch import KvmArch, VcpuArch
    from .clock import HrTimer
    from .lapic_msgs import VendorOps
    from .trace import Tracer

LAPIC_MMIO_LENGTH = 1 << 12
_U32 = 0xFFFFFFFF


def kvm_apic_calc_x2apic_ldr(id_: int) -> int:
    return ((id_ >> 4) << 16) | (1 << (id_ & 0xF))


def for_each_set_bit(v: int):
    """The numbers of the bits set in *v*, lowest first."""
    while v:
        low = v & -v
        yield low.bit_length() - 1
        v ^= low


class LapicAccessMixin:
    """Register reads and writes, x2APIC MSRs, KVM_GET/SET_LAPIC (mixed into LocalApic)."""

    __slots__ = ()

    # fields of LocalApic this code reads
    arch: VcpuArch
    kvm: KvmArch
    ops: VendorOps
    trace: Tracer | None
    vcpu_id: int
    page: bytearray
    r: memoryview
    irr: int
    isr: int
    tmr: int
    base_address: int
    hw_enabled: bool
    x2apic: bool
    sw_enabled: bool
    apicv_active: bool
    lvt0_in_nmi_mode: bool
    nr_lvt_entries: int
    tpr_access_write: bool | None
    timer: HrTimer
    period: int
    timer_mode_mask: int
    timer_pending: int
    expired_tscdeadline: int
    divide_count: int

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
            return self.vector_dword(offset)
        return self.r[offset >> 2]

    def vector_dword(self, offset: int) -> int:
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
        # 9cfec6d097c6 (6.6) moved the PIR/ON clearing to the start; before it (since
        # 967235d32032, 4.11) vmx_apicv_post_state_restore cleared them at the end, after the
        # timer restart below could already have posted an expired timer's vector there
        old_pir_clear = self.kvm.kvm_version < (6, 6)
        if not old_pir_clear:
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
            for v in for_each_set_bit(old_isr & ~self.isr):
                tr.in_service(self.vcpu_id, v, False)
            for v in for_each_set_bit(self.isr & ~old_isr):
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
            if old_pir_clear:
                self.ops.apicv_pre_state_restore(self)  # then named apicv_post_state_restore
            self.ops.apicv_post_state_restore(self)
        self.arch.requests |= KVM_REQ_EVENT
        self.arch.apic_arb_prio = 0
        return 0
