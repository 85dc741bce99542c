"""The guest agent's side of the real backend: guest memory layout, mailbox, KVM_RUN watchdog.

Guest-side methods of :class:`~apicv.kvm.vcpu.KvmVcpu` are carried out by a small agent
(``guest/agent.S``) that runs in 64-bit long mode and talks to the host through a per-vCPU
mailbox in guest memory. This module is the one place that defines where things are; the
agent is assembled with the mailbox constants (:data:`AGENT_SYMBOLS`, as ``--defsym``).

Guest physical memory (one RAM slot at GPA 0, one 64 KiB slot below 4 GiB)::

    0x000000-0x000fff  not RAM (so an APIC based at 0 is reachable; see write_agent_image)
    0x001000           GDT: null, 0x08 64-bit code, 0x10 data, 0x18 busy 64-bit TSS
    0x001800           TSS (104 bytes)
    0x002000-0x002fff  IDT, 256 interrupt gates to the agent's stubs
    0x003000           PML4            0x004000  PDPT
    0x005000-0x008fff  4 page directories: identity map of 0..4 GiB with 2 MiB pages
    0x009000-0x00afff  2 page directories for the per-vCPU APIC windows at 4 GiB + idx * 2 MiB
                       (used only when the APIC base is relocated above 4 GiB)
    0x010000-0x02ffff  the agent (flat binary, position independent)
    0x038000           the SMM handler (RSM) at SMBASE + 0x8000
    0x080000-0x09ffff  scratch RAM the backend never uses (apicv.memory.SCRATCH_GPA): VAPIC
                       words, PV-EOI flags, guest_load/guest_store
    0x100000 + idx * 0x4000, per vCPU (idx = creation order):
        +0x0000        mailbox (MB_* below)
        +0x1000-0x2fff interrupt log (one byte per vector taken, LOG_CAPACITY entries)
        +0x3000-0x3fff stack (RSP starts at +0x4000)
    0xfec00000         the in-kernel IOAPIC (not a memslot; ioapic_read/ioapic_write)
    0xffff0000-0xffffffff  "ROM": the reset stub at 0xfffffff0 (OUT to PORT_RESET forever)

A KVM_RUN that blocks (a HALTED vCPU, an AP that received INIT during the operation) is
interrupted every RUN_POLL_S seconds by SIGALRM (:class:`RunWatchdog`, main thread only).
"""

from __future__ import annotations

import signal
import struct
import threading
from typing import Any

from ..memory import RAM_END, RAM_START
from . import uapi as K
from .guest import build as agent_build
from .sys import flat_segment

# ---------------------------------------------------------------- guest memory layout
GDT_GPA = 0x1000
TSS_GPA = 0x1800
IDT_GPA = 0x2000
PML4_GPA = 0x3000
PDPT_GPA = 0x4000
PD_GPA = 0x5000  # 4 pages
PD_WIN_GPA = 0x9000  # 2 pages
AGENT_GPA = 0x10000
AGENT_MAX = 0x20000
SMBASE = 0x30000
SMM_HANDLER_GPA = SMBASE + 0x8000
PERCPU_GPA = 0x100000
PERCPU_SIZE = 0x4000
MAX_VCPUS = 1024  # KVM_MAX_VCPUS as the model has it; also the number of mailboxes
RAM_SIZE = PERCPU_GPA + MAX_VCPUS * PERCPU_SIZE
RAM_SLOT_START = 0x1000  # guest page 0 stays out of the RAM memslot (see write_agent_image)
# the model checks guest addresses against apicv.memory's RAM bounds: they must be this slot
if (RAM_SLOT_START, RAM_SIZE) != (RAM_START, RAM_END):
    raise ImportError(f"apicv.memory says RAM is [{RAM_START:#x}, {RAM_END:#x}) but the KVM "
                      f"backend's RAM memslot is [{RAM_SLOT_START:#x}, {RAM_SIZE:#x})")
ROM_GPA = 0xFFFF0000
ROM_SIZE = 0x10000
RESET_VECTOR_GPA = 0xFFFFFFF0
WIN_VA = 1 << 32  # the per-vCPU APIC windows (virtual addresses)
PAGE_2M = 1 << 21
GPA_4G = 1 << 32

SEL_CODE = 0x08
SEL_DATA = 0x10
SEL_TSS = 0x18

# ---------------------------------------------------------------- mailbox (offsets in its page)
MB_CMD = 0x00  # u32 command
MB_SEQ = 0x04  # u32 sequence number the host gives the command
MB_ARG0 = 0x08  # u64 address (MMIO) or MSR index
MB_ARG1 = 0x10  # u64 value to write
MB_SIZE = 0x18  # u32 MMIO access size
MB_DONE = 0x1C  # u32 the agent copies MB_SEQ here when the command is done
MB_RESULT = 0x20  # u64 value read
MB_FAULT = 0x28  # u32 13 if the RDMSR/WRMSR took #GP, else 0
MB_X2APIC = 0x2C  # u32 1: handlers EOI with WRMSR 0x80b; 0: 32-bit MMIO at MB_APIC_VA + 0xb0
MB_APIC_VA = 0x30  # u64 virtual address of the APIC page
MB_EOI = 0x38  # u32 0: the interrupt handlers do not EOI
MB_LIMIT = 0x3C  # u32 interrupts this window may take (0xffffffff: no limit)
MB_WIN_COUNT = 0x40  # u32 interrupts taken in this window
MB_LOG_COUNT = 0x44  # u32 entries in the interrupt log
MB_LOG_DROPPED = 0x48  # u32 vectors not logged (log full)
MB_ITERATIONS = 0x4C  # u32 loop iterations of the last interrupt window
MB_IDLE_MAX = 0x50  # u32 close the window after this many idle iterations in a row
MB_ITER_MAX = 0x54  # u32 hard cap on window iterations
MB_WIN_SET = 0x58  # u32 1: store MB_WIN_PDE at MB_WIN_PDE_ADDR and INVLPG MB_APIC_VA first
MB_WIN_PDE_ADDR = 0x60  # u64
MB_WIN_PDE = 0x68  # u64
MB_EXC_VECTOR = 0x70  # u64 unexpected exception: vector
MB_EXC_ERROR = 0x78  # u64 ... its error code (0 if none)
MB_EXC_RIP = 0x80  # u64 ... RIP
MB_PV_EOI = 0x88  # u64 GPA of the PV-EOI flag (MSR_KVM_PV_EOI_EN & ~3 when enabled), else 0
MB_PV_EOI_SKIPPED = 0x90  # u32 handlers that found the PV-EOI flag set and skipped the EOI
MB_LOG = 0x1000  # u8[LOG_CAPACITY]: vectors taken, in order
LOG_CAPACITY = 0x2000

CMD_RUN = 0  # nothing: exit at once (pending NMIs are taken on the way)
CMD_MMIO_READ = 1
CMD_MMIO_WRITE = 2
CMD_RDMSR = 3
CMD_WRMSR = 4
CMD_WRITE_CR8 = 5
CMD_READ_CR8 = 6
CMD_TAKE_INTERRUPTS = 7
CMD_LOAD = 8  # load MB_SIZE bytes from MB_ARG0 (IOAPIC MMIO or RAM, identity-mapped)
CMD_STORE = 9  # store MB_ARG1 (MB_SIZE bytes) at MB_ARG0
CMD_IN = 10  # IN AL, DX=MB_ARG0
CMD_OUT = 11  # OUT DX=MB_ARG0, AL=MB_ARG1

PORT_DONE = 0x3F0  # OUT: the operation is done
PORT_EXCEPTION = 0x3F1  # OUT: an exception the agent did not expect
PORT_RESET = 0x3F2  # OUT from the reset stub: the BSP was reset by INIT while running
PORT_KICK = 0x3F3  # OUT: interrupt window: back to userspace, KVM_RUN again (see agent.S)

# the symbols agent.S is assembled with (--defsym)
AGENT_SYMBOLS = {k: v for k, v in dict(globals()).items()
                 if k.startswith(("MB_", "CMD_", "PORT_")) or k == "LOG_CAPACITY"}

IDLE_MAX = 4
ITER_MAX = 4096
NO_LIMIT = 0xFFFFFFFF

# the ports inb/outb may touch: the in-kernel i8259 pair and its ELCR (no userspace exit)
PIC_PORTS = frozenset((0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1))
IOAPIC_MMIO_SIZE = 0x100  # IOAPIC_MEM_LENGTH

# how long KVM_RUN may block before the host looks at the vCPU (SIGALRM period), and how long
# one guest operation may take at most
RUN_POLL_S = 0.05
RUN_DEADLINE_S = 10.0


def load_agent() -> agent_build.Agent:
    """The guest agent, assembled with this module's mailbox layout (cached)."""
    return agent_build.build(AGENT_SYMBOLS)


def write_agent_image(ram: Any, rom: Any, agent: agent_build.Agent) -> None:
    """Lay out what the agent runs on: its code, the SMM handler, the reset stub in "ROM",
    the GDT/TSS/IDT and the page tables. *ram* is indexed by GPA (guest page 0 is left out of
    the memslot: an APIC base of 0 must reach the LAPIC's MMIO window, not RAM), *rom* by
    offset from ROM_GPA."""
    if len(agent.image) > AGENT_MAX:
        raise RuntimeError(f"the guest agent is {len(agent.image)} bytes (max {AGENT_MAX})")
    ram[AGENT_GPA:AGENT_GPA + len(agent.image)] = agent.image
    ram[SMM_HANDLER_GPA:SMM_HANDLER_GPA + len(agent.smm_handler)] = agent.smm_handler
    off = RESET_VECTOR_GPA - ROM_GPA
    rom[off:off + len(agent.reset_stub)] = agent.reset_stub
    # GDT: null, 64-bit code, data, busy 64-bit TSS (16 bytes)
    tss_lo = ((0x67 & 0xFFFF) | (TSS_GPA & 0xFFFFFF) << 16 | 0xB << 40 | 1 << 47
              | ((TSS_GPA >> 24) & 0xFF) << 56)
    struct.pack_into("<5Q", ram, GDT_GPA, 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF,
                     tss_lo, TSS_GPA >> 32)
    struct.pack_into("<26I", ram, TSS_GPA, *([0] * 25), 104 << 16)  # I/O map base = 104
    # IDT: interrupt gates (P, DPL 0, type 0xE) on the 64-bit code segment
    for vec, stub in enumerate(agent.stubs):
        h = AGENT_GPA + stub
        lo = ((h & 0xFFFF) | SEL_CODE << 16 | 0x8E << 40 | ((h >> 16) & 0xFFFF) << 48)
        struct.pack_into("<QQ", ram, IDT_GPA + 16 * vec, lo, h >> 32)
    # page tables: PML4[0] -> PDPT; PDPT[0..3] -> identity PDs; PDPT[4..5] -> window PDs
    struct.pack_into("<Q", ram, PML4_GPA, PDPT_GPA | 3)
    for i in range(4):
        struct.pack_into("<Q", ram, PDPT_GPA + 8 * i, (PD_GPA + 0x1000 * i) | 3)
    for i in range(2):
        struct.pack_into("<Q", ram, PDPT_GPA + 8 * (4 + i), (PD_WIN_GPA + 0x1000 * i) | 3)
    struct.pack_into("<2048Q", ram, PD_GPA, *((i * PAGE_2M) | 0x83 for i in range(2048)))


def agent_sregs(sregs: K.kvm_sregs) -> None:
    """Put the agent's long-mode state into *sregs* (flat segments, its TSS, no LDT, GDT,
    IDT, paging on its page tables), leaving apic_base and interrupt_bitmap as they are."""
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        flat_segment(seg, SEL_DATA, type_=3, db=1, long=0)
    flat_segment(sregs.cs, SEL_CODE, type_=0xB, db=0, long=1)
    tr = sregs.tr
    tr.base, tr.limit, tr.selector, tr.type = TSS_GPA, 0x67, SEL_TSS, 0xB
    tr.present, tr.dpl, tr.db, tr.s, tr.l, tr.g, tr.avl, tr.unusable = 1, 0, 0, 0, 0, 0, 0, 0
    ldt = sregs.ldt
    ldt.base, ldt.limit, ldt.selector, ldt.type = 0, 0, 0, 2
    ldt.present, ldt.dpl, ldt.db, ldt.s, ldt.l, ldt.g, ldt.avl = 0, 0, 0, 0, 0, 0, 0
    ldt.unusable = 1
    sregs.gdt.base, sregs.gdt.limit = GDT_GPA, 5 * 8 - 1
    sregs.idt.base, sregs.idt.limit = IDT_GPA, 256 * 16 - 1
    sregs.cr0 = K.X86_CR0_PE | K.X86_CR0_MP | K.X86_CR0_ET | K.X86_CR0_NE | K.X86_CR0_PG
    sregs.cr3 = PML4_GPA
    sregs.cr4 = K.X86_CR4_PAE
    sregs.efer = K.EFER_LME | K.EFER_LMA


# ---------------------------------------------------------------- KVM_RUN watchdog
def _on_alarm(signum: int, frame: Any) -> None:
    """SIGALRM only has to interrupt KVM_RUN (which then returns EINTR)."""


class RunWatchdog:
    """Make a blocked KVM_RUN return EINTR every RUN_POLL_S seconds (SIGALRM from
    ITIMER_REAL, handled by a no-op handler), so the host can look at the vCPU instead of
    hanging. Signal handlers can only be installed from the main thread; elsewhere there is no
    watchdog (a blocked KVM_RUN then blocks)."""

    def __init__(self) -> None:
        self.active = threading.current_thread() is threading.main_thread()
        self._old_handler: Any = None
        self._old_timer = (0.0, 0.0)

    def __enter__(self) -> RunWatchdog:
        if self.active:
            self._old_handler = signal.signal(signal.SIGALRM, _on_alarm)
            self._old_timer = signal.setitimer(signal.ITIMER_REAL, RUN_POLL_S, RUN_POLL_S)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.active:
            signal.setitimer(signal.ITIMER_REAL, *self._old_timer)
            if self._old_handler is not None:  # None: installed outside Python; keep ours
                signal.signal(signal.SIGALRM, self._old_handler)


# ---------------------------------------------------------------- one vCPU's mailbox
class Mailbox:
    """One vCPU's mailbox, interrupt log and stack in guest RAM (*mem*, indexed by GPA), at
    PERCPU_GPA + *vcpu_idx* * PERCPU_SIZE. Cleared when created."""

    def __init__(self, mem: Any, vcpu_idx: int) -> None:
        self.mem = mem
        self.vcpu_idx = vcpu_idx
        self.base = PERCPU_GPA + vcpu_idx * PERCPU_SIZE
        self.stack_top = self.base + PERCPU_SIZE
        self.seq = 0  # the sequence number of the last command posted
        self._win_pde = 0  # the APIC window PDE the agent last stored
        mem[self.base:self.base + PERCPU_SIZE] = bytes(PERCPU_SIZE)
        self.put32(MB_IDLE_MAX, IDLE_MAX)
        self.put32(MB_ITER_MAX, ITER_MAX)

    def put32(self, off: int, v: int) -> None:
        struct.pack_into("<I", self.mem, self.base + off, v & 0xFFFFFFFF)

    def put64(self, off: int, v: int) -> None:
        struct.pack_into("<Q", self.mem, self.base + off, v & 0xFFFFFFFFFFFFFFFF)

    def get32(self, off: int) -> int:
        return struct.unpack_from("<I", self.mem, self.base + off)[0]

    def get64(self, off: int) -> int:
        return struct.unpack_from("<Q", self.mem, self.base + off)[0]

    def post(self, cmd: int, *, arg0: int, arg1: int, size: int, x2apic: bool, apic_va: int,
             eoi: bool, pv_eoi_gpa: int, limit: int) -> None:
        """Write a command and its arguments with a new sequence number; MB_DONE reaches it
        when the agent is done (:meth:`done`)."""
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        self.put32(MB_CMD, cmd)
        self.put32(MB_SEQ, self.seq)
        self.put64(MB_ARG0, arg0)
        self.put64(MB_ARG1, arg1)
        self.put32(MB_SIZE, size)
        self.put64(MB_RESULT, 0)
        self.put32(MB_FAULT, 0)
        self.put32(MB_X2APIC, int(x2apic))
        self.put64(MB_APIC_VA, apic_va)
        self.put32(MB_EOI, int(bool(eoi)))
        self.put64(MB_PV_EOI, pv_eoi_gpa)
        self.put32(MB_LIMIT, limit)

    def done(self) -> bool:
        """Whether the agent finished the command last posted."""
        return self.get32(MB_DONE) == self.seq

    def drain(self) -> tuple[list[int], int, int]:
        """Empty the interrupt log: (vectors taken, in order; handler EOIs skipped for PV EOI;
        vectors dropped because the log was full)."""
        out: list[int] = []
        counts = []
        n = self.get32(MB_LOG_COUNT)
        if n:
            start = self.base + MB_LOG
            out.extend(self.mem[start:start + min(n, LOG_CAPACITY)])
            self.put32(MB_LOG_COUNT, 0)
        for off in (MB_PV_EOI_SKIPPED, MB_LOG_DROPPED):
            counts.append(self.get32(off))
            if counts[-1]:
                self.put32(off, 0)
        return out, counts[0], counts[1]

    def apic_va(self, gpa: int) -> int:
        """Where the agent finds the APIC page at *gpa*: the GPA itself when below 4 GiB
        (identity map), else a 2 MiB window of this vCPU's own at WIN_VA + idx * 2 MiB, whose
        PDE the agent stores itself (so that KVM's MMU sees the page-table write)."""
        if gpa + 0x1000 <= GPA_4G:
            self.put32(MB_WIN_SET, 0)
            return gpa
        pde = (gpa & ~(PAGE_2M - 1)) | 0x83
        if self._win_pde != pde:
            self.put64(MB_WIN_PDE_ADDR, PD_WIN_GPA + 8 * self.vcpu_idx)
            self.put64(MB_WIN_PDE, pde)
            self.put32(MB_WIN_SET, 1)
            self._win_pde = pde
        else:
            self.put32(MB_WIN_SET, 0)
        return WIN_VA + self.vcpu_idx * PAGE_2M + (gpa & (PAGE_2M - 1))

    def forget_window(self) -> None:
        """The agent was re-established: it stores no window PDE before the next command."""
        self.put32(MB_WIN_SET, 0)

    def exception(self) -> str:
        """The unexpected exception the agent reported (PORT_EXCEPTION)."""
        return (f"unexpected guest exception vector {self.get64(MB_EXC_VECTOR)} (error code "
                f"{self.get64(MB_EXC_ERROR):#x}) at RIP {self.get64(MB_EXC_RIP):#x}")
