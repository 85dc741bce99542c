"""The APIC accesses of a guest running in L2 (:class:`apicv.nested_guest.NestedVcpu`): through
L1's vmcs12 controls -- virtualized on L1's virtual-APIC page (SDM 29.4/29.5: APIC-access
virtualization, APIC-register virtualization, TPR/EOI virtualization, x2APIC mode), reflected
to L1 as nested VM exits, or, when L1 passes its own APIC through, emulated by L0 on L1's APIC.
Each method is the nested branch of the :class:`apicv.guest.GuestMixin` method of the same name.
"""

from __future__ import annotations

from . import apicdef as A
from .errors import GuestFault
from .vmx.nested import (
    SECONDARY_EXEC_APIC_REGISTER_VIRT,
    SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES,
    SECONDARY_EXEC_VIRTUALIZE_X2APIC_MODE,
)
from .vmx.vmx import ARV_READ, ARV_WRITE


class NestedApicAccessMixin:
    """L2's APIC accesses (mixed into NestedVcpu before Vcpu: ``super()`` is the L1 path)."""

    def _l2_uses_x2apic(self) -> bool:
        """How L2 reaches "its" APIC: x2APIC MSRs when L1 virtualizes x2APIC mode, or when it
        passes through its own APIC and that is in x2APIC mode; MMIO otherwise."""
        v12 = self.nested.vmcs12
        if v12.has2(SECONDARY_EXEC_VIRTUALIZE_X2APIC_MODE):
            return True
        return not v12.has2(SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES) and self.apic.x2apic

    def _guest_eoi(self) -> None:
        if not self.nested.guest_mode:
            super()._guest_eoi()
            return
        if self._l2_uses_x2apic():
            self._guest_wrmsr(A.APIC_BASE_MSR + (A.APIC_EOI >> 4), 0)
        else:
            self._mmio(A.APIC_EOI, 4, 0)

    def _mmio(self, offset: int, size: int, value: int | None) -> int:
        """An L2 access to the APIC page: virtualized with vmcs12's controls (SDM 29.4), an
        APIC-access exit to L1, or -- L1 gave no APIC-access page, mapping its own APIC
        into L2 -- an access to L1's APIC that L0 emulates."""
        n = self.nested
        if not n.guest_mode:
            return super()._mmio(offset, size, value)
        v12 = n.vmcs12
        if not v12.has2(SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES):
            return super()._mmio(offset, size, value)
        p = self.vmx
        write = value is not None
        if p.tpr_shadow and self._l2_virtualized(offset, size, write):
            if not write:
                return p.read_page(offset, size)
            self._l2_apic_write(offset, size, value)
            return 0
        self._l2_exit_to_l1("APIC_ACCESS", (offset & 0xFFF) | (int(write) << 12))
        self.last_read_undefined = False
        return 0

    def _l2_virtualized(self, offset: int, size: int, write: bool) -> bool:
        """SDM 29.4.2 / 29.4.3.1 with vmcs12's APIC-register virtualization and VID."""
        if size > 4 or (offset & 0xC) or ((offset + size - 1) & 0xC):
            return False
        v12 = self.nested.vmcs12
        arv = v12.has2(SECONDARY_EXEC_APIC_REGISTER_VIRT)
        slot = offset & 0xFF0
        if not write:
            return slot in ARV_READ if arv else slot == A.APIC_TASKPRI
        if slot == A.APIC_TASKPRI:
            return True
        if v12.vid and slot in (A.APIC_EOI, A.APIC_ICR):
            return True
        return arv and slot in ARV_WRITE

    def _l2_apic_write(self, offset: int, size: int, value: int) -> None:
        """A virtualized write to L2's virtual-APIC page, then APIC-write emulation (SDM
        29.4.3.2): TPR/EOI/self-IPI virtualization, or a trap-like APIC-write exit to L1."""
        p = self.vmx
        page = p.apic.r
        p.write_page(offset, size, value)
        slot = offset & 0xFF0
        v12 = self.nested.vmcs12
        if slot == A.APIC_TASKPRI:
            page[A.APIC_TASKPRI >> 2] = page[A.APIC_TASKPRI >> 2] & 0xFF
            self._tpr_virtualized()
        elif slot == A.APIC_EOI and v12.vid:
            page[A.APIC_EOI >> 2] = 0
            self._eoi_virtualized()
        elif slot == A.APIC_ICR and v12.vid and self._self_ipi_ok(page[A.APIC_ICR >> 2]):
            p.self_ipi_virtualization(page[A.APIC_ICR >> 2] & 0xFF)
            self._settle()
        else:
            self._l2_exit_to_l1("APIC_WRITE", slot)

    def _tpr_virtualized(self) -> None:
        if not self.nested.guest_mode:
            super()._tpr_virtualized()
            return
        if self.vmx.tpr_virtualization() == "TPR_BELOW_THRESHOLD":
            self._l2_exit_to_l1("TPR_BELOW_THRESHOLD")
            return
        self._settle()

    def _eoi_virtualized(self) -> None:
        if not self.nested.guest_mode:
            super()._eoi_virtualized()
            return
        vector = self.vmx.eoi_virtualization()
        if vector is not None:
            self._l2_exit_to_l1("EOI_INDUCED", vector)  # vmcs12's EOI-exit bitmap
            return
        self._settle()

    def _guest_wrmsr(self, index: int, value: int) -> None:
        n = self.nested
        if not n.guest_mode:
            super()._guest_wrmsr(index, value)
            return
        v12 = n.vmcs12
        if (A.APIC_BASE_MSR <= index <= A.APIC_BASE_MSR + 0xFF
                and v12.has2(SECONDARY_EXEC_VIRTUALIZE_X2APIC_MODE) and v12.tpr_shadow
                and not v12.msr_exits(index)
                and (index == 0x808 or (v12.vid and index in (0x80B, 0x83F)))):
            self._l2_x2apic_write(index, value)  # SDM 29.5
            return
        if v12.msr_exits(index):
            self._l2_exit_to_l1("MSR_WRITE")
            return
        # L1 lets it through: L0 emulates the WRMSR on L1's APIC (kvm_set_msr_common)
        ok = self._reenter_after(
            lambda: self._gp_if(self.kvm_set_msr_common(index, value, host=False), False),
            "MSR_WRITE")
        if not ok:
            raise GuestFault(13, f"WRMSR {index:#x} <- {value:#x}")

    def _l2_x2apic_write(self, index: int, value: int) -> None:
        """SDM 29.5 on vmcs12's virtual-APIC page; the APIC-write exit goes to L1."""
        if not self._x2apic_virtualized_write(index, value):
            self._l2_exit_to_l1("APIC_WRITE", A.APIC_SELF_IPI)

    def _guest_rdmsr(self, index: int) -> int:
        n = self.nested
        if not n.guest_mode:
            return super()._guest_rdmsr(index)
        v12 = n.vmcs12
        if (A.APIC_BASE_MSR <= index <= A.APIC_BASE_MSR + 0xFF
                and v12.has2(SECONDARY_EXEC_VIRTUALIZE_X2APIC_MODE) and v12.tpr_shadow
                and not v12.msr_exits(index)):
            reg = (index & 0xFF) << 4
            if reg == A.APIC_TASKPRI:
                return self.vmx.read_page64(A.APIC_TASKPRI)
            if (v12.has2(SECONDARY_EXEC_APIC_REGISTER_VIRT) and reg in ARV_READ
                    and reg != A.APIC_TMCCT):
                return self.vmx.read_page64(reg)
        if v12.msr_exits(index):
            self._l2_exit_to_l1("MSR_READ")
            return 0
        v = self._reenter_after(
            lambda: self._gp_if(self.kvm_get_msr_common(index, host=False), None), "MSR_READ")
        if v is None:
            raise GuestFault(13, f"RDMSR {index:#x}")
        return v

    def _cr8(self, value: int | None) -> int:
        n = self.nested
        if n.guest_mode and not n.vmcs12.tpr_shadow:
            self._l2_exit_to_l1("CR_ACCESS", 8 | ((0 if value is not None else 1) << 4))
            return 0
        return super()._cr8(value)
