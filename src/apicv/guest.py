"""The guest side of a vCPU: what the guest agent does, and how each of its APIC accesses is
handled -- virtualized by the processor (VMX APIC virtualization, TPR shadow) or by a VM exit
that KVM emulates -- with every VM exit counted by its VMX basic exit reason.

Why this module is long: it is the simulated processor -- each guest operation, the VM exits it
causes and the entries that follow (APIC-access, APIC-write, EOI-induced, TPR-below-threshold,
MSR, CR8, I/O and window exits) -- and these steps call each other in the order the SDM gives.

The guest is the small agent the real backend runs: it executes with RFLAGS.IF=0 except in
interrupt windows; its interrupt handlers record the vector, EOI it (unless told not to) and
IRET; its NMI handler records 2; its SMM handler is a bare RSM. A guest operation is one
KVM_RUN: VM entry (KVM injects at most one event; with virtual-interrupt delivery the processor
delivers recognized virtual interrupts itself), the operation, and the agent's OUT back to
userspace (not counted as an exit: it is the agent's, not the guest work's).

Where a vCPU rests between API calls (``vcpu.location``):

* ``"host"``   -- not in KVM_RUN (the default; every other operation returns the vCPU here);
* ``"guest"``  -- in guest mode, idling with IF as given to :meth:`GuestMixin.enter_guest`;
  interrupts sent to it are delivered at once (kick + VM exit, or posted-interrupt
  notification without one);
* ``"halted"`` -- blocked in HLT (:meth:`GuestMixin.halt`) until an event wakes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import apicdef as A
from .api import mmio_offset
from .errors import GuestFault, IoExit, KvmError, MmioExit, VcpuNotRunnable
from .kvm_host import KVM_REQ_EVENT, KVM_REQ_UNBLOCK
from .lapic import REJECTED, EoiBroadcast, SendIpi
from .memory import in_ram
from .uapi import (
    KVM_IOAPIC_DEFAULT_BASE_ADDRESS,
    KVM_MP_STATE_HALTED,
    KVM_MP_STATE_RUNNABLE,
    KVM_X86_QUIRK_LAPIC_MMIO_HOLE,
    PIC_PORTS,
    PIT_PORTS,
)

if TYPE_CHECKING:
    from .vmx.vmx import VmxVcpu

NMI_VECTOR = 2
_U64 = (1 << 64) - 1
_MAX_ROUNDS = 100_000


class GuestMixin:
    """Guest operations of :class:`apicv.vcpu.Vcpu`."""

    vmx: VmxVcpu
    td: bool

    # ------------------------------------------------------------------ public guest ops
    def mmio_read(self, offset: int | str, size: int = 4) -> int:
        """The guest reads *size* bytes at APIC base + *offset* (xAPIC MMIO; a register name
        such as "TPR" works too)."""
        offset = mmio_offset(offset, size)
        out: list[int] = []
        self._kvm_run(lambda: out.append(self._mmio(offset, size, None)))
        return out[0]

    def mmio_write(self, offset: int | str, value: int, size: int = 4) -> None:
        """The guest writes *value* (*size* bytes) at APIC base + *offset*."""
        offset = mmio_offset(offset, size)
        if not 0 <= value < (1 << (8 * size)):
            raise ValueError(f"value {value:#x} does not fit in {size} bytes")
        self._kvm_run(lambda: self._mmio(offset, size, value))

    def rdmsr(self, index: int) -> int:
        """The guest executes RDMSR; GuestFault(13) where the guest gets #GP."""
        out: list[int] = []
        self._kvm_run(lambda: out.append(self._guest_rdmsr(index)))
        return out[0]

    def wrmsr(self, index: int, value: int) -> None:
        """The guest executes WRMSR; GuestFault(13) where the guest gets #GP."""
        if not 0 <= value <= _U64:
            raise ValueError(f"MSR value {value:#x} does not fit in 64 bits")
        self._kvm_run(lambda: self._guest_wrmsr(index, value))

    def write_cr8(self, value: int) -> None:
        """The guest executes MOV CR8, value (64-bit mode): TPR = (value & 0xf) << 4."""
        if not 0 <= value <= 0xF:
            raise GuestFault(13, f"MOV to CR8 with reserved bits set ({value:#x})")
        self._kvm_run(lambda: self._cr8(value))

    def read_cr8(self) -> int:
        """The guest executes MOV reg, CR8: TPR[7:4]."""
        out: list[int] = []
        self._kvm_run(lambda: out.append(self._cr8(None)))
        return out[0]

    def take_interrupts(self, limit: int | None = None, eoi: bool = True) -> list[int]:
        """The guest opens an IF=1 window (STI ... CLI) and takes what is delivered.

        Returns the vectors taken since the last call, in order: those taken while the vCPU
        was elsewhere (NMIs during other operations, interrupts while it sat in guest mode or
        halted) first, then this window's. Handlers EOI (MMIO in xAPIC mode, WRMSR 0x80B in
        x2APIC mode) unless *eoi* is False; *limit* caps how many this window takes."""
        if limit is not None and limit < 0:
            raise ValueError("limit must be >= 0")
        self._kvm_run(lambda: self._interrupt_window(limit, eoi))
        out, self.taken = self.taken, []
        return out

    def run(self) -> list[int]:
        """One KVM_RUN in which the guest only exits back: takes what is injected with IF=0
        (NMIs) and returns the vectors taken since the last take_interrupts."""
        self._kvm_run(lambda: None)
        return list(self.taken)

    def ioapic_read(self, offset: int, size: int = 4) -> int:
        """The guest loads *size* bytes at 0xFEC00000 + *offset* (the IOAPIC window)."""
        self._check_ioapic(offset, size)
        out: list[int] = []
        self._kvm_run(lambda: out.append(self._ioapic_mmio(offset, size, None)))
        return out[0]

    def ioapic_write(self, offset: int, value: int, size: int = 4) -> None:
        """The guest stores *value* (*size* bytes) at 0xFEC00000 + *offset*."""
        self._check_ioapic(offset, size)
        if not 0 <= value < (1 << (8 * size)):
            raise ValueError(f"value {value:#x} does not fit in {size} bytes")
        self._kvm_run(lambda: self._ioapic_mmio(offset, size, value))

    def inb(self, port: int) -> int:
        """The guest executes IN AL, DX on an in-kernel PIC port (0x20/0x21, 0xA0/0xA1), ELCR
        port (0x4D0/0x4D1) or PIT port (0x40-0x43, speaker 0x61). A port no in-kernel device
        claims (no PIC with a split irqchip, no PIT before KVM_CREATE_PIT2, 0x61 without
        KVM_PIT_SPEAKER_DUMMY) exits to userspace: IoExit."""
        self._check_port(port)
        out: list[int] = []
        self._kvm_run(lambda: out.append(self._pio(port, None)))
        return out[0]

    def outb(self, port: int, value: int) -> None:
        """The guest executes OUT DX, AL on an in-kernel PIC, ELCR or PIT port (see inb)."""
        self._check_port(port)
        if not 0 <= value <= 0xFF:
            raise ValueError(f"value {value:#x} does not fit in a byte")
        self._kvm_run(lambda: self._pio(port, value))

    def guest_load(self, gpa: int, size: int = 4) -> int:
        """The guest loads *size* bytes of its RAM (no exit)."""
        self._check_guest_mem(gpa, size)
        out: list[int] = []
        self._kvm_run(lambda: out.append(self.vm.mem.read_int(gpa, size)))
        return out[0]

    def guest_store(self, gpa: int, value: int, size: int = 4) -> None:
        """The guest stores *value* into its RAM (no exit): e.g. a new TPR into the VAPIC word,
        or a cleared PV-EOI flag."""
        self._check_guest_mem(gpa, size)
        if not 0 <= value < (1 << (8 * size)):
            raise ValueError(f"value {value:#x} does not fit in {size} bytes")
        self._kvm_run(lambda: self.vm.mem.write_int(gpa, size, value))

    # ------------------------------------------------------------------ where the vCPU is
    @property
    def location(self) -> str:
        return self._location

    def enter_guest(self, interrupts: bool = True) -> None:
        """KVM_RUN, and the guest idles in guest mode with RFLAGS.IF = *interrupts* until the
        next operation on this vCPU takes it out. Interrupts sent meanwhile are delivered as
        they arrive."""
        with self.vm.vcpu_ioctl(self):
            self._begin_run()
            self.rflags_if = interrupts
            self._idle()
            self._location = "guest"

    def halt(self, interrupts: bool = True) -> None:
        """KVM_RUN; the guest executes [STI;] HLT. KVM blocks the vCPU (mp_state HALTED) unless
        an event wakes it at once; a wake-up delivers the interrupt and leaves the vCPU in
        guest mode."""
        with self.vm.vcpu_ioctl(self):
            self._begin_run()
            # STI blocks interrupts for one instruction: the HLT, which exits (HLT exiting)
            self.rflags_if = interrupts
            if self.td:
                # a TD halts with TDVMCALL<HLT>, telling whether interrupts are blocked
                self._vm_exit("TDCALL")
                self.vmx.hlt_exit = True
                self.vmx.hlt_irq_blocked = not interrupts
            else:
                self._vm_exit("HLT")
            self.kvm_set_mp_state(KVM_MP_STATE_HALTED)  # __kvm_emulate_halt
            self.exit_in_kernel()
            self._location = "halted"
            self.arch.blocked = True
            self._wake_if_events()

    def leave_guest(self) -> None:
        """The VMM takes the vCPU out of KVM_RUN (a signal; KVM_RUN returns EINTR)."""
        self._stop_guest()

    def _stop_guest(self) -> None:
        if self._location == "host":
            return
        if self._location == "guest":
            self.rflags_if = False  # the agent returns to userspace; its next op starts with CLI
            self._vm_exit(None)  # the signal's exit
        # (a vCPU taken out of HLT is still in HLT, with the IF it halted with, until an
        # event wakes it)
        self._location = "host"
        self.arch.in_guest_mode = False
        self.arch.blocked = False
        self.arch.wants_to_run = False

    # ------------------------------------------------------------------ KVM_RUN
    def _kvm_run(self, work) -> None:
        """One KVM_RUN whose guest does *work* and then exits to userspace. (The vCPU
        context takes a vCPU resting in guest mode or HLT out of its KVM_RUN first.)"""
        arch = self.arch
        with self.vm.vcpu_ioctl(self):
            try:
                self._begin_run()
            except (VcpuNotRunnable, KvmError):
                # KVM_RUN refused or returned before any VM entry: there is no exit, so no
                # kvm_lapic_sync_from_vapic (a VAPIC word must not overwrite a restored TPR)
                arch.wants_to_run = False
                raise
            try:
                work()
            except GuestFault:
                # the agent's exception handler records the fault and returns with IRET, which
                # ends NMI blocking (SDM 6.7.1) like any IRET
                self.nmi_masked = False
                raise
            finally:
                self._vm_exit(None)  # the agent's OUT
                arch.wants_to_run = False

    def _begin_run(self) -> None:
        """KVM_RUN up to the guest's next instruction: block while HALTED, enter; a guest woken
        from STI;HLT takes what is pending, then its next operation starts with CLI."""
        self.arch.wants_to_run = True
        self._run_until_guest()
        self._entry()
        if self.rflags_if:
            self._idle()
            self.rflags_if = False

    def _vm_exit(self, reason: str | None) -> None:
        """A VM exit (counted unless it is the agent's own hand-back)."""
        self.arch.in_guest_mode = False
        if reason is not None:
            self.vmx.exit_counts[reason] += 1
        if self.arch.apic_attention:
            self._sync_from_vapic()

    def _sync_from_vapic(self) -> None:
        """vcpu_enter_guest() after every VM exit (and a cancelled entry), with
        apic_attention set: kvm_lapic_sync_from_vapic (PV-EOI check, VAPIC TPR)."""
        self.route(self.apic.kvm_lapic_sync_from_vapic(self.vm.mem))

    def exit_in_kernel(self) -> None:
        """vcpu_run after an exit handled in the kernel: KVM_REQ_UNBLOCK is cleared and a
        pending timer expiry is injected."""
        clock = self.vm.clock
        if clock.source is not None:
            clock.sync()  # time passed while the guest ran
        self.arch.requests &= ~KVM_REQ_UNBLOCK
        if self.apic.apic_has_pending_timer():
            self.apic.kvm_inject_apic_timer_irqs()
        self.vm.settle()

    def _enter(self) -> None:
        """One VM entry and what the guest does right after it: the handler of an event KVM
        injected, then virtual interrupts the processor delivers."""
        arch = self.arch
        for _ in range(_MAX_ROUNDS):
            if arch.mp_state != KVM_MP_STATE_RUNNABLE:
                return
            ev = self._vcpu_enter_guest()
            # kvm_vcpu_exit_request(): a request still pending cancels the entry (r = 1) and
            # vcpu_run's tail runs (e.g. KVM_REQ_UNBLOCK from an expired timer); an event
            # already injected is re-queued (cancel_injection) and re-injected next time
            if arch.requests:
                if ev is not None:
                    self._reinject = ev
                    arch.requests |= KVM_REQ_EVENT
                if arch.apic_attention:
                    self._sync_from_vapic()  # cancel_injection
                self.exit_in_kernel()
                continue
            break
        else:
            raise RuntimeError("KVM_RUN did not reach the guest")
        self.vmx.vm_entry()  # the processor: PPR virtualization, evaluation (VID)
        self.arch.in_guest_mode = True
        if ev is not None:
            self._deliver(ev)
        self._settle()

    def _entry(self) -> None:
        """Enter; while the guest opens a window KVM asked for, exit and enter again."""
        for _ in range(_MAX_ROUNDS):
            self._enter()
            if self.arch.mp_state != KVM_MP_STATE_RUNNABLE or not self._window_exit():
                return
            self.exit_in_kernel()
        raise RuntimeError("event injection did not settle")

    def _reenter(self, reason: str) -> None:
        """A VM exit handled in the kernel, then back into the guest."""
        self._vm_exit(reason)
        self.exit_in_kernel()
        self._entry()

    def _window_exit(self) -> bool:
        """An NMI-window or interrupt-window VM exit (KVM_REQ_EVENT) happens if KVM asked for
        one and the guest is now open for it."""
        if self.nmi_window_requested and not self.nmi_masked:
            self.nmi_window_requested = False
            self.arch.requests |= KVM_REQ_EVENT
            self._vm_exit("NMI_WINDOW")
            return True
        if self.irq_window_requested and self.rflags_if:
            self.irq_window_requested = False
            self.arch.requests |= KVM_REQ_EVENT
            self._vm_exit("INTERRUPT_WINDOW")
            return True
        return False

    def _settle(self) -> None:
        """The guest is in guest mode with its current IF: the processor delivers recognized
        virtual interrupts (SDM: at an instruction boundary with IF=1), one after another."""
        vmx = self.vmx
        for _ in range(_MAX_ROUNDS):
            if not (vmx.apicv and vmx.recognized and self.rflags_if and self.arch.in_guest_mode):
                return
            if self.nmi_window_requested and not self.nmi_masked:
                # SDM: virtual-interrupt delivery has the priority of an interrupt-window exit;
                # an NMI-window exit (NMI priority) comes first
                return
            self._deliver(("irq", vmx.deliver()))
        raise RuntimeError("virtual-interrupt delivery did not settle")

    def _deliver(self, ev) -> None:
        """The guest takes an event and its handler runs to IRET."""
        if ev == "smi":
            return  # the SMM handler is a bare RSM
        if ev == NMI_VECTOR:
            self.nmi_injected = False
            self.taken.append(NMI_VECTOR)
            return  # NMI blocking ends at IRET
        vector = ev[1]
        self.taken.append(vector)
        if_after, eoi = self._window_count()
        self.rflags_if = False  # inside the handler (interrupt gate)
        if eoi:
            self._guest_eoi()
        self.rflags_if = if_after  # IRET
        self.nmi_masked = False  # IRET unblocks NMIs, from any handler (SDM 6.7.1)

    def _window_count(self) -> tuple[bool, bool]:
        """A handler runs in an interrupt window: count it; (IF after its IRET, whether it
        EOIs). The agent keeps IF=0 once it has taken the window's `limit` vectors."""
        win = self._window
        if_after = self.rflags_if
        eoi = True if win is None else win[2]
        if win is not None:
            win[0] += 1
            if win[1] is not None and win[0] >= win[1]:
                if_after = False
        return if_after, eoi

    def _guest_eoi(self) -> None:
        """The handler's EOI: with PV EOI enabled, Linux's kvm_guest_apic_eoi_write() first
        test-and-clears the flag byte and skips the EOI write if it was set; then WRMSR
        0x80B in x2APIC mode, else an MMIO write to base + 0xB0."""
        apic = self.apic
        if apic.pv_eoi_enabled():
            mem = self.vm.mem
            gpa = apic.pv_eoi_gpa
            flag = mem.kvm_read_guest_cached(gpa, 1)
            if flag & 1:
                mem.kvm_write_guest_cached(gpa, 1, flag & ~1)
                return
        if apic.x2apic:
            self._guest_wrmsr(A.APIC_BASE_MSR + (A.APIC_EOI >> 4), 0)
        elif apic.hw_enabled:
            self._mmio(A.APIC_EOI, 4, 0)

    def _interrupt_window(self, limit: int | None, eoi: bool) -> None:
        """STI; the guest idles until nothing more is delivered (or *limit* reached); CLI."""
        if limit == 0:
            return
        self._window = [0, limit, eoi]
        try:
            self.rflags_if = True
            self._idle()
        finally:
            self._window = None
            self.rflags_if = False

    def _idle(self) -> None:
        """The guest runs with its current IF until nothing more is delivered: recognized
        virtual interrupts, and the window exits KVM asked for."""
        for _ in range(_MAX_ROUNDS):
            before = len(self.taken)
            self._settle()
            if self.rflags_if and self._window_exit():
                self.exit_in_kernel()
                self._entry()
            if len(self.taken) == before:
                return
        raise RuntimeError("the guest did not settle")

    # ------------------------------------------------------------------ kicks and wake-ups
    def service_kick(self) -> None:
        """Something was sent to this vCPU while it rests in guest mode or in HLT."""
        arch = self.arch
        vmx = self.vmx
        if self._location == "guest":
            if arch.pi_notification:
                arch.pi_notification = False
                vmx.posted_interrupt_processing()  # no VM exit
                self._settle()
            if arch.kick_pending:
                arch.kick_pending = False
                self._reenter("EXTERNAL_INTERRUPT")
            self._idle()
        elif self._location == "halted":
            arch.kick_pending = arch.pi_notification = False
            self._wake_if_events()

    def _wake_if_events(self) -> None:
        """vcpu_block(): a blocked vCPU runs again when kvm_vcpu_has_events()."""
        if not self.kvm_vcpu_has_events():
            if self.apic.apic_has_pending_timer():
                self.apic.kvm_inject_apic_timer_irqs()
                self.vm.settle()
            if not self.kvm_vcpu_has_events():
                return
        self.arch.blocked = False
        self.kvm_apic_accept_events()
        if self.arch.mp_state == KVM_MP_STATE_HALTED:
            self.arch.pv_unhalted = False
            self.kvm_set_mp_state(KVM_MP_STATE_RUNNABLE)
        self._location = "guest"
        self.exit_in_kernel()  # vcpu_run()'s tail after vcpu_block(): a pending timer
        self._entry()
        self._idle()

    # ------------------------------------------------------------------ devices
    @staticmethod
    def _check_ioapic(offset: int, size: int) -> None:
        if size not in (1, 2, 4, 8):
            raise ValueError(f"MMIO size must be 1, 2, 4 or 8, not {size}")
        if not 0 <= offset <= 0x100 - size:
            raise ValueError(f"offset {offset:#x} is outside the 256-byte IOAPIC window")

    @staticmethod
    def _check_port(port: int) -> None:
        if port not in PIC_PORTS and port not in PIT_PORTS:
            raise ValueError(f"port {port:#x} is not an in-kernel PIC/ELCR/PIT port "
                             f"({', '.join(hex(p) for p in sorted(PIC_PORTS | PIT_PORTS))})")

    @staticmethod
    def _check_guest_mem(gpa: int, size: int) -> None:
        if size not in (1, 2, 4, 8):
            raise ValueError(f"access size must be 1, 2, 4 or 8, not {size}")
        if not in_ram(gpa, size):
            raise ValueError(f"[{gpa:#x}, {gpa + size:#x}) is not guest RAM")

    def _ioapic_mmio(self, offset: int, size: int, value: int | None) -> int:
        """An IOAPIC access: an MMIO exit (EPT misconfiguration; a TDVMCALL in a TD) that the
        in-kernel IOAPIC handles, or that goes to userspace when no device claims it."""
        gpa = KVM_IOAPIC_DEFAULT_BASE_ADDRESS + offset
        base = self.apic.base_address
        if base <= gpa and gpa + size <= base + 0x1000:
            # vcpu_mmio_read/write ask the vCPU's LAPIC first: an APIC base moved onto the
            # IOAPIC window hides the IOAPIC from this vCPU
            return self._mmio(gpa - base, size, value)
        self.last_read_undefined = False

        def emulate() -> int:
            out = self.vm.ioapic_mmio(gpa, size, value)
            if out is None:
                raise MmioExit(gpa, size, value is not None)
            return out

        return self._reenter_after(emulate, "TDCALL" if self.td else "EPT_MISCONFIG")

    def _pio(self, port: int, value: int | None) -> int:
        """IN/OUT on a PIC or PIT port: an I/O-instruction exit the in-kernel device handles,
        or that goes to userspace when none claims the port."""
        vm = self.vm

        def emulate() -> int:
            if port in PIT_PORTS:
                out = vm.pit_pio(port, value)
                if out is None:
                    raise IoExit(port, 1, value is not None)  # no in-kernel PIT: userspace
                return out
            if vm.pic is None:
                raise IoExit(port, 1, value is not None)  # no in-kernel PIC: userspace
            if value is None:
                return vm.picdev_read(port)
            vm.picdev_write(port, value)
            return 0

        return self._reenter_after(emulate, "TDCALL" if self.td else "IO_INSTRUCTION")

    # ------------------------------------------------------------------ APIC accesses
    def _mmio(self, offset: int, size: int, value: int | None) -> int:
        """A guest load (value None) or store to APIC base + offset."""
        apic = self.apic
        vmx = self.vmx
        self.last_read_undefined = False
        if not apic.hw_enabled or apic.x2apic:
            # the MMIO hole: an EPT-misconfig exit to the emulated MMIO bus (in a TD: a #VE the
            # guest turns into a TDVMCALL)
            reason = "TDCALL" if self.td else "EPT_MISCONFIG"
            if not self.vm.kvm.has_quirk(KVM_X86_QUIRK_LAPIC_MMIO_HOLE):
                self._vm_exit(reason)
                raise MmioExit(apic.base_address + offset, size, value is not None)
            self._reenter_after(lambda: None, reason)
            return (1 << (8 * size)) - 1 if value is None else 0
        if vmx.vaa and vmx.mmio_virtualized(offset, size, value is not None):
            if value is None:
                return vmx.read_page(offset, size)
            self._apic_write_emulation(offset, size, value)
            return 0
        reason = "APIC_ACCESS" if vmx.vaa else "EPT_MISCONFIG"
        if value is None:
            out = self._reenter_after(lambda: apic.kvm_lapic_reg_read(offset, size), reason)
            # KVM leaves the emulator's buffer untouched for a rejected read (undefined data);
            # the model says 0 and flags it
            self.last_read_undefined = out is None
            return 0 if out is None else out
        self._reenter_after(lambda: self.route(apic.apic_mmio_write_reg(offset, size, value)),
                            reason)
        return 0

    def _reenter_after(self, emulate, reason: str):
        """A VM exit whose handler (*emulate*) KVM runs before entering again."""
        self._vm_exit(reason)
        out = emulate()
        self.exit_in_kernel()
        self._entry()
        return out

    def _apic_write_emulation(self, offset: int, size: int, value: int) -> None:
        """A virtualized write to the APIC-access page, then APIC-write emulation (SDM)."""
        apic = self.apic
        vmx = self.vmx
        vmx.write_page(offset, size, value)
        if offset == A.APIC_TASKPRI:
            apic.r[A.APIC_TASKPRI >> 2] &= 0xFF  # clear bytes 3:1 of VTPR
            self._tpr_virtualized()
        elif offset == A.APIC_EOI and vmx.apicv:
            apic.r[A.APIC_EOI >> 2] = 0  # clear VEOI
            self._eoi_virtualized()
        elif offset == A.APIC_ICR and vmx.apicv and self._self_ipi_ok(apic.r[A.APIC_ICR >> 2]):
            vmx.self_ipi_virtualization(apic.r[A.APIC_ICR >> 2] & 0xFF)
            self._settle()
        elif A.APIC_ICR2 <= offset < A.APIC_ICR2 + 4:
            apic.r[A.APIC_ICR2 >> 2] &= 0xFF000000  # clear bytes 2:0 of VICR_HI; no exit
        else:
            # trap-like APIC-write VM exit: KVM replays the value now in the page
            self._reenter_after(lambda: self.route(apic.kvm_apic_write_nodecode(offset & 0xFF0)),
                                "APIC_WRITE")

    @staticmethod
    def _self_ipi_ok(icr: int) -> bool:
        return (not icr & (0xFFF00000 | 0x30000 | 0x2000 | 0x1000)
                and (icr >> 18) & 3 == 1 and not icr & A.APIC_INT_LEVELTRIG
                and not icr & A.APIC_MODE_MASK and icr & 0xF0)

    def _tpr_virtualized(self) -> None:
        if self.vmx.tpr_virtualization() == "TPR_BELOW_THRESHOLD":
            # handle_tpr_below_threshold(): kvm_apic_update_ppr()
            self._reenter_after(self.apic.kvm_apic_update_ppr, "TPR_BELOW_THRESHOLD")
        self._settle()

    def _eoi_virtualized(self) -> None:
        vector = self.vmx.eoi_virtualization()
        if vector is not None:
            # trap-like EOI-induced exit: kvm_apic_set_eoi_accelerated()
            self._reenter_after(lambda: self.route(self.apic.kvm_apic_set_eoi_accelerated(vector)),
                                "EOI_INDUCED")
        self._settle()

    def _guest_rdmsr(self, index: int) -> int:
        vmx = self.vmx
        if A.APIC_BASE_MSR <= index <= A.APIC_BASE_MSR + 0xFF and vmx.msr_read_passes(index):
            if vmx.apicv:
                return vmx.read_page64((index & 0xFF) << 4)
            return vmx.read_page64(A.APIC_TASKPRI)
        v = self._reenter_after(lambda: self._gp_if(self.kvm_get_msr_common(index, host=False),
                                                    None),
                                "TDCALL" if self.td else "MSR_READ")
        if v is None:
            raise GuestFault(13, f"RDMSR {index:#x}")
        return v

    def _guest_wrmsr(self, index: int, value: int) -> None:
        vmx = self.vmx
        if A.APIC_BASE_MSR <= index <= A.APIC_BASE_MSR + 0xFF and vmx.msr_write_passes(index):
            if not self._x2apic_virtualized_write(index, value):
                self._reenter_after(
                    lambda: self.route(self.apic.kvm_apic_write_nodecode(A.APIC_SELF_IPI)),
                    "APIC_WRITE")
            return
        ok = self._reenter_after(
            lambda: self._gp_if(self.kvm_set_msr_common(index, value, host=False), False),
            "TDCALL" if self.td else "MSR_WRITE")
        if not ok:
            raise GuestFault(13, f"WRMSR {index:#x} <- {value:#x}")

    def _x2apic_virtualized_write(self, index: int, value: int) -> bool:
        """A WRMSR that virtualize-x2APIC-mode handles (SDM 29.5): the reserved-bit checks
        (#GP), an 8-byte store to the virtual-APIC page (a TD's own page in a TD), then TPR,
        EOI or self-IPI virtualization. False for a self-IPI of a vector below 16: that one is
        a trap-like APIC-write VM exit, the caller's to take."""
        if index == 0x80B:
            if value:
                raise GuestFault(13, f"WRMSR {index:#x} <- {value:#x} (EOI must be 0)")
        elif value >> 8:
            raise GuestFault(13, f"WRMSR {index:#x} <- {value:#x} (bits 63:8 reserved)")
        vmx = self.vmx
        off = (index & 0xFF) << 4
        page = vmx.apic.r
        page[off >> 2] = value & 0xFFFFFFFF
        page[(off >> 2) + 1] = 0
        if index == 0x808:
            self._tpr_virtualized()
        elif index == 0x80B:
            self._eoi_virtualized()
        elif value & 0xF0:
            vmx.self_ipi_virtualization(value & 0xFF)
            self._settle()
        else:
            return False
        return True

    def _gp_if(self, result, failed):
        """kvm_emulate_rdmsr/wrmsr: a failed access is kvm_inject_gp() -> kvm_queue_exception,
        which raises KVM_REQ_EVENT, so the re-entry runs kvm_check_and_inject_events (and its
        kvm_cpu_has_injectable_intr refreshes PPR). The #GP is delivered to the agent.
        (A TD's failed TDVMCALL is an error code for the TD, not an injection by KVM.)"""
        if (result is None if failed is None else not result) and not self.td:
            self.arch.requests |= KVM_REQ_EVENT
            # kvm_queue_exception_e(GP_VECTOR, 0), injected at the re-entry and delivered:
            # vcpu->arch.exception keeps the vector and error code (KVM_GET_VCPU_EVENTS)
            ex = self.exception
            ex.pending = ex.injected = ex.has_payload = False
            ex.vector, ex.has_error_code, ex.error_code, ex.payload = 13, True, 0, 0
        return result

    def _cr8(self, value: int | None) -> int:
        apic = self.apic
        if self.vmx.tpr_shadow:
            page = self.vmx.apic.r
            if value is None:
                return (page[A.APIC_TASKPRI >> 2] >> 4) & 0xF
            page[A.APIC_TASKPRI >> 2] = (value & 0xF) << 4
            self._tpr_virtualized()
            return 0
        if value is None:
            return self._reenter_after(apic.kvm_lapic_get_cr8, "CR_ACCESS")
        self._reenter_after(lambda: apic.kvm_lapic_set_tpr(value), "CR_ACCESS")
        return 0

    def route(self, eff) -> None:
        """Carry out what a LAPIC write asked for."""
        if eff is None or eff is REJECTED:
            return
        if isinstance(eff, SendIpi):
            self.vm.router.kvm_apic_send_ipi(eff)
        elif isinstance(eff, EoiBroadcast):
            self.vm.kvm_ioapic_update_eoi(self, eff.vector, eff.level)
