"""A vCPU: mp_state, INIT/SIPI, NMI/SMI bookkeeping, event injection, the vCPU ioctls.

This is the x86.c half of the picture (``kvm_vcpu_reset``, ``kvm_apic_accept_events``,
``process_nmi``, ``kvm_check_and_inject_events``, ``vcpu_enter_guest``, ``vcpu_block``,
``KVM_GET/SET_MP_STATE``, the MSR paths) around one :class:`LocalApic` and its VMX state
(:class:`~apicv.vmx.vmx.VmxVcpu`). What the guest does is in :mod:`apicv.guest`.

Why this module is long: ``struct kvm_vcpu_arch``'s event state, the vCPU ioctls and the
entry path (``vcpu_run``, ``vcpu_enter_guest``, ``kvm_check_and_inject_events``, and the same
path offered to a VMM as :meth:`Vcpu.prepare_entry` / :meth:`Vcpu.inject_interrupt`) share
that state field by field, as x86.c does; split apart they would each reach into the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import apicdef as A
from .arch import VcpuArch
from .errors import KvmError, MsrRejected, VcpuNotRunnable
from .guest import NMI_VECTOR, GuestMixin
from .kvm_host import (
    KVM_APIC_INIT,
    KVM_APIC_SIPI,
    KVM_REQ_APF_READY,
    KVM_REQ_APICV_UPDATE,
    KVM_REQ_EVENT,
    KVM_REQ_NMI,
    KVM_REQ_REPORT_TPR_ACCESS,
    KVM_REQ_SMI,
    KVM_REQ_UNBLOCK,
    ApicvInhibit,
    request_names,
)
from .lapic import REJECTED, LocalApic
from .memory import in_memslot
from .uapi import (
    EINVAL,
    KVM_APIC_REG_SIZE,
    KVM_MAX_MCE_BANKS,
    KVM_MP_STATE_AP_RESET_HOLD,
    KVM_MP_STATE_HALTED,
    KVM_MP_STATE_INIT_RECEIVED,
    KVM_MP_STATE_RUNNABLE,
    KVM_MP_STATE_SIPI_RECEIVED,
    KVM_MP_STATE_UNINITIALIZED,
    KVM_MSR_ENABLED,
    MCG_BANKCNT_MASK,
    MCG_CMCI_P,
    MCG_CTL_P,
    MCG_LMCE_P,
    MCG_SER_P,
    MP_STATE_NAMES,
    MSR_KVM_PV_EOI_EN,
)
from .vcpu_events import VcpuEventsMixin
from .vcpu_state import VcpuStateMixin
from .vmx.tdx import (
    TdxVcpu,
    tdx_has_emulated_msr,
    tdx_interrupt_allowed,
    tdx_is_read_only_msr,
    tdx_protected_apic_has_interrupt,
)
from .vmx.vmx import VmxVcpu

if TYPE_CHECKING:
    from .vm import Vm

# kvm_caps.supported_mce_cap on VMX: MCG_CTL_P | MCG_SER_P, plus LMCE and CMCI (vmx.c)
KVM_MCE_CAP_SUPPORTED = MCG_CTL_P | MCG_SER_P | MCG_CMCI_P | MCG_LMCE_P
_U64 = (1 << 64) - 1
# bound on event-injection rounds in one guest operation (each round injects one event)
_MAX_ROUNDS = 100_000
# the reset vector a BSP starts at after INIT: CS selector 0xF000, base 0xFFFF0000, RIP 0xFFF0
RESET_VECTOR = (0xF000, 0xFFFF0000, 0xFFF0)


@dataclass(frozen=True, slots=True)
class Entry:
    """What ``vcpu_run`` / ``vcpu_enter_guest`` decided before a VM entry, for a VMM whose KVM
    has no in-kernel LAPIC (the model is the irqchip): :meth:`Vcpu.prepare_entry`."""

    runnable: bool  # False: the vCPU blocks (vcpu_block) until a kick
    reset: tuple[int, int, int] | None = None  # (CS selector, CS base, RIP): INIT or SIPI state
    nmis: int = 0  # NMIs to inject with KVM_NMI (KVM keeps NMI blocking and windows itself)


@dataclass(frozen=True, slots=True)
class Injection:
    """The interrupt half of ``kvm_check_and_inject_events`` (:meth:`Vcpu.inject_interrupt`):
    the vector to inject with KVM_INTERRUPT (-1: none), acknowledged (IRR -> ISR) already, and
    whether more is pending, so that the VMM asks for an interrupt window."""

    vector: int = -1
    window: bool = False


NO_INJECTION = Injection()
USER_EXIT_REASONS = {"IOAPIC_EOI": 26}  # KVM_EXIT_IOAPIC_EOI


class Vcpu(VcpuEventsMixin, VcpuStateMixin, GuestMixin):
    """One vCPU of a :class:`~apicv.vm.Vm`. Host-side methods are the vCPU ioctls; guest-side
    methods (:class:`~apicv.guest.GuestMixin`) are what the guest agent does."""

    def __init__(self, vm: Vm, vcpu_id: int, vcpu_idx: int) -> None:
        self.vm = vm
        self.vcpu_id = vcpu_id
        kvm = vm.kvm
        self.arch = VcpuArch(
            vcpu_id=vcpu_id, vcpu_idx=vcpu_idx, cpuid_x2apic=vm.x2apic_cpuid,
            cpuid_tsc_deadline=vm.tsc_deadline_cpuid, maxphyaddr=vm.maxphyaddr,
            virtual_tsc_khz=vm.tsc_khz, mcg_cap=vm.mcg_cap,
        )
        # kvm_arch_vcpu_create(): RUNNABLE only for the reset BSP (in-kernel irqchip)
        self.arch.mp_state = (KVM_MP_STATE_RUNNABLE if vcpu_id == kvm.bsp_vcpu_id
                              else KVM_MP_STATE_UNINITIALIZED)
        self.apic = LocalApic(self.arch, kvm, vm.clock, vm.vendor_ops())
        self.apic.trace = vm.trace
        self.td = kvm.is_td
        if self.td:
            # tdx_vcpu_create(): the APIC state belongs to the TDX module
            self.apic.guest_apic_protected = True
            self.vmx = self.apic.vmx = TdxVcpu(self.apic)
        else:
            self.vmx = self.apic.vmx = VmxVcpu(self.apic, flexpriority=vm.flexpriority)
        self._location = "host"
        # init_vmcs(): the execution controls follow APICv and the APIC mode
        self.apic.ops.refresh_apicv_exec_ctrl(self.apic)
        self.apic.ops.set_virtual_apic_mode(self.apic)
        # x86.c event state
        self.nmi_pending = 0
        self.nmi_injected = False
        self.nmi_masked = False  # NMI blocking (only inside the guest's NMI handler)
        self.smi_pending = False
        self.smi_count = 0
        self.rflags_if = False
        self.irq_window_requested = False
        self.nmi_window_requested = False
        self.taken: list[int] = []  # vectors the guest took, not yet returned
        self.sipi: tuple[int, int, int] | None = None  # (CS selector, CS base, RIP) after SIPI
        self._window: list | None = None  # [taken, limit, eoi] while take_interrupts runs
        self.last_read_undefined = False  # the last mmio_read was rejected by the LAPIC
        self._reinject = None  # an injected event whose VM entry was cancelled
        self.user_exits: list[tuple[str, int]] = []  # exits for a split irqchip's VMM
        self._events_init()  # KVM_GET/SET_VCPU_EVENTS state (vcpu_events.py)
        self.kvm_vcpu_reset(False)

    # ------------------------------------------------------------------ reset / INIT / SIPI
    def kvm_vcpu_reset(self, init_event: bool) -> None:
        self.apic.kvm_lapic_reset(init_event)
        self.smi_pending = False
        self.smi_count = 0
        self.arch.nmi_queued = 0
        self.nmi_pending = 0
        self.nmi_injected = False
        self.nmi_masked = False
        self._reinject = None  # kvm_clear_interrupt_queue()
        self._events_reset()
        self.arch.requests |= KVM_REQ_EVENT
        self.rflags_if = False  # RFLAGS = X86_EFLAGS_FIXED
        self.irq_window_requested = False
        self.nmi_window_requested = False
        self.vm.settle()

    def kvm_vcpu_is_bsp(self) -> bool:
        return bool(self.arch.apic_base & A.MSR_IA32_APICBASE_BSP)

    def kvm_apic_init_sipi_allowed(self) -> bool:
        """Not in SMM (only KVM_SET_VCPU_EVENTS puts the model there: its SMM handler returns
        at once), and INIT not blocked by the vendor: a TD vCPU always blocks INIT/SIPI
        (vt_apic_init_signal_blocked)."""
        return not (self.td or self.in_smm)

    def tdx_vcpu_init(self) -> None:
        """KVM_TDX_INIT_VCPU, the APIC part: x2APIC mode (the TDX module mandates it), the BSP
        bit for the reset BSP, RUNNABLE; the first vcpu_load clears PID.SN."""
        base = (A.APIC_DEFAULT_PHYS_BASE | A.MSR_IA32_APICBASE_ENABLE | A.X2APIC_ENABLE
                | (A.MSR_IA32_APICBASE_BSP if self.vcpu_id == self.vm.kvm.bsp_vcpu_id else 0))
        with self.vm.vcpu_ioctl(self):
            if self.apic.kvm_apic_set_base(base, True):
                raise KvmError(EINVAL, "KVM_TDX_INIT_VCPU", "cannot set the x2APIC base")
            self.kvm_set_mp_state(KVM_MP_STATE_RUNNABLE)
            self.vmx.pi_desc.sn = False

    def kvm_apic_accept_events(self) -> int:
        """Process a pending INIT (vCPU INIT reset) and SIPI (only in INIT_RECEIVED)."""
        apic = self.apic
        if not apic.pending_events:
            return 0
        if not self.kvm_apic_init_sipi_allowed():
            apic.pending_events &= ~(1 << KVM_APIC_SIPI)
            return 0
        if apic.pending_events & (1 << KVM_APIC_INIT):
            apic.pending_events &= ~(1 << KVM_APIC_INIT)
            self.kvm_vcpu_reset(True)
            self.kvm_set_mp_state(KVM_MP_STATE_RUNNABLE if self.kvm_vcpu_is_bsp()
                               else KVM_MP_STATE_INIT_RECEIVED)
        if apic.pending_events & (1 << KVM_APIC_SIPI):
            apic.pending_events &= ~(1 << KVM_APIC_SIPI)
            if self.arch.mp_state == KVM_MP_STATE_INIT_RECEIVED:
                vec = apic.sipi_vector
                # kvm_vcpu_deliver_sipi_vector(): CS.selector = vec << 8, CS.base = vec << 12
                self.sipi = (vec << 8, vec << 12, 0)
                self.kvm_set_mp_state(KVM_MP_STATE_RUNNABLE)
        return 0

    def kvm_set_mp_state(self, state: int) -> None:
        """kvmkvm_set_mp_state(): RUNNABLE also clears pv_unhalted."""
        self.arch.mp_state = state
        if state == KVM_MP_STATE_RUNNABLE:
            self.arch.pv_unhalted = False
        tr = self.vm.trace
        if tr is not None:
            tr.mp_state(self.vcpu_id, MP_STATE_NAMES.get(state, str(state)))

    # ------------------------------------------------------------------ host: vCPU ioctls
    def get_lapic(self) -> bytes:
        """KVM_GET_LAPIC: the 1024-byte register page (kvm_apic_get_state)."""
        with self.vm.vcpu_ioctl(self):
            if self.apic.guest_apic_protected:
                raise KvmError(EINVAL, "KVM_GET_LAPIC", "the APIC state is protected")
            self.apic.ops.sync_pir_to_irr(self.apic)
            return self.apic.kvm_apic_get_state()

    def lapic_view(self) -> bytes:
        """The page as KVM_GET_LAPIC would return it, without its side effects and without
        taking the vCPU out of guest mode: PIR merged into IRR in the copy, TMCCT computed.
        (Not an ioctl: a way to look at a running vCPU's virtual-APIC page.)"""
        apic = self.apic
        saved = apic.irr
        apic.irr |= self.vmx.pi_desc.pir
        try:
            return apic.kvm_apic_get_state()
        finally:
            apic.irr = saved

    def set_lapic(self, page: bytes) -> None:
        """KVM_SET_LAPIC (kvm_apic_set_state); KvmError(EINVAL) where KVM refuses."""
        page = bytes(page)
        if len(page) != KVM_APIC_REG_SIZE:
            raise ValueError(f"a kvm_lapic_state is {KVM_APIC_REG_SIZE} bytes, got {len(page)}")
        with self.vm.vcpu_ioctl(self):
            if self.apic.guest_apic_protected:
                raise KvmError(EINVAL, "KVM_SET_LAPIC", "the APIC state is protected")
            r = self.apic.kvm_apic_set_state(page)
            self.vm.settle()
            if r:
                raise KvmError(-r, "KVM_SET_LAPIC",
                               "x2APIC ID in the state does not match the vCPU ID "
                               "(KVM_X2APIC_API_USE_32BIT_IDS)")
            if self.vm.ioapic is not None:
                self.vm.ioapic.kvm_rtc_eoi_tracking_restore_one(self)
            self.apic.kvm_lapic_update_cr8_intercept()

    def set_vapic_addr(self, gpa: int) -> None:
        """KVM_SET_VAPIC_ADDR: the guest-physical address of the 4-byte VAPIC word (0 turns
        VAPIC syncing off); KvmError(EINVAL) if the word is not in guest RAM."""
        if not 0 <= gpa <= _U64:
            raise ValueError(f"VAPIC address {gpa:#x} does not fit in 64 bits")
        with self.vm.vcpu_ioctl(self):
            r = self.apic.kvm_lapic_set_vapic_addr(gpa, in_memslot(gpa, 4))
            if r:
                raise KvmError(-r, "KVM_SET_VAPIC_ADDR", f"{gpa:#x} is not in a memslot")

    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE: runs kvm_apic_accept_events first."""
        with self.vm.vcpu_ioctl(self):
            self.kvm_apic_accept_events()
            st = self.arch.mp_state
            if st in (KVM_MP_STATE_HALTED, KVM_MP_STATE_AP_RESET_HOLD) and self.arch.pv_unhalted:
                return KVM_MP_STATE_RUNNABLE
            return st

    def set_mp_state(self, state: int) -> None:
        """KVM_SET_MP_STATE."""
        with self.vm.vcpu_ioctl(self):
            if state not in (KVM_MP_STATE_UNINITIALIZED, KVM_MP_STATE_HALTED,
                             KVM_MP_STATE_AP_RESET_HOLD, KVM_MP_STATE_INIT_RECEIVED,
                             KVM_MP_STATE_SIPI_RECEIVED, KVM_MP_STATE_RUNNABLE):
                raise KvmError(EINVAL, "KVM_SET_MP_STATE", f"mp_state {state} not valid on x86")
            # (6.18: no INIT/SIPI-blocked check here any more; KVM_RUN refuses instead)
            if state == KVM_MP_STATE_SIPI_RECEIVED:
                self.kvm_set_mp_state(KVM_MP_STATE_INIT_RECEIVED)
                self.apic.pending_events |= 1 << KVM_APIC_SIPI
            else:
                self.kvm_set_mp_state(state)
            self.arch.requests |= KVM_REQ_EVENT

    def get_msr(self, index: int) -> int:
        """KVM_GET_MSRS for one MSR (host-initiated). MsrRejected where KVM processes 0."""
        with self.vm.vcpu_ioctl(self):
            v = self.kvm_get_msr_common(index, host=True)
            if v is None:
                raise MsrRejected("KVM_GET_MSRS", index)
            return v

    def set_msr(self, index: int, value: int) -> bool:
        """KVM_SET_MSRS for one MSR (host-initiated): True if KVM set it (returned 1)."""
        if not 0 <= value <= _U64:
            raise ValueError(f"MSR value {value:#x} does not fit in 64 bits")
        with self.vm.vcpu_ioctl(self):
            ok = self.kvm_set_msr_common(index, value, host=True)
            self.vm.settle()
            return ok

    def nmi(self) -> None:
        """KVM_NMI: kvm_inject_nmi()."""
        with self.vm.vcpu_ioctl(self):
            self.arch.nmi_queued += 1
            self.arch.requests |= KVM_REQ_NMI

    def setup_mce(self, mcg_cap: int) -> None:
        """KVM_X86_SETUP_MCE: only the LVT count (MCG_CMCI_P) matters to the APIC."""
        bank_num = mcg_cap & MCG_BANKCNT_MASK
        supported = self.vm.supported_mce_cap | MCG_BANKCNT_MASK
        if not bank_num or bank_num > KVM_MAX_MCE_BANKS or mcg_cap & ~supported:
            raise KvmError(EINVAL, "KVM_X86_SETUP_MCE", f"mcg_cap {mcg_cap:#x} not supported")
        with self.vm.vcpu_ioctl(self):
            self.arch.mcg_cap = mcg_cap
            self.apic.kvm_apic_after_set_mcg_cap()

    def set_cpuid(self, *, x2apic: bool = True, tsc_deadline: bool = True) -> None:
        """KVM_SET_CPUID2, reduced to the two bits the APIC depends on."""
        with self.vm.vcpu_ioctl(self):
            self.arch.cpuid_x2apic = x2apic
            self.arch.cpuid_tsc_deadline = tsc_deadline
            self.arch.cpuid_set = True
            self.apic.kvm_apic_set_version()
            self.apic.timer_mode_mask = self.apic.timer_mode_mask_for_cpuid()

    def set_guest_debug(self, enable: bool = False, blockirq: bool = False) -> None:
        """KVM_SET_GUEST_DEBUG, the part the APIC cares about: KVM_GUESTDBG_BLOCKIRQ keeps
        KVM from injecting interrupts and inhibits APICv while any vCPU has it
        (kvm_arch_vcpu_guestdbg_update_apicv_inhibit)."""
        with self.vm.vcpu_ioctl(self):
            if self.td:
                raise KvmError(EINVAL, "KVM_SET_GUEST_DEBUG", "guest state is protected")
            self.arch.guest_debug_blockirq = bool(enable and blockirq)
            blocked = any(v.arch.guest_debug_blockirq for v in self.vm.vcpus)
            self.vm.kvm_set_or_clear_apicv_inhibit(ApicvInhibit.BLOCKIRQ, blocked)

    def set_tpr_access_reporting(self, enabled: bool, flags: int = 0) -> None:
        """KVM_TPR_ACCESS_REPORTING."""
        if flags:
            raise KvmError(EINVAL, "KVM_TPR_ACCESS_REPORTING", "flags must be 0")
        self.arch.tpr_access_reporting = bool(enabled)

    # ------------------------------------------------------------------ MSR dispatch
    def kvm_get_msr_common(self, index: int, host: bool) -> int | None:
        """The APIC-related MSR reads of kvm_get_msr_common() (None: KVM fails the read)."""
        apic = self.apic
        if self.td and not tdx_has_emulated_msr(index):
            return None  # tdx_get_msr()
        if index == A.MSR_IA32_APICBASE:
            return self.arch.apic_base
        if A.APIC_BASE_MSR <= index <= A.APIC_BASE_MSR + 0xFF:
            return apic.kvm_x2apic_msr_read(index)
        if index == A.MSR_IA32_TSC_DEADLINE:
            return apic.kvm_get_lapic_tscdeadline_msr()
        if index == A.MSR_IA32_TSC:
            return apic.guest_tsc()
        if index == MSR_KVM_PV_EOI_EN:
            return self.arch.pv_eoi_msr
        raise ValueError(f"MSR {index:#x} is not modelled by apicv")

    def kvm_set_msr_common(self, index: int, value: int, host: bool) -> bool:
        """The APIC-related MSR writes of kvm_set_msr_common() (False: KVM fails it)."""
        apic = self.apic
        if self.td and (tdx_is_read_only_msr(index) or not tdx_has_emulated_msr(index)):
            return False  # tdx_set_msr()
        if index == A.MSR_IA32_APICBASE:
            return apic.kvm_apic_set_base(value, host) == 0
        if A.APIC_BASE_MSR <= index <= A.APIC_BASE_MSR + 0xFF:
            eff = apic.kvm_x2apic_msr_write(index, value)
            if eff is REJECTED:
                return False
            self.route(eff)
            return True
        if index == A.MSR_IA32_TSC_DEADLINE:
            apic.kvm_set_lapic_tscdeadline_msr(value)
            return True
        if index == A.MSR_IA32_TSC:
            if host:
                self.kvm_synchronize_tsc(value)  # vcpu_state.py
            else:
                self.arch.tsc_offset = (value - apic.guest_tsc() + self.arch.tsc_offset) & _U64
            return True
        if index == MSR_KVM_PV_EOI_EN:
            addr = value & ~KVM_MSR_ENABLED
            return apic.kvm_lapic_set_pv_eoi(value, in_memslot(addr, 1))
        raise ValueError(f"MSR {index:#x} is not modelled by apicv")

    def _run_until_guest(self) -> None:
        """kvm_arch_vcpu_ioctl_run / vcpu_run until the vCPU enters the guest."""
        arch = self.arch
        if arch.mp_state == KVM_MP_STATE_INIT_RECEIVED and not self.kvm_apic_init_sipi_allowed():
            # kvm_arch_vcpu_ioctl_run(): wait-for-SIPI with INIT/SIPI blocked is refused
            raise KvmError(EINVAL, "KVM_RUN", "vCPU in INIT_RECEIVED while INIT/SIPI is blocked")
        if arch.mp_state == KVM_MP_STATE_UNINITIALIZED:
            # KVM_RUN blocks until an event, runs accept_events and returns -EAGAIN; the
            # agent's driver runs again.
            if not self.kvm_vcpu_has_events():
                raise VcpuNotRunnable(self.vcpu_id, arch.mp_state, "no INIT/SIPI pending")
            self.kvm_apic_accept_events()
        for _ in range(_MAX_ROUNDS):
            if arch.mp_state == KVM_MP_STATE_RUNNABLE:
                return
            self._vcpu_block()
        raise VcpuNotRunnable(self.vcpu_id, arch.mp_state)

    def _vcpu_block(self) -> None:
        """vcpu_block(): wake on an event, or say that KVM_RUN would block for good."""
        arch = self.arch
        if not self.kvm_vcpu_has_events():
            if self.apic.apic_has_pending_timer():
                # kvm_vcpu_check_block() wakes for the timer; vcpu_run injects it into IRR
                self.apic.kvm_inject_apic_timer_irqs()
                self.vm.settle()
                if self.kvm_vcpu_has_events():
                    self._vcpu_block()
                    return
            raise VcpuNotRunnable(self.vcpu_id, arch.mp_state, "nothing would wake it")
        self.kvm_apic_accept_events()
        st = arch.mp_state
        if st in (KVM_MP_STATE_HALTED, KVM_MP_STATE_AP_RESET_HOLD):
            arch.pv_unhalted = False
            self.kvm_set_mp_state(KVM_MP_STATE_RUNNABLE)
        elif st == KVM_MP_STATE_INIT_RECEIVED and not self.apic.pending_events:
            raise VcpuNotRunnable(self.vcpu_id, st, "waiting for SIPI")
        # vcpu_run()'s tail after vcpu_block() returned 1
        arch.requests &= ~KVM_REQ_UNBLOCK
        if self.apic.apic_has_pending_timer():
            self.apic.kvm_inject_apic_timer_irqs()
            self.vm.settle()

    def kvm_vcpu_has_events(self) -> bool:
        arch = self.arch
        if self.apic.pending_events and self.kvm_apic_init_sipi_allowed():
            return True
        if arch.pv_unhalted:
            return True
        if arch.requests & KVM_REQ_NMI or (self.nmi_pending and not self.nmi_masked):
            return True
        if arch.requests & KVM_REQ_SMI or self.smi_pending:
            return True
        return self.kvm_arch_interrupt_allowed() and self.kvm_cpu_has_interrupt()

    def kvm_arch_interrupt_allowed(self) -> bool:
        """RFLAGS.IF and no STI / MOV-SS blocking (only KVM_SET_VCPU_EVENTS gives the model's
        guest one, until its next entry); for a TD, tdx_interrupt_allowed() (KVM cannot read
        RFLAGS)."""
        if self.td:
            return tdx_interrupt_allowed(self)
        return self.rflags_if and not self.interrupt_shadow

    def kvm_cpu_has_interrupt(self) -> bool:
        """kvm_cpu_has_interrupt(); a protected APIC answers through
        tdx_protected_apic_has_interrupt()."""
        if self.vm.kvm_cpu_has_extint(self):
            return True
        if self.apic.guest_apic_protected:
            return tdx_protected_apic_has_interrupt(self)
        return self.apic.kvm_apic_has_interrupt() != -1

    def kvm_cpu_has_injectable_intr(self) -> bool:
        if self.vm.kvm_cpu_has_extint(self):
            return True
        if self.apic.apicv_active:
            return False  # the CPU delivers through RVI
        return self.apic.kvm_apic_has_interrupt() != -1

    def kvm_cpu_get_interrupt(self) -> int:
        vector = self.vm.kvm_cpu_get_extint(self)
        if vector != -1:
            return vector
        vector = self.apic.kvm_apic_has_interrupt()
        if vector != -1:
            self.apic.kvm_apic_ack_interrupt(vector)
        return vector

    def process_nmi(self) -> None:
        """At most two NMIs pending (one if NMIs are blocked or one is being injected)."""
        limit = 1 if (self.nmi_masked or self.nmi_injected) else 2
        self.nmi_pending += self.arch.nmi_queued
        self.arch.nmi_queued = 0
        self.nmi_pending = min(self.nmi_pending, limit)
        if self.nmi_pending:
            self.arch.requests |= KVM_REQ_EVENT

    def process_requests(self) -> None:
        """The requests vcpu_enter_guest() handles before it looks at KVM_REQ_EVENT."""
        arch = self.arch
        # nothing for the model to do: async PF, TPR-access report (KVM_EXIT_TPR_ACCESS); the
        # split irqchip's EOI exit is the VM's (process_vcpu_requests)
        arch.requests &= ~(KVM_REQ_APF_READY | KVM_REQ_REPORT_TPR_ACCESS)
        req = arch.requests
        if req & KVM_REQ_APICV_UPDATE:
            arch.requests &= ~KVM_REQ_APICV_UPDATE
            self.vm.kvm_vcpu_update_apicv(self)
        if req & KVM_REQ_SMI:
            arch.requests &= ~KVM_REQ_SMI
            self.smi_pending = True  # process_smi()
            arch.requests |= KVM_REQ_EVENT
        if req & KVM_REQ_NMI:
            arch.requests &= ~KVM_REQ_NMI
            self.process_nmi()
        self.vm.process_vcpu_requests(self)

    def _vcpu_enter_guest(self):
        """vcpu_enter_guest() up to VM entry: handle requests; on KVM_REQ_EVENT accept
        INIT/SIPI and inject at most one event. Returns the injected event or None."""
        arch = self.arch
        self.process_requests()
        injected = None
        if arch.requests & KVM_REQ_EVENT:
            arch.requests &= ~KVM_REQ_EVENT
            self.kvm_apic_accept_events()
            if arch.mp_state == KVM_MP_STATE_INIT_RECEIVED:
                return None
            injected = self.kvm_check_and_inject_events()
            if self.apic.hw_enabled and self.apic.sw_enabled:
                self.apic.kvm_lapic_update_cr8_intercept()  # update_cr8_intercept()
                self.vm.kvm_lapic_sync_to_vapic(self)
        apic = self.apic
        if apic.hw_enabled and apic.sw_enabled:
            # pending posted interrupts: PIR -> IRR, RVI = highest IRR (vmx_sync_pir_to_irr)
            apic.ops.sync_pir_to_irr(apic)
        apic.kvm_wait_lapic_expire()
        self.interrupt_shadow = 0  # the guest's first instruction after entry ends it
        return injected

    def inject_nmi(self) -> None:
        """kvm_check_and_inject_events() injecting one pending NMI (kvm_x86_ops.inject_nmi):
        it leaves nmi_pending for the NMI being injected."""
        self.nmi_pending -= 1
        self.nmi_injected = True
        tr = self.vm.trace
        if tr is not None:
            tr.kvm_inj_nmi()

    def kvm_check_and_inject_events(self):
        """Inject at most one event: 'smi', NMI_VECTOR (2) for an NMI, an IRQ vector, or None.
        Requests an NMI/IRQ window when more is pending than could be injected."""
        can_inject = True
        injected = None
        if self._reinject is not None:
            # an event whose injection was cancelled goes in first (kvm_x86_call(inject_*));
            # an interrupt KVM_SET_VCPU_EVENTS left behind an NMI is dropped, as VMX does
            injected, self._reinject = self._reinject, None
            self.interrupt_injected = False
            can_inject = False
        # STI / MOV-SS blocking (KVM_SET_VCPU_EVENTS) blocks NMIs and interrupts (vmx_*_blocked)
        shadow = self.interrupt_shadow
        if self.arch.guest_debug_blockirq:
            return injected  # "Don't inject interrupts if the user asked to avoid doing so"
        if self.smi_pending and not self.in_smm:  # vmx_smi_allowed: not in SMM
            self.smi_pending = False
            self.smi_count += 1
            can_inject = False
            injected = "smi"
        if self.nmi_pending:
            if can_inject and not self.nmi_masked and not shadow:
                self.inject_nmi()
                can_inject = False
                injected = NMI_VECTOR
                if self.td:
                    # tdx_inject_nmi(): TD_VCPU_PEND_NMI holds one NMI; extra ones collapse
                    self.nmi_pending = 0
            if self.nmi_pending:
                self.nmi_window_requested = True
        if self.kvm_cpu_has_injectable_intr():
            if can_inject and self.rflags_if and not shadow:
                irq = self.kvm_cpu_get_interrupt()
                if irq != -1:
                    self.interrupt_nr, self.interrupt_soft = irq, False  # kvm_queue_interrupt
                    tr = self.vm.trace
                    if tr is not None:
                        tr.kvm_inj_virq(irq)
                    injected = ("irq", irq)
            if self.kvm_cpu_has_injectable_intr():
                self.irq_window_requested = True
        return injected

    # ------------------------------------------------------------------ a VMM's entry path
    def prepare_entry(self, halt_if: bool = False) -> Entry:
        """vcpu_run / vcpu_enter_guest up to event injection, for a VMM that runs the guest
        on a KVM without an in-kernel LAPIC: the tail of the previous exit
        (:meth:`exit_in_kernel`), the requests (KVM_REQ_NMI left to KVM: accepted NMIs are
        returned for KVM_NMI), ``kvm_apic_accept_events`` (an INIT of the BSP restarts it at
        the reset vector; a SIPI gives the AP its start state), and ``vcpu_block`` for a
        HALTED vCPU (*halt_if*: RFLAGS.IF at its HLT). Then call :meth:`inject_interrupt`."""
        arch = self.arch
        self.exit_in_kernel()
        req_nmi = arch.requests & KVM_REQ_NMI
        arch.requests &= ~KVM_REQ_NMI
        self.process_requests()
        arch.requests |= req_nmi
        init = 1 << KVM_APIC_INIT
        had_init = bool(self.apic.pending_events & init)
        self.kvm_apic_accept_events()
        state = arch.mp_state
        reset = None
        if had_init and not self.apic.pending_events & init and state == KVM_MP_STATE_RUNNABLE:
            reset = RESET_VECTOR
        if state in (KVM_MP_STATE_UNINITIALIZED, KVM_MP_STATE_INIT_RECEIVED):
            return Entry(False, reset)
        if self.sipi is not None:
            reset, self.sipi = self.sipi, None
        nmis = arch.nmi_queued  # (an INIT reset cleared those accepted before it)
        if nmis:
            arch.nmi_queued = 0
            arch.requests &= ~KVM_REQ_NMI
        if state == KVM_MP_STATE_HALTED:
            self.rflags_if = halt_if
            if not (nmis or self.kvm_vcpu_has_events()):
                return Entry(False, reset)
            self.kvm_set_mp_state(KVM_MP_STATE_RUNNABLE)
        arch.requests &= ~KVM_REQ_EVENT
        return Entry(True, reset, nmis)

    def inject_interrupt(self, allowed: bool) -> Injection:
        """kvm_check_and_inject_events() for an interrupt given with KVM_INTERRUPT: if one is
        injectable and *allowed* (KVM reported ready_for_interrupt_injection with IF=1, and no
        NMI goes first), ``kvm_cpu_get_interrupt`` acknowledges it; ``window`` says whether
        more is pending (request an interrupt window)."""
        if not self.kvm_cpu_has_injectable_intr():
            return NO_INJECTION
        vector = -1
        if allowed:
            vector = self.kvm_cpu_get_interrupt()
            tr = self.vm.trace
            if vector != -1 and tr is not None:
                tr.kvm_inj_virq(vector)
        return Injection(vector, self.kvm_cpu_has_injectable_intr())

    def user_exit(self, name: str, data: int) -> None:
        """KVM_RUN returned to userspace with an exit a split-irqchip VMM handles (e.g.
        KVM_EXIT_IOAPIC_EOI); the VMM re-enters at once, so the guest operation goes on."""
        self.user_exits.append((name, data))
        tr = self.vm.trace
        if tr is not None:
            tr.kvm_userspace_exit(name, USER_EXIT_REASONS[name])

    def pop_exits(self) -> list[tuple[str, int]]:
        """The exits to userspace a split-irqchip VMM had to handle since the last call, as
        ``(name, data)`` pairs: ``("IOAPIC_EOI", vector)``."""
        out, self.user_exits = self.user_exits, []
        return out

    @property
    def vcpu_idx(self) -> int:
        """The creation index (kvm_vcpu.vcpu_idx)."""
        return self.arch.vcpu_idx

    # ------------------------------------------------------------------ views
    @property
    def mp_state(self) -> int:
        """vcpu->arch.mp_state as it is now (no accept_events; see get_mp_state)."""
        return self.arch.mp_state

    @property
    def apicv_active(self) -> bool:
        """kvm_vcpu_apicv_active(): APICv is active on this vCPU."""
        return self.apic.apicv_active

    @property
    def pi_desc(self):
        """The posted-interrupt descriptor (struct pi_desc: PIR, ON, SN, NV, NDST)."""
        return self.vmx.pi_desc

    @property
    def exit_counts(self):
        """VM exits so far by VMX basic exit reason name (a Counter; clear() to reset)."""
        return self.vmx.exit_counts

    @property
    def guest_intr_status(self) -> int:
        """GUEST_INTR_STATUS: RVI in bits 7:0, SVI in bits 15:8."""
        return self.vmx.guest_intr_status

    @property
    def pending_requests(self) -> list[str]:
        return request_names(self.arch.requests)

    def __repr__(self) -> str:
        return (f"Vcpu(id={self.vcpu_id}, mp_state={MP_STATE_NAMES.get(self.arch.mp_state)}, "
                f"apic_base={self.arch.apic_base:#x})")
