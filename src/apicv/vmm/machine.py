"""``apicv boot``: a small VMM on /dev/kvm in which the apicv model is the guest's interrupt
controller (``irqchip="model"``), or KVM's in-kernel LAPIC/IOAPIC/PIC is (``irqchip="kernel"``)
so that the same guest can be compared run for run.

With the model as irqchip the VM has no KVM_CREATE_IRQCHIP and the VMM does for the model what
KVM's ``vcpu_enter_guest()`` does for its in-kernel LAPIC: see :mod:`apicv.vmm.irqchip`.

One host thread per vCPU (ctypes releases the GIL in KVM_RUN); one lock serialises every model
call. A vCPU the model kicks (``kvm_vcpu_kick``) is taken out of KVM_RUN with
``kvm_run.immediate_exit`` and a signal (SIGUSR1), or woken from its HLT wait.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as _errno
import mmap
import os
import signal
import struct
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from ..errors import ApicvError, BootError, KvmError
from ..kvm import uapi as K
from ..kvm.sys import (
    enable_vm_cap,
    flat_segment,
    get_supported_cpuid,
    ioctl,
    ioctl_raw,
    kvm_available,
    vcpu_cpuid,
)
from ..uapi import KVM_MP_STATE_HALTED
from . import multiboot
from .devices import FwCfg, PortBus, Serial16550
from .irqchip import X2APIC_API_FLAGS, ModelIrqchipMixin

KICK_SIGNAL = signal.SIGUSR1
TSS_ADDR = 0xFFFBD000
IDENTITY_MAP_ADDR = 0xFEFFC000
GIL_SWITCH_INTERVAL = 0.0002  # seconds
WINDOW_POLL = 0.0002  # seconds a vCPU waits for an interrupt window before a kick (H6)
HYPERCALLS = (b"\x0f\x01\xc1", b"\x0f\x01\xd9")  # VMCALL, VMMCALL
STATUS_TIMEOUT = 124
STATUS_ERROR = 125
# CPUID 0x40000001 EAX: PV features that need KVM's in-kernel LAPIC (PV EOI, PV unhalt, PV
# IPIs, PV sched_yield, async PF delivered by interrupt); hidden with the model as irqchip
KVM_PV_FEATURES_NEEDING_LAPIC = (1 << 6) | (1 << 7) | (1 << 11) | (1 << 13) | (1 << 14)


@dataclass
class BootResult:
    """How a boot ended. ``status`` is the process exit status ``apicv boot`` returns: the
    isa-debug-exit status ``(code << 1) | 1``, 124 on timeout, 125 if the guest shut down or a
    vCPU failed."""

    status: int
    reason: str  # "debug-exit", "timeout", "shutdown", "error"
    exit_code: int | None = None  # the value the guest wrote to port 0xF4
    message: str = ""
    elapsed: float = 0.0
    output: bytes = b""
    exits: Counter = field(default_factory=Counter)  # exits to userspace, by reason
    injected: int = 0  # interrupts injected with KVM_INTERRUPT (model irqchip)
    nmis: int = 0  # NMIs injected with KVM_NMI (model irqchip)
    rips: dict[int, int] = field(default_factory=dict)  # vCPU id -> RIP when it stopped


class VmmVcpu:
    """One KVM vCPU, its kvm_run page and its thread's state."""

    def __init__(self, machine: Machine, vcpu_id: int, fd: int) -> None:
        self.vcpu_id = vcpu_id
        self.fd = fd
        self.run_mm = mmap.mmap(fd, machine.run_size, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE)
        probe = ctypes.c_char.from_buffer(self.run_mm)
        self.run = K.kvm_run.from_address(ctypes.addressof(probe))
        del probe
        self.run_base = ctypes.addressof(self.run)
        self.model = None  # apicv.vcpu.Vcpu (model irqchip)
        self.thread: threading.Thread | None = None
        self.tid = 0
        self.in_run = False  # between the lock release before KVM_RUN and its return
        self.waiting = False  # in HLT, or an AP waiting for INIT/SIPI
        self.wake = threading.Event()
        self.halt_if = False
        self.cr8_set = 0
        self.exits: Counter = Counter()
        self.msrs = K.kvm_msrs_1()
        self.events = K.kvm_vcpu_events()
        self.nmi_inflight = False  # an NMI given to KVM may not have been delivered yet
        self.window_since = 0.0  # when request_interrupt_window was last set

    def ioctl(self, req: int, arg=0) -> int:
        return ioctl(self.fd, req, arg)

    def set_msr(self, index: int, value: int) -> None:
        m = self.msrs
        m.nmsrs = 1
        m.entries[0].index = index
        m.entries[0].data = value
        if self.ioctl(K.KVM_SET_MSRS, m) != 1:
            raise BootError(f"vCPU {self.vcpu_id}: KVM_SET_MSRS {index:#x} refused")

    def get_msr(self, index: int) -> int:
        m = self.msrs
        m.nmsrs = 1
        m.entries[0].index = index
        if self.ioctl(K.KVM_GET_MSRS, m) != 1:
            raise BootError(f"vCPU {self.vcpu_id}: KVM_GET_MSRS {index:#x} refused")
        return m.entries[0].data

    def close(self) -> None:
        self.run = None
        self.run_mm.close()
        os.close(self.fd)


class Machine(ModelIrqchipMixin):
    """A VM ready to boot one multiboot kernel (see the module docstring)."""

    def __init__(self, kernel: str, *, smp: int = 1, memory_mb: int = 128, x2apic: bool = True,
                 tsc_deadline: bool = True, append: str = "", initrd: str | bytes | None = None,
                 irqchip: str = "model", trace: bool = False, trace_limit: int = 500_000,
                 out=None) -> None:
        if irqchip not in ("model", "kernel"):
            raise BootError(f"irqchip must be 'model' or 'kernel', not {irqchip!r}")
        if not 1 <= smp <= 255:
            raise BootError(f"--smp {smp}: 1 to 255 vCPUs")
        if not 2 <= memory_mb <= 3072:
            raise BootError(f"--memory {memory_mb}: 2 to 3072 MiB (RAM sits below the "
                            "PCI hole)")
        if trace and irqchip != "model":
            raise BootError("--trace-out records the model's trace: it needs --irqchip model")
        ok, why = kvm_available()
        if not ok:
            raise BootError(why)
        # regular files only, none larger than the guest's RAM (what could not be loaded
        # anyway): not /dev/zero, a FIFO or a directory
        image = multiboot.read_image(kernel, "kernel", memory_mb << 20)
        rd = initrd if isinstance(initrd, bytes | None) else None
        if isinstance(initrd, str):
            rd = multiboot.read_image(initrd, "initrd", memory_mb << 20)
        self.irqchip = irqchip
        self.smp = smp
        self.ram_size = memory_mb << 20
        self.x2apic = x2apic
        self.x2apic_api = X2APIC_API_FLAGS if x2apic else 0
        self.tsc_deadline = tsc_deadline
        self.out = out
        self.output = bytearray()
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.timer_changed = threading.Event()  # wakes the timer loop early
        self.timer_wake_at = 0  # model time the timer loop sleeps until
        self.polling_windows = False  # the timer loop polls vCPUs waiting for a window
        self.result: BootResult | None = None
        self.vcpus: list[VmmVcpu] = []
        self.vm = None  # the model Vm (irqchip="model")
        self.injected = 0
        self.nmis = 0
        self._fds: list[int] = []
        self._kfd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        self._fds.append(self._kfd)
        try:
            self._build(image, kernel, append, rd, trace, trace_limit)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ building the VM
    def _build(self, image, kernel, append, rd, trace, trace_limit) -> None:
        kfd = self._kfd
        self.run_size = ioctl(kfd, K.KVM_GET_VCPU_MMAP_SIZE)
        self.vm_fd = ioctl(kfd, K.KVM_CREATE_VM, 0)
        self._fds.append(self.vm_fd)
        # needed for real mode on VMX without unrestricted guest; harmless elsewhere
        ioctl_raw(self.vm_fd, K.KVM_SET_TSS_ADDR, TSS_ADDR)
        ioctl_raw(self.vm_fd, K.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(IDENTITY_MAP_ADDR))
        self.mem = mmap.mmap(-1, self.ram_size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                             prot=mmap.PROT_READ | mmap.PROT_WRITE)
        probe = ctypes.c_char.from_buffer(self.mem)
        hva = ctypes.addressof(probe)
        del probe
        region = K.kvm_userspace_memory_region(slot=0, flags=0, guest_phys_addr=0,
                                               memory_size=self.ram_size, userspace_addr=hva)
        ioctl(self.vm_fd, K.KVM_SET_USER_MEMORY_REGION, region)
        if self.irqchip == "kernel":
            ioctl(self.vm_fd, K.KVM_CREATE_IRQCHIP)
            if self.x2apic_api:
                enable_vm_cap(self.vm_fd, K.KVM_CAP_X2APIC_API, self.x2apic_api)
        else:
            self._setup_user_msrs()
        self.tsc_khz = ioctl(self.vm_fd, K.KVM_GET_TSC_KHZ)
        self.supported_cpuid = get_supported_cpuid(kfd)
        for vid in range(self.smp):
            fd = ioctl(self.vm_fd, K.KVM_CREATE_VCPU, vid)
            try:
                v = VmmVcpu(self, vid, fd)  # closes fd with the vCPU from now on
            except BaseException:
                os.close(fd)
                raise
            self.vcpus.append(v)
            self._set_cpuid(v)
        self.loaded = self._load_kernel(image, kernel, append, rd)
        self._set_entry_state(self.vcpus[0])
        self.serial, self.ports = self._make_devices()
        if self.irqchip == "model":
            self._build_model(trace, trace_limit)
        self._mask_pic()

    def _load_kernel(self, image: bytes, kernel: str, append: str, rd: bytes | None):
        """Load the kernel into guest memory (a subclass loads other formats)."""
        return multiboot.load(self.mem, self.ram_size, image, path=kernel, append=append,
                              initrd=rd)

    def _make_devices(self) -> tuple[Serial16550, PortBus]:
        serial = Serial16550(self._serial_out)
        return serial, PortBus(serial=serial, fw_cfg=FwCfg(self.smp, self.ram_size),
                               irq_line=self._irq_line, on_exit=self._debug_exit,
                               pic=self._pic_ports() if self.irqchip == "model" else None)

    def _set_cpuid(self, v: VmmVcpu) -> None:
        """KVM_SET_CPUID2: the supported CPUID with this vCPU's APIC ID and the x2APIC /
        TSC-deadline bits asked for (kvm.sys.vcpu_cpuid), plus the logical-processor count
        (1:EBX[23:16], HTT), the APIC bit, and no PV features that need KVM's LAPIC when the
        model is the irqchip."""
        buf = vcpu_cpuid(self.supported_cpuid, v.vcpu_id, x2apic=self.x2apic,
                         tsc_deadline=self.tsc_deadline)
        for i in range(buf.nent):
            e = buf.entries[i]
            if e.function == 1:
                e.ebx = (e.ebx & 0xFF00FFFF) | (self.smp & 0xFF) << 16
                e.edx |= 1 << 9  # APIC (KVM clears it at run time while APIC_BASE.EN is 0)
                if self.smp > 1:
                    e.edx |= 1 << 28  # HTT: EBX[23:16] is valid
            elif e.function == 0x40000001 and self.irqchip == "model":
                e.eax &= ~KVM_PV_FEATURES_NEEDING_LAPIC
        v.ioctl(K.KVM_SET_CPUID2, buf)
        self.cpuid_1_eax = next((e.eax for e in self.supported_cpuid if e.function == 1), 0)

    def _set_entry_state(self, v: VmmVcpu) -> None:
        """Multiboot entry: 32-bit protected mode, paging off, flat segments; EAX magic, EBX
        the MBI (KVM_GET_SREGS first so that apic_base and the rest keep KVM's values)."""
        s = K.kvm_sregs()
        v.ioctl(K.KVM_GET_SREGS, s)
        flat_segment(s.cs, 0x10, type_=0xB, db=1, long=0)
        for seg in (s.ds, s.es, s.fs, s.gs, s.ss):
            flat_segment(seg, 0x18, type_=0x3, db=1, long=0)
        s.cr0 = K.X86_CR0_PE | K.X86_CR0_ET
        s.cr3 = s.cr4 = 0
        s.efer = 0
        v.ioctl(K.KVM_SET_SREGS, s)
        r = K.kvm_regs()
        for name, val in self.loaded.registers.items():
            setattr(r, name, val)
        v.ioctl(K.KVM_SET_REGS, r)

    def _mask_pic(self) -> None:
        """Both PICs start with every line masked (IMR 0xFF): a test kernel's GSIs 0-15 go to
        the IOAPIC only, whichever irqchip."""
        for chip in (K.KVM_IRQCHIP_PIC_MASTER, K.KVM_IRQCHIP_PIC_SLAVE):
            if self.vm is not None:
                st = bytearray(self.vm.get_irqchip(chip))
                st[2] = 0xFF
                self.vm.set_irqchip(chip, bytes(st))
            else:
                c = K.kvm_irqchip(chip_id=chip)
                ioctl(self.vm_fd, K.KVM_GET_IRQCHIP, c)
                c.chip.pic.imr = 0xFF
                ioctl(self.vm_fd, K.KVM_SET_IRQCHIP, c)

    # ------------------------------------------------------------------ devices
    def _serial_out(self, data: bytes) -> None:
        self.output += data
        out = self.out
        if out is not None:
            out.write(data)
            if data == b"\n":
                out.flush()

    def _debug_exit(self, status: int) -> None:
        self._finish(BootResult(status=status, reason="debug-exit", exit_code=status >> 1,
                                message=f"isa-debug-exit: code {status >> 1}"))

    def _irq_line(self, irq: int, level: int) -> None:
        if self.vm is not None:
            self.vm.irq_line(irq, level)  # under the lock (an exit handler)
        else:
            ioctl(self.vm_fd, K.KVM_IRQ_LINE, K.kvm_irq_level(irq=irq, level=level))

    # ------------------------------------------------------------------ stopping, kicks
    def _finish(self, result: BootResult) -> None:
        if self.result is None:
            self.result = result
        self.done.set()
        self.timer_changed.set()
        for v in self.vcpus:
            self._kick(v)

    def _kick(self, v: VmmVcpu) -> None:
        if v.waiting:
            v.wake.set()
        elif v.in_run and v.tid:
            v.run.immediate_exit = 1
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pthread_kill(v.tid, KICK_SIGNAL)

    # ------------------------------------------------------------------ running
    def run(self, timeout: float | None = 60.0) -> BootResult:
        """Boot: start one thread per vCPU, keep the model's timers going, stop at the
        debug exit, a shutdown, an error or *timeout* seconds."""
        if threading.current_thread() is not threading.main_thread():
            raise BootError("boot must run in the main thread (it installs a signal handler "
                            "for vCPU kicks)")
        old = signal.signal(KICK_SIGNAL, lambda signum, frame: None)
        # the timer thread must get the GIL soon after its sleep, not after the default 5 ms
        # switch interval of a vCPU thread handling exits (a 1 kHz periodic timer would drop
        # ticks: KVM coalesces an expiry while the previous one is pending)
        old_switch = sys.getswitchinterval()
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        t_start = time.monotonic()
        body = self._vcpu_loop_model if self.irqchip == "model" else self._vcpu_loop_kernel
        try:
            self._start_threads(body)
            deadline = None if timeout is None else t_start + timeout
            self._main_loop(deadline)
            if self.result is None:
                self._finish(BootResult(status=STATUS_TIMEOUT, reason="timeout",
                                        message=f"timed out after {timeout:g} s"))
        finally:
            # on every way out (a Ctrl-C included): no vCPU thread may outlive the run, and
            # the kick signal keeps its handler until the last one is gone (its default
            # action would kill the process)
            try:
                self._stop_threads()
            finally:
                if not self._threads_alive():
                    signal.signal(KICK_SIGNAL, old)
                sys.setswitchinterval(old_switch)
        res = self.result
        res.elapsed = time.monotonic() - t_start
        res.output = bytes(self.output)
        for v in self.vcpus:
            res.exits.update(v.exits)
            r = K.kvm_regs()
            if ioctl_raw(v.fd, K.KVM_GET_REGS, r)[0] == 0:
                res.rips[v.vcpu_id] = r.rip
                if res.reason == "timeout" and self._insn_at(v, r.rip) in HYPERCALLS:
                    res.message += (f"; vCPU {v.vcpu_id} is stuck in a hypercall at "
                                    f"{r.rip:#x} (this host's KVM never returns from "
                                    "KVM_HC_SEND_IPI, H5: for kvm-unit-tests' apic.flat use "
                                    "--env TEST_DEVICE=0)")
        res.injected = self.injected
        res.nmis = self.nmis
        if self.out is not None:
            self.out.flush()
        return res

    def _insn_at(self, v: VmmVcpu, rip: int) -> bytes:
        """The 3 bytes at CS:RIP (KVM_TRANSLATE of the linear address), or b"" if not RAM."""
        s = K.kvm_sregs()
        if ioctl_raw(v.fd, K.KVM_GET_SREGS, s)[0] != 0:
            return b""
        t = K.kvm_translation(linear_address=(s.cs.base + rip) & ((1 << 64) - 1))
        if ioctl_raw(v.fd, K.KVM_TRANSLATE, t)[0] != 0 or not t.valid:
            return b""
        gpa = t.physical_address
        if gpa + 3 > self.ram_size:
            return b""
        return bytes(self.mem[gpa:gpa + 3])

    def _start_threads(self, body) -> None:
        """One thread per vCPU, started with SIGINT blocked: the threads inherit the mask, so
        a Ctrl-C always reaches the main thread, and never lands between a thread's start and
        the record that it runs."""
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            for v in self.vcpus:
                v.thread = threading.Thread(target=self._thread, args=(body, v),
                                            name=f"vcpu{v.vcpu_id}", daemon=True)
                v.thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def _threads_alive(self) -> bool:
        return any(v.thread is not None and v.thread.is_alive() for v in self.vcpus)

    def _stop_threads(self, patience: float = 10.0) -> None:
        """Stop every vCPU thread and wait until each has returned: before anything a thread
        touches (kvm_run, guest memory, the fds) may be unmapped or closed. A Ctrl-C while
        waiting does not cut the wait short; it is raised again once the threads are gone.
        A thread still alive after *patience* seconds is left running (close() then leaves
        the mappings to the process's exit rather than pull them from under it)."""
        interrupted: BaseException | None = None
        end = time.monotonic() + patience
        while self._threads_alive() and time.monotonic() < end:
            try:
                self.done.set()
                self.timer_changed.set()
                for v in self.vcpus:
                    if v.thread is not None and v.thread.is_alive():
                        self._kick(v)
                        v.thread.join(0.05)
            except KeyboardInterrupt as e:
                interrupted = e
        if interrupted is not None:
            raise interrupted

    def _main_loop(self, deadline: float | None) -> None:
        """The model's timers on real time: fire what is due, sleep until the next expiry."""
        vm = self.vm
        while not self.done.is_set():
            wait = 0.05
            if vm is not None:
                with self.lock:
                    clock = vm.clock
                    clock.sync()
                    vm.deliver_kicks()
                    nxt = clock.next_expiry()
                    if nxt is not None:
                        wait = min(wait, max(0.0, (nxt - clock.now) / 1e9))
                    if self._poll_windows():
                        wait = min(wait, WINDOW_POLL)
                    # a vCPU arming an earlier timer meanwhile wakes this loop (_after_exit)
                    self.timer_wake_at = clock.now + int(wait * 1e9)
                    self.timer_changed.clear()
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                wait = min(wait, left)
            if wait > 0:
                self.timer_changed.wait(wait)

    def _poll_windows(self) -> bool:
        """H6: this host's KVM may notice an open interrupt window only at the guest's next
        exit, so a guest spinning with IF=1 (``while (!flag) pause();``) may never see an
        interrupt the VMM could not inject when it asked for the window. A vCPU that has
        waited WINDOW_POLL in KVM_RUN with ``request_interrupt_window`` set is kicked out to
        try again. Returns whether any vCPU is waiting for a window."""
        now = time.monotonic()
        waiting = False
        for v in self.vcpus:
            if v.in_run and v.run.request_interrupt_window:
                waiting = True
                if now - v.window_since >= WINDOW_POLL:
                    self._kick(v)
        self.polling_windows = waiting
        return waiting

    def _thread(self, body, v: VmmVcpu) -> None:
        v.tid = threading.get_ident()
        try:
            body(v)
        except ApicvError as e:
            self._finish(BootResult(status=STATUS_ERROR, reason="error",
                                    message=f"vCPU {v.vcpu_id}: {e}"))
        except Exception as e:  # a bug: report it as the run's outcome, with its type
            self._finish(BootResult(status=STATUS_ERROR, reason="error",
                                    message=f"vCPU {v.vcpu_id}: {type(e).__name__}: {e}"))

    def _kvm_run(self, v: VmmVcpu) -> bool:
        """KVM_RUN; False if it was interrupted (EINTR/EAGAIN) rather than an exit."""
        r, e = ioctl_raw(v.fd, K.KVM_RUN)
        if r < 0:
            if e in (_errno.EINTR, _errno.EAGAIN):
                return False
            raise KvmError(e, "KVM_RUN")
        return True

    # -- the kernel irqchip: KVM does everything but the devices --
    def _vcpu_loop_kernel(self, v: VmmVcpu) -> None:
        v.in_run = True  # a stop kicks it out of KVM_RUN (an AP blocks there until SIPI)
        while not self.done.is_set():
            if self._kvm_run(v):
                v.run.immediate_exit = 0
                with self.lock:  # the devices are shared by the vCPU threads
                    self._handle_exit(v)
            else:
                v.run.immediate_exit = 0

    # ------------------------------------------------------------------ exits
    def _handle_exit(self, v: VmmVcpu) -> None:
        run = v.run
        reason = run.exit_reason
        v.exits[K.EXIT_REASON_NAMES.get(reason, str(reason))] += 1
        if reason == K.KVM_EXIT_IO:
            self._pio(v)
        elif reason == K.KVM_EXIT_MMIO:
            self._mmio(v)
        elif reason in (K.KVM_EXIT_X86_RDMSR, K.KVM_EXIT_X86_WRMSR):
            self._msr(v, reason == K.KVM_EXIT_X86_WRMSR)
        elif reason == K.KVM_EXIT_HLT:
            v.halt_if = bool(run.if_flag)
            if v.model is not None:
                v.model.kvm_set_mp_state(KVM_MP_STATE_HALTED)  # __kvm_emulate_halt
        elif reason in (K.KVM_EXIT_IRQ_WINDOW_OPEN, K.KVM_EXIT_SET_TPR, K.KVM_EXIT_INTR,
                        K.KVM_EXIT_DEBUG):
            pass
        elif reason == K.KVM_EXIT_SHUTDOWN:
            self._finish(BootResult(status=STATUS_ERROR, reason="shutdown",
                                    message=f"vCPU {v.vcpu_id}: shutdown (triple fault)"))
        elif reason == K.KVM_EXIT_SYSTEM_EVENT:
            self._finish(BootResult(status=STATUS_ERROR, reason="shutdown",
                                    message=f"vCPU {v.vcpu_id}: system event "
                                            f"{run.u.system_event.type}"))
        else:
            detail = ""
            if reason == K.KVM_EXIT_INTERNAL_ERROR:
                detail = f" suberror {run.u.internal.suberror}"
            elif reason == K.KVM_EXIT_FAIL_ENTRY:
                detail = f" hardware reason {run.u.fail_entry.hardware_entry_failure_reason:#x}"
            r = K.kvm_regs()
            ioctl_raw(v.fd, K.KVM_GET_REGS, r)
            name = K.EXIT_REASON_NAMES.get(reason, str(reason))
            self._finish(BootResult(status=STATUS_ERROR, reason="error",
                                    message=f"vCPU {v.vcpu_id}: {name}{detail} at RIP "
                                            f"{r.rip:#x}"))

    def _pio(self, v: VmmVcpu) -> None:
        io = v.run.u.io
        size, port, count = io.size, io.port, io.count
        addr = v.run_base + io.data_offset
        buf = (ctypes.c_char * (size * count)).from_address(addr)
        ports = self.ports
        fmt = {1: "<B", 2: "<H", 4: "<I"}[size]
        for i in range(count):
            if io.direction == K.KVM_EXIT_IO_OUT:
                ports.write(port, size, struct.unpack_from(fmt, buf, i * size)[0])
            else:
                struct.pack_into(fmt, buf, i * size, ports.read(port, size))

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Stop and join the vCPU threads, then unmap kvm_run pages and guest memory and close
        every fd. Safe to call twice and after a failed construction."""
        self._stop_threads()
        if self._threads_alive():  # stuck (never seen): leave everything to process exit
            return
        for v in self.vcpus:
            with contextlib.suppress(OSError, BufferError):
                v.close()
        self.vcpus = []
        mem = getattr(self, "mem", None)
        if mem is not None:
            mem.close()
            self.mem = None
        for fd in reversed(self._fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []


def boot(kernel: str, *, smp: int = 1, memory_mb: int = 128, x2apic: bool = True,
         tsc_deadline: bool = True, append: str = "", initrd: str | bytes | None = None,
         timeout: float | None = 60.0, irqchip: str = "model", trace_out: str | None = None,
         out=None) -> BootResult:
    """Boot *kernel* and return how it ended (see :class:`Machine` and :class:`BootResult`).
    *out* is a binary stream for the guest's serial output (``sys.stdout.buffer`` in the CLI).
    """
    from .linuxboot import machine_class

    m = machine_class(kernel)(kernel, smp=smp, memory_mb=memory_mb, x2apic=x2apic,
                                 tsc_deadline=tsc_deadline, append=append, initrd=initrd,
                                 irqchip=irqchip, trace=trace_out is not None, out=out)
    try:
        res = m.run(timeout)
        if trace_out is not None and m.vm is not None and m.vm.trace is not None:
            m.vm.trace.write_chrome_trace(trace_out, [v.vcpu_id for v in m.vm.vcpus])
        return res
    finally:
        m.close()


__all__ = ["BootError", "BootResult", "Machine", "boot", "STATUS_TIMEOUT", "STATUS_ERROR"]
