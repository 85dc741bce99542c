"""One vCPU of the real backend: :class:`KvmVcpu`, the vCPU ioctls and the guest agent's operations.

Host-side methods are the vCPU ioctls themselves. Guest-side methods (``mmio_read``, ``wrmsr``,
``take_interrupts``, ...) post a command to the vCPU's mailbox (layout in
:mod:`apicv.kvm.agent`) and run the agent until it answers.

Protocol: before each guest operation the host runs KVM_GET_MP_STATE (which makes KVM accept a
pending INIT/SIPI) and KVM_GET_SREGS; if the vCPU was reset (CR0.PG clear) it re-establishes the
agent with KVM_SET_SREGS/KVM_SET_REGS, passing back the apic_base and interrupt_bitmap it just
read so the LAPIC is not touched. It then writes the command, its arguments, the APIC mode and
base and a new sequence number into the mailbox and runs KVM_RUN until the agent's OUT to
PORT_DONE (in-kernel exits never come back to userspace; MMIO and port exits to userspace are
completed and reported as :class:`~apicv.errors.MmioExit` / :class:`~apicv.errors.IoExit`;
KVM_EXIT_IOAPIC_EOI is recorded for ``pop_exits``; an OUT to PORT_KICK is answered with another
KVM_RUN). Interrupt and NMI handlers append their vector to the log; the host drains the log
after every run.

What this host's KVM does that shapes the agent: a pending interrupt (and a pending INIT, SIPI
or second NMI) is acted on only at a VM entry from userspace -- exits KVM handles in the kernel
(PIO to the in-kernel PIC, APIC MMIO, MSRs) re-enter without injecting -- so the interrupt
window kicks with an OUT that comes back to userspace; HLT never returns with an in-kernel
irqchip, so the agent never halts; 32-bit protected mode cannot IRET, so it runs in long mode.

UNINITIALIZED and INIT_RECEIVED vCPUs are refused before KVM_RUN
(:class:`~apicv.errors.VcpuNotRunnable`); a KVM_RUN that blocks is interrupted by the
:class:`~apicv.kvm.agent.RunWatchdog`.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import mmap
import os
import struct
import time
from typing import TYPE_CHECKING, Any

from .. import apicdef as A
from .. import uapi as MU
from ..api import VcpuEvents, mmio_offset
from ..errors import GuestFault, IoExit, KvmError, MmioExit, MsrRejected, VcpuNotRunnable
from ..memory import in_ram
from . import agent as G
from . import uapi as K
from .state_ioctls import KvmVcpuStateMixin
from .sys import U64_MAX, KvmExitError, describe_exit, ioctl, ioctl_raw, vcpu_cpuid

if TYPE_CHECKING:
    from .backend import KvmVm

_NOT_RUNNING = (MU.KVM_MP_STATE_UNINITIALIZED, MU.KVM_MP_STATE_INIT_RECEIVED)


class KvmVcpu(KvmVcpuStateMixin):
    """One vCPU of a :class:`~apicv.kvm.backend.KvmVm`: the vCPU ioctls and the guest agent's
    operations. Created by ``KvmVm.create_vcpu`` (*fd* is the KVM_CREATE_VCPU fd, *vcpu_idx*
    the creation order, which selects the mailbox)."""

    def __init__(self, vm: KvmVm, vcpu_id: int, vcpu_idx: int, fd: int) -> None:
        self.vm = vm
        self.vcpu_id = vcpu_id
        self.vcpu_idx = vcpu_idx
        self.fd = fd
        self.sipi: tuple[int, int, int] | None = None  # (CS selector, CS base, RIP) after SIPI
        self.taken: list[int] = []  # vectors taken, not yet returned by take_interrupts
        self.tpr_accesses: list[tuple[int, bool]] = []  # KVM_EXIT_TPR_ACCESS (rip, is_write)
        self._exits: list[tuple[str, int]] = []  # exits a split-irqchip VMM handles (pop_exits)
        self.log_dropped = 0
        self.pv_eoi_skipped = 0  # handler EOIs replaced by clearing the PV-EOI flag
        self.last_iterations = 0  # loop iterations of the last interrupt window
        self._run_mm: mmap.mmap | None = mmap.mmap(fd, vm.vcpu_mmap_size, mmap.MAP_SHARED,
                                                   mmap.PROT_READ | mmap.PROT_WRITE)
        probe = ctypes.c_char.from_buffer(self._run_mm)
        # from_address, not from_buffer: no buffer export, so close() can always unmap
        self._run: Any = K.kvm_run.from_address(ctypes.addressof(probe))
        del probe
        self._mb = G.Mailbox(vm.mem, vcpu_idx)
        self._needs_setup = True  # the agent has not been set up yet (or must be again)
        self._crashed = False  # ... because it died (unblock NMIs when re-establishing)
        self._lapic = K.kvm_lapic_state()
        self._sregs = K.kvm_sregs()
        self._msrs = K.kvm_msrs_1()
        self._mp = K.kvm_mp_state()

    @property
    def apicv_active(self) -> bool:
        """Whether KVM runs this vCPU with APICv: only if the host's kvm_intel has it (never
        on these machines); KVM does not report the per-vCPU state."""
        return bool(self.vm.host_parameters.get("enable_apicv"))

    @property
    def location(self) -> str:
        """Between calls the real backend's vCPUs are always out of KVM_RUN."""
        return "host"

    def close(self) -> None:
        """Unmap kvm_run and close the vCPU fd (``KvmVm.close`` does it for every vCPU)."""
        self._run = None
        if self._run_mm is not None:
            self._run_mm.close()
            self._run_mm = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _ioctl(self, req: int, arg: Any = 0, name: str | None = None) -> int:
        self.vm.check_open()
        return ioctl(self.fd, req, arg, name)

    # ------------------------------------------------------------------ host: vCPU ioctls
    def get_lapic(self) -> bytes:
        """KVM_GET_LAPIC: the 1024-byte register page."""
        self._ioctl(K.KVM_GET_LAPIC, self._lapic)
        return bytes(self._lapic)  # the struct is exactly the 1024-byte page

    def set_lapic(self, page: bytes) -> None:
        """KVM_SET_LAPIC; KvmError(EINVAL) where KVM refuses."""
        page = bytes(page)
        if len(page) != MU.KVM_APIC_REG_SIZE:
            raise ValueError(f"a kvm_lapic_state is {MU.KVM_APIC_REG_SIZE} bytes, "
                             f"got {len(page)}")
        st = K.kvm_lapic_state.from_buffer_copy(page)
        self._ioctl(K.KVM_SET_LAPIC, st)

    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE (KVM accepts a pending INIT/SIPI first; a SIPI it accepted is
        recorded in ``sipi``)."""
        st = self._get_mp_state()
        if st == MU.KVM_MP_STATE_RUNNABLE:
            self._ioctl(K.KVM_GET_SREGS, self._sregs)
            self._note_sipi(self._sregs)
        return st

    def peek_mp_state(self) -> int:
        """KVM_GET_MP_STATE alone: the state, without get_mp_state's look at the segment
        registers for an accepted SIPI (``sipi`` is noted at the next guest operation)."""
        return self._get_mp_state()

    def _get_mp_state(self) -> int:
        self._ioctl(K.KVM_GET_MP_STATE, self._mp)
        return self._mp.mp_state

    def _note_sipi(self, sregs: K.kvm_sregs) -> None:
        """A runnable vCPU whose CS is no longer the agent's, with CS.base == CS.selector << 4,
        has accepted a SIPI (kvm_vcpu_deliver_sipi_vector: selector = vector << 8, base =
        vector << 12, RIP 0). Without an INIT first the vCPU is still in long mode."""
        cs = sregs.cs
        if cs.selector != G.SEL_CODE and cs.base == cs.selector << 4 and not cs.selector & 0xFF:
            self.sipi = (cs.selector, cs.base, self.get_regs().rip)

    def set_mp_state(self, state: int) -> None:
        """KVM_SET_MP_STATE."""
        self._ioctl(K.KVM_SET_MP_STATE, K.kvm_mp_state(mp_state=state & 0xFFFFFFFF))

    def get_msr(self, index: int) -> int:
        """KVM_GET_MSRS for one MSR. MsrRejected when KVM processes 0 MSRs; ValueError for an
        index that does not fit in the u32 of struct kvm_msr_entry."""
        self._check_msr_index(index)
        m = self._msrs
        m.nmsrs = 1
        m.entries[0].index = index
        m.entries[0].data = 0
        if self._ioctl(K.KVM_GET_MSRS, m) != 1:
            raise MsrRejected("KVM_GET_MSRS", index)
        return m.entries[0].data

    def set_msr(self, index: int, value: int) -> bool:
        """KVM_SET_MSRS for one MSR: True if KVM set it (returned 1). ValueError for an index
        over 32 bits or a value over 64 bits."""
        self._check_msr_index(index)
        self._check_msr_value(value)
        m = self._msrs
        m.nmsrs = 1
        m.entries[0].index = index
        m.entries[0].data = value
        return self._ioctl(K.KVM_SET_MSRS, m) == 1

    def nmi(self) -> None:
        """KVM_NMI."""
        self._ioctl(K.KVM_NMI)

    def interrupt(self, vector: int) -> None:
        """KVM_INTERRUPT (struct kvm_interrupt, one u32): kvm_vcpu_ioctl_interrupt refuses a
        vector from KVM_NR_INTERRUPTS up (EINVAL), any vector with the in-kernel PIC (ENXIO)
        and, with a split irqchip, a second one while pending_external_vector holds the
        first (EEXIST). ValueError if *vector* is not a u32."""
        if isinstance(vector, bool) or not isinstance(vector, int) or not 0 <= vector <= 0xFFFFFFFF:
            raise ValueError(f"KVM_INTERRUPT vector {vector!r} is not a u32")
        self._ioctl(K.KVM_INTERRUPT, K.kvm_interrupt(irq=vector))

    def get_vcpu_events(self) -> VcpuEvents:
        """KVM_GET_VCPU_EVENTS (kvm_vcpu_ioctl_x86_get_vcpu_events; it runs process_nmi, so
        NMIs queued by KVM_NMI show up in nmi_pending, at most two)."""
        buf = bytearray(MU.KVM_VCPU_EVENTS_SIZE)
        arg = (ctypes.c_char * len(buf)).from_buffer(buf)
        try:
            self._ioctl(K.KVM_GET_VCPU_EVENTS, arg)
        finally:
            del arg  # release the export of buf
        return VcpuEvents.unpack(bytes(buf))

    def set_vcpu_events(self, events: VcpuEvents) -> None:
        """KVM_SET_VCPU_EVENTS with ``events.pack()`` (kvm_vcpu_ioctl_x86_set_vcpu_events);
        KvmError with KVM's errno where it refuses (what KVM had already applied by then
        stays applied, as in the kernel)."""
        if not isinstance(events, VcpuEvents):
            raise TypeError(f"set_vcpu_events takes a VcpuEvents, not {type(events).__name__}")
        buf = (ctypes.c_char * MU.KVM_VCPU_EVENTS_SIZE).from_buffer_copy(events.pack())
        self._ioctl(K.KVM_SET_VCPU_EVENTS, buf)

    def setup_mce(self, mcg_cap: int) -> None:
        """KVM_X86_SETUP_MCE."""
        self._ioctl(K.KVM_X86_SETUP_MCE, ctypes.c_uint64(mcg_cap & U64_MAX))

    def set_cpuid(self, *, x2apic: bool = True, tsc_deadline: bool = True) -> None:
        """KVM_SET_CPUID2: what KVM_GET_SUPPORTED_CPUID reports, with this vCPU's APIC IDs
        (leaf 1 EBX[31:24], leaves 0xB/0x1F EDX), CPUID.1:ECX x2APIC (bit 21) and TSC-deadline
        (bit 24) as asked, and the VM's MAXPHYADDR. KVM refuses a different CPUID once the
        vCPU has run (EINVAL)."""
        buf = vcpu_cpuid(self.vm.supported_cpuid, self.vcpu_id, x2apic=x2apic,
                         tsc_deadline=tsc_deadline, maxphyaddr=self.vm.maxphyaddr)
        self._ioctl(K.KVM_SET_CPUID2, buf)

    def set_tpr_access_reporting(self, enabled: bool, flags: int = 0) -> None:
        """KVM_TPR_ACCESS_REPORTING (reports arrive as KVM_EXIT_TPR_ACCESS during guest
        operations and are collected in ``tpr_accesses``)."""
        ctl = K.kvm_tpr_access_ctl(enabled=int(bool(enabled)), flags=flags & 0xFFFFFFFF)
        self._ioctl(K.KVM_TPR_ACCESS_REPORTING, ctl)

    def set_vapic_addr(self, gpa: int) -> None:
        """KVM_SET_VAPIC_ADDR: the guest-physical address of the 32-bit VAPIC word that KVM
        writes before entry (kvm_lapic_sync_to_vapic) and reads TPR from after each exit
        (kvm_lapic_sync_from_vapic); 0 turns it off. KvmError(EINVAL) for an address KVM
        cannot map (kvm_gfn_to_hva_cache_init fails outside a memslot)."""
        if not 0 <= gpa <= U64_MAX:
            raise ValueError(f"address {gpa:#x} does not fit in 64 bits")
        self._ioctl(K.KVM_SET_VAPIC_ADDR, K.kvm_vapic_addr(vapic_addr=gpa))

    def set_guest_debug(self, enable: bool = False, blockirq: bool = False) -> None:
        """KVM_SET_GUEST_DEBUG with control KVM_GUESTDBG_ENABLE and KVM_GUESTDBG_BLOCKIRQ as
        asked (no breakpoints or single-stepping): with both, KVM injects no interrupts
        while the guest runs. KVM ignores the other flags without ENABLE. KvmError with
        KVM's errno if it refuses (e.g. EINVAL for BLOCKIRQ on a kernel without it)."""
        control = ((K.KVM_GUESTDBG_ENABLE if enable else 0)
                   | (K.KVM_GUESTDBG_BLOCKIRQ if blockirq else 0))
        self._ioctl(K.KVM_SET_GUEST_DEBUG, K.kvm_guest_debug(control=control))

    def get_kvm_sregs(self) -> K.kvm_sregs:
        """KVM_GET_SREGS, the whole struct (a fresh copy); ``get_sregs`` gives its APIC part."""
        s = K.kvm_sregs()
        self._ioctl(K.KVM_GET_SREGS, s)
        return s

    def get_regs(self) -> K.kvm_regs:
        """KVM_GET_REGS."""
        r = K.kvm_regs()
        self._ioctl(K.KVM_GET_REGS, r)
        return r

    # ------------------------------------------------------------------ guest operations
    def mmio_read(self, offset: int | str, size: int = 4) -> int:
        """The guest reads *size* bytes at APIC base + *offset* (xAPIC MMIO; a register name
        such as "TPR" works too)."""
        offset = mmio_offset(offset, size)
        return self._op(G.CMD_MMIO_READ, offset=offset, size=size)

    def mmio_write(self, offset: int | str, value: int, size: int = 4) -> None:
        """The guest writes *value* (*size* bytes) at APIC base + *offset*."""
        offset = mmio_offset(offset, size)
        self._check_value(value, size)
        self._op(G.CMD_MMIO_WRITE, offset=offset, size=size, arg1=value)

    def rdmsr(self, index: int) -> int:
        """The guest executes RDMSR; GuestFault(13) where KVM injects #GP."""
        self._check_msr_index(index)
        return self._op(G.CMD_RDMSR, arg0=index, what=f"RDMSR {index:#x}")

    def wrmsr(self, index: int, value: int) -> None:
        """The guest executes WRMSR; GuestFault(13) where KVM injects #GP."""
        self._check_msr_index(index)
        self._check_msr_value(value)
        self._op(G.CMD_WRMSR, arg0=index, arg1=value, what=f"WRMSR {index:#x} <- {value:#x}")

    def write_cr8(self, value: int) -> None:
        """The guest executes MOV CR8, value (64-bit mode): TPR = (value & 0xf) << 4."""
        if not 0 <= value <= 0xF:
            raise GuestFault(13, f"MOV to CR8 with reserved bits set ({value:#x})")
        self._op(G.CMD_WRITE_CR8, arg1=value)

    def read_cr8(self) -> int:
        """The guest executes MOV reg, CR8: TPR[7:4]."""
        return self._op(G.CMD_READ_CR8)

    def take_interrupts(self, limit: int | None = None, eoi: bool = True) -> list[int]:
        """The guest opens an IF=1 window (STI ... CLI) and takes what KVM injects.

        Returns the vectors taken since the last call, in order: NMIs (2) taken during other
        guest operations first, then those of this window. Each handler EOIs its vector (MMIO
        EOI in xAPIC mode, WRMSR 0x80B in x2APIC mode) unless *eoi* is False -- or, when PV
        EOI is enabled (MSR_KVM_PV_EOI_EN bit 0, read with KVM_GET_MSRS before the window),
        atomically clears bit 0 of the flag and writes no EOI if it was set (Linux's
        kvm_guest_apic_eoi_write; counted in ``pv_eoi_skipped``); *limit* caps how
        many interrupts this window takes (the agent keeps IF=0 after that many). The window
        closes after 16 loop iterations in a row without a new interrupt (each iteration is
        one exit to userspace and back, hence one chance for KVM to inject) or 4096 in all."""
        if limit is not None and limit < 0:
            raise ValueError("limit must be >= 0")
        lim = G.NO_LIMIT if limit is None else min(limit, G.NO_LIMIT)
        self._op(G.CMD_TAKE_INTERRUPTS, limit=lim, eoi=eoi)
        out, self.taken = self.taken, []
        return out

    def run(self) -> list[int]:
        """One KVM_RUN in which the guest only exits back (OUT): injects what is pending
        (NMIs with IF=0) and returns vectors taken since the last take_interrupts."""
        self._op(G.CMD_RUN)
        return list(self.taken)

    def pop_exits(self) -> list[tuple[str, int]]:
        """The exits to userspace a split-irqchip VMM must handle, in order, since the last
        call: ``("IOAPIC_EOI", vector)`` for each KVM_EXIT_IOAPIC_EOI (the guest operation
        went on as KVM_RUN does when userspace re-enters). Always [] with the in-kernel
        irqchip, whose IOAPIC takes the EOIs itself."""
        out, self._exits = self._exits, []
        return out

    def ioapic_read(self, offset: int, size: int = 4) -> int:
        """The guest loads *size* bytes at IOAPIC base (0xFEC00000) + *offset*; the in-kernel
        IOAPIC (ioapic_mmio_read) answers without an exit to userspace. With a split irqchip
        the load exits to userspace: MmioExit (the guest read all ones)."""
        self._check_ioapic(offset, size)
        return self._op(G.CMD_LOAD, arg0=MU.KVM_IOAPIC_DEFAULT_BASE_ADDRESS + offset,
                        size=size)

    def ioapic_write(self, offset: int, value: int, size: int = 4) -> None:
        """The guest stores *value* (*size* bytes) at IOAPIC base (0xFEC00000) + *offset*
        (ioapic_mmio_write in the kernel; MmioExit with a split irqchip)."""
        self._check_ioapic(offset, size)
        self._check_value(value, size)
        self._op(G.CMD_STORE, arg0=MU.KVM_IOAPIC_DEFAULT_BASE_ADDRESS + offset, size=size,
                 arg1=value)

    def inb(self, port: int) -> int:
        """The guest executes IN AL, DX on a port of the in-kernel i8259 PIC (0x20, 0x21,
        0xA0, 0xA1), its ELCR (0x4D0, 0x4D1) or the i8254 PIT (0x40-0x43, speaker 0x61); KVM
        handles it without a userspace exit. A port no in-kernel device claims (no PIC with a
        split irqchip, no PIT before KVM_CREATE_PIT2, 0x61 without KVM_PIT_SPEAKER_DUMMY)
        exits to userspace: IoExit (the guest read 0xFF)."""
        self._check_port(port)
        return self._op(G.CMD_IN, arg0=port) & 0xFF

    def outb(self, port: int, value: int) -> None:
        """The guest executes OUT DX, AL on a PIC/ELCR/PIT port (see inb; IoExit when no
        in-kernel device claims it)."""
        self._check_port(port)
        self._check_value(value, 1)
        self._op(G.CMD_OUT, arg0=port, arg1=value)

    def guest_load(self, gpa: int, size: int = 4) -> int:
        """The guest loads *size* bytes of RAM at *gpa* (inside KVM_RUN, so KVM's entry work --
        kvm_lapic_sync_to_vapic, PV-EOI arming -- happens before it and the exit work --
        kvm_lapic_sync_from_vapic, the PV-EOI check -- after it)."""
        self._check_ram(gpa, size)
        return self._op(G.CMD_LOAD, arg0=gpa, size=size)

    def guest_store(self, gpa: int, value: int, size: int = 4) -> None:
        """The guest stores *value* (*size* bytes) to RAM at *gpa* (see guest_load). Storing
        over the agent's own pages (below SCRATCH_GPA, or the per-vCPU area) breaks it."""
        self._check_ram(gpa, size)
        self._check_value(value, size)
        self._op(G.CMD_STORE, arg0=gpa, size=size, arg1=value)

    # -- argument checks (as the model makes them) --
    @staticmethod
    def _check_value(value: int, size: int) -> None:
        if not 0 <= value < (1 << (8 * size)):
            if size == 1:
                raise ValueError(f"value {value:#x} does not fit in a byte")
            raise ValueError(f"value {value:#x} does not fit in {size} bytes")

    @staticmethod
    def _check_ioapic(offset: int, size: int) -> None:
        if size not in (1, 2, 4, 8):
            raise ValueError(f"MMIO size must be 1, 2, 4 or 8, not {size}")
        if not 0 <= offset <= G.IOAPIC_MMIO_SIZE - size:
            raise ValueError(f"offset {offset:#x} is outside the IOAPIC's "
                             f"{G.IOAPIC_MMIO_SIZE:#x}-byte window")

    @staticmethod
    def _check_port(port: int) -> None:
        if port not in G.PIC_PORTS and port not in MU.PIT_PORTS:
            ports = sorted(G.PIC_PORTS | MU.PIT_PORTS)
            raise ValueError(f"port {port:#x} is not an in-kernel PIC/ELCR/PIT port "
                             f"({', '.join(f'{p:#x}' for p in ports)})")

    @staticmethod
    def _check_ram(gpa: int, size: int) -> None:
        if size not in (1, 2, 4, 8):
            raise ValueError(f"access size must be 1, 2, 4 or 8, not {size}")
        if not in_ram(gpa, size):
            raise ValueError(f"[{gpa:#x}, {gpa + size:#x}) is not guest RAM")

    @staticmethod
    def _check_msr_index(index: int) -> None:
        if not 0 <= index <= 0xFFFFFFFF:
            raise ValueError(f"MSR index {index:#x} does not fit in 32 bits")

    @staticmethod
    def _check_msr_value(value: int) -> None:
        if not 0 <= value <= U64_MAX:
            raise ValueError(f"MSR value {value:#x} does not fit in 64 bits")

    def forget_agent(self) -> None:
        """Set the agent up again at the next guest operation, as on a new vCPU (a cleared
        mailbox; ``taken``, ``sipi`` and the other records empty): :meth:`KvmVm.reset`."""
        self._mb = G.Mailbox(self.vm.mem, self.vcpu_idx)
        self._needs_setup, self._crashed = True, False
        self.sipi = None
        self.taken, self.tpr_accesses, self._exits = [], [], []
        self.log_dropped = self.pv_eoi_skipped = self.last_iterations = 0

    # ------------------------------------------------------------------ agent plumbing
    def _op(self, cmd: int, *, offset: int = 0, size: int = 0, arg0: int = 0, arg1: int = 0,
            limit: int = G.NO_LIMIT, eoi: bool = True, what: str = "") -> int:
        """One guest operation: prepare the vCPU, post the command, KVM_RUN to PORT_DONE."""
        self.vm.check_open()
        st = self._get_mp_state()
        if st in _NOT_RUNNING:
            raise VcpuNotRunnable(self.vcpu_id, st,
                                  "waiting for SIPI" if st == MU.KVM_MP_STATE_INIT_RECEIVED
                                  else "no INIT/SIPI pending")
        sregs = self._sregs
        self._ioctl(K.KVM_GET_SREGS, sregs)
        if (self._needs_setup or not sregs.cr0 & K.X86_CR0_PG
                or sregs.cs.selector != G.SEL_CODE):  # reset by INIT, or moved by a SIPI
            self._establish(sregs)
        apic_base = sregs.apic_base
        mb = self._mb
        va = mb.apic_va(apic_base & ~0xFFF & ((1 << self.vm.maxphyaddr) - 1))
        if cmd in (G.CMD_MMIO_READ, G.CMD_MMIO_WRITE):
            arg0 = va + offset
        x2 = (apic_base & (A.MSR_IA32_APICBASE_ENABLE | A.X2APIC_ENABLE)
              == (A.MSR_IA32_APICBASE_ENABLE | A.X2APIC_ENABLE))
        # interrupt handlers run only in these two commands (the others keep IF=0)
        pv_eoi = cmd in (G.CMD_TAKE_INTERRUPTS, G.CMD_RUN)
        mb.post(cmd, arg0=arg0, arg1=arg1, size=size, x2apic=x2, apic_va=va, eoi=eoi,
                pv_eoi_gpa=self._pv_eoi_gpa() if pv_eoi else 0, limit=limit)
        user_exits: list[MmioExit | IoExit] = []
        try:
            self._run_agent(user_exits)
        finally:
            self._drain_log()
        if cmd == G.CMD_TAKE_INTERRUPTS:
            self.last_iterations = mb.get32(G.MB_ITERATIONS)
        if user_exits:
            raise user_exits[0]
        if mb.get32(G.MB_FAULT):
            raise GuestFault(mb.get32(G.MB_FAULT), what)
        return mb.get64(G.MB_RESULT)

    def _pv_eoi_gpa(self) -> int:
        """Where the handlers find the PV-EOI flag: MSR_KVM_PV_EOI_EN (KVM_GET_MSRS) without
        its flag bits when enabled, else 0 (the handlers then always EOI the APIC)."""
        try:
            v = self.get_msr(MU.MSR_KVM_PV_EOI_EN)
        except MsrRejected:
            return 0
        return v & ~3 if v & MU.KVM_MSR_ENABLED else 0

    def _drain_log(self) -> None:
        vectors, skipped, dropped = self._mb.drain()
        self.taken.extend(vectors)
        self.pv_eoi_skipped += skipped
        self.log_dropped += dropped

    def _establish(self, sregs: K.kvm_sregs) -> None:
        """(Re)enter the agent: long-mode segments, control registers, descriptor tables and
        registers, keeping apic_base and interrupt_bitmap exactly as KVM_GET_SREGS gave them.

        KVM_SET_SREGS also writes CR8 into TPR[7:4] and clears TPR[3:0]; a TPR with low bits
        set is written back by the agent afterwards."""
        self._note_sipi(sregs)
        tpr = struct.unpack_from("<I", self.get_lapic(), A.APIC_TASKPRI)[0]
        if self._crashed:
            # recovering from a crash: unblock NMIs the dead handler may have kept blocked
            ev = K.kvm_vcpu_events()
            self._ioctl(K.KVM_GET_VCPU_EVENTS, ev)
            if ev.nmi.masked or ev.exception.injected or ev.exception.pending:
                ev.nmi.masked = 0
                ev.exception.injected = 0
                ev.exception.pending = 0
                ev.flags = 0
                self._ioctl(K.KVM_SET_VCPU_EVENTS, ev)
        G.agent_sregs(sregs)
        self._ioctl(K.KVM_SET_SREGS, sregs)
        regs = K.kvm_regs(rip=G.AGENT_GPA + self.vm.agent.entry, rsp=self._mb.stack_top,
                          r15=self._mb.base, rflags=K.X86_EFLAGS_FIXED)
        self._ioctl(K.KVM_SET_REGS, regs)
        self._needs_setup = self._crashed = False
        self._mb.forget_window()
        if tpr & 0xF:
            self._restore_tpr(tpr, sregs.apic_base)

    def _restore_tpr(self, tpr: int, apic_base: int) -> None:
        """Write TPR back as the guest would (KVM_SET_SREGS truncated it to CR8 << 4)."""
        en = apic_base & A.MSR_IA32_APICBASE_ENABLE
        if en and apic_base & A.X2APIC_ENABLE:
            self._op(G.CMD_WRMSR, arg0=A.APIC_BASE_MSR + (A.APIC_TASKPRI >> 4), arg1=tpr)
        elif en:
            self._op(G.CMD_MMIO_WRITE, offset=A.APIC_TASKPRI, size=4, arg1=tpr)

    def _crash(self, message: str) -> KvmExitError:
        """The agent is gone: re-establish it (unblocking NMIs) before the next operation."""
        self._needs_setup = self._crashed = True
        return KvmExitError(self.vcpu_id, message)

    def _run_agent(self, user_exits: list[MmioExit | IoExit]) -> None:
        """KVM_RUN until the agent reports the command done (or the vCPU stops running).

        Accesses no in-kernel device claims (KVM_EXIT_MMIO, KVM_EXIT_IO on a port that is not
        the agent's) are completed as by a VMM with no device there (reads return all ones)
        and collected in *user_exits*; KVM_EXIT_IOAPIC_EOI is recorded for pop_exits. Each is
        followed by another KVM_RUN, as a VMM re-enters after handling it."""
        run = self._run
        deadline = time.monotonic() + G.RUN_DEADLINE_S
        fd = self.fd
        with G.RunWatchdog():
            while True:
                r, e = ioctl_raw(fd, K.KVM_RUN)
                if r < 0:
                    if e == _errno.EAGAIN:
                        continue
                    if e != _errno.EINTR:
                        raise KvmError(e, "KVM_RUN")
                    st = self._get_mp_state()
                    if st == MU.KVM_MP_STATE_RUNNABLE:
                        if time.monotonic() > deadline:
                            raise self._crash("the guest agent did not finish within "
                                              f"{G.RUN_DEADLINE_S} s")
                        continue
                    if st == MU.KVM_MP_STATE_INIT_RECEIVED:
                        # an INIT during the operation (e.g. sent to itself): the operation
                        # is over; the vCPU now waits for a SIPI
                        return
                    raise VcpuNotRunnable(self.vcpu_id, st, "KVM_RUN blocked")
                reason = run.exit_reason
                if reason == K.KVM_EXIT_IO:
                    io = run.u.io
                    port = io.port
                    if port == G.PORT_DONE and io.direction == K.KVM_EXIT_IO_OUT:
                        if self._mb.done():
                            return
                        continue
                    if port == G.PORT_KICK:
                        continue  # the interrupt window's exit: re-enter at once
                    if port == G.PORT_RESET:
                        return  # the BSP was reset by INIT; re-established next time
                    if port == G.PORT_EXCEPTION:
                        raise self._crash(self._mb.exception())
                    # a port no in-kernel device serves (the PIC's with a split irqchip)
                    is_out = io.direction == K.KVM_EXIT_IO_OUT
                    user_exits.append(IoExit(port, io.size, is_out))
                    if not is_out:
                        assert self._run_mm is not None
                        n = io.size * io.count
                        self._run_mm[io.data_offset:io.data_offset + n] = b"\xff" * n
                    continue  # the next KVM_RUN completes the IN
                if reason == K.KVM_EXIT_MMIO:
                    m = run.u.mmio
                    user_exits.append(MmioExit(m.phys_addr, m.len, bool(m.is_write)))
                    if not m.is_write:
                        for i in range(8):
                            m.data[i] = 0xFF
                    continue  # the next KVM_RUN completes the access
                if reason == K.KVM_EXIT_TPR_ACCESS:
                    t = run.u.tpr_access
                    self.tpr_accesses.append((t.rip, bool(t.is_write)))
                    continue
                if reason == K.KVM_EXIT_IOAPIC_EOI:
                    # split irqchip: the EOI of a vector a reserved GSI's level MSI route
                    # targets (kvm_ioapic_send_eoi); the userspace IOAPIC would handle it
                    self._exits.append(("IOAPIC_EOI", run.u.eoi.vector))
                    continue
                if reason in (K.KVM_EXIT_INTR, K.KVM_EXIT_IRQ_WINDOW_OPEN):
                    continue
                raise self._crash(describe_exit(run, reason))

    def __repr__(self) -> str:
        return f"KvmVcpu(id={self.vcpu_id})"
