"""Intel TDX: the protected APIC of a trust domain (KVM's vmx/tdx.c, vmx/main.c and the
``guest_apic_protected`` paths of lapic.c, irq.c and x86.c).

In a TD the virtual-APIC page belongs to the TDX module, not to KVM. KVM still has its
``struct kvm_lapic`` -- the registers the guest asks it to emulate through TDVMCALL (ID,
SPIV, LVTs, the timer, ICR) live there, and its APIC map routes interrupts -- but its IRR/ISR
are "bogus": every interrupt goes in through the posted-interrupt descriptor
(``tdx_deliver_interrupt``), the TDX module moves PIR into the TD's own vIRR, and the CPU
delivers and EOIs it there (the EOI-exit bitmap is protected, so no EOI ever exits). So:

* KVM_GET_LAPIC / KVM_SET_LAPIC fail with -EINVAL; ``kvm_apic_has_interrupt`` is -1 and
  ``kvm_cpu_has_interrupt`` asks :func:`tdx_protected_apic_has_interrupt` instead;
* APICv is always active (TDX needs ``enable_apicv``); an inhibit that would deactivate it is a
  KVM bug (``vt_refresh_apicv_exec_ctrl``: KVM_BUG_ON, the VM is dead, ioctls return -EIO);
* the in-kernel IOAPIC is refused (KVM_CREATE_IRQCHIP: -ENOTTY, protected EOIs) and a vCPU
  needs a split irqchip (``tdx_vcpu_create``: -EINVAL otherwise);
* INIT and SIPI are always blocked; the guest's x2APIC is enabled by KVM_TDX_INIT_VCPU and its
  APIC base is read-only; NMIs go through TD_VCPU_PEND_NMI, extra ones collapse.

:class:`TdVirtualApic` is the TD's own page; :class:`TdxVcpu` the CPU side (with the TDX
module's entry behaviour); :class:`TdxOps` the ``vt_x86_ops`` hooks for a TD vCPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import apicdef as A
from ..errors import KvmError
from ..lapic import VendorOps
from ..uapi import EIO
from .pi_desc import POSTED_INTR_VECTOR
from .vmx import VmxOps, VmxVcpu

if TYPE_CHECKING:
    from ..lapic import LocalApic
    from ..vcpu import Vcpu

_U32 = 0xFFFFFFFF

# x2APIC MSRs the CPU virtualizes for a TD and KVM therefore cannot emulate
# (tdx_has_emulated_msr: TPR, PPR, EOI, ISR, TMR, IRR)
TDX_VIRTUALIZED_X2APIC_MSRS = frozenset(
    [0x808, 0x80A, 0x80B] + list(range(0x810, 0x828)))


def tdx_has_emulated_msr(index: int) -> bool:
    """tdx_has_emulated_msr(), for the MSRs the model knows: the APIC base, TSC deadline and
    the x2APIC registers the CPU does not virtualize. (IA32_TSC belongs to the TDX module.)"""
    if index in (A.MSR_IA32_APICBASE, A.MSR_IA32_TSC_DEADLINE):
        return True
    if A.APIC_BASE_MSR <= index <= A.APIC_BASE_MSR + 0xFF:
        return index not in TDX_VIRTUALIZED_X2APIC_MSRS
    return False


def tdx_is_read_only_msr(index: int) -> bool:
    """tdx_is_read_only_msr(): the APIC base (and EFER, FEAT_CTL) cannot be written."""
    return index == A.MSR_IA32_APICBASE


class TdVirtualApic:
    """The TD's virtual-APIC page, owned by the TDX module (KVM never sees it): VTPR, VPPR,
    VEOI, vISR/vTMR/vIRR. It offers the parts of a LocalApic the CPU model uses."""

    __slots__ = ("vcpu_id", "clock", "_kvm_apic", "page", "r", "irr", "isr", "tmr")

    def __init__(self, kvm_apic: LocalApic) -> None:
        self.vcpu_id = kvm_apic.vcpu_id
        self.clock = kvm_apic.clock
        self._kvm_apic = kvm_apic
        self.page = bytearray(4096)
        self.r = memoryview(self.page).cast("I")
        self.irr = 0
        self.isr = 0
        self.tmr = 0

    def vector_dword(self, offset: int) -> int:
        bank, idx = divmod(offset - A.APIC_ISR, 0x80)
        vec = (self.isr, self.tmr, self.irr)[bank]
        return (vec >> (32 * (idx >> 4))) & _U32

    @property
    def trace(self):
        """The vCPU's tracer (the same one its KVM LAPIC uses, also when enabled later)."""
        return self._kvm_apic.trace

    def state(self) -> bytes:
        """The page as a 1024-byte kvm_lapic_state (for ``apicv state decode``): what
        KVM_GET_LAPIC would show if KVM could read it."""
        out = bytearray(self.page[:0x400])
        words = memoryview(out).cast("I")
        for bank, vec in ((A.APIC_ISR, self.isr), (A.APIC_TMR, self.tmr), (A.APIC_IRR, self.irr)):
            for i in range(8):
                words[(bank + 0x10 * i) >> 2] = (vec >> (32 * i)) & _U32
        return bytes(out)


class TdxVcpu(VmxVcpu):
    """A TD vCPU's APIC virtualization: always APICv (VID, x2APIC virtualization, posted
    interrupts), on the TD's own page, with the TDX module's view of the last TD exit."""

    __slots__ = ("hlt_exit", "hlt_irq_blocked")

    def __init__(self, kvm_apic: LocalApic) -> None:
        super().__init__(TdVirtualApic(kvm_apic), flexpriority=True)
        # tdx_vcpu_create(): NV = POSTED_INTR_VECTOR and SN set until the vCPU is loaded
        self.pi_desc.nv = POSTED_INTR_VECTOR
        self.pi_desc.sn = True
        self.tpr_shadow = True
        self.vx2 = True
        self.vaa = False
        self.apicv = True
        self.eoi_exit_bitmap = 0  # protected: every EOI is virtualized, none exits
        # the last TD exit was TDVMCALL<HLT>, with its "interrupts blocked" flag (r12)
        self.hlt_exit = False
        self.hlt_irq_blocked = False

    def vmxip(self) -> bool:
        """TD_VCPU_STATE_DETAILS_NON_ARCH.vmxip: a virtual interrupt is pending (RVI above
        VPPR), read by KVM with a SEAMCALL."""
        return (self.rvi & 0xF0) > (self.apic.r[A.APIC_PROCPRI >> 2] & 0xF0)

    def vm_entry(self) -> None:
        """tdx_vcpu_run(): with PID.ON, KVM sends itself the notification vector before
        TDH.VP.ENTER, so the CPU processes the posted interrupts right after entry."""
        self.hlt_exit = False
        if self.pi_desc.on:
            self.posted_interrupt_processing()
        self.ppr_virtualization()
        self.evaluate()

    def msr_read_passes(self, msr: int) -> bool:
        """RDMSR of TPR, PPR, ISR/TMR/IRR is virtualized; the rest is a #VE and TDVMCALL."""
        return msr in TDX_VIRTUALIZED_X2APIC_MSRS and msr != 0x80B

    def msr_write_passes(self, msr: int) -> bool:
        return msr in (0x808, 0x80B, 0x83F)


class TdxOps(VmxOps):
    """vt_x86_ops for a TD vCPU: posted interrupts are the only way in, and the hooks that
    touch the virtual-APIC page or the VMCS APIC controls are ignored (the TDX module owns
    them)."""

    def deliver_interrupt(self, apic: LocalApic, dm: int, trig: int, vector: int) -> None:
        """tdx_deliver_interrupt(): no IRR fallback, no LAPIC emulation."""
        self._vmx_deliver_posted_interrupt(apic, vector)
        tr = apic.trace
        if tr is not None:
            tr.kvm_apicv_accept_irq(apic.vcpu_id, dm, trig, vector)

    def sync_pir_to_irr(self, apic: LocalApic) -> int:
        """vt_sync_pir_to_irr(): -1 for a TD (PIR is the TDX module's to process)."""
        return -1

    # the TDX module owns the virtual-APIC page and the VMCS APIC controls: nothing to do
    hwapic_irr_update = VendorOps.hwapic_irr_update
    hwapic_isr_update = VendorOps.hwapic_isr_update
    apicv_pre_state_restore = VendorOps.apicv_pre_state_restore
    update_cr8_intercept = VendorOps.update_cr8_intercept
    set_virtual_apic_mode = VendorOps.set_virtual_apic_mode
    load_eoi_exitmap = VendorOps.load_eoi_exitmap

    def refresh_apicv_exec_ctrl(self, apic: LocalApic) -> None:
        """vt_refresh_apicv_exec_ctrl(): KVM_BUG_ON(!kvm_vcpu_apicv_active(vcpu))."""
        if not apic.apicv_active:
            apic.kvm.vm_bugged = True
            raise KvmError(EIO, "KVM_RUN",
                           "KVM_BUG_ON: APICv deactivated on a TD vCPU (an inhibit was set); "
                           "the VM is dead")

    tdx_deliver_interrupt = deliver_interrupt
    vt_sync_pir_to_irr = sync_pir_to_irr
    vt_refresh_apicv_exec_ctrl = refresh_apicv_exec_ctrl


def tdx_protected_apic_has_interrupt(vcpu: Vcpu) -> bool:
    """tdx_protected_apic_has_interrupt(): a posted interrupt pending in the descriptor, or --
    only when the TD exited with HLT and interrupts enabled -- a virtual interrupt the CPU
    already recognized (RVI) between STI and HLT."""
    vmx = vcpu.vmx
    if vmx.pi_desc.pi_has_pending_interrupt():
        return True
    if not (vmx.hlt_exit and not vmx.hlt_irq_blocked):
        return False
    return vmx.vmxip()


def tdx_interrupt_allowed(vcpu: Vcpu) -> bool:
    """tdx_interrupt_allowed(): true unless the TD exited with HLT and interrupts blocked."""
    vmx = vcpu.vmx
    return not (vmx.hlt_exit and vmx.hlt_irq_blocked)
