"""The model as the guest's interrupt controller: the part of ``apicv boot`` that plays KVM's
in-kernel LAPIC/IOAPIC/PIC with the apicv model (mixed into :class:`apicv.vmm.machine.Machine`).

The VM has no KVM_CREATE_IRQCHIP, and the VMM does for the model what KVM's
``vcpu_enter_guest()`` does for its in-kernel LAPIC:

* xAPIC MMIO at the vCPU's APIC base and the IOAPIC window reach userspace as KVM_EXIT_MMIO
  (no memslot covers them) and go to ``kvm_lapic_reg_read`` / ``apic_mmio_write_reg`` and
  ``ioapic_mmio_read/write``; with the APIC hardware-disabled or in x2APIC mode the page is
  KVM_X86_QUIRK_LAPIC_MMIO_HOLE's all-ones hole, as in ``apic_mmio_read``;
* RDMSR/WRMSR of the APIC MSRs exit to userspace (KVM_EXIT_X86_RDMSR/WRMSR, with
  KVM_CAP_X86_USER_SPACE_MSR) and reach ``kvm_x2apic_msr_read/write``, ``kvm_apic_set_base``
  and the TSC-deadline timer: IA32_APIC_BASE and IA32_TSC_DEADLINE, which KVM would handle
  itself, through an MSR filter that denies them (KVM_MSR_EXIT_REASON_FILTER); the x2APIC
  range 0x800-0x8FF, which no filter can cover, because without an in-kernel LAPIC
  ``kvm_x2apic_msr_read/write`` fail and KVM_MSR_EXIT_REASON_INVAL sends the failure to
  userspace. A rejected access sets ``msr.error`` and KVM injects #GP; so does any other MSR
  access that failed in KVM (what KVM would have done). KVM's own apic_base is kept equal to
  the model's (KVM_SET_MSRS, host-initiated) so CPUID.1:EDX.APIC follows APIC_BASE.EN as
  ``kvm_update_cpuid_runtime`` makes it;
* CR8 is synchronised through ``kvm_run.cr8`` (written before KVM_RUN, read after every exit);
* before each KVM_RUN, as ``kvm_check_and_inject_events``: NMIs the model accepted become
  KVM_NMI; when ``kvm_cpu_has_injectable_intr`` and KVM reported the vCPU
  ``ready_for_interrupt_injection``, ``kvm_cpu_get_interrupt`` (IRR -> ISR) picks the vector
  for KVM_INTERRUPT; while more is pending, ``request_interrupt_window`` asks for
  KVM_EXIT_IRQ_WINDOW_OPEN;
* KVM_EXIT_HLT puts the vCPU in KVM_MP_STATE_HALTED and its thread waits until
  ``kvm_vcpu_has_events`` (``vcpu_block``); APs wait in UNINITIALIZED / INIT_RECEIVED until
  ``kvm_apic_accept_events`` takes a SIPI, then get the INIT state with CS from the SIPI vector
  (``kvm_vcpu_deliver_sipi_vector``) through KVM_SET_SREGS/REGS;
* the model's clock follows CLOCK_MONOTONIC: the main thread fires due APIC timers, a pending
  expiry is moved into IRR before entry (``kvm_inject_apic_timer_irqs``).

Every method here runs with ``machine.lock`` held, except the vCPU loop, which takes it.
"""

from __future__ import annotations

import ctypes
import time
from typing import TYPE_CHECKING

from .. import apicdef as A
from ..errors import BootError
from ..kvm import uapi as K
from ..kvm.sys import cpuid_maxphyaddr, enable_vm_cap, ioctl
from ..uapi import KVM_X86_QUIRK_LAPIC_MMIO_HOLE

if TYPE_CHECKING:
    from .machine import VmmVcpu

# KVM_CAP_X2APIC_API as QEMU enables it when the guest has x2APIC: 32-bit IDs and no broadcast
# quirk. Without x2APIC in CPUID it stays off, so aliased xAPIC IDs follow the architecture
# (kvm_recalculate_phys_map disables the optimized map instead of keeping the first vCPU).
X2APIC_API_FLAGS = 3  # KVM_X2APIC_API_USE_32BIT_IDS | KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK
IOAPIC_BASE = 0xFEC00000
IOAPIC_LEN = 0x100
MSR_IA32_TSC = 0x10


def _seg(seg: K.kvm_segment, *, base: int, limit: int, selector: int, type_: int, s: int = 1,
         db: int = 0, g: int = 0) -> None:
    seg.base, seg.limit, seg.selector, seg.type = base, limit, selector, type_
    seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g, seg.avl, seg.unusable = (
        1, 0, db, s, 0, g, 0, 0)


class ModelIrqchipMixin:
    """The userspace-irqchip half of the VMM (attributes it uses are the Machine's)."""

    def _setup_user_msrs(self) -> None:
        """KVM_CAP_X86_USER_SPACE_MSR (filtered and failed accesses exit) and a filter denying
        IA32_APIC_BASE and IA32_TSC_DEADLINE."""
        if ioctl(self._kfd, K.KVM_CHECK_EXTENSION, K.KVM_CAP_X86_USER_SPACE_MSR) <= 0:
            raise BootError("this KVM lacks KVM_CAP_X86_USER_SPACE_MSR: x2APIC MSRs cannot "
                            "reach a userspace irqchip")
        enable_vm_cap(self.vm_fd, K.KVM_CAP_X86_USER_SPACE_MSR,
                         K.KVM_MSR_EXIT_REASON_FILTER | K.KVM_MSR_EXIT_REASON_INVAL)
        flt = K.kvm_msr_filter(flags=K.KVM_MSR_FILTER_DEFAULT_ALLOW)
        self._bitmaps = []
        rw = K.KVM_MSR_FILTER_READ | K.KVM_MSR_FILTER_WRITE
        for i, (base, n) in enumerate(((A.MSR_IA32_APICBASE, 1), (A.MSR_IA32_TSC_DEADLINE, 1))):
            bm = ctypes.create_string_buffer((n + 7) // 8)  # all clear: deny
            self._bitmaps.append(bm)
            r = flt.ranges[i]
            r.flags, r.nmsrs, r.base = rw, n, base
            r.bitmap = ctypes.addressof(bm)
        ioctl(self.vm_fd, K.KVM_X86_SET_MSR_FILTER, flt)

    def _build_model(self, trace: bool, trace_limit: int) -> None:
        from ..vm import Vm

        self.vm = vm = Vm(self.smp, self.x2apic_api, enable_apicv=False,
                          lapic_timer_advance=False, x2apic_cpuid=self.x2apic,
                          tsc_deadline_cpuid=self.tsc_deadline, tsc_khz=self.tsc_khz,
                          smm=False, maxphyaddr=cpuid_maxphyaddr(self.supported_cpuid))
        # the model's kvm_vcpu_kick()s reach the vCPU threads (a signal, or a wake-up)
        vm.set_kick_handler(lambda mv: self._kick(self.vcpus[mv.vcpu_idx]))
        if trace:
            vm.enable_tracing(limit=trace_limit)
        t0 = time.monotonic_ns()
        self.clock_t0 = t0
        vm.clock.follow(lambda: time.monotonic_ns() - t0)
        for v, mv in zip(self.vcpus, vm.vcpus, strict=True):
            v.model = mv
            # KVM's vcpu->arch.apic_base = the model's: CPUID.1:EDX.APIC follows it
            v.set_msr(A.MSR_IA32_APICBASE, mv.arch.apic_base)
            self._calibrate_tsc(v, mv)

    def _calibrate_tsc(self, v: VmmVcpu, mv) -> None:
        """The model's guest TSC (kvm_read_l1_tsc: offset + ns * kHz) = KVM's, never ahead
        of it (timers fire late, not early): offset = TSC read - kHz * (time after the read).
        Done at start and at every TSC-deadline write (the guest may have written its TSC)."""
        tsc = v.get_msr(MSR_IA32_TSC)
        now = time.monotonic_ns() - self.clock_t0
        mv.arch.tsc_offset = (tsc - now * self.tsc_khz // 1_000_000) & ((1 << 64) - 1)

    def _pic_ports(self):
        """The PIC's ports for the port bus (the model exists only later)."""
        return (lambda port: self.vm.picdev_read(port),
                lambda port, value: self.vm.picdev_write(port, value))

    # -- the model as irqchip --
    def _vcpu_loop_model(self, v: VmmVcpu) -> None:
        """One vCPU's thread: vcpu_run() with the model -- enter (or wait, as vcpu_block does,
        until a kick), KVM_RUN without the lock, handle the exit."""
        mv = v.model
        lock = self.lock
        run = v.run
        while True:
            with lock:
                if self.done.is_set():
                    return
                run.immediate_exit = 0
                runnable = self._before_entry(v, mv)
                if runnable:
                    v.in_run = mv.arch.in_guest_mode = True
                else:
                    v.waiting = mv.arch.blocked = True
                    v.wake.clear()
            if not runnable:
                v.wake.wait(0.5)
                with lock:
                    v.waiting = mv.arch.blocked = False
                continue
            ok = self._kvm_run(v)
            with lock:
                v.in_run = mv.arch.in_guest_mode = False
                if not self.done.is_set():
                    self._after_exit(v, mv, ok)

    def _before_entry(self, v: VmmVcpu, mv) -> bool:
        """vcpu_run / vcpu_enter_guest for the model (:meth:`apicv.vcpu.Vcpu.prepare_entry`
        and :meth:`~apicv.vcpu.Vcpu.inject_interrupt`), carried out with KVM_SET_SREGS/REGS,
        KVM_NMI, KVM_INTERRUPT and request_interrupt_window. False if the vCPU has to wait."""
        run = v.run
        tr = self.vm.trace
        if tr is not None:
            tr.context = v.vcpu_id
        entry = mv.prepare_entry(halt_if=v.halt_if)
        if entry.reset is not None:
            self._reset_vcpu(v, *entry.reset)
        if not entry.runnable:
            return False
        for _ in range(entry.nmis):
            v.ioctl(K.KVM_NMI)
            self.nmis += 1
            v.nmi_inflight = True
        # an interrupt given with KVM_INTERRUPT counts as injected: it needs an open window and
        # must not overtake an NMI that KVM still holds
        allowed = bool(run.ready_for_interrupt_injection and run.if_flag
                       and mv.kvm_cpu_has_injectable_intr() and not self._nmi_first(v))
        inj = mv.inject_interrupt(allowed)
        if inj.vector != -1:
            v.ioctl(K.KVM_INTERRUPT, K.kvm_interrupt(irq=inj.vector))
            self.injected += 1
            run.ready_for_interrupt_injection = 0
        if inj.window:
            run.request_interrupt_window = 1
            v.window_since = time.monotonic()
            if not self.polling_windows:
                self.timer_changed.set()  # H6: the timer loop polls for the window
        else:
            run.request_interrupt_window = 0
        cr8 = mv.apic.kvm_lapic_get_cr8()
        run.cr8 = cr8
        v.cr8_set = cr8
        self.vm.deliver_kicks()
        return True

    def _nmi_first(self, v: VmmVcpu) -> bool:
        """Whether an NMI KVM holds goes in before an interrupt (kvm_check_and_inject_events
        injects a pending, unmasked NMI first). An interrupt given with KVM_INTERRUPT counts
        as already injected and would overtake it, so the VMM waits for the next interrupt
        window. (Asked with KVM_GET_VCPU_EVENTS only while an NMI forwarded to KVM may still
        be pending.)"""
        if not v.nmi_inflight:
            return False
        ev = v.events
        v.ioctl(K.KVM_GET_VCPU_EVENTS, ev)
        if not (ev.nmi.pending or ev.nmi.injected):
            v.nmi_inflight = False
            return False
        return bool(ev.nmi.pending and not ev.nmi.masked)

    def _reset_vcpu(self, v: VmmVcpu, selector: int, base: int, rip: int) -> None:
        """The INIT state (SDM 'Processor state following power-up, reset, or INIT') with
        CS from a SIPI (kvm_vcpu_deliver_sipi_vector) or the reset vector."""
        s = K.kvm_sregs()
        v.ioctl(K.KVM_GET_SREGS, s)
        _seg(s.cs, base=base, limit=0xFFFF, selector=selector, type_=0xB)
        for seg in (s.ds, s.es, s.fs, s.gs, s.ss):
            _seg(seg, base=0, limit=0xFFFF, selector=0, type_=0x3)
        _seg(s.tr, base=0, limit=0xFFFF, selector=0, type_=0xB, s=0)
        _seg(s.ldt, base=0, limit=0xFFFF, selector=0, type_=0x2, s=0)
        s.gdt.base = s.idt.base = 0
        s.gdt.limit = s.idt.limit = 0xFFFF
        s.cr0 = 0x60000010  # CD | NW | ET
        s.cr2 = s.cr3 = s.cr4 = s.cr8 = 0
        s.efer = 0
        s.apic_base = v.model.arch.apic_base if v.model is not None else s.apic_base
        for i in range(len(s.interrupt_bitmap)):
            s.interrupt_bitmap[i] = 0
        v.ioctl(K.KVM_SET_SREGS, s)
        r = K.kvm_regs()
        r.rip, r.rflags, r.rdx = rip, 2, self.cpuid_1_eax
        v.ioctl(K.KVM_SET_REGS, r)
        ev = K.kvm_vcpu_events()
        ev.flags = K.KVM_VCPUEVENT_VALID_NMI_PENDING
        v.ioctl(K.KVM_SET_VCPU_EVENTS, ev)
        v.run.ready_for_interrupt_injection = 0
        v.run.request_interrupt_window = 0
        v.halt_if = False
        v.nmi_inflight = False

    def _after_exit(self, v: VmmVcpu, mv, exited: bool = True) -> None:
        """After KVM_RUN: IF and CR8 as the guest left them (also when a kick interrupted the
        run, *exited* False: the guest may have run and written CR8), then the exit."""
        run = v.run
        tr = self.vm.trace
        if tr is not None:
            tr.context = v.vcpu_id
        mv.rflags_if = bool(run.if_flag)
        if run.cr8 != v.cr8_set:
            mv.apic.kvm_lapic_set_tpr(run.cr8)  # the guest wrote CR8 (kvm_set_cr8)
            v.cr8_set = run.cr8
        if not exited:
            return
        self._handle_exit(v)
        vm = self.vm
        vm.settle()  # the exit's effects; kicks go out through the kick handler
        nxt = vm.clock.next_expiry()
        if nxt is not None and nxt < self.timer_wake_at:
            self.timer_changed.set()  # the guest armed a timer before the loop's wake-up
        if tr is not None:
            tr.apic_state(mv.apic)

    def _mmio(self, v: VmmVcpu) -> None:
        m = v.run.u.mmio
        gpa, size, write = m.phys_addr, m.len, bool(m.is_write)
        value = int.from_bytes(bytes(m.data[:size]), "little") if write else None
        out = 0
        mv = v.model
        if mv is not None:
            apic = mv.apic
            base = apic.base_address
            if base <= gpa < base + 0x1000:
                out = self._apic_mmio(mv, gpa - base, size, value)
            elif IOAPIC_BASE <= gpa < IOAPIC_BASE + IOAPIC_LEN:
                r = self.vm.ioapic_mmio(gpa, size, value)
                out = 0 if r is None else r
        if not write:
            m.data[:size] = list(out.to_bytes(size, "little"))

    def _apic_mmio(self, mv, offset: int, size: int, value: int | None) -> int:
        """apic_mmio_read / apic_mmio_write on the model's LAPIC."""
        apic = mv.apic
        if not apic.hw_enabled or apic.x2apic:
            if not self.vm.kvm.has_quirk(KVM_X86_QUIRK_LAPIC_MMIO_HOLE):
                return 0  # -EOPNOTSUPP: nothing on the bus; the VMM reads 0
            return (1 << (8 * size)) - 1 if value is None else 0
        if value is None:
            out = apic.kvm_lapic_reg_read(offset, size)
            return 0 if out is None else out
        mv.route(apic.apic_mmio_write_reg(offset, size, value))
        return 0

    def _msr(self, v: VmmVcpu, write: bool) -> None:
        msr = v.run.u.msr
        mv = v.model
        index = msr.index
        if mv is None or not (index in (A.MSR_IA32_APICBASE, A.MSR_IA32_TSC_DEADLINE)
                              or A.APIC_BASE_MSR <= index <= A.APIC_BASE_MSR + 0xFF):
            msr.error = 1  # an access KVM itself failed: #GP, as KVM would inject
            return
        if write:
            if index == A.MSR_IA32_TSC_DEADLINE:
                self._calibrate_tsc(v, mv)
            ok = mv.kvm_set_msr_common(index, msr.data, host=False)
            msr.error = 0 if ok else 1
            if ok and index == A.MSR_IA32_APICBASE:
                v.set_msr(A.MSR_IA32_APICBASE, mv.arch.apic_base)
        else:
            val = mv.kvm_get_msr_common(index, host=False)
            if val is None:
                msr.error = 1
            else:
                msr.error = 0
                msr.data = val

