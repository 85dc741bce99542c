"""Nested VMX, the interrupt half: L1's VMCS for its L2 guest (:class:`Vmcs12`), KVM's nested
state of one vCPU (:class:`NestedVmx`, ``struct nested_vmx``) and the nested branches of the VMX
hooks lapic.c calls (:class:`NestedVmxOps`).

Checked against KVM's source (arch/x86/kvm/vmx/nested.c, vmx.c, x86.c, 6.18) and the Intel SDM,
not against a machine: the hosts apicv runs on have no VMX. Every rule names its function.

What L1 configured is read from vmcs12 the way the processor reads vmcs02 (L0 merges the two:
``prepare_vmcs02``): the virtual-APIC page and the posted-interrupt descriptor live in L1's
memory (``vm.mem``); the processor's virtual-APIC behaviour on them is :class:`VmxVcpu` run over
that memory (:class:`VirtualApicPage`, :class:`MemPiDesc`).

``kvm_version`` switches three rules to their older form:

* before 6.10 ``vmx_has_nested_events`` knew only the preemption timer and MTF, so a nested
  posted interrupt pending (``pi_pending``, PID.ON) did not wake a halted L2 (fixed by "KVM: nVMX:
  Check for pending posted interrupts when looking for nested events", 2024; older
  ``kvm_vcpu_has_events`` asked ``kvm_guest_apic_has_interrupt`` -- RVI against vPPR -- only);
* before 6.14 ``vmx_hwapic_isr_update`` wrote SVI into the current VMCS, vmcs02 while L2 runs,
  leaving vmcs01's SVI stale after KVM emulated an EOI of L1's APIC for L2 (b682d2fbf17c);
* from 6.19 ``__nested_vmx_vmexit`` refreshes vmcs01's APICv controls at once
  (``vmx_refresh_apicv_exec_ctrl``) instead of raising KVM_REQ_APICV_UPDATE, which
  ``__kvm_vcpu_update_apicv`` ignores because ``apicv_active`` already changed ("KVM: nVMX:
  Immediately refresh APICv controls as needed on nested VM-Exit", Dec 2025): 6.18 has the bug.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .. import apicdef as A
from ..errors import ApicvError
from ..kvm_host import KVM_REQ_APICV_UPDATE, KVM_REQ_EVENT, KVM_REQ_LOAD_EOI_EXITMAP
from ..memory import in_ram
from .pi_desc import POSTED_INTR_NESTED_VECTOR
from .vmx import VmxOps, VmxVcpu

if TYPE_CHECKING:
    from ..lapic import LocalApic

# --- VM-execution controls (SDM Vol. 3C 25.6, arch/x86/include/asm/vmx.h) ---
PIN_BASED_EXT_INTR_MASK = 1 << 0
PIN_BASED_NMI_EXITING = 1 << 3
PIN_BASED_VIRTUAL_NMIS = 1 << 5
PIN_BASED_POSTED_INTR = 1 << 7
CPU_BASED_INTR_WINDOW_EXITING = 1 << 2
CPU_BASED_HLT_EXITING = 1 << 7
CPU_BASED_TPR_SHADOW = 1 << 21
CPU_BASED_NMI_WINDOW_EXITING = 1 << 22
CPU_BASED_USE_MSR_BITMAPS = 1 << 28
CPU_BASED_ACTIVATE_SECONDARY_CONTROLS = 1 << 31
SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES = 1 << 0
SECONDARY_EXEC_VIRTUALIZE_X2APIC_MODE = 1 << 4
SECONDARY_EXEC_APIC_REGISTER_VIRT = 1 << 8
SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY = 1 << 9
VM_EXIT_ACK_INTR_ON_EXIT = 1 << 15

# --- interruption information (SDM 25.9.2) ---
INTR_INFO_VALID_MASK = 1 << 31
INTR_TYPE_EXT_INTR = 0 << 8
INTR_TYPE_NMI_INTR = 2 << 8
GUEST_INTR_STATE_NMI = 1 << 3
GUEST_ACTIVITY_ACTIVE = 0
GUEST_ACTIVITY_HLT = 1
X86_EFLAGS_IF = 1 << 9
X86_EFLAGS_FIXED = 1 << 1

# VM-instruction errors (SDM 31.4)
VMXERR_VMLAUNCH_NONCLEAR_VMCS = 4
VMXERR_VMRESUME_NONLAUNCHED_VMCS = 5
VMXERR_ENTRY_INVALID_CONTROL_FIELD = 7

# basic exit reasons L1 can see (SDM Appendix C); names as trace.h's VMX_EXIT_REASONS
NESTED_EXIT_REASONS = {
    "EXCEPTION_NMI": 0, "EXTERNAL_INTERRUPT": 1, "TRIPLE_FAULT": 2, "INIT_SIGNAL": 3,
    "SIPI_SIGNAL": 4, "INTERRUPT_WINDOW": 7, "NMI_WINDOW": 8, "HLT": 12, "VMLAUNCH": 20,
    "VMRESUME": 24, "CR_ACCESS": 28, "MSR_READ": 31, "MSR_WRITE": 32,
    "TPR_BELOW_THRESHOLD": 43, "APIC_ACCESS": 44, "EOI_INDUCED": 45, "EPT_MISCONFIG": 49,
    "PREEMPTION_TIMER": 52, "APIC_WRITE": 56,
}
EXIT_REASON_NAMES = {v: k for k, v in NESTED_EXIT_REASONS.items()}
EBUSY = 16

# the versions the switch knows (see the module docstring)
KVM_6_9, KVM_6_13, KVM_6_18, KVM_6_19 = (6, 9), (6, 13), (6, 18), (6, 19)
HAS_NESTED_EVENTS_PI_FIX = (6, 10)
DEFER_SVI_FIX = (6, 14)
APICV_REFRESH_ON_VMEXIT_FIX = (6, 19)


class VmFail(ApicvError):
    """VMLAUNCH/VMRESUME failed (VMfailValid): L1 continues after the instruction with
    RFLAGS.ZF=1 and ``vmcs12.vm_instruction_error`` set (nested_vmx_failValid). An
    :class:`~apicv.errors.ApicvError`: a scenario step reports it (``expect_vmfail``)."""

    def __init__(self, error: int, why: str) -> None:
        super().__init__(f"VM-instruction error {error}: {why}")
        self.error = error


class NotInL2Error(ApicvError, RuntimeError):
    """A guest operation asked for a level (L1 or L2) that is not the one running."""


@dataclass
class Vmcs12:
    """The fields of L1's VMCS for L2 that interrupt delivery depends on (struct vmcs12).

    ``msr_intercepts`` is the part of L1's MSR bitmap that matters here: the MSR indexes whose
    reads and writes exit to L1 (``None``: no MSR bitmaps, every MSR access exits)."""

    pin_based_vm_exec_control: int = PIN_BASED_EXT_INTR_MASK | PIN_BASED_NMI_EXITING
    cpu_based_vm_exec_control: int = CPU_BASED_HLT_EXITING
    secondary_vm_exec_control: int = 0
    vm_exit_controls: int = VM_EXIT_ACK_INTR_ON_EXIT
    virtual_apic_page_addr: int = 0
    apic_access_addr: int = 0
    posted_intr_nv: int = 0
    posted_intr_desc_addr: int = 0
    eoi_exit_bitmap: int = 0  # EOI_EXIT_BITMAP0..3, 256 bits
    guest_intr_status: int = 0  # RVI | SVI << 8
    tpr_threshold: int = 0
    vm_entry_intr_info_field: int = 0
    guest_rflags: int = X86_EFLAGS_FIXED | X86_EFLAGS_IF
    guest_interruptibility_info: int = 0
    guest_activity_state: int = GUEST_ACTIVITY_ACTIVE
    msr_intercepts: frozenset | None = None
    # exit information (written by nested_vmx_vmexit / prepare_vmcs12)
    vm_exit_reason: int = 0
    exit_qualification: int = 0
    vm_exit_intr_info: int = 0
    idt_vectoring_info_field: int = 0
    vm_instruction_error: int = 0
    launch_state: int = 0

    @classmethod
    def build(cls, *, ext_intr_exiting: bool = True, nmi_exiting: bool = True,
              virtual_nmis: bool = False, ack_intr_on_exit: bool = True,
              hlt_exiting: bool = True, intr_window_exiting: bool = False,
              nmi_window_exiting: bool = False, tpr_shadow: bool = False,
              virtual_apic_page: int = 0, tpr_threshold: int = 0,
              virtualize_apic_accesses: bool = False, apic_access_addr: int = 0xFEE00000,
              virtualize_x2apic_mode: bool = False, apic_register_virt: bool = False,
              virtual_intr_delivery: bool = False, eoi_exit_bitmap: int = 0,
              guest_intr_status: int = 0, posted_interrupts: bool = False,
              posted_intr_nv: int = 0, posted_intr_desc: int = 0, msr_intercepts=None,
              guest_if: bool = True, entry_intr_info: int = 0) -> Vmcs12:
        """A vmcs12 from named controls (what L1 would VMWRITE)."""
        pin = ((PIN_BASED_EXT_INTR_MASK if ext_intr_exiting else 0)
               | (PIN_BASED_NMI_EXITING if nmi_exiting else 0)
               | (PIN_BASED_VIRTUAL_NMIS if virtual_nmis else 0)
               | (PIN_BASED_POSTED_INTR if posted_interrupts else 0))
        sec = ((SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES if virtualize_apic_accesses else 0)
               | (SECONDARY_EXEC_VIRTUALIZE_X2APIC_MODE if virtualize_x2apic_mode else 0)
               | (SECONDARY_EXEC_APIC_REGISTER_VIRT if apic_register_virt else 0)
               | (SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY if virtual_intr_delivery else 0))
        cpu = ((CPU_BASED_HLT_EXITING if hlt_exiting else 0)
               | (CPU_BASED_INTR_WINDOW_EXITING if intr_window_exiting else 0)
               | (CPU_BASED_NMI_WINDOW_EXITING if nmi_window_exiting else 0)
               | (CPU_BASED_TPR_SHADOW if tpr_shadow else 0)
               | (CPU_BASED_USE_MSR_BITMAPS if msr_intercepts is not None else 0)
               | (CPU_BASED_ACTIVATE_SECONDARY_CONTROLS if sec else 0))
        return cls(
            pin_based_vm_exec_control=pin, cpu_based_vm_exec_control=cpu,
            secondary_vm_exec_control=sec,
            vm_exit_controls=VM_EXIT_ACK_INTR_ON_EXIT if ack_intr_on_exit else 0,
            virtual_apic_page_addr=virtual_apic_page, apic_access_addr=apic_access_addr,
            posted_intr_nv=posted_intr_nv, posted_intr_desc_addr=posted_intr_desc,
            eoi_exit_bitmap=eoi_exit_bitmap, guest_intr_status=guest_intr_status,
            tpr_threshold=tpr_threshold, vm_entry_intr_info_field=entry_intr_info,
            guest_rflags=X86_EFLAGS_FIXED | (X86_EFLAGS_IF if guest_if else 0),
            msr_intercepts=None if msr_intercepts is None else frozenset(msr_intercepts))

    # nested_cpu_has*() (nested.h)
    def has(self, ctl: int) -> bool:
        return bool(self.cpu_based_vm_exec_control & ctl)

    def has2(self, ctl: int) -> bool:
        return bool(self.cpu_based_vm_exec_control & CPU_BASED_ACTIVATE_SECONDARY_CONTROLS
                    and self.secondary_vm_exec_control & ctl)

    def pin(self, ctl: int) -> bool:
        return bool(self.pin_based_vm_exec_control & ctl)

    @property
    def exit_on_intr(self) -> bool:
        return self.pin(PIN_BASED_EXT_INTR_MASK)

    @property
    def exit_on_nmi(self) -> bool:
        return self.pin(PIN_BASED_NMI_EXITING)

    @property
    def ack_intr_on_exit(self) -> bool:
        return bool(self.vm_exit_controls & VM_EXIT_ACK_INTR_ON_EXIT)

    @property
    def posted_intr(self) -> bool:
        return self.pin(PIN_BASED_POSTED_INTR)

    @property
    def vid(self) -> bool:
        return self.has2(SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY)

    @property
    def tpr_shadow(self) -> bool:
        return self.has(CPU_BASED_TPR_SHADOW)

    def msr_exits(self, msr: int) -> bool:
        """nested_vmx_exit_handled_msr(): the access exits to L1 (no MSR bitmaps: all do)."""
        if not self.has(CPU_BASED_USE_MSR_BITMAPS) or self.msr_intercepts is None:
            return True
        return msr in self.msr_intercepts

    def nested_vmx_check_controls(self, enable_apicv: bool) -> str | None:
        """The interrupt-related VM-entry checks on VM-execution controls (SDM 27.2.1.1;
        nested_vmx_check_controls: nested_check_vm_execution_controls,
        nested_vmx_check_tpr_shadow_controls, nested_vmx_check_apicv_controls), plus the
        allowed-1 settings of the VMX capability MSRs (nested_vmx_setup_ctls_msrs offers APIC
        register virtualization, virtual-interrupt delivery and posted interrupts only with
        enable_apicv). Returns why it fails, or None."""
        if not enable_apicv and (self.posted_intr or self.vid
                                 or self.has2(SECONDARY_EXEC_APIC_REGISTER_VIRT)):
            return "APICv controls not allowed (kvm_intel.enable_apicv=0)"
        if self.pin(PIN_BASED_VIRTUAL_NMIS) and not self.exit_on_nmi:
            return "virtual NMIs need NMI exiting"
        if self.has(CPU_BASED_NMI_WINDOW_EXITING) and not self.pin(PIN_BASED_VIRTUAL_NMIS):
            return "NMI-window exiting needs virtual NMIs"
        if self.tpr_shadow:
            a = self.virtual_apic_page_addr
            if a & 0xFFF or not in_ram(a, 0x1000):
                return "virtual-APIC address is not a valid page (page_address_valid)"
        elif (self.has2(SECONDARY_EXEC_VIRTUALIZE_X2APIC_MODE) or self.vid
              or self.has2(SECONDARY_EXEC_APIC_REGISTER_VIRT)):
            return "x2APIC virtualization, APIC-register virtualization and VID need TPR shadow"
        if (self.has2(SECONDARY_EXEC_VIRTUALIZE_X2APIC_MODE)
                and self.has2(SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES)):
            return "virtualize x2APIC mode and virtualize APIC accesses are exclusive"
        if self.vid and not self.exit_on_intr:
            return "virtual-interrupt delivery needs external-interrupt exiting"
        if self.posted_intr:
            if not (self.vid and self.ack_intr_on_exit):
                return "posted interrupts need VID and acknowledge interrupt on exit"
            if self.posted_intr_nv & 0xFF00 or not 0 <= self.posted_intr_nv <= 0xFF:
                return "posted-interrupt notification vector above 255"
            d = self.posted_intr_desc_addr
            if d & 0x3F or not in_ram(d, 64):
                return "posted-interrupt descriptor not 64-byte aligned in RAM"
        if self.tpr_shadow and not self.vid and self.tpr_threshold & ~0xF:
            return "TPR threshold bits 31:4 must be 0"
        return None


class VirtualApicPage:
    """L1's virtual-APIC page for L2 (vmcs12.virtual_apic_page_addr in L1 memory), with the
    face :class:`VmxVcpu` expects of its APIC: 32-bit words ``r``, the IRR/ISR bitmaps
    (VIRR at 200H, VISR at 100H, SDM 29.1.1), bytes ``page``."""

    __slots__ = ("mem", "gpa", "r", "page", "trace", "vcpu_id", "clock")

    def __init__(self, mem, gpa: int, vcpu_id: int, clock) -> None:
        self.mem = mem
        self.gpa = gpa
        self.r = _Words(mem, gpa)
        self.page = _Bytes(mem, gpa)
        self.trace = None  # L2's virtual APIC has no timeline track of its own
        self.vcpu_id = vcpu_id
        self.clock = clock

    def _bank(self, base: int) -> int:
        v = 0
        for i in range(8):
            v |= self.mem.read_int(self.gpa + base + 0x10 * i, 4) << (32 * i)
        return v

    def _set_bank(self, base: int, value: int) -> None:
        for i in range(8):
            self.mem.write_int(self.gpa + base + 0x10 * i, 4, (value >> (32 * i)) & 0xFFFFFFFF)

    @property
    def irr(self) -> int:
        return self._bank(A.APIC_IRR)

    @irr.setter
    def irr(self, v: int) -> None:
        self._set_bank(A.APIC_IRR, v)

    @property
    def isr(self) -> int:
        return self._bank(A.APIC_ISR)

    @isr.setter
    def isr(self, v: int) -> None:
        self._set_bank(A.APIC_ISR, v)

    def vector_dword(self, offset: int) -> int:
        return self.mem.read_int(self.gpa + (offset & 0xFF0), 4)


class _Words:
    __slots__ = ("mem", "gpa")

    def __init__(self, mem, gpa: int) -> None:
        self.mem, self.gpa = mem, gpa

    def __getitem__(self, i: int) -> int:
        return self.mem.read_int(self.gpa + 4 * i, 4)

    def __setitem__(self, i: int, v: int) -> None:
        self.mem.write_int(self.gpa + 4 * i, 4, v)


class _Bytes:
    __slots__ = ("mem", "gpa")

    def __init__(self, mem, gpa: int) -> None:
        self.mem, self.gpa = mem, gpa

    def __getitem__(self, i: int) -> int:
        return self.mem.read_int(self.gpa + i, 1)


class MemPiDesc:
    """L1's posted-interrupt descriptor for L2 (vmcs12.posted_intr_desc_addr), read and written
    in L1 memory with struct pi_desc's layout: PIR bits 0-255, ON bit 256, SN bit 257."""

    __slots__ = ("mem", "gpa")

    def __init__(self, mem, gpa: int) -> None:
        self.mem, self.gpa = mem, gpa

    @property
    def pir(self) -> int:
        return self.mem.read_int(self.gpa, 32)

    @pir.setter
    def pir(self, v: int) -> None:
        self.mem.write_int(self.gpa, 32, v)

    @property
    def on(self) -> bool:
        return bool(self.mem.read_int(self.gpa + 32, 1) & 1)

    @on.setter
    def on(self, v: bool) -> None:
        b = self.mem.read_int(self.gpa + 32, 1)
        self.mem.write_int(self.gpa + 32, 1, (b | 1) if v else (b & ~1))

    def pi_test_on(self) -> bool:
        return self.on

    def pi_clear_on(self) -> None:
        self.on = False

    def pi_test_and_clear_on(self) -> bool:
        was = self.on
        self.on = False
        return was

    def pi_harvest_pir(self) -> int:
        pir = self.pir
        self.pir = 0
        return pir

    def pi_find_highest_vector(self) -> int:
        return self.pir.bit_length() - 1


@dataclass
class NestedExit:
    """One nested VM exit as L1 sees it in vmcs12 (and the level exits are counted at)."""

    reason: str
    exit_qualification: int = 0
    intr_info: int = 0
    idt_vectoring_info: int = 0

    @property
    def vector(self) -> int | None:
        return self.intr_info & 0xFF if self.intr_info & INTR_INFO_VALID_MASK else None

    def __str__(self) -> str:
        parts = [f"qualification={self.exit_qualification:#x}"] if self.exit_qualification else []
        if self.intr_info:
            parts.append(f"intr_info={self.intr_info:#x}")
        if self.idt_vectoring_info:
            parts.append(f"idt_vectoring_info={self.idt_vectoring_info:#x}")
        return self.reason + (f"({', '.join(parts)})" if parts else "")


@dataclass
class NestedVmx:
    """struct nested_vmx (the interrupt part) for one vCPU."""

    kvm_version: tuple = KVM_6_18
    vmxon: bool = False
    vmcs12: Vmcs12 | None = None
    guest_mode: bool = False  # is_guest_mode(): L2 is the current guest
    nested_run_pending: bool = False
    pi_pending: bool = False
    posted_intr_nv: int = -1  # cached vmcs12 NV while L2 runs, -1 otherwise
    pi_desc: MemPiDesc | None = None
    vapic: VirtualApicPage | None = None
    vmcs02: VmxVcpu | None = None  # the processor state of L2 (vmcs02)
    # deferred vmcs01 updates (nested_vmx_vmexit applies them)
    update_vmcs01_apicv_status: bool = False
    update_vmcs01_hwapic_isr: bool = False
    change_vmcs01_virtual_apic_mode: bool = False
    reload_vmcs01_apic_access_page: bool = False
    load_eoi_exitmap_pending: bool = False  # vcpu->arch.load_eoi_exitmap_pending
    apic_access_page_reloads: int = 0  # KVM_REQ_APIC_PAGE_RELOAD handled for vmcs01
    pi_nested_notification: bool = False  # POSTED_INTR_NESTED_VECTOR sent to the pCPU
    l1_dispatch: int = -1  # a vector acknowledged on exit, for L1's exit handler
    l1_rflags_if: bool = False
    l1_nmi_masked: bool = False
    l2_taken: list = field(default_factory=list)
    exits: list = field(default_factory=list)  # NestedExit, as L1 saw them
    l1_exit_counts: Counter = field(default_factory=Counter)  # nested exits by reason
    l2_exit_counts: Counter = field(default_factory=Counter)  # exits to L0 while L2 ran
    current_vmptr: int = -1

    def pop_exits(self) -> list:
        out, self.exits = self.exits, []
        return out


class NestedVmxOps(VmxOps):
    """The VMX hooks of one vCPU with their nested branches (vmx.c): installed on the vCPU's
    LocalApic at VMXON. Outside guest mode every hook is VmxOps'."""

    def __init__(self, nested: NestedVmx) -> None:
        self.nested = nested

    def vmx_deliver_nested_posted_interrupt(self, apic: LocalApic, vector: int) -> int:
        """vmx_deliver_nested_posted_interrupt(): L1's notification vector for L2 arriving while
        L2 is the current guest sets pi_pending and KVM_REQ_EVENT, and sends
        POSTED_INTR_NESTED_VECTOR to the pCPU (the PIR and ON were set by L1)."""
        n = self.nested
        if n.guest_mode and vector == n.posted_intr_nv:
            n.pi_pending = True
            apic.arch.requests |= KVM_REQ_EVENT
            self.kvm_vcpu_trigger_posted_interrupt(apic, POSTED_INTR_NESTED_VECTOR)
            return 0
        return -1

    def deliver_interrupt(self, apic: LocalApic, dm: int, trig: int, vector: int) -> None:
        """vmx_deliver_interrupt() -> vmx_deliver_posted_interrupt(): the nested branch comes
        first, whether or not APICv is active for L1."""
        if self.vmx_deliver_nested_posted_interrupt(apic, vector) == 0:
            tr = apic.trace
            if tr is not None:
                tr.kvm_apicv_accept_irq(apic.vcpu_id, dm, trig, vector)
            return
        super().deliver_interrupt(apic, dm, trig, vector)

    def kvm_vcpu_trigger_posted_interrupt(self, apic: LocalApic, pi_vec: int) -> None:
        if pi_vec != POSTED_INTR_NESTED_VECTOR:
            super().kvm_vcpu_trigger_posted_interrupt(apic, pi_vec)
            return
        arch = apic.arch
        if arch.in_guest_mode:
            # the IPI reaches the pCPU in VMX non-root operation: processed with vmcs02
            self.nested.pi_nested_notification = True
            apic.kvm.kicked.append(arch)
            return
        apic.kvm_vcpu_wake_up()

    def sync_pir_to_irr(self, apic: LocalApic) -> int:
        """vmx_sync_pir_to_irr(): in guest mode RVI (vmcs01's) is not written; a newly
        recognized posted interrupt needs KVM_REQ_EVENT to exit to L1 or be injected into L2
        ("KVM doesn't use virtual interrupt delivery to inject interrupts into L2")."""
        if not self.nested.guest_mode:
            return super().sync_pir_to_irr(apic)
        pi = apic.vmx.pi_desc
        if pi.on:
            pi.pi_clear_on()
            got, max_irr = apic.kvm_apic_update_irr(pi.pi_harvest_pir())
        else:
            max_irr = apic.kvm_lapic_find_highest_irr()
            got = False
        if got:
            apic.arch.requests |= KVM_REQ_EVENT
        return max_irr

    def hwapic_isr_update(self, apic: LocalApic, max_isr: int) -> None:
        """vmx_hwapic_isr_update(): with L2 active the SVI update waits for vmcs01
        (update_vmcs01_hwapic_isr, b682d2fbf17c); before 6.14 it went into the current VMCS,
        vmcs02, and vmcs01's SVI stayed stale."""
        n = self.nested
        if not n.guest_mode:
            super().hwapic_isr_update(apic, max_isr)
            return
        if n.kvm_version >= DEFER_SVI_FIX:
            n.update_vmcs01_hwapic_isr = True
        elif n.vmcs02 is not None:
            n.vmcs02.svi = 0 if max_isr == -1 else max_isr & 0xFF

    def refresh_apicv_exec_ctrl(self, apic: LocalApic) -> None:
        """vmx_refresh_apicv_exec_ctrl(): deferred while L2 runs (update_vmcs01_apicv_status)."""
        if self.nested.guest_mode:
            self.nested.update_vmcs01_apicv_status = True
            return
        super().refresh_apicv_exec_ctrl(apic)

    def set_virtual_apic_mode(self, apic: LocalApic) -> None:
        """vmx_set_virtual_apic_mode(): "Postpone execution until vmcs01 is the current VMCS"
        (change_vmcs01_virtual_apic_mode)."""
        if self.nested.guest_mode:
            self.nested.change_vmcs01_virtual_apic_mode = True
            return
        super().set_virtual_apic_mode(apic)

    def load_eoi_exitmap(self, apic: LocalApic, bitmap: int) -> None:
        """vmx_load_eoi_exitmap() writes vmcs01's bitmap: vcpu_scan_ioapic() in guest mode
        only marks load_eoi_exitmap_pending (applied by leave_guest_mode); a bitmap load
        requested before L2 ran and handled while it runs is kept for vmcs01 as well."""
        if self.nested.guest_mode:
            self.nested.load_eoi_exitmap_pending = True
            return
        super().load_eoi_exitmap(apic, bitmap)

    def vmx_set_apic_access_page_addr(self, apic: LocalApic) -> None:
        """vmx_set_apic_access_page_addr() (KVM_REQ_APIC_PAGE_RELOAD): "Defer reload until
        vmcs01 is the current VMCS"."""
        if self.nested.guest_mode:
            self.nested.reload_vmcs01_apic_access_page = True
            return
        self.nested.apic_access_page_reloads += 1


def vmcs02_for(vmcs12: Vmcs12, vapic: VirtualApicPage | None, pi_desc) -> VmxVcpu:
    """prepare_vmcs02_early()/prepare_vmcs02(): the APIC-virtualization controls of vmcs02 are
    vmcs12's (L0's own VAA, x2APIC virtualization, ARV and VID are cleared, then vmcs12's set),
    with GUEST_INTR_STATUS, the EOI-exit bitmap and the TPR threshold from vmcs12, and the
    posted-interrupt descriptor L1 gave (notification vector POSTED_INTR_NESTED_VECTOR).
    Without TPR shadow L2 has no virtual-APIC page and nothing is virtualized."""
    p = VmxVcpu(vapic)  # type: ignore[arg-type]
    p.tpr_shadow = vapic is not None
    if vapic is None:
        p.flexpriority = False
        return p
    p.vaa = vmcs12.has2(SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES)
    p.vx2 = vmcs12.has2(SECONDARY_EXEC_VIRTUALIZE_X2APIC_MODE)
    p.apicv = vmcs12.vid
    p.rvi = vmcs12.guest_intr_status & 0xFF
    p.svi = (vmcs12.guest_intr_status >> 8) & 0xFF
    p.eoi_exit_bitmap = vmcs12.eoi_exit_bitmap
    p.tpr_threshold = vmcs12.tpr_threshold & 0xF
    if pi_desc is not None:
        p.pi_desc = pi_desc  # type: ignore[assignment]
    return p


def apply_deferred_vmcs01_updates(n: NestedVmx, vcpu) -> None:
    """The tail of __nested_vmx_vmexit() once vmcs01 is current again: the virtual-APIC mode,
    the APIC-access page, the APICv controls, SVI -- and leave_guest_mode()'s EOI-exit bitmap."""
    apic = vcpu.apic
    ops = apic.ops
    if n.load_eoi_exitmap_pending:  # leave_guest_mode()
        n.load_eoi_exitmap_pending = False
        vcpu.arch.requests |= KVM_REQ_LOAD_EOI_EXITMAP
    if n.change_vmcs01_virtual_apic_mode:
        n.change_vmcs01_virtual_apic_mode = False
        ops.set_virtual_apic_mode(apic)
    if n.reload_vmcs01_apic_access_page:
        n.reload_vmcs01_apic_access_page = False
        n.apic_access_page_reloads += 1  # kvm_make_request(KVM_REQ_APIC_PAGE_RELOAD)
    if n.update_vmcs01_apicv_status:
        n.update_vmcs01_apicv_status = False
        if n.kvm_version >= APICV_REFRESH_ON_VMEXIT_FIX:
            ops.refresh_apicv_exec_ctrl(apic)
        else:
            # 6.18: KVM_REQ_APICV_UPDATE, which __kvm_vcpu_update_apicv() drops when
            # apicv_active already matches -- vmcs01's controls stay as they were
            vcpu.arch.requests |= KVM_REQ_APICV_UPDATE
    if n.update_vmcs01_hwapic_isr:
        n.update_vmcs01_hwapic_isr = False
        apic.kvm_apic_update_hwapic_isr()
