"""``apicv boot``: a small VMM on /dev/kvm in which the apicv model is the guest's interrupt
controller (``irqchip="model"``), or KVM's in-kernel LAPIC/IOAPIC/PIC is (``irqchip="kernel"``)
so that the same guest can be compared run for run.

With the model as irqchip the VM has no KVM_CREATE_IRQCHIP, and the VMM does for the model what
KVM's ``vcpu_enter_guest()`` does for its in-kernel LAPIC:

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
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from .. import apicdef as A
from ..errors import ApicvError, KvmError
from ..kvm import uapi as K
from ..kvm.vm import _ioctl, _ioctl_raw, kvm_available
from ..kvm_host import KVM_APIC_INIT, KVM_REQ_EVENT, KVM_REQ_NMI
from ..uapi import (
    KVM_MP_STATE_HALTED,
    KVM_MP_STATE_INIT_RECEIVED,
    KVM_MP_STATE_RUNNABLE,
    KVM_MP_STATE_UNINITIALIZED,
    KVM_X86_QUIRK_LAPIC_MMIO_HOLE,
)
from . import multiboot
from .devices import FwCfg, PortBus, Serial16550

KICK_SIGNAL = signal.SIGUSR1
TSS_ADDR = 0xFFFBD000
IDENTITY_MAP_ADDR = 0xFEFFC000
X2APIC_API_FLAGS = 3  # KVM_X2APIC_API_USE_32BIT_IDS | KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK
STATUS_TIMEOUT = 124
STATUS_ERROR = 125
IOAPIC_BASE = 0xFEC00000
IOAPIC_LEN = 0x100
MSR_IA32_TSC = 0x10
# CPUID 0x40000001 EAX: PV features that need KVM's in-kernel LAPIC (PV EOI, PV unhalt, PV
# IPIs, PV sched_yield, async PF delivered by interrupt); hidden with the model as irqchip
KVM_PV_FEATURES_NEEDING_LAPIC = (1 << 6) | (1 << 7) | (1 << 11) | (1 << 13) | (1 << 14)
_MAX_BOOT_MS = 1 << 40


class BootError(ApicvError):
    """The VM could not be built or run (the message says which step and why)."""


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


class _Vcpu:
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

    def ioctl(self, req: int, arg=0) -> int:
        return _ioctl(self.fd, req, arg)

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


def _seg(seg: K.kvm_segment, *, base: int, limit: int, selector: int, type_: int, s: int = 1,
         db: int = 0, g: int = 0) -> None:
    seg.base, seg.limit, seg.selector, seg.type = base, limit, selector, type_
    seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g, seg.avl, seg.unusable = (
        1, 0, db, s, 0, g, 0, 0)


class Machine:
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
        try:
            with open(kernel, "rb") as f:
                image = f.read()
            rd = initrd if isinstance(initrd, bytes | None) else None
            if isinstance(initrd, str):
                with open(initrd, "rb") as f:
                    rd = f.read()
        except OSError as e:
            raise BootError(f"{e.filename}: {e.strerror}") from None
        self.irqchip = irqchip
        self.smp = smp
        self.ram_size = memory_mb << 20
        self.x2apic = x2apic
        self.tsc_deadline = tsc_deadline
        self.out = out
        self.output = bytearray()
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.result: BootResult | None = None
        self.vcpus: list[_Vcpu] = []
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
        self.run_size = _ioctl(kfd, K.KVM_GET_VCPU_MMAP_SIZE)
        self.vm_fd = _ioctl(kfd, K.KVM_CREATE_VM, 0)
        self._fds.append(self.vm_fd)
        # needed for real mode on VMX without unrestricted guest; harmless elsewhere
        _ioctl_raw(self.vm_fd, K.KVM_SET_TSS_ADDR, TSS_ADDR)
        _ioctl_raw(self.vm_fd, K.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(IDENTITY_MAP_ADDR))
        self.mem = mmap.mmap(-1, self.ram_size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                             prot=mmap.PROT_READ | mmap.PROT_WRITE)
        probe = ctypes.c_char.from_buffer(self.mem)
        hva = ctypes.addressof(probe)
        del probe
        region = K.kvm_userspace_memory_region(slot=0, flags=0, guest_phys_addr=0,
                                               memory_size=self.ram_size, userspace_addr=hva)
        _ioctl(self.vm_fd, K.KVM_SET_USER_MEMORY_REGION, region)
        if self.irqchip == "kernel":
            _ioctl(self.vm_fd, K.KVM_CREATE_IRQCHIP)
            self._enable_cap(K.KVM_CAP_X2APIC_API, X2APIC_API_FLAGS)
        else:
            self._setup_user_msrs()
        self.tsc_khz = _ioctl(self.vm_fd, K.KVM_GET_TSC_KHZ)
        self.supported_cpuid = self._supported_cpuid()
        for vid in range(self.smp):
            fd = _ioctl(self.vm_fd, K.KVM_CREATE_VCPU, vid)
            self._fds.append(fd)
            v = _Vcpu(self, vid, fd)
            self.vcpus.append(v)
            self._set_cpuid(v)
        self.loaded = multiboot.load(self.mem, self.ram_size, image, path=kernel,
                                     append=append, initrd=rd)
        self._set_entry_state(self.vcpus[0])
        self.serial = Serial16550(self._serial_out)
        self.ports = PortBus(serial=self.serial, fw_cfg=FwCfg(self.smp, self.ram_size),
                             irq_line=self._irq_line, on_exit=self._debug_exit,
                             pic=self._pic_ports() if self.irqchip == "model" else None)
        if self.irqchip == "model":
            self._build_model(trace, trace_limit)
        self._mask_pic()

    def _enable_cap(self, cap: int, *args: int) -> None:
        c = K.kvm_enable_cap(cap=cap)
        for i, a in enumerate(args):
            c.args[i] = a
        _ioctl(self.vm_fd, K.KVM_ENABLE_CAP, c)

    def _setup_user_msrs(self) -> None:
        """KVM_CAP_X86_USER_SPACE_MSR (filtered and failed accesses exit) and a filter denying
        IA32_APIC_BASE and IA32_TSC_DEADLINE."""
        if _ioctl(self._kfd, K.KVM_CHECK_EXTENSION, K.KVM_CAP_X86_USER_SPACE_MSR) <= 0:
            raise BootError("this KVM lacks KVM_CAP_X86_USER_SPACE_MSR: x2APIC MSRs cannot "
                            "reach a userspace irqchip")
        self._enable_cap(K.KVM_CAP_X86_USER_SPACE_MSR,
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
        _ioctl(self.vm_fd, K.KVM_X86_SET_MSR_FILTER, flt)

    def _supported_cpuid(self) -> list:
        n = 256
        while True:
            buf = K.kvm_cpuid2_with(n)()
            buf.nent = n
            r, e = _ioctl_raw(self._kfd, K.KVM_GET_SUPPORTED_CPUID, buf)
            if r >= 0:
                return [K.kvm_cpuid_entry2.from_buffer_copy(buf.entries[i])
                        for i in range(buf.nent)]
            if e != _errno.E2BIG or n >= 4096:
                raise KvmError(e, "KVM_GET_SUPPORTED_CPUID")
            n *= 2

    def _set_cpuid(self, v: _Vcpu) -> None:
        """KVM_SET_CPUID2: the supported CPUID with this vCPU's APIC ID (leaf 1 EBX[31:24],
        leaves 0xB/0x1F EDX), x2APIC (1:ECX[21]) and TSC-deadline (1:ECX[24]) as asked."""
        ents = self.supported_cpuid
        buf = K.kvm_cpuid2_with(len(ents))()
        buf.nent = len(ents)
        for i, src in enumerate(ents):
            e = K.kvm_cpuid_entry2.from_buffer_copy(src)
            if e.function == 1:
                e.ebx = (e.ebx & 0x0000FFFF) | (self.smp & 0xFF) << 16 | (v.vcpu_id & 0xFF) << 24
                e.ecx = (e.ecx & ~(1 << 21)) | (bool(self.x2apic) << 21)
                e.ecx = (e.ecx & ~(1 << 24)) | (bool(self.tsc_deadline) << 24)
                e.edx |= 1 << 9  # APIC (KVM clears it at run time while APIC_BASE.EN is 0)
                if self.smp > 1:
                    e.edx |= 1 << 28  # HTT: EBX[23:16] is valid
            elif e.function in (0xB, 0x1F):
                e.edx = v.vcpu_id
            elif e.function == 0x40000001 and self.irqchip == "model":
                e.eax &= ~KVM_PV_FEATURES_NEEDING_LAPIC
            buf.entries[i] = e
        v.ioctl(K.KVM_SET_CPUID2, buf)
        self.cpuid_1_eax = next((e.eax for e in ents if e.function == 1), 0)

    def _set_entry_state(self, v: _Vcpu) -> None:
        """Multiboot entry: 32-bit protected mode, paging off, flat segments; EAX magic, EBX
        the MBI (KVM_GET_SREGS first so that apic_base and the rest keep KVM's values)."""
        s = K.kvm_sregs()
        v.ioctl(K.KVM_GET_SREGS, s)
        _seg(s.cs, base=0, limit=0xFFFFFFFF, selector=0x10, type_=0xB, db=1, g=1)
        for seg in (s.ds, s.es, s.fs, s.gs, s.ss):
            _seg(seg, base=0, limit=0xFFFFFFFF, selector=0x18, type_=0x3, db=1, g=1)
        s.cr0 = K.X86_CR0_PE | K.X86_CR0_ET
        s.cr3 = s.cr4 = 0
        s.efer = 0
        v.ioctl(K.KVM_SET_SREGS, s)
        r = K.kvm_regs()
        for name, val in self.loaded.registers.items():
            setattr(r, name, val)
        v.ioctl(K.KVM_SET_REGS, r)

    def _build_model(self, trace: bool, trace_limit: int) -> None:
        from ..vm import Vm

        vmm = self

        class _VmmVm(Vm):
            """The model Vm whose kicks reach the VMM's vCPU threads."""

            def _service_kicks(self) -> None:
                vmm._drain_kicks()

        self.vm = vm = _VmmVm(self.smp, X2APIC_API_FLAGS, enable_apicv=False,
                              lapic_timer_advance=False, x2apic_cpuid=self.x2apic,
                              tsc_deadline_cpuid=self.tsc_deadline, tsc_khz=self.tsc_khz,
                              smm=False, maxphyaddr=self._maxphyaddr())
        if trace:
            vm.enable_tracing(limit=trace_limit)
        t0 = time.monotonic_ns()
        vm.clock.follow(lambda: time.monotonic_ns() - t0)
        for v, mv in zip(self.vcpus, vm.vcpus, strict=True):
            v.model = mv
            # KVM's vcpu->arch.apic_base = the model's: CPUID.1:EDX.APIC follows it
            v.set_msr(A.MSR_IA32_APICBASE, mv.arch.apic_base)
            # the model's guest TSC = the real one, never ahead of it (timers fire late, not
            # early): offset = TSC read - khz * (time after the read)
            tsc = v.get_msr(MSR_IA32_TSC)
            now = time.monotonic_ns() - t0
            mv.arch.tsc_offset = (tsc - now * self.tsc_khz // 1_000_000) & ((1 << 64) - 1)

    def _maxphyaddr(self) -> int:
        for e in self.supported_cpuid:
            if e.function == 0x80000008:
                return e.eax & 0xFF
        return 36

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
                _ioctl(self.vm_fd, K.KVM_GET_IRQCHIP, c)
                c.chip.pic.imr = 0xFF
                _ioctl(self.vm_fd, K.KVM_SET_IRQCHIP, c)

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
            _ioctl(self.vm_fd, K.KVM_IRQ_LINE, K.kvm_irq_level(irq=irq, level=level))

    def _pic_ports(self):
        def read(port: int) -> int:
            out = self.vm.pic.picdev_read(port)
            self.vm._pic_unlock()
            return out

        def write(port: int, value: int) -> None:
            vm = self.vm
            pic = vm.pic
            pic.accept_pic_intr = any(mv.apic.kvm_apic_accept_pic_intr() for mv in vm.vcpus)
            pic.picdev_write(port, value)
            vm._pic_unlock()

        return read, write

    # ------------------------------------------------------------------ stopping, kicks
    def _finish(self, result: BootResult) -> None:
        if self.result is None:
            self.result = result
        self.done.set()
        for v in self.vcpus:
            self._kick(v)

    def _kick(self, v: _Vcpu) -> None:
        if v.waiting:
            v.wake.set()
        elif v.in_run and v.tid:
            v.run.immediate_exit = 1
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pthread_kill(v.tid, KICK_SIGNAL)

    def _drain_kicks(self) -> None:
        """The model's kvm_vcpu_kick()s since the last call: wake or signal those vCPUs."""
        kicked = self.vm.kvm.kicked
        while kicked:
            arch = kicked.pop()
            self._kick(self.vcpus[arch.vcpu_idx])

    # ------------------------------------------------------------------ running
    def run(self, timeout: float | None = 60.0) -> BootResult:
        """Boot: start one thread per vCPU, keep the model's timers going, stop at the
        debug exit, a shutdown, an error or *timeout* seconds."""
        if threading.current_thread() is not threading.main_thread():
            raise BootError("boot must run in the main thread (it installs a signal handler "
                            "for vCPU kicks)")
        old = signal.signal(KICK_SIGNAL, lambda signum, frame: None)
        t_start = time.monotonic()
        body = self._vcpu_loop_model if self.irqchip == "model" else self._vcpu_loop_kernel
        try:
            for v in self.vcpus:
                v.thread = threading.Thread(target=self._thread, args=(body, v),
                                            name=f"vcpu{v.vcpu_id}", daemon=True)
                v.thread.start()
            deadline = None if timeout is None else t_start + timeout
            self._main_loop(deadline)
            if self.result is None:
                self._finish(BootResult(status=STATUS_TIMEOUT, reason="timeout",
                                        message=f"timed out after {timeout:g} s"))
            for v in self.vcpus:
                while v.thread.is_alive():
                    self._kick(v)
                    v.thread.join(0.05)
        finally:
            signal.signal(KICK_SIGNAL, old)
        res = self.result
        res.elapsed = time.monotonic() - t_start
        res.output = bytes(self.output)
        for v in self.vcpus:
            res.exits.update(v.exits)
            r = K.kvm_regs()
            if _ioctl_raw(v.fd, K.KVM_GET_REGS, r)[0] == 0:
                res.rips[v.vcpu_id] = r.rip
        res.injected = self.injected
        res.nmis = self.nmis
        if self.out is not None:
            self.out.flush()
        return res

    def _main_loop(self, deadline: float | None) -> None:
        """The model's timers on real time: fire what is due, sleep until the next expiry."""
        vm = self.vm
        while not self.done.is_set():
            wait = 0.05
            if vm is not None:
                with self.lock:
                    clock = vm.clock
                    clock.sync()
                    self._drain_kicks()
                    nxt = clock.next_expiry()
                    if nxt is not None:
                        wait = min(wait, max(0.0, (nxt - clock.now) / 1e9))
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                wait = min(wait, left)
            if wait > 0:
                self.done.wait(wait)

    def _thread(self, body, v: _Vcpu) -> None:
        v.tid = threading.get_ident()
        try:
            body(v)
        except ApicvError as e:
            self._finish(BootResult(status=STATUS_ERROR, reason="error",
                                    message=f"vCPU {v.vcpu_id}: {e}"))
        except Exception as e:  # a bug: report it as the run's outcome, with its type
            self._finish(BootResult(status=STATUS_ERROR, reason="error",
                                    message=f"vCPU {v.vcpu_id}: {type(e).__name__}: {e}"))

    def _kvm_run(self, v: _Vcpu) -> bool:
        """KVM_RUN; False if it was interrupted (EINTR/EAGAIN) rather than an exit."""
        r, e = _ioctl_raw(v.fd, K.KVM_RUN)
        if r < 0:
            if e in (_errno.EINTR, _errno.EAGAIN):
                return False
            raise KvmError(e, "KVM_RUN")
        return True

    # -- the kernel irqchip: KVM does everything but the devices --
    def _vcpu_loop_kernel(self, v: _Vcpu) -> None:
        v.in_run = True  # a stop kicks it out of KVM_RUN (an AP blocks there until SIPI)
        while not self.done.is_set():
            if self._kvm_run(v):
                v.run.immediate_exit = 0
                self._handle_exit(v)
            else:
                v.run.immediate_exit = 0

    # -- the model as irqchip --
    def _vcpu_loop_model(self, v: _Vcpu) -> None:
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
                if ok and not self.done.is_set():
                    self._after_exit(v, mv)

    def _before_entry(self, v: _Vcpu, mv) -> bool:
        """vcpu_run / vcpu_enter_guest for the model: timers, requests, NMIs, INIT/SIPI,
        HLT wake-up and interrupt injection. False if the vCPU has to wait."""
        vm = self.vm
        arch = mv.arch
        run = v.run
        tr = vm.trace
        if tr is not None:
            tr.context = v.vcpu_id
        mv._exit_in_kernel()  # clock, KVM_REQ_UNBLOCK, a pending timer expiry into IRR
        nmis = arch.nmi_queued
        if nmis:
            # the accepted NMIs go to KVM, which keeps NMI blocking and windows itself
            arch.nmi_queued = 0
            arch.requests &= ~KVM_REQ_NMI
        mv._process_requests()
        init = 1 << KVM_APIC_INIT
        had_init = bool(mv.apic.pending_events & init)
        mv.kvm_apic_accept_events()
        state = arch.mp_state
        if had_init and not mv.apic.pending_events & init and state == KVM_MP_STATE_RUNNABLE:
            self._reset_vcpu(v, 0xF000, 0xFFFF0000, 0xFFF0)  # INIT of the BSP: reset vector
        if state in (KVM_MP_STATE_UNINITIALIZED, KVM_MP_STATE_INIT_RECEIVED):
            return False
        if mv.sipi is not None:
            sel, base, rip = mv.sipi
            mv.sipi = None
            self._reset_vcpu(v, sel, base, rip)
            nmis = 0  # INIT discarded them
        for _ in range(nmis):
            v.ioctl(K.KVM_NMI)
            self.nmis += 1
            v.nmi_inflight = True
        if state == KVM_MP_STATE_HALTED:
            mv.rflags_if = v.halt_if
            if not (nmis or mv.kvm_vcpu_has_events()):
                return False
            mv._set_mp_state(KVM_MP_STATE_RUNNABLE)
        arch.requests &= ~KVM_REQ_EVENT
        # kvm_check_and_inject_events() for a userspace-injected interrupt
        if mv.kvm_cpu_has_injectable_intr():
            if run.ready_for_interrupt_injection and run.if_flag and not self._nmi_first(v):
                vec = mv.kvm_cpu_get_interrupt()
                if vec != -1:
                    if tr is not None:
                        tr.kvm_inj_virq(vec)
                    v.ioctl(K.KVM_INTERRUPT, K.kvm_interrupt(irq=vec))
                    self.injected += 1
                    run.ready_for_interrupt_injection = 0
            run.request_interrupt_window = int(mv.kvm_cpu_has_injectable_intr())
        else:
            run.request_interrupt_window = 0
        cr8 = mv.apic.kvm_lapic_get_cr8()
        run.cr8 = cr8
        v.cr8_set = cr8
        vm._after_lapic_change()
        self._drain_kicks()
        return True

    def _nmi_first(self, v: _Vcpu) -> bool:
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

    def _reset_vcpu(self, v: _Vcpu, selector: int, base: int, rip: int) -> None:
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

    def _after_exit(self, v: _Vcpu, mv) -> None:
        run = v.run
        tr = self.vm.trace
        if tr is not None:
            tr.context = v.vcpu_id
        mv.rflags_if = bool(run.if_flag)
        if run.cr8 != v.cr8_set:
            mv.apic.kvm_lapic_set_tpr(run.cr8)  # the guest wrote CR8 (kvm_set_cr8)
        self._handle_exit(v)
        self.vm._after_lapic_change()
        if tr is not None:
            tr.apic_state(mv.apic)
        self._drain_kicks()

    # ------------------------------------------------------------------ exits
    def _handle_exit(self, v: _Vcpu) -> None:
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
                v.model._set_mp_state(KVM_MP_STATE_HALTED)  # __kvm_emulate_halt
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
            _ioctl_raw(v.fd, K.KVM_GET_REGS, r)
            name = K.EXIT_REASON_NAMES.get(reason, str(reason))
            self._finish(BootResult(status=STATUS_ERROR, reason="error",
                                    message=f"vCPU {v.vcpu_id}: {name}{detail} at RIP "
                                            f"{r.rip:#x}"))

    def _pio(self, v: _Vcpu) -> None:
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

    def _mmio(self, v: _Vcpu) -> None:
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
        mv._route(apic.apic_mmio_write_reg(offset, size, value))
        return 0

    def _msr(self, v: _Vcpu, write: bool) -> None:
        msr = v.run.u.msr
        mv = v.model
        index = msr.index
        if mv is None or not (index in (A.MSR_IA32_APICBASE, A.MSR_IA32_TSC_DEADLINE)
                              or A.APIC_BASE_MSR <= index <= A.APIC_BASE_MSR + 0xFF):
            msr.error = 1  # an access KVM itself failed: #GP, as KVM would inject
            return
        if write:
            ok = mv._write_msr(index, msr.data, host=False)
            msr.error = 0 if ok else 1
            if ok and index == A.MSR_IA32_APICBASE:
                v.set_msr(A.MSR_IA32_APICBASE, mv.arch.apic_base)
        else:
            val = mv._read_msr(index, host=False)
            if val is None:
                msr.error = 1
            else:
                msr.error = 0
                msr.data = val

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        for v in self.vcpus:
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
    m = Machine(kernel, smp=smp, memory_mb=memory_mb, x2apic=x2apic,
                tsc_deadline=tsc_deadline, append=append, initrd=initrd, irqchip=irqchip,
                trace=trace_out is not None, out=out)
    try:
        res = m.run(timeout)
        if trace_out is not None and m.vm is not None and m.vm.trace is not None:
            m.vm.trace.write_chrome_trace(trace_out, [v.vcpu_id for v in m.vm.vcpus])
        return res
    finally:
        m.close()


__all__ = ["BootError", "BootResult", "Machine", "boot", "STATUS_TIMEOUT", "STATUS_ERROR"]
