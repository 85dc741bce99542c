"""``apicv boot`` for Linux: the :class:`~apicv.vmm.machine.Machine` with the x86 boot protocol
(:mod:`apicv.vmm.linux`), the MP table, the devices a firmware-less Linux probes
(:class:`~apicv.vmm.devices.Uart16550` on IRQ 4, CMOS/RTC, the i8042's reset line) and the
fix-ups this host's KVM leaves to a VMM running an unmodified Linux (:mod:`apicv.vmm.hostfix`).

How a Linux run ends: ``reboot=k`` (the default command line has it) makes the kernel's
``reboot -f`` pulse the i8042 reset line, which ends the run with status 0 ("guest reset");
with the model as irqchip, every vCPU halted with interrupts off and nothing pending
(``poweroff -f``) ends it with status 0 too ("all vCPUs halted"); either is status 125 after
a "Kernel panic" line on the console (``panic=-1`` resets, ``panic=0`` halts); a triple
fault (``reboot=t``) is status 125, as for any kernel.
"""

from __future__ import annotations

import os
import stat
import time

from ..kvm import uapi as K
from ..kvm.sys import flat_segment
from ..uapi import KVM_MP_STATE_HALTED
from . import linux
from .devices import Cmos, FwCfg, LinuxPortBus, Uart16550
from .hostfix import HostFixups
from .machine import STATUS_ERROR, BootResult, Machine, VmmVcpu

SERIAL_IRQ = 4
TRACE_LIMIT = 100_000  # model trace events --trace-out keeps of a Linux boot
X86_CR0_PE, X86_CR0_ET, X86_CR0_NE, X86_CR0_PG = 1, 1 << 4, 1 << 5, 1 << 31
X86_CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
# host difference: XSAVE/XRSTOR in the guest kernel end in KVM_EXIT_INTERNAL_ERROR here, and
# the guest sees XSAVE whatever KVM_SET_CPUID2 says: Linux is told not to use it
PANIC = b"Kernel panic - not syncing"
HOST_APPEND = "noxsave clearcpuid=151,308,141"
DEFAULT_APPEND = "console=ttyS0 reboot=k panic=-1"


def host_cmdline(append: str) -> str:
    """*append* with HOST_APPEND: its ``clearcpuid=`` lists merged into one (Linux takes the
    last ``clearcpuid=`` only)."""
    words = append.split()
    host = HOST_APPEND.split()
    bits = [w.split("=", 1)[1] for w in words + host if w.startswith("clearcpuid=")]
    rest = [w for w in words + host if not w.startswith("clearcpuid=")]
    merged = ",".join(dict.fromkeys(b for lst in bits for b in lst.split(",") if b))
    return " ".join(rest + ([f"clearcpuid={merged}"] if merged else []))


def machine_class(path: str) -> type[Machine]:
    """:class:`LinuxMachine` for a bzImage or a vmlinux, :class:`Machine` otherwise (which
    also says why a path that is no regular file cannot be booted -- never opened here, so a
    FIFO does not block)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return Machine
        with open(path, "rb") as f:
            head = f.read(16384)
    except OSError:
        return Machine  # Machine says why it cannot be read
    return LinuxMachine if linux.kind(head) is not None else Machine


class LinuxMachine(Machine):
    """A VM booting a Linux kernel (see the module docstring)."""

    def __init__(self, kernel: str, **kw) -> None:
        kw.setdefault("trace_limit", TRACE_LIMIT)
        super().__init__(kernel, **kw)

    def _load_kernel(self, image: bytes, kernel: str, append: str, rd: bytes | None):
        self.fixups = HostFixups(self)
        self.halted_for_good_since = 0.0
        self.stopped_trace = None
        cmdline = host_cmdline(append or DEFAULT_APPEND)
        return linux.load(self.mem, self.ram_size, image, append=cmdline, initrd=rd,
                          nr_cpus=self.smp, cpu_signature=self.cpuid_1_eax)

    def _make_devices(self):
        serial = Uart16550(self._serial_out,
                           lambda level: self._irq_line(SERIAL_IRQ, level))
        ports = LinuxPortBus(serial=serial, fw_cfg=FwCfg(self.smp, self.ram_size),
                             irq_line=self._irq_line, on_exit=self._debug_exit,
                             pic=self._pic_ports() if self.irqchip == "model" else None,
                             cmos=Cmos(time.time), on_reset=self._guest_reset)
        return serial, ports

    def _set_entry_state(self, v: VmmVcpu) -> None:
        """The 64-bit boot protocol's entry: long mode, the loader's identity map and GDT,
        __BOOT_CS/__BOOT_DS, RSI = the zero page, interrupts off."""
        s = K.kvm_sregs()
        v.ioctl(K.KVM_GET_SREGS, s)
        flat_segment(s.cs, linux.BOOT_CS, type_=0xB, db=0, long=1)
        for seg in (s.ds, s.es, s.fs, s.gs, s.ss):
            flat_segment(seg, linux.BOOT_DS, type_=0x3, db=1, long=0)
        s.gdt.base, s.gdt.limit = linux.GDT_GPA, 4 * 8 - 1
        s.idt.base, s.idt.limit = 0, 0
        s.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG
        s.cr3 = linux.PML4_GPA
        s.cr4 = X86_CR4_PAE
        s.efer = EFER_LME | EFER_LMA
        v.ioctl(K.KVM_SET_SREGS, s)
        r = K.kvm_regs()
        for name, val in self.loaded.registers.items():
            setattr(r, name, val)
        v.ioctl(K.KVM_SET_REGS, r)

    def _guest_reset(self) -> None:
        self._end("reset", "the guest reset the machine (i8042 reset line)")

    def _end(self, reason: str, message: str) -> None:
        """A clean end (status 0), unless the kernel panicked (125, with its line)."""
        i = self.output.find(PANIC)
        if i >= 0:
            end = self.output.find(b"\n", i)
            line = bytes(self.output[i:end if end > 0 else None]).decode(errors="replace")
            self._finish(BootResult(status=STATUS_ERROR, reason="panic",
                                    message=f"{message}, after: {line.strip()}"))
        else:
            self._finish(BootResult(status=0, reason=reason, message=message))

    def _handle_exit(self, v: VmmVcpu) -> None:
        fx = self.fixups
        if fx.pf_hook is None:
            fx.exits_unhooked += 1
            if fx.exits_unhooked % 32 == 0:
                fx.hook_page_faults(v)
        if v.run.exit_reason == K.KVM_EXIT_INTERNAL_ERROR and self.fixups.handle(v):
            return
        super()._handle_exit(v)

    def _poll_windows(self) -> bool:
        """Also (main loop, model irqchip, lock held): the end of a run in which every vCPU
        halted with IF=0 and nothing can wake it (an NMI or INIT would): a poweroff."""
        waiting = super()._poll_windows()
        vcpus = self.vcpus
        if all(v.waiting and not v.halt_if and v.model is not None
               and v.model.arch.mp_state == KVM_MP_STATE_HALTED
               and not v.model.kvm_vcpu_has_events() for v in vcpus):
            now = time.monotonic()
            if not self.halted_for_good_since:
                self.halted_for_good_since = now
            elif now - self.halted_for_good_since > 0.5:
                self._end("halted", "all vCPUs halted with interrupts off")
        else:
            self.halted_for_good_since = 0.0
        return waiting

    def _after_exit(self, v: VmmVcpu, mv, exited: bool = True) -> None:
        super()._after_exit(v, mv, exited)
        tr = self.vm.trace
        if tr is not None and tr.dropped:
            self._stop_tracing(tr)

    def _stop_tracing(self, tr) -> None:
        """--trace-out on Linux: the trace keeps the boot's first TRACE_LIMIT events (the SMP
        bring-up, the first timer interrupts and IPIs) and then stops, timeline included, so
        that the file stays bounded; the tracer is put back for writing at the end."""
        vm = self.vm
        self.stopped_trace = tr
        vm.trace = vm.router.trace = None
        if vm.ioapic is not None:
            vm.ioapic.trace = vm.pic.trace = None
        for mv in vm.vcpus:
            mv.apic.trace = None

    def run(self, timeout: float | None = 60.0) -> BootResult:
        res = super().run(timeout)
        if self.stopped_trace is not None:
            self.vm.trace = self.stopped_trace
            res.message += (f"; --trace-out kept the first {self.stopped_trace.limit} events "
                            "of the boot")
        res.exits.update(self.fixups.counts)
        if res.reason == "error" and self.fixups.last:
            res.message += f" ({self.fixups.last})"
        return res


__all__ = ["LinuxMachine", "machine_class", "STATUS_ERROR"]
