"""KVM_INTERRUPT and KVM_GET/SET_VCPU_EVENTS on the model's vCPU (:class:`VcpuEventsMixin`).

The x86.c event state a VMM saves and restores (``struct kvm_vcpu_events``) lives on the
:class:`~apicv.vcpu.Vcpu` as KVM keeps it in ``struct kvm_vcpu_arch``:

* ``nmi_pending`` / ``arch.nmi_queued`` / ``nmi_injected`` / ``nmi_masked`` -- the vcpu.py fields;
* ``interrupt_nr``, ``interrupt_soft``, ``interrupt_injected`` -- ``vcpu->arch.interrupt``; an
  injected interrupt is re-injected at the next entry through the vCPU's re-injection slot
  (``_reinject``, the slot a cancelled entry uses), an injected NMI likewise (it goes first);
* ``interrupt_shadow`` -- the STI / MOV-SS blocking (``KVM_X86_SHADOW_INT_*``) as VMX keeps it in
  GUEST_INTERRUPTIBILITY_INFO: it blocks interrupt and NMI injection at the next entry and is
  gone once the guest has run;
* ``exception`` -- ``vcpu->arch.exception`` (:class:`QueuedException`). The model's guest takes
  no exceptions: a valid exception given to KVM_SET_VCPU_EVENTS is stored and reported back by
  KVM_GET_VCPU_EVENTS (and cleared by a vCPU reset, as ``kvm_clear_exception_queue`` does), but
  it is never delivered; the real KVM would deliver it at the next KVM_RUN;
* ``in_smm`` / ``smm_inside_nmi`` -- HF_SMM_MASK / HF_SMM_INSIDE_NMI_MASK, settable only with SMM
  support (``VmConfig.smm``); in SMM an INIT stays latched and no SMI is injected.

The model has no KVM_CAP_EXCEPTION_PAYLOAD or KVM_CAP_X86_TRIPLE_FAULT_EVENT, so the PAYLOAD
and TRIPLE_FAULT flags get KVM's answer for a VM without them (EINVAL).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import uapi as U
from .api import VcpuEvents
from .errors import KvmError
from .guest import NMI_VECTOR
from .kvm_host import KVM_APIC_INIT, KVM_REQ_EVENT, KVM_REQ_NMI, KVM_REQ_SMI

BP_VECTOR = 3
OF_VECTOR = 4
_U32 = 0xFFFFFFFF


@dataclass(slots=True)
class QueuedException:
    """``struct kvm_queued_exception`` (vcpu->arch.exception), as KVM_SET_VCPU_EVENTS fills it."""

    pending: bool = False
    injected: bool = False
    has_error_code: bool = False
    vector: int = 0
    error_code: int = 0
    has_payload: bool = False
    payload: int = 0


class VcpuEventsMixin:
    """KVM_INTERRUPT, KVM_GET_VCPU_EVENTS and KVM_SET_VCPU_EVENTS for :class:`apicv.vcpu.Vcpu`."""

    def _events_init(self) -> None:
        """kvm_arch_vcpu_create(): the event state that no reset touches."""
        self.interrupt_nr = 0  # vcpu->arch.interrupt.nr: the last vector queued for injection
        self.interrupt_soft = False
        self.interrupt_injected = False  # set by KVM_SET_VCPU_EVENTS until the next entry
        self.interrupt_shadow = 0  # KVM_X86_SHADOW_INT_MOV_SS or _STI (VMX keeps one)
        self.exception = QueuedException()
        self.in_smm = False
        self.smm_inside_nmi = False

    def _events_reset(self) -> None:
        """kvm_vcpu_reset()'s part: kvm_clear_interrupt_queue, kvm_clear_exception_queue (the
        vector, error code and payload stay, as in KVM), hflags = 0 (out of SMM), and
        vmx_vcpu_reset's GUEST_INTERRUPTIBILITY_INFO = 0 (no interrupt shadow)."""
        self.interrupt_injected = False
        self.exception.pending = self.exception.injected = False
        self.in_smm = self.smm_inside_nmi = False
        self.interrupt_shadow = 0

    # ------------------------------------------------------------------ KVM_INTERRUPT
    def interrupt(self, vector: int) -> None:
        """KVM_INTERRUPT (kvm_vcpu_ioctl_interrupt). The model always has the in-kernel LAPIC,
        where KVM_INTERRUPT only injects an ExtINT: EINVAL for a vector from KVM_NR_INTERRUPTS
        up, ENXIO with the in-kernel PIC (irqchip="kernel"); with a split irqchip EEXIST while
        pending_external_vector holds a vector, else the vector is stored there with
        KVM_REQ_EVENT and is the vCPU's ExtINT source (kvm_cpu_has_extint: taken at an entry
        that injects an interrupt, if the vCPU accepts PIC interrupts). ValueError for a
        value that is not a u32 (struct kvm_interrupt.irq)."""
        if isinstance(vector, bool) or not isinstance(vector, int) or not 0 <= vector <= _U32:
            raise ValueError(f"KVM_INTERRUPT vector {vector!r} is not a u32")
        with self.vm.vcpu_ioctl(self):
            if vector >= U.KVM_NR_INTERRUPTS:
                raise KvmError(U.EINVAL, "KVM_INTERRUPT", f"vector {vector} >= 256")
            if self.vm.pic is not None:
                raise KvmError(U.ENXIO, "KVM_INTERRUPT", "the in-kernel PIC injects ExtINTs")
            arch = self.arch
            if arch.pending_external_vector != -1:
                raise KvmError(U.EEXIST, "KVM_INTERRUPT",
                               f"vector {arch.pending_external_vector:#x} still pending")
            arch.pending_external_vector = vector
            arch.requests |= KVM_REQ_EVENT

    # ------------------------------------------------------------------ KVM_GET_VCPU_EVENTS
    def get_vcpu_events(self) -> VcpuEvents:
        """KVM_GET_VCPU_EVENTS (kvm_vcpu_ioctl_x86_get_vcpu_events): process_nmi() first (NMIs
        queued by KVM_NMI become pending, at most 2, or 1 while NMIs are masked or one is
        injected), and with SMM support a KVM_REQ_SMI becomes smi_pending (process_smi).

        Reported as KVM does without KVM_CAP_EXCEPTION_PAYLOAD: a pending exception shows as
        injected; #BP and #OF (software exceptions) as neither; the exception's vector, error
        code and payload whatever they are. interrupt_injected only for a hardware interrupt
        (not soft); interrupt_nr the last vector queued; smi_smm / smi_pending /
        smi_inside_nmi only with SMM support; smi_latched_init is KVM_APIC_INIT pending;
        sipi_vector never (0). flags: NMI_PENDING | SHADOW | SMM (always, SMM support or not).
        A TD vCPU reports no NMI masking and no interrupt shadow (vt_get_nmi_mask,
        vt_get_interrupt_shadow)."""
        with self.vm.vcpu_ioctl(self):
            self.process_nmi()
            smm = self.vm.kvm.smm
            if smm and self.arch.requests & KVM_REQ_SMI:
                self.arch.requests &= ~KVM_REQ_SMI
                self.smi_pending = True  # process_smi()
                self.arch.requests |= KVM_REQ_EVENT
            ex = self.exception
            soft = ex.vector in (BP_VECTOR, OF_VECTOR)  # kvm_exception_is_soft()
            return VcpuEvents(
                exception_injected=0 if soft else int(ex.injected or ex.pending),
                exception_pending=0 if soft else int(ex.pending),
                exception_nr=ex.vector,
                exception_has_error_code=int(ex.has_error_code),
                exception_error_code=ex.error_code,
                exception_has_payload=int(ex.has_payload),
                exception_payload=ex.payload,
                interrupt_injected=int(self._interrupt_queued() and not self.interrupt_soft),
                interrupt_nr=self.interrupt_nr,
                interrupt_shadow=0 if self.td else self.interrupt_shadow,
                nmi_injected=int(self.nmi_injected),
                nmi_pending=self.nmi_pending,  # kvm_get_nr_pending_nmis (no vNMI)
                nmi_masked=int(self.nmi_masked and not self.td),
                smi_smm=int(smm and self.in_smm),
                smi_pending=int(smm and self.smi_pending),
                smi_inside_nmi=int(smm and self.smm_inside_nmi),
                smi_latched_init=int(bool(self.apic.pending_events & 1 << KVM_APIC_INIT)),
                flags=(U.KVM_VCPUEVENT_VALID_NMI_PENDING | U.KVM_VCPUEVENT_VALID_SHADOW
                       | U.KVM_VCPUEVENT_VALID_SMM),
            )

    def _interrupt_queued(self) -> bool:
        """vcpu->arch.interrupt.injected: set by KVM_SET_VCPU_EVENTS, or an interrupt waiting
        in the re-injection slot."""
        ev = self._reinject
        return self.interrupt_injected or (isinstance(ev, tuple) and ev[0] == "irq")

    # ------------------------------------------------------------------ KVM_SET_VCPU_EVENTS
    def set_vcpu_events(self, events: VcpuEvents) -> None:
        """KVM_SET_VCPU_EVENTS (kvm_vcpu_ioctl_x86_set_vcpu_events), in KVM's order.

        Refused before anything changes (EINVAL): an unknown flag; KVM_VCPUEVENT_VALID_PAYLOAD
        (the model has no KVM_CAP_EXCEPTION_PAYLOAD); an injected exception with a vector
        over 31 or 2 (NMI) -- without the PAYLOAD flag ``exception_pending`` and
        ``exception_has_payload`` are taken as 0. Then process_nmi(), and the state is set:
        the exception (stored, reported back, never delivered: the model's guest takes no
        exceptions); the interrupt (vector, soft, injected: re-injected at the next entry,
        whatever RFLAGS.IF, as KVM's inject_irq(reinjected)); the interrupt shadow with
        VALID_SHADOW (VMX keeps MOV_SS if bit 0 is set, else STI if bit 1); nmi_injected
        (re-injected first); with VALID_NMI_PENDING nmi_pending = 0 and the count queued
        (KVM_REQ_NMI); the NMI mask; with VALID_SIPI_VECTOR the LAPIC's sipi_vector; with
        VALID_SMM the SMM state (SMM support only: without it smm, pending or inside_nmi set
        is EINVAL -- after the fields above were set, as in KVM) and the latched INIT
        (KVM_APIC_INIT set or cleared). VALID_TRIPLE_FAULT is EINVAL last (no
        KVM_CAP_X86_TRIPLE_FAULT_EVENT), again after the rest. On success KVM_REQ_EVENT.
        A TD vCPU ignores the shadow and the NMI mask (vt_set_*)."""
        if not isinstance(events, VcpuEvents):
            raise TypeError(f"set_vcpu_events takes a VcpuEvents, not {type(events).__name__}")
        ev = events
        with self.vm.vcpu_ioctl(self):
            flags = ev.flags
            if flags & ~U.KVM_VCPUEVENT_VALID_FLAGS:
                raise KvmError(U.EINVAL, "KVM_SET_VCPU_EVENTS", f"unknown flags {flags:#x}")
            if flags & U.KVM_VCPUEVENT_VALID_PAYLOAD:
                raise KvmError(U.EINVAL, "KVM_SET_VCPU_EVENTS",
                               "KVM_VCPUEVENT_VALID_PAYLOAD without KVM_CAP_EXCEPTION_PAYLOAD")
            # no VALID_PAYLOAD: exception.pending and exception_has_payload are ignored
            if ev.exception_injected and (ev.exception_nr > 31 or ev.exception_nr == NMI_VECTOR):
                raise KvmError(U.EINVAL, "KVM_SET_VCPU_EVENTS",
                               f"exception vector {ev.exception_nr} cannot be injected")
            self.process_nmi()
            self.exception = QueuedException(
                injected=bool(ev.exception_injected), vector=ev.exception_nr,
                has_error_code=bool(ev.exception_has_error_code),
                error_code=ev.exception_error_code, payload=ev.exception_payload)
            self.interrupt_injected = bool(ev.interrupt_injected)
            self.interrupt_nr = ev.interrupt_nr
            self.interrupt_soft = bool(ev.interrupt_soft)
            if flags & U.KVM_VCPUEVENT_VALID_SHADOW and not self.td:
                self.interrupt_shadow = self._vmx_shadow(ev.interrupt_shadow)
            self.nmi_injected = bool(ev.nmi_injected)
            # the one re-injection slot: an injected NMI goes first (kvm_check_and_inject_events)
            if self.nmi_injected:
                self._reinject = NMI_VECTOR
            elif self.interrupt_injected:
                self._reinject = ("irq", ev.interrupt_nr)
            else:
                self._reinject = None
            arch = self.arch
            if flags & U.KVM_VCPUEVENT_VALID_NMI_PENDING:
                self.nmi_pending = 0
                arch.nmi_queued = ev.nmi_pending
                if ev.nmi_pending:
                    arch.requests |= KVM_REQ_NMI
            if not self.td:
                self.nmi_masked = bool(ev.nmi_masked)  # set_nmi_mask
            if flags & U.KVM_VCPUEVENT_VALID_SIPI_VECTOR:
                self.apic.sipi_vector = ev.sipi_vector
            if flags & U.KVM_VCPUEVENT_VALID_SMM:
                self._set_smm_events(ev)
            if flags & U.KVM_VCPUEVENT_VALID_TRIPLE_FAULT:
                raise KvmError(U.EINVAL, "KVM_SET_VCPU_EVENTS",
                               "KVM_VCPUEVENT_VALID_TRIPLE_FAULT without "
                               "KVM_CAP_X86_TRIPLE_FAULT_EVENT")
            arch.requests |= KVM_REQ_EVENT

    @staticmethod
    def _vmx_shadow(mask: int) -> int:
        """vmx_set_interrupt_shadow() then vmx_get_interrupt_shadow(): MOV SS blocking if
        KVM_X86_SHADOW_INT_MOV_SS is set, else STI blocking if KVM_X86_SHADOW_INT_STI is set;
        other bits are dropped."""
        if mask & U.KVM_X86_SHADOW_INT_MOV_SS:
            return U.KVM_X86_SHADOW_INT_MOV_SS
        if mask & U.KVM_X86_SHADOW_INT_STI:
            return U.KVM_X86_SHADOW_INT_STI
        return 0

    def _set_smm_events(self, ev: VcpuEvents) -> None:
        """The KVM_VCPUEVENT_VALID_SMM part: with CONFIG_KVM_SMM, kvm_smm_changed() when
        smi.smm differs from HF_SMM_MASK (leaving SMM clears smm_inside_nmi and raises
        KVM_REQ_EVENT for a latched INIT or SMI), smi_pending, and smm_inside_nmi while in SMM;
        without it, EINVAL if smm, pending or smm_inside_nmi is set. Then the latched INIT."""
        if self.vm.kvm.smm:
            if self.in_smm != bool(ev.smi_smm):
                self.in_smm = bool(ev.smi_smm)
                if not self.in_smm:
                    self.smm_inside_nmi = False
                    self.arch.requests |= KVM_REQ_EVENT
            self.smi_pending = bool(ev.smi_pending)
            if ev.smi_smm:
                self.smm_inside_nmi = bool(ev.smi_inside_nmi)
        elif ev.smi_smm or ev.smi_pending or ev.smi_inside_nmi:
            raise KvmError(U.EINVAL, "KVM_SET_VCPU_EVENTS", "no SMM support (CONFIG_KVM_SMM)")
        if ev.smi_latched_init:
            self.apic.pending_events |= 1 << KVM_APIC_INIT
        else:
            self.apic.pending_events &= ~(1 << KVM_APIC_INIT)
