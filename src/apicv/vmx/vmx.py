"""Intel VMX APIC virtualization for one vCPU: KVM's vmx.c/posted_intr.c hooks
(:class:`VmxOps`, the ``kvm_x86_ops`` lapic.c calls) and the processor's side of it in VMX
non-root operation (:class:`VmxVcpu`): the guest-interrupt status (RVI/SVI), PPR/TPR/EOI/self-IPI
virtualization, evaluation and delivery of pending virtual interrupts, posted-interrupt
processing, and which guest APIC accesses are virtualized and which exit (Intel SDM Vol. 3C,
"APIC Virtualization and Virtual Interrupts").

The virtual-APIC page is the LocalApic's register page, as in KVM (apic->regs): VTPR/VPPR are
its TPR/PPR words and VIRR/VISR its IRR/ISR bits, so what the "CPU" changes is exactly what
KVM_GET_LAPIC returns.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from .. import apicdef as A
from ..kvm_host import KVM_REQ_EVENT
from ..lapic import VendorOps
from .pi_desc import POSTED_INTR_VECTOR, PiDesc

if TYPE_CHECKING:
    from ..lapic import LocalApic

# VMX basic exit reasons (SDM Appendix C) the model counts
EXIT_REASONS = {
    "EXTERNAL_INTERRUPT": 1, "INTERRUPT_WINDOW": 7, "NMI_WINDOW": 8, "HLT": 12,
    "CR_ACCESS": 28, "IO_INSTRUCTION": 30, "MSR_READ": 31, "MSR_WRITE": 32,
    "TPR_BELOW_THRESHOLD": 43,
    "APIC_ACCESS": 44, "EOI_INDUCED": 45, "EPT_MISCONFIG": 49, "APIC_WRITE": 56,
    "TDCALL": 77,
}

# page offsets (dword 0 of the 16-byte slot) whose reads/writes are virtualized with
# APIC-register virtualization (SDM 29.4.2 / 29.4.3.1)
ARV_READ = frozenset([0x20, 0x30, 0x80, 0xB0, 0xD0, 0xE0, 0xF0, 0x280, 0x300, 0x310, 0x320,
                      0x330, 0x340, 0x350, 0x360, 0x370, 0x380, 0x3E0]
                     + list(range(0x100, 0x280, 0x10)))
ARV_WRITE = frozenset([0x20, 0x80, 0xB0, 0xD0, 0xE0, 0xF0, 0x280, 0x300, 0x310, 0x320, 0x330,
                       0x340, 0x350, 0x360, 0x370, 0x380, 0x3E0])


def _highest(v: int) -> int:
    return v.bit_length() - 1 if v else 0


class VmxVcpu:
    """struct vcpu_vmx (the APIC-virtualization part) plus the CPU's non-root behaviour."""

    __slots__ = ("apic", "pi_desc", "rvi", "svi", "eoi_exit_bitmap", "tpr_threshold",
                 "flexpriority", "vaa", "vx2", "tpr_shadow", "apicv", "recognized",
                 "exit_counts")

    def __init__(self, apic: LocalApic, flexpriority: bool = True) -> None:
        self.apic = apic
        self.pi_desc = PiDesc()
        self.rvi = 0  # GUEST_INTR_STATUS[7:0]
        self.svi = 0  # GUEST_INTR_STATUS[15:8]
        self.eoi_exit_bitmap = 0
        self.tpr_threshold = 0
        self.flexpriority = flexpriority
        self.tpr_shadow = flexpriority  # CPU_BASED_TPR_SHADOW
        self.vaa = False  # SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES
        self.vx2 = False  # SECONDARY_EXEC_VIRTUALIZE_X2APIC_MODE
        self.apicv = False  # APIC_REGISTER_VIRT | VIRTUAL_INTR_DELIVERY | posted interrupts
        self.recognized = False  # a pending virtual interrupt is recognized
        self.exit_counts: Counter[str] = Counter()

    @property
    def guest_intr_status(self) -> int:
        return self.rvi | (self.svi << 8)

    def count(self, reason: str) -> None:
        self.exit_counts[reason] += 1

    # ------------------------------------------------------------ processor operations
    def ppr_virtualization(self) -> None:
        apic = self.apic
        vtpr = apic.r[A.APIC_TASKPRI >> 2]
        if (vtpr & 0xF0) >= (self.svi & 0xF0):
            vppr = vtpr & 0xFF
        else:
            vppr = self.svi & 0xF0
        apic.r[A.APIC_PROCPRI >> 2] = vppr

    def evaluate(self) -> None:
        """Evaluation of pending virtual interrupts (interrupt-window exiting is 0 here)."""
        vppr = self.apic.r[A.APIC_PROCPRI >> 2]
        self.recognized = (self.rvi & 0xF0) > (vppr & 0xF0)

    def deliver(self) -> int:
        """Virtual-interrupt delivery: returns the vector delivered through the IDT."""
        apic = self.apic
        vector = self.rvi
        apic.isr |= 1 << vector
        self.svi = vector
        apic.r[A.APIC_PROCPRI >> 2] = vector & 0xF0
        apic.irr &= ~(1 << vector)
        self.rvi = _highest(apic.irr)
        self.recognized = False
        tr = apic.trace
        if tr is not None:
            tr.in_service(apic.vcpu_id, vector, True)
            tr.timeline.append((apic.clock.now, apic.vcpu_id, "vid", (self.rvi, self.svi)))
        return vector

    def tpr_virtualization(self) -> str | None:
        """After VTPR changed; returns 'TPR_BELOW_THRESHOLD' for the trap-like exit."""
        if not self.apicv:
            if (self.apic.r[A.APIC_TASKPRI >> 2] >> 4) & 0xF < self.tpr_threshold:
                return "TPR_BELOW_THRESHOLD"
            return None
        self.ppr_virtualization()
        self.evaluate()
        return None

    def eoi_virtualization(self) -> int | None:
        """Returns the vector when the EOI-exit bitmap asks for an EOI-induced exit."""
        apic = self.apic
        vector = self.svi
        apic.isr &= ~(1 << vector)
        self.svi = _highest(apic.isr)
        self.ppr_virtualization()
        tr = apic.trace
        if tr is not None:
            tr.in_service(apic.vcpu_id, vector, False)
        if self.eoi_exit_bitmap >> vector & 1:
            return vector
        self.evaluate()
        return None

    def self_ipi_virtualization(self, vector: int) -> None:
        self.apic.irr |= 1 << vector
        if vector > self.rvi:
            self.rvi = vector
        self.evaluate()

    def posted_interrupt_processing(self) -> None:
        """The notification vector arrived in non-root operation (no VM exit)."""
        pi = self.pi_desc
        pi.pi_clear_on()
        pir = pi.pi_harvest_pir()
        if pir:
            self.apic.irr |= pir
            top = pir.bit_length() - 1
            if top > self.rvi:
                self.rvi = top
        self.evaluate()

    def vm_entry(self) -> None:
        """VM entry with virtual-interrupt delivery: PPR virtualization, then evaluation."""
        if self.apicv:
            self.ppr_virtualization()
            self.evaluate()

    # ------------------------------------------------------------ guest accesses
    def mmio_virtualized(self, offset: int, size: int, write: bool) -> bool:
        """Whether a linear access to the APIC-access page is virtualized (else it causes an
        APIC-access VM exit). Only called with 'virtualize APIC accesses' on."""
        if not self.tpr_shadow or size > 4 or (offset & 0xC) or ((offset + size - 1) & 0xC):
            return False
        slot = offset & 0xFF0
        if not self.apicv:  # no ARV, no VID: only the TPR (at offset 080H)
            return offset == A.APIC_TASKPRI
        return slot in (ARV_WRITE if write else ARV_READ)

    def read_page(self, offset: int, size: int) -> int:
        """A virtualized read: data from the virtual-APIC page."""
        apic = self.apic
        slot = offset & 0xFF0
        if A.APIC_ISR <= slot < A.APIC_ESR:
            word = apic.vector_dword(slot)
        else:
            word = apic.r[slot >> 2]
        shift = 8 * (offset & 3)
        return (word >> shift) & ((1 << (8 * size)) - 1)

    def write_page(self, offset: int, size: int, value: int) -> None:
        """A virtualized write stores the data on the virtual-APIC page."""
        apic = self.apic
        slot = offset & 0xFF0
        shift = 8 * (offset & 3)
        mask = ((1 << (8 * size)) - 1) << shift
        apic.r[slot >> 2] = (apic.r[slot >> 2] & ~mask) | ((value << shift) & mask)

    def read_page64(self, offset: int) -> int:
        """8 bytes at *offset* (virtualized RDMSR of an x2APIC MSR)."""
        r = self.apic
        lo = self.read_page(offset, 4)
        return lo | (r.page[offset + 4] | r.page[offset + 5] << 8 | r.page[offset + 6] << 16
                     | r.page[offset + 7] << 24) << 32

    def msr_read_passes(self, msr: int) -> bool:
        """The x2APIC MSR bitmap lets a RDMSR through (vmx_update_msr_bitmap_x2apic)."""
        if not self.vx2 or msr > 0x83F:
            return False
        reg = (msr & 0xFF) << 4
        if reg == A.APIC_TASKPRI:
            return True
        if not self.apicv or reg == A.APIC_TMCCT:
            return False
        return bool(self.apic.kvm_lapic_readable_reg_mask() >> (reg >> 4) & 1)

    def msr_write_passes(self, msr: int) -> bool:
        if not self.vx2:
            return False
        if msr == 0x808:
            return True
        return self.apicv and msr in (0x80B, 0x83F)


class VmxOps(VendorOps):
    """kvm_x86_ops for VMX (vmx.c, posted_intr.c) with enable_apicv=1."""

    def deliver_interrupt(self, apic: LocalApic, dm: int, trig: int, vector: int) -> None:
        """vmx_deliver_interrupt(): post it; if APICv is inactive, the IRR path."""
        if self.vmx_deliver_posted_interrupt(apic, vector):
            super().deliver_interrupt(apic, dm, trig, vector)
        else:
            tr = apic.trace
            if tr is not None:
                tr.kvm_apicv_accept_irq(apic.vcpu_id, dm, trig, vector)

    def vmx_deliver_posted_interrupt(self, apic: LocalApic, vector: int) -> int:
        """Set PIR[vector] and ON; notify the vCPU (0 on success, -1 when APICv is off)."""
        if not apic.apicv_active:
            return -1
        self._vmx_deliver_posted_interrupt(apic, vector)
        return 0

    def _vmx_deliver_posted_interrupt(self, apic: LocalApic, vector: int) -> None:
        """__vmx_deliver_posted_interrupt() (vmx/common.h): PIR, ON, notification."""
        pi = apic.vmx.pi_desc
        tr = apic.trace
        if tr is not None:
            tr.timeline.append((apic.clock.now, apic.vcpu_id, "pir", vector))
        if pi.pi_test_and_set_pir(vector):
            return
        if pi.pi_test_and_set_on():
            return
        self.kvm_vcpu_trigger_posted_interrupt(apic, POSTED_INTR_VECTOR)

    def kvm_vcpu_trigger_posted_interrupt(self, apic: LocalApic, pi_vec: int) -> None:
        arch = apic.arch
        if arch.in_guest_mode:
            # a notification IPI to the pCPU: processed by the CPU, no VM exit
            arch.pi_notification = True
            apic.kvm.kicked.append(arch)
            return
        apic.kvm_vcpu_wake_up()

    def sync_pir_to_irr(self, apic: LocalApic) -> int:
        """vmx_sync_pir_to_irr()."""
        vmx = apic.vmx
        pi = vmx.pi_desc
        if pi.on:
            pi.pi_clear_on()
            got, max_irr = apic.kvm_apic_update_irr(pi.pi_harvest_pir())
        else:
            max_irr = apic.kvm_lapic_find_highest_irr()
            got = False
        if apic.apicv_active:
            self.vmx_set_rvi(apic, max_irr)
        elif got:
            apic.arch.requests |= KVM_REQ_EVENT
        return max_irr

    def vmx_set_rvi(self, apic: LocalApic, vector: int) -> None:
        apic.vmx.rvi = 0 if vector == -1 else vector & 0xFF

    def hwapic_irr_update(self, apic: LocalApic, max_irr: int) -> None:
        self.vmx_set_rvi(apic, max_irr)

    def hwapic_isr_update(self, apic: LocalApic, max_isr: int) -> None:
        apic.vmx.svi = 0 if max_isr == -1 else max_isr & 0xFF

    def apicv_pre_state_restore(self, apic: LocalApic) -> None:
        """vmx_apicv_pre_state_restore(): queued posted interrupts are dropped."""
        pi = apic.vmx.pi_desc
        pi.pi_clear_on()
        pi.pir = 0

    def update_cr8_intercept(self, apic: LocalApic, tpr: int, max_irr: int) -> None:
        """vmx_update_cr8_intercept(): TPR_THRESHOLD."""
        apic.vmx.tpr_threshold = 0 if (max_irr == -1 or tpr < max_irr) else max_irr

    def set_virtual_apic_mode(self, apic: LocalApic) -> None:
        """vmx_set_virtual_apic_mode(): VIRTUALIZE_APIC_ACCESSES for xAPIC (flexpriority),
        VIRTUALIZE_X2APIC_MODE for x2APIC."""
        vmx = apic.vmx
        vmx.vaa = apic.hw_enabled and not apic.x2apic and vmx.flexpriority
        vmx.vx2 = apic.hw_enabled and apic.x2apic and vmx.flexpriority

    def refresh_apicv_exec_ctrl(self, apic: LocalApic) -> None:
        apic.vmx.apicv = apic.apicv_active

    def load_eoi_exitmap(self, apic: LocalApic, bitmap: int) -> None:
        if apic.apicv_active:
            apic.vmx.eoi_exit_bitmap = bitmap

    # KVM's own names for these kvm_x86_ops (vmx/main.c wires them up)
    vmx_deliver_interrupt = deliver_interrupt
    vmx_sync_pir_to_irr = sync_pir_to_irr
    vmx_hwapic_isr_update = hwapic_isr_update
    vmx_apicv_pre_state_restore = apicv_pre_state_restore
    vmx_update_cr8_intercept = update_cr8_intercept
    vmx_set_virtual_apic_mode = set_virtual_apic_mode
    vmx_refresh_apicv_exec_ctrl = refresh_apicv_exec_ctrl
    vmx_load_eoi_exitmap = load_eoi_exitmap
