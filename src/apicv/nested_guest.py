"""A vCPU that can run an L2 guest: KVM's nested-VMX interrupt logic on the vCPU (x86.c's nested
parts, nested.c's vmx_check_nested_events and nested_vmx_vmexit) and the processor running L2
with vmcs02 (:mod:`apicv.vmx.nested` holds vmcs12, the nested state and the vmx.c hooks).

``enable_nested(vcpu)`` gives a model vCPU VMX (CPUID.1:ECX.VMX): it becomes a
:class:`NestedVcpu` in place, with ``vcpu.nested`` (struct nested_vmx), ``vcpu.l2`` (guest
operations run *in L2*) and the L1 instructions ``vmxon``, ``vmptrld``, ``vmlaunch``,
``vmresume``, ``vmxoff``. The vCPU's own guest operations (``vcpu.mmio_write``,
``vcpu.take_interrupts``...) are L1's and need L1 to be the running guest; ``vcpu.l2.*`` need L2
(:class:`~apicv.vmx.nested.NotInL2Error` otherwise). ``vcpu.level`` says which one runs.

The L1 agent is passive: after a nested VM exit L1 keeps running until the caller VMRESUMEs;
the exit is in ``vcpu.nested.exits`` and vmcs12's exit fields, as L1 reads them. A vector
acknowledged on exit is handed to L1's handler for it at once (KVM's own L1 code does that in
handle_external_interrupt_irqoff): it shows in L1's ``take_interrupts()`` and is EOI'd.
Exits to L0 are counted per level: ``vcpu.exit_counts`` (L1), ``vcpu.nested.l2_exit_counts``
(while L2 ran); ``vcpu.nested.l1_exit_counts`` counts the nested exits L1 was given.

Why this module is long: it is the vCPU's nested half -- the x86.c event paths with their
guest-mode branches and the processor running L2 -- and each override is the nested branch of
one Vcpu/GuestMixin method, kept beside the others that share vmcs12 and the level switch.
"""

from __future__ import annotations

from contextlib import contextmanager

from . import apicdef as A
from .errors import GuestFault
from .guest import NMI_VECTOR
from .kvm_host import KVM_APIC_INIT, KVM_APIC_SIPI, KVM_REQ_EVENT, KVM_REQ_NMI, KVM_REQ_SMI
from .nested_apic import NestedApicAccessMixin
from .uapi import KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_RUNNABLE
from .vcpu import Vcpu
from .vmx.nested import (
    CPU_BASED_HLT_EXITING,
    CPU_BASED_INTR_WINDOW_EXITING,
    CPU_BASED_NMI_WINDOW_EXITING,
    EBUSY,
    GUEST_ACTIVITY_ACTIVE,
    GUEST_ACTIVITY_HLT,
    GUEST_INTR_STATE_NMI,
    HAS_NESTED_EVENTS_PI_FIX,
    INTR_INFO_VALID_MASK,
    INTR_TYPE_EXT_INTR,
    INTR_TYPE_NMI_INTR,
    KVM_6_18,
    NESTED_EXIT_REASONS,
    VMXERR_ENTRY_INVALID_CONTROL_FIELD,
    VMXERR_VMLAUNCH_NONCLEAR_VMCS,
    VMXERR_VMRESUME_NONLAUNCHED_VMCS,
    X86_EFLAGS_FIXED,
    X86_EFLAGS_IF,
    MemPiDesc,
    NestedExit,
    NestedVmx,
    NestedVmxOps,
    NotInL2Error,
    VirtualApicPage,
    Vmcs12,
    VmFail,
    apply_deferred_vmcs01_updates,
    vmcs02_for,
)

ENXIO = 6


def enable_nested(vcpu: Vcpu, kvm_version: tuple = KVM_6_18) -> NestedVcpu:
    """Give *vcpu* VMX: it becomes a :class:`NestedVcpu` (same object) whose KVM behaves as
    *kvm_version* (see :mod:`apicv.vmx.nested`). A TD vCPU has no VMX."""
    if vcpu.td:
        raise ValueError("a TD vCPU has no VMX")
    if not isinstance(vcpu, NestedVcpu):
        vcpu.__class__ = NestedVcpu
        vcpu.nested = NestedVmx(kvm_version=tuple(kvm_version))
        vcpu.op_level = 1
        vcpu.req_immediate_exit = False
        vcpu.apic.ops = NestedVmxOps(vcpu.nested)
        vcpu.l2 = L2Guest(vcpu)
    return vcpu  # type: ignore[return-value]


class NestedVcpu(NestedApicAccessMixin, Vcpu):
    """A :class:`~apicv.vcpu.Vcpu` with nested VMX (made by :func:`enable_nested`)."""

    nested: NestedVmx
    op_level: int
    req_immediate_exit: bool
    l2: L2Guest

    # ------------------------------------------------------------------ views
    @property
    def level(self) -> str:
        return "L2" if self.nested.guest_mode else "L1"

    @property
    def vmcs12(self) -> Vmcs12 | None:
        return self.nested.vmcs12

    @property
    def exit_counts(self):
        """L1's exits to L0 (vmcs01); L2's are ``nested.l2_exit_counts``."""
        return self.apic.vmx.exit_counts

    @property
    def pi_desc(self):
        return self.apic.vmx.pi_desc

    @property
    def guest_intr_status(self) -> int:
        """vmcs01's GUEST_INTR_STATUS (L1's RVI/SVI)."""
        return self.apic.vmx.guest_intr_status

    def lapic_view(self) -> bytes:
        saved, self.vmx = self.vmx, self.apic.vmx
        try:
            return super().lapic_view()
        finally:
            self.vmx = saved

    @contextmanager
    def at_level(self, level: int):
        """Guest operations inside run at *level* (1 or 2) and check that it is running."""
        old, self.op_level = self.op_level, level
        try:
            yield
        finally:
            self.op_level = old

    def _begin_run(self) -> None:
        cur = 2 if self.nested.guest_mode else 1
        if cur != self.op_level:
            raise NotInL2Error(f"L{cur} is running, not L{self.op_level}"
                               + (" (use vcpu.l2.*)" if cur == 2 else ""))
        super()._begin_run()

    # ------------------------------------------------------------------ L1's VMX instructions
    def vmxon(self) -> None:
        """L1 executes VMXON (handle_vmxon): VMX operation; INIT is now latched."""
        self._l1_instruction("VMXON", self._do_vmxon)

    def _do_vmxon(self) -> None:
        self.nested.vmxon = True

    def vmxoff(self) -> None:
        """L1 executes VMXOFF (handle_vmxoff -> free_nested): posted_intr_nv = -1; a latched
        INIT is accepted again (kvm_apic_init_sipi_allowed)."""
        def off() -> None:
            n = self.nested
            n.vmxon = False
            n.posted_intr_nv = -1
            n.current_vmptr = -1
            self.arch.requests |= KVM_REQ_EVENT
        self._l1_instruction("VMXOFF", off)

    def vmptrld(self, vmcs12: Vmcs12, gpa: int = 0x10000) -> None:
        """L1 makes *vmcs12* its current VMCS (handle_vmptrld)."""
        def load() -> None:
            self.nested.vmcs12 = vmcs12
            self.nested.current_vmptr = gpa
        self._l1_instruction("VMPTRLD", load)

    def vmlaunch(self) -> None:
        """L1 executes VMLAUNCH (nested_vmx_run(launch=True)); VmFail where it fails."""
        self._vmentry(True)

    def vmresume(self) -> None:
        """L1 executes VMRESUME after a nested VM exit."""
        self._vmentry(False)

    def _l1_instruction(self, reason: str, handler) -> None:
        if reason != "VMXON" and not self.nested.vmxon:
            raise GuestFault(6, f"{reason} outside VMX operation (#UD)")

        def work() -> None:
            self._vm_exit(reason)  # every VMX instruction exits to L0
            handler()
            self.exit_in_kernel()
            self._entry()
        with self.at_level(1):
            self._kvm_run(work)

    def _vmentry(self, launch: bool) -> None:
        failed: list[VmFail] = []

        def run() -> None:
            try:
                self.nested_vmx_run(launch)
            except VmFail as e:
                self.nested.vmcs12 and setattr(self.nested.vmcs12, "vm_instruction_error",
                                               e.error)
                failed.append(e)
        self._l1_instruction("VMLAUNCH" if launch else "VMRESUME", run)
        if failed:
            raise failed[0]

    def nested_vmx_run(self, launch: bool) -> None:
        """nested_vmx_run(): the checks, nested_vmx_enter_non_root_mode(), then "Emulate
        processing of posted interrupts on VM-Enter" and the HLT activity state."""
        n = self.nested
        v12 = n.vmcs12
        if v12 is None:
            raise VmFail(0, "no current VMCS (VMfailInvalid)")
        if v12.launch_state == int(launch):
            raise VmFail(VMXERR_VMLAUNCH_NONCLEAR_VMCS if launch
                         else VMXERR_VMRESUME_NONLAUNCHED_VMCS, "launch state")
        why = v12.nested_vmx_check_controls(self.vm.kvm.enable_apicv)
        if why is not None:
            raise VmFail(VMXERR_ENTRY_INVALID_CONTROL_FIELD, why)
        n.nested_run_pending = True
        self.nested_vmx_enter_non_root_mode()
        apic = self.apic
        if v12.posted_intr and apic.kvm_apic_has_interrupt() == n.posted_intr_nv:
            n.pi_pending = True
            self.arch.requests |= KVM_REQ_EVENT
            apic.apic_clear_irr(n.posted_intr_nv)  # kvm_apic_clear_irr
        if (v12.guest_activity_state == GUEST_ACTIVITY_HLT
                and not v12.vm_entry_intr_info_field & INTR_INFO_VALID_MASK
                and not v12.has(CPU_BASED_NMI_WINDOW_EXITING)
                and not (v12.has(CPU_BASED_INTR_WINDOW_EXITING) and self.rflags_if)):
            n.nested_run_pending = False
            self.kvm_set_mp_state(KVM_MP_STATE_HALTED)  # kvm_emulate_halt_noskip

    def nested_vmx_enter_non_root_mode(self) -> None:
        """enter_guest_mode() with vmcs02 prepared from vmcs12 (prepare_vmcs02_early: the
        cached posted_intr_nv; nested_get_vmcs12_pages: the virtual-APIC page and the
        descriptor mapped), L2's RFLAGS and NMI blocking, the VM-entry event injected."""
        n = self.nested
        v12 = n.vmcs12
        mem = self.vm.mem
        # "we force L0 to perform pending event evaluation by requesting a KVM_REQ_EVENT":
        # a window vmcs01 asked for, a virtual interrupt vmcs01 would have delivered
        # (vmx_has_apicv_interrupt), or a pending INIT/SIPI
        l1 = self.apic.vmx
        if (self.irq_window_requested or self.nmi_window_requested
                or (self.apic.apicv_active
                    and (l1.rvi & 0xF0) > (self.apic.r[A.APIC_PROCPRI >> 2] & 0xF0))
                or self.apic.kvm_apic_has_pending_init_or_sipi()):
            self.arch.requests |= KVM_REQ_EVENT
        n.l1_rflags_if = self.rflags_if
        n.l1_nmi_masked = self.nmi_masked
        n.guest_mode = True
        n.posted_intr_nv = v12.posted_intr_nv if v12.posted_intr else -1
        n.pi_desc = MemPiDesc(mem, v12.posted_intr_desc_addr) if v12.posted_intr else None
        n.vapic = (VirtualApicPage(mem, v12.virtual_apic_page_addr, self.vcpu_id,
                                   self.vm.clock) if v12.tpr_shadow else None)
        n.vmcs02 = vmcs02_for(v12, n.vapic, n.pi_desc)
        n.vmcs02.exit_counts = n.l2_exit_counts
        self.vmx = n.vmcs02  # vmx_switch_vmcs(vmcs02)
        self.rflags_if = bool(v12.guest_rflags & X86_EFLAGS_IF)
        self.nmi_masked = bool(v12.guest_interruptibility_info & GUEST_INTR_STATE_NMI)
        self.nmi_window_requested = self.irq_window_requested = False
        info = v12.vm_entry_intr_info_field
        if info & INTR_INFO_VALID_MASK:
            kind = info & 0x700
            self._reinject = NMI_VECTOR if kind == INTR_TYPE_NMI_INTR else ("irq", info & 0xFF)
        tr = self.vm.trace
        if tr is not None:
            tr.kvm_nested_vmenter(0, n.current_vmptr & ((1 << 64) - 1), 0,
                                  v12.guest_intr_status, info, False, 0)

    # ------------------------------------------------------------------ nested events
    def vmx_nmi_blocked(self) -> bool:
        """vmx_nmi_blocked(): never while L2 runs and L1 exits on NMIs."""
        if self.nested.guest_mode and self.nested.vmcs12.exit_on_nmi:
            return False
        return self.nmi_masked or bool(self.interrupt_shadow)

    def __vmx_interrupt_blocked(self) -> bool:
        return not self.rflags_if or bool(self.interrupt_shadow)

    def vmx_interrupt_blocked(self) -> bool:
        """vmx_interrupt_blocked(): never while L2 runs and L1 exits on interrupts."""
        if self.nested.guest_mode and self.nested.vmcs12.exit_on_intr:
            return False
        return self.__vmx_interrupt_blocked()

    def kvm_arch_interrupt_allowed(self) -> bool:
        return not self.vmx_interrupt_blocked()

    def kvm_apic_init_sipi_allowed(self) -> bool:
        """vmx_apic_init_signal_blocked(): INIT is blocked in VMX root operation (L1 after
        VMXON) and not in non-root operation, where it causes a VM exit (SDM 26.2)."""
        n = self.nested
        return super().kvm_apic_init_sipi_allowed() and not (n.vmxon and not n.guest_mode)

    def kvm_apic_accept_events(self) -> int:
        """kvm_apic_accept_events(): in guest mode kvm_check_nested_events() first (an INIT
        becomes an INIT-signal VM exit); INIT/SIPI then go on for L1."""
        if (self.apic.pending_events and self.kvm_apic_init_sipi_allowed()
                and self.nested.guest_mode and self.vmx_check_nested_events() < 0):
            return 0
        return super().kvm_apic_accept_events()

    def kvm_cpu_has_injectable_intr(self) -> bool:
        """kvm_cpu_has_injectable_intr(): with L2 running, an APIC interrupt is injectable even
        with APICv (KVM does not use virtual-interrupt delivery for L2)."""
        if self.vm.kvm_cpu_has_extint(self):
            return True
        if not self.nested.guest_mode and self.apic.apicv_active:
            return False
        return self.apic.kvm_apic_has_interrupt() != -1

    def vmx_check_nested_events(self) -> int:
        """vmx_check_nested_events(): INIT, SIPI, SMI, NMI and interrupts in the SDM's priority
        order ("Priority Among Concurrent Events"); 0, or -EBUSY while a nested run is pending
        or an event waits to be re-injected. (Exceptions, MTF and the preemption timer are not
        modelled.)"""
        n = self.nested
        apic = self.apic
        v12 = n.vmcs12
        block = n.nested_run_pending or self._reinject is not None
        if apic.pending_events & (1 << KVM_APIC_INIT):
            if block:
                return -EBUSY
            apic.pending_events &= ~(1 << KVM_APIC_INIT)
            if self.arch.mp_state != KVM_MP_STATE_INIT_RECEIVED:
                self.nested_vmx_vmexit("INIT_SIGNAL")
            return 0
        if apic.pending_events & (1 << KVM_APIC_SIPI):
            if block:
                return -EBUSY
            apic.pending_events &= ~(1 << KVM_APIC_SIPI)
            if self.arch.mp_state == KVM_MP_STATE_INIT_RECEIVED:
                self.nested_vmx_vmexit("SIPI_SIGNAL", 0, apic.sipi_vector & 0xFF)
                return 0
        if self.smi_pending and not self.in_smm:
            if block:
                return -EBUSY
            return self.vmx_complete_nested_posted_interrupt()
        if self.nmi_pending and not self.vmx_nmi_blocked():
            if block:
                return -EBUSY
            if not v12.exit_on_nmi:
                return self.vmx_complete_nested_posted_interrupt()
            self.nested_vmx_vmexit("EXCEPTION_NMI",
                                   NMI_VECTOR | INTR_TYPE_NMI_INTR | INTR_INFO_VALID_MASK)
            # "The NMI-triggered VM exit counts as injection"
            self.nmi_pending = 0
            self.nmi_masked = True  # vmx_set_nmi_mask(vcpu, true), in vmcs01
            return 0
        if self.kvm_cpu_has_interrupt() and not self.vmx_interrupt_blocked():
            if block:
                return -EBUSY
            if not v12.exit_on_intr:
                return self.vmx_complete_nested_posted_interrupt()
            if not v12.ack_intr_on_exit:
                self.nested_vmx_vmexit("EXTERNAL_INTERRUPT")
                return 0
            irq = self.vm.kvm_cpu_get_extint(self)
            if irq != -1:
                self.nested_vmx_vmexit("EXTERNAL_INTERRUPT",
                                       INTR_INFO_VALID_MASK | INTR_TYPE_EXT_INTR | irq)
                n.l1_dispatch = irq
                return 0
            irq = apic.kvm_apic_has_interrupt()
            if irq < 0:
                return self.vmx_complete_nested_posted_interrupt()
            if irq == n.posted_intr_nv:
                # L2's notification vector: posted-interrupt processing, not a VM exit
                n.pi_pending = True
                apic.apic_clear_irr(irq)  # kvm_apic_clear_irr
                return self.vmx_complete_nested_posted_interrupt()
            self.nested_vmx_vmexit("EXTERNAL_INTERRUPT",
                                   INTR_INFO_VALID_MASK | INTR_TYPE_EXT_INTR | irq)
            # "ACK the interrupt _after_ emulating VM-Exit, as the IRQ must be marked as
            # in-service in vmcs01.GUEST_INTERRUPT_STATUS.SVI if APICv is active."
            apic.kvm_apic_ack_interrupt(irq)
            n.l1_dispatch = irq
            return 0
        return self.vmx_complete_nested_posted_interrupt()

    def vmx_complete_nested_posted_interrupt(self) -> int:
        """vmx_complete_nested_posted_interrupt(): PIR of L1's descriptor into L2's VIRR
        (__kvm_apic_update_irr) and RVI of vmcs02 raised to the highest vector."""
        n = self.nested
        if not n.pi_pending:
            return 0
        if n.pi_desc is None:
            return -ENXIO  # mmio_needed
        n.pi_pending = False
        if not n.pi_desc.pi_test_and_clear_on():
            return 0
        max_irr = n.pi_desc.pi_find_highest_vector()
        if max_irr > 0:
            if n.vapic is None:
                return -ENXIO
            n.vapic.irr = n.vapic.irr | n.pi_desc.pi_harvest_pir()
            max_irr = n.vapic.irr.bit_length() - 1
            if (max_irr & 0xFF) > n.vmcs02.rvi:
                n.vmcs02.rvi = max_irr & 0xFF
        return 0

    def vmx_has_nested_events(self, for_injection: bool) -> bool:
        """vmx_has_nested_events() (6.10+): a virtual interrupt above vPPR in RVI, or in the PIR
        of a pending nested posted interrupt, while L2 can take it (VID, not blocked).
        Before 6.10: only the preemption timer and MTF (neither modelled)."""
        n = self.nested
        if n.kvm_version < HAS_NESTED_EVENTS_PI_FIX or for_injection:
            return False
        v12 = n.vmcs12
        if not v12.vid or self.__vmx_interrupt_blocked() or n.vapic is None:
            return False
        vppr = n.vapic.r[A.APIC_PROCPRI >> 2]
        if (n.vmcs02.rvi & 0xF0) > (vppr & 0xF0):
            return True
        if n.pi_pending and n.pi_desc is not None and n.pi_desc.pi_test_on():
            max_irr = n.pi_desc.pi_find_highest_vector()
            if max_irr > 0 and (max_irr & 0xF0) > (vppr & 0xF0):
                return True
        return False

    def kvm_guest_apic_has_interrupt(self) -> bool:
        """Before 6.10: vmx_guest_apic_has_interrupt(), RVI against vPPR only."""
        n = self.nested
        if not (n.guest_mode and n.vmcs12.vid and n.vapic is not None):
            return False
        vppr = n.vapic.r[A.APIC_PROCPRI >> 2]
        return (n.vmcs02.rvi & 0xF0) > (vppr & 0xF0)

    def kvm_vcpu_has_events(self) -> bool:
        """kvm_vcpu_has_events() with L2 running: vmx_nmi_allowed/vmx_interrupt_allowed(false)
        see through L2's blocking when L1 exits on the event; then has_events(vcpu, false)
        (6.10+), or kvm_guest_apic_has_interrupt() (before)."""
        n = self.nested
        if not n.guest_mode:
            return super().kvm_vcpu_has_events()
        arch = self.arch
        if self.apic.pending_events and self.kvm_apic_init_sipi_allowed():
            return True
        if arch.pv_unhalted:
            return True
        if arch.requests & KVM_REQ_NMI or (self.nmi_pending and not self.vmx_nmi_blocked()):
            return True
        if arch.requests & KVM_REQ_SMI or self.smi_pending:
            return True
        allowed = self.kvm_arch_interrupt_allowed()
        if allowed and self.kvm_cpu_has_interrupt():
            return True
        if n.kvm_version < HAS_NESTED_EVENTS_PI_FIX:
            return allowed and self.kvm_guest_apic_has_interrupt()
        return self.vmx_has_nested_events(False)

    def kvm_check_and_inject_events(self):
        """kvm_check_and_inject_events(): with L2 running, nested events first (a nested VM
        exit supersedes injection; events then go on for L1); -EBUSY (a nested run pending)
        re-injects and asks for an immediate exit. An NMI or interrupt L1 exits on is never
        injected into L2 (vmx_nmi_allowed / vmx_interrupt_allowed with for_injection)."""
        n = self.nested
        if not n.guest_mode:
            return super().kvm_check_and_inject_events()
        r = self.vmx_check_nested_events()
        if not n.guest_mode:
            return super().kvm_check_and_inject_events()
        injected = None
        can_inject = True
        if self._reinject is not None:
            injected, self._reinject = self._reinject, None
            self.interrupt_injected = False
            can_inject = False
        if r < 0:
            self.req_immediate_exit = True
            return injected
        if self.arch.guest_debug_blockirq:
            return injected
        v12 = n.vmcs12
        shadow = self.interrupt_shadow
        if self.nmi_pending:
            if v12.exit_on_nmi or n.nested_run_pending:
                self.req_immediate_exit = True
            elif can_inject and not self.nmi_masked and not shadow:
                self.inject_nmi()
                can_inject = False
                injected = NMI_VECTOR
            if self.nmi_pending and not v12.exit_on_nmi:
                self.nmi_window_requested = True
        if self.kvm_cpu_has_injectable_intr():
            if v12.exit_on_intr or n.nested_run_pending:
                self.req_immediate_exit = True
            elif can_inject and self.rflags_if and not shadow:
                irq = self.kvm_cpu_get_interrupt()
                if irq != -1:
                    self.interrupt_nr, self.interrupt_soft = irq, False
                    tr = self.vm.trace
                    if tr is not None:
                        tr.kvm_inj_virq(irq)
                    injected = ("irq", irq)
            if self.kvm_cpu_has_injectable_intr() and not v12.exit_on_intr:
                self.irq_window_requested = True
        if self.vmx_has_nested_events(True):
            self.req_immediate_exit = True
        return injected

    # ------------------------------------------------------------------ nested VM exit
    def nested_vmx_vmexit(self, reason: str, intr_info: int = 0, qual: int = 0) -> None:
        """nested_vmx_vmexit(): vmcs12 gets L2's state (sync_vmcs02_to_vmcs12) and the exit
        information (prepare_vmcs12, vmcs12_save_pending_event); queued events for L2 are
        dropped; vmcs01 is current again and the deferred vmcs01 updates are applied; L1
        resumes with its host state (RFLAGS fixed: IF=0)."""
        n = self.nested
        v12 = n.vmcs12
        # sync_vmcs02_to_vmcs12
        v12.guest_rflags = X86_EFLAGS_FIXED | (X86_EFLAGS_IF if self.rflags_if else 0)
        v12.guest_activity_state = (GUEST_ACTIVITY_HLT
                                    if self.arch.mp_state == KVM_MP_STATE_HALTED
                                    else GUEST_ACTIVITY_ACTIVE)
        v12.guest_interruptibility_info = GUEST_INTR_STATE_NMI if self.nmi_masked else 0
        if v12.vid:
            v12.guest_intr_status = n.vmcs02.guest_intr_status
        # prepare_vmcs12
        code = NESTED_EXIT_REASONS[reason]
        v12.vm_exit_reason = code
        v12.exit_qualification = qual
        v12.launch_state = 1
        v12.vm_entry_intr_info_field &= ~INTR_INFO_VALID_MASK
        ev = self._reinject
        if ev == NMI_VECTOR or (ev is None and self.nmi_injected):
            idt = INTR_TYPE_NMI_INTR | INTR_INFO_VALID_MASK | NMI_VECTOR
        elif isinstance(ev, tuple):
            idt = INTR_INFO_VALID_MASK | INTR_TYPE_EXT_INTR | ev[1]
        else:
            idt = 0
        v12.idt_vectoring_info_field = idt
        v12.vm_exit_intr_info = intr_info
        self.nmi_injected = False  # kvm_clear_interrupt_queue and friends
        self._reinject = None
        self.interrupt_injected = False
        # leave_guest_mode(), vmx_switch_vmcs(vmcs01)
        n.guest_mode = False
        n.nested_run_pending = False
        self.vmx = self.apic.vmx
        n.pi_desc = None
        n.vapic = None
        self.nmi_window_requested = self.irq_window_requested = False
        apply_deferred_vmcs01_updates(n, self)
        if self.arch.mp_state == KVM_MP_STATE_HALTED:
            self.kvm_set_mp_state(KVM_MP_STATE_RUNNABLE)  # "in case we halted in L2"
        # load_vmcs12_host_state: RFLAGS = X86_EFLAGS_FIXED, no interrupt shadow
        self.rflags_if = False
        self.interrupt_shadow = 0
        self.nmi_masked = n.l1_nmi_masked
        n.exits.append(NestedExit(reason, qual, intr_info, idt))
        n.l1_exit_counts[reason] += 1
        tr = self.vm.trace
        if tr is not None:
            tr.kvm_nested_vmexit_inject(reason, qual, 0, intr_info, 0)

    def l2_interrupt_window(self, limit: int | None, eoi: bool) -> None:
        """One KVM_RUN in which L2 opens an IF=1 window (L2Guest.take_interrupts)."""
        if limit is not None and limit < 0:
            raise ValueError("limit must be >= 0")
        with self.at_level(2):
            self._kvm_run(lambda: self._interrupt_window(limit, eoi))

    def l2_hlt_exit(self, interrupts: bool) -> None:
        """One KVM_RUN in which L2 executes [STI;] HLT and L1 asked for HLT exiting: the
        HLT is a nested VM exit (L2Guest.halt)."""
        def work() -> None:
            self.rflags_if = interrupts
            self._l2_exit_to_l1("HLT")
        with self.at_level(2):
            self._kvm_run(work)

    def _l2_exit_to_l1(self, reason: str, qual: int = 0, intr_info: int = 0,
                       enter: bool = True) -> None:
        """An exit of L2 (to L0) that L1 wants (nested_vmx_reflect_vmexit ->
        nested_vmx_l1_wants_exit): reflected as a nested VM exit; KVM then enters L1."""
        self._vm_exit(reason)
        tr = self.vm.trace
        if tr is not None:
            tr.kvm_nested_vmexit(self.vcpu_id, reason, 0, qual, 0, intr_info, 0)
        self.nested_vmx_vmexit(reason, intr_info, qual)
        if enter:
            self.exit_in_kernel()
            self._entry()

    # ------------------------------------------------------------------ entry / kicks
    def _enter(self) -> None:
        """One VM entry; the first into L2 ends the pending nested run (vmx_vcpu_run); an
        immediate exit KVM asked for follows; after a nested VM exit L1's handler runs the
        vector acknowledged on exit."""
        n = self.nested
        self.req_immediate_exit = False
        super()._enter()
        if n.guest_mode and self.arch.in_guest_mode:
            n.nested_run_pending = False
        if not n.guest_mode and n.l1_dispatch != -1 and self.arch.in_guest_mode:
            vector, n.l1_dispatch = n.l1_dispatch, -1
            self._deliver(("irq", vector))
        if self.req_immediate_exit and self.arch.in_guest_mode:
            self.req_immediate_exit = False
            self.arch.requests |= KVM_REQ_EVENT
            self._reenter("PREEMPTION_TIMER")  # vmx_update_hv_timer(force_immediate_exit)

    def service_kick(self) -> None:
        """While L2 runs: POSTED_INTR_NESTED_VECTOR is vmcs02's notification vector, processed
        by the CPU without a VM exit (SDM 29.6); anything else (a kick, L1's own
        POSTED_INTR_VECTOR) is an external interrupt that exits to L0."""
        n = self.nested
        arch = self.arch
        if self.location == "guest" and n.pi_nested_notification:
            n.pi_nested_notification = False
            if n.guest_mode and n.vmcs12.posted_intr:
                n.vmcs02.posted_interrupt_processing()
                self._settle()
            else:
                arch.kick_pending = True
        if self.location == "guest" and n.guest_mode and arch.pi_notification:
            arch.pi_notification = False
            arch.kick_pending = True
        super().service_kick()

    def _window_exit(self) -> bool:
        """NMI-/interrupt-window exits in L2: reflected when vmcs12 asked for the window
        (nested_vmx_l1_wants_exit), KVM's own otherwise."""
        n = self.nested
        if not n.guest_mode:
            return super()._window_exit()
        v12 = n.vmcs12
        if v12.has(CPU_BASED_NMI_WINDOW_EXITING) and not self.nmi_masked:
            self._l2_exit_to_l1("NMI_WINDOW", enter=False)
            return True
        if self.nmi_window_requested and not self.nmi_masked:
            return super()._window_exit()
        if v12.has(CPU_BASED_INTR_WINDOW_EXITING) and self.rflags_if:
            self._l2_exit_to_l1("INTERRUPT_WINDOW", enter=False)
            return True
        return super()._window_exit()

    # ------------------------------------------------------------------ L2's guest side
    def _deliver(self, ev) -> None:
        n = self.nested
        if not n.guest_mode:
            super()._deliver(ev)
            return
        if ev == "smi":
            return
        if ev == NMI_VECTOR:
            self.nmi_injected = False
            n.l2_taken.append(NMI_VECTOR)
            return
        vector = ev[1]
        n.l2_taken.append(vector)
        if_after, eoi = self._window_count()
        self.rflags_if = False
        if eoi:
            self._guest_eoi()
        if n.guest_mode:  # (the EOI may have exited to L1)
            self.rflags_if = if_after
            self.nmi_masked = False

class L2Guest:
    """Guest operations run by L2 on a :class:`NestedVcpu` (the same names as the vCPU's own,
    which are L1's). ``take_interrupts`` returns the vectors L2's handlers took."""

    def __init__(self, vcpu: NestedVcpu) -> None:
        self.vcpu = vcpu

    def _op(self, name: str, *args, **kw):
        v = self.vcpu
        with v.at_level(2):
            return getattr(Vcpu, name)(v, *args, **kw)

    def mmio_read(self, offset, size: int = 4) -> int:
        return self._op("mmio_read", offset, size)

    def mmio_write(self, offset, value: int, size: int = 4) -> None:
        self._op("mmio_write", offset, value, size)

    def rdmsr(self, index: int) -> int:
        return self._op("rdmsr", index)

    def wrmsr(self, index: int, value: int) -> None:
        self._op("wrmsr", index, value)

    def read_cr8(self) -> int:
        return self._op("read_cr8")

    def write_cr8(self, value: int) -> None:
        self._op("write_cr8", value)

    def enter_guest(self, interrupts: bool = True) -> None:
        self._op("enter_guest", interrupts)

    def take_interrupts(self, limit: int | None = None, eoi: bool = True) -> list[int]:
        """L2 opens an IF=1 window; the vectors L2 took (since the last call)."""
        self.vcpu.l2_interrupt_window(limit, eoi)
        return self.taken()

    def run(self) -> list[int]:
        """One KVM_RUN in which L2 only runs with IF=0 (takes NMIs and injected events)."""
        self._op("run")
        return self.taken()

    def halt(self, interrupts: bool = True) -> None:
        """L2 executes [STI;] HLT: a HLT exit to L1 if L1 asked for it, else KVM halts the
        vCPU in L2 (L1 does not see it)."""
        v = self.vcpu
        if v.nested.guest_mode and v.nested.vmcs12.has(CPU_BASED_HLT_EXITING):
            v.l2_hlt_exit(interrupts)
            return
        self._op("halt", interrupts)

    def taken(self) -> list[int]:
        n = self.vcpu.nested
        out, n.l2_taken = n.l2_taken, []
        return out
