"""The real-KVM backend: :class:`KvmVm` and :class:`KvmVcpu` drive /dev/kvm with the same public
API as the model's :class:`apicv.vm.Vm` and :class:`apicv.vcpu.Vcpu`.

Host-side methods are the ioctls themselves. Guest-side methods (``mmio_read``, ``wrmsr``,
``take_interrupts``, ...) are carried out by a small guest agent (``guest/agent.S``) that runs in
64-bit long mode and talks to the host through a per-vCPU mailbox in guest memory:

Guest physical memory (one RAM slot at GPA 0, one 64 KiB slot below 4 GiB)::

    0x000000-0x000fff  not RAM (so an APIC based at 0 is reachable; see _setup_memory)
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

Protocol: before each guest operation the host runs KVM_GET_MP_STATE (which makes KVM accept a
pending INIT/SIPI) and KVM_GET_SREGS; if the vCPU was reset (CR0.PG clear) it re-establishes the
agent with KVM_SET_SREGS/KVM_SET_REGS, passing back the apic_base and interrupt_bitmap it just
read so the LAPIC is not touched. It then writes the command, its arguments, the APIC mode and
base and a new sequence number into the mailbox and runs KVM_RUN until the agent's OUT to
PORT_DONE (in-kernel exits never come back to userspace; MMIO exits to userspace are completed
and reported as :class:`~apicv.errors.MmioExit`; an OUT to PORT_KICK is answered with another
KVM_RUN). Interrupt and NMI handlers append their vector to the log; the host drains the log
after every run.

What this host's KVM does that shapes the agent: a pending interrupt (and a pending INIT, SIPI
or second NMI) is acted on only at a VM entry from userspace -- exits KVM handles in the kernel
(PIO to the in-kernel PIC, APIC MMIO, MSRs) re-enter without injecting -- so the interrupt
window kicks with an OUT that comes back to userspace; HLT never returns with an in-kernel
irqchip, so the agent never halts; 32-bit protected mode cannot IRET, so it runs in long mode.

A KVM_RUN that blocks (a HALTED vCPU, an AP that received INIT during the operation) is
interrupted every 50 ms by SIGALRM (ITIMER_REAL, main thread only); UNINITIALIZED and
INIT_RECEIVED vCPUs are refused before KVM_RUN (:class:`~apicv.errors.VcpuNotRunnable`).
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

from .. import apicdef as A
from .. import uapi as MU
from ..errors import ApicvError, GuestFault, KvmError, MmioExit, MsrRejected, VcpuNotRunnable
from ..memory import RAM_END, RAM_START, in_ram
from . import uapi as K
from .guest import build as agent_build

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
RAM_SLOT_START = 0x1000  # guest page 0 stays out of the RAM memslot (see _setup_memory)
# the model checks guest addresses against apicv.memory's RAM bounds: they must be this slot
if (RAM_SLOT_START, RAM_SIZE) != (RAM_START, RAM_END):
    raise ImportError(f"apicv.memory says RAM is [{RAM_START:#x}, {RAM_END:#x}) but the KVM "
                      f"backend's RAM memslot is [{RAM_SLOT_START:#x}, {RAM_SIZE:#x})")
ROM_GPA = 0xFFFF0000
ROM_SIZE = 0x10000
RESET_VECTOR_GPA = 0xFFFFFFF0
WIN_VA = 1 << 32
_2M = 1 << 21
_4G = 1 << 32

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

# the ports inb/outb may touch: the in-kernel i8259 pair and its ELCR (no userspace exit)
PIC_PORTS = frozenset((0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1))
IOAPIC_MMIO_SIZE = 0x100  # IOAPIC_MEM_LENGTH

PORT_DONE = 0x3F0  # OUT: the operation is done
PORT_EXCEPTION = 0x3F1  # OUT: an exception the agent did not expect
PORT_RESET = 0x3F2  # OUT from the reset stub: the BSP was reset by INIT while running
PORT_KICK = 0x3F3  # OUT: interrupt window: back to userspace, KVM_RUN again (see agent.S)
IDLE_MAX = 4
ITER_MAX = 4096
NO_LIMIT = 0xFFFFFFFF

# the symbols agent.S is assembled with (--defsym)
AGENT_SYMBOLS = {k: v for k, v in dict(globals()).items()
                 if k.startswith(("MB_", "CMD_", "PORT_")) or k == "LOG_CAPACITY"}

# how long KVM_RUN may block before the host looks at the vCPU (SIGALRM period), and how long
# one guest operation may take at most
RUN_POLL_S = 0.05
RUN_DEADLINE_S = 10.0

_U64 = (1 << 64) - 1
_NOT_RUNNING = (MU.KVM_MP_STATE_UNINITIALIZED, MU.KVM_MP_STATE_INIT_RECEIVED)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.restype = ctypes.c_int
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


class KvmExitError(ApicvError):
    """KVM_RUN ended in a way the guest agent never asks for (internal error, shutdown, failed
    entry, an unexpected exception in the guest or an unexpected exit). The agent is
    re-established before the next guest operation."""

    def __init__(self, vcpu_id: int, message: str) -> None:
        self.vcpu_id = vcpu_id
        super().__init__(f"vCPU {vcpu_id}: {message}")


# ---------------------------------------------------------------- ioctl plumbing
def _arg(arg) -> int:
    if isinstance(arg, ctypes.Structure | ctypes.Array | ctypes.Union):
        return ctypes.addressof(arg)
    if isinstance(arg, ctypes._SimpleCData):
        return ctypes.addressof(arg)
    return int(arg)


def _ioctl_raw(fd: int, req: int, arg=0) -> tuple[int, int]:
    """ioctl(2) through libc: (return value, errno)."""
    r = _libc.ioctl(fd, req, _arg(arg))
    return r, (ctypes.get_errno() if r < 0 else 0)


def _ioctl(fd: int, req: int, arg=0, name: str | None = None) -> int:
    r, e = _ioctl_raw(fd, req, arg)
    if r < 0:
        raise KvmError(e, name or K.IOCTL_NAMES.get(req, f"ioctl {req:#x}"))
    return r


def _read_param(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def _param_bool(v: str | None) -> bool | None:
    if v is None:
        return None
    if v in ("Y", "y", "1"):
        return True
    if v in ("N", "n", "0"):
        return False
    try:
        return int(v) != 0
    except ValueError:
        return None


def get_supported_cpuid(kvm_fd: int) -> list[K.kvm_cpuid_entry2]:
    """KVM_GET_SUPPORTED_CPUID on /dev/kvm (growing the buffer while KVM says E2BIG)."""
    n = 128
    while True:
        buf = K.kvm_cpuid2_with(n)()
        buf.nent = n
        r, e = _ioctl_raw(kvm_fd, K.KVM_GET_SUPPORTED_CPUID, buf)
        if r >= 0:
            return [K.kvm_cpuid_entry2.from_buffer_copy(buf.entries[i]) for i in range(buf.nent)]
        if e != _errno.E2BIG or n >= 4096:
            raise KvmError(e, "KVM_GET_SUPPORTED_CPUID")
        n *= 2


def cpuid_maxphyaddr(entries: list[K.kvm_cpuid_entry2]) -> int:
    """MAXPHYADDR: CPUID 0x80000008 EAX[7:0] (36 without the leaf)."""
    for ent in entries:
        if ent.function == 0x80000008:
            return ent.eax & 0xFF
    return 36


def vcpu_cpuid(entries: list[K.kvm_cpuid_entry2], vcpu_id: int, *, x2apic: bool,
               tsc_deadline: bool, maxphyaddr: int | None = None):
    """The struct kvm_cpuid2 for KVM_SET_CPUID2: *entries* with this vCPU's APIC IDs (leaf 1
    EBX[31:24], leaves 0xB/0x1F EDX), CPUID.1:ECX x2APIC (bit 21) and TSC-deadline (bit 24)
    as asked, and MAXPHYADDR if given."""
    buf = K.kvm_cpuid2_with(len(entries))()
    buf.nent = len(entries)
    for i, src in enumerate(entries):
        e = K.kvm_cpuid_entry2.from_buffer_copy(src)
        if e.function == 1:
            e.ebx = (e.ebx & 0x00FFFFFF) | (vcpu_id & 0xFF) << 24
            e.ecx = (e.ecx & ~(1 << 21)) | (bool(x2apic) << 21)
            e.ecx = (e.ecx & ~(1 << 24)) | (bool(tsc_deadline) << 24)
        elif e.function in (0xB, 0x1F):
            e.edx = vcpu_id & 0xFFFFFFFF
        elif e.function == 0x80000008 and maxphyaddr is not None:
            e.eax = (e.eax & ~0xFF) | maxphyaddr
        buf.entries[i] = e
    return buf


def enable_vm_cap(vm_fd: int, cap: int, *args: int) -> None:
    """KVM_ENABLE_CAP on a VM fd (up to 4 arguments)."""
    if len(args) > 4:
        raise ValueError("KVM_ENABLE_CAP takes at most 4 arguments")
    ec = K.kvm_enable_cap(cap=cap, flags=0)
    for i, a in enumerate(args):
        ec.args[i] = a & _U64
    _ioctl(vm_fd, K.KVM_ENABLE_CAP, ec)


def host_module_parameters() -> dict[str, object]:
    """The kvm (and kvm_intel/kvm_amd) module parameters the model takes as VM options.

    Without kvm_intel or kvm_amd (e.g. the PVM backend), enable_apicv is False: there is no
    hardware APIC virtualization."""
    p = "/sys/module/kvm/parameters/"
    apicv = _param_bool(_read_param("/sys/module/kvm_intel/parameters/enable_apicv"))
    if apicv is None:
        apicv = _param_bool(_read_param("/sys/module/kvm_amd/parameters/avic"))
    vh = _param_bool(_read_param(p + "vector_hashing"))
    if vh is None:
        vh = _param_bool(_read_param("/sys/module/kvm_intel/parameters/vector_hashing"))
    mtp = _read_param(p + "min_timer_period_us")
    lta = _param_bool(_read_param(p + "lapic_timer_advance"))
    if lta is None:
        ns = _read_param(p + "lapic_timer_advance_ns")
        lta = None if ns is None else int(ns) != 0
    fp = _param_bool(_read_param("/sys/module/kvm_intel/parameters/flexpriority"))
    return {
        "enable_apicv": bool(apicv),
        "flexpriority": bool(fp),
        "vector_hashing": True if vh is None else vh,
        "min_timer_period_us": 200 if mtp is None else int(mtp),
        "lapic_timer_advance": True if lta is None else lta,
    }


def load_agent() -> agent_build.Agent:
    """The guest agent, assembled with this module's mailbox layout (cached)."""
    return agent_build.build(AGENT_SYMBOLS)


# ---------------------------------------------------------------- the clock
class KvmClock:
    """Wall time for the real backend: ``now`` is CLOCK_MONOTONIC nanoseconds since the VM was
    created, and ``advance(ns)`` sleeps that long (KVM's APIC timers are hrtimers on
    CLOCK_MONOTONIC; they fire by themselves, the host cannot see or count them)."""

    def __init__(self) -> None:
        self._t0 = time.monotonic_ns()

    @property
    def now(self) -> int:
        return time.monotonic_ns() - self._t0

    def advance(self, ns: int) -> None:
        """Sleep *ns* nanoseconds."""
        if ns < 0:
            raise ValueError(f"time cannot go backwards (advance by {ns} ns)")
        if ns:
            time.sleep(ns / 1e9)

    def advance_to(self, t: int) -> None:
        now = self.now
        if t < now:
            raise ValueError(f"time cannot go backwards (now {now} ns, asked {t} ns)")
        self.advance(t - now)

    def next_expiry(self) -> None:
        """Not observable on the real KVM."""
        return None


# ---------------------------------------------------------------- KVM_RUN watchdog
def _on_alarm(signum, frame) -> None:
    """SIGALRM only has to interrupt KVM_RUN (which then returns EINTR)."""


class _RunWatchdog:
    """Make a blocked KVM_RUN return EINTR every RUN_POLL_S seconds (SIGALRM from
    ITIMER_REAL, handled by a no-op handler), so the host can look at the vCPU instead of
    hanging. Signal handlers can only be installed from the main thread; elsewhere there is no
    watchdog (a blocked KVM_RUN then blocks)."""

    def __init__(self) -> None:
        self.active = threading.current_thread() is threading.main_thread()
        self._old_handler = None
        self._old_timer = (0.0, 0.0)

    def __enter__(self) -> _RunWatchdog:
        if self.active:
            self._old_handler = signal.signal(signal.SIGALRM, _on_alarm)
            self._old_timer = signal.setitimer(signal.ITIMER_REAL, RUN_POLL_S, RUN_POLL_S)
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            signal.setitimer(signal.ITIMER_REAL, *self._old_timer)
            if self._old_handler is not None:  # None: installed outside Python; keep ours
                signal.signal(signal.SIGALRM, self._old_handler)


# ---------------------------------------------------------------- availability
def kvm_available() -> tuple[bool, str]:
    """(True, "") when /dev/kvm can run the backend, else (False, why not)."""
    path = "/dev/kvm"
    if not os.path.exists(path):
        return False, f"{path} does not exist (no KVM on this machine)"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return False, f"cannot open {path}: {e.strerror}"
    try:
        r, e = _ioctl_raw(fd, K.KVM_GET_API_VERSION)
        if r != K.KVM_API_VERSION:
            return False, f"KVM_GET_API_VERSION returned {r} (errno {e}), expected 12"
        for cap, name in ((K.KVM_CAP_IRQCHIP, "KVM_CAP_IRQCHIP"),
                          (K.KVM_CAP_SIGNAL_MSI, "KVM_CAP_SIGNAL_MSI")):
            if _ioctl_raw(fd, K.KVM_CHECK_EXTENSION, cap)[0] <= 0:
                return False, f"KVM lacks {name}"
    finally:
        os.close(fd)
    try:
        load_agent()
    except agent_build.AgentBuildError as e:
        return False, f"cannot build the guest agent: {e}"
    except OSError as e:
        return False, f"cannot build the guest agent: {e}"
    return True, ""


# ---------------------------------------------------------------- the VM
class KvmVm:
    """A real KVM VM with an in-kernel irqchip and *nr_vcpus* vCPUs, with the interface of
    :class:`apicv.vm.Vm`.

    Options the real KVM takes (``x2apic_api``, ``bsp_vcpu_id``, ``apic_bus_cycle_ns``,
    ``disabled_quirks``, ``x2apic_cpuid``, ``tsc_deadline_cpuid``, ``mcg_cap``, ``maxphyaddr`` up
    to the host's, which goes into guest CPUID 0x80000008) are applied. Module parameters
    (``enable_apicv``, ``vector_hashing``, ``min_timer_period_us``, ``lapic_timer_advance``) and
    ``tsc_khz`` belong to the host: None (the default) or the host's value is accepted, anything
    else raises ValueError. ``irqchip="split"`` is not implemented. ``trace=True`` is accepted
    but there is no tracing on this backend (``vm.trace`` is None).
    """

    backend = "kvm"

    def __init__(self, nr_vcpus: int = 1, x2apic_api: int = 0, *,
                 vcpu_ids: list[int] | None = None, bsp_vcpu_id: int = 0,
                 apic_bus_cycle_ns: int = 1, disabled_quirks: int = 0,
                 x2apic_cpuid: bool = True, tsc_deadline_cpuid: bool = True,
                 maxphyaddr: int | None = None, mcg_cap: int = 0, tsc_khz: int | None = None,
                 enable_apicv: bool | None = None, flexpriority: bool | None = None,
                 vector_hashing: bool | None = None,
                 min_timer_period_us: int | None = None,
                 lapic_timer_advance: bool | None = None,
                 irqchip: str = "kernel", vm_type: str | int = "default",
                 trace=False) -> None:
        self._kvm_fd = -1
        self._vm_fd = -1
        self._mems: list[mmap.mmap] = []
        self.vcpus: list[KvmVcpu] = []
        self._by_id: dict[int, KvmVcpu] = {}
        self._closed = False
        if isinstance(vm_type, str):
            from ..uapi import VM_TYPE_NAMES

            if vm_type.lower() not in VM_TYPE_NAMES:
                raise ValueError(f"vm_type must be one of {', '.join(VM_TYPE_NAMES)}")
            vm_type = VM_TYPE_NAMES[vm_type.lower()]
        if vm_type:
            # ask the real KVM: a host without that VM type fails KVM_CREATE_VM (EINVAL)
            kfd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
            try:
                os.close(_ioctl(kfd, K.KVM_CREATE_VM, vm_type))
            finally:
                os.close(kfd)
            raise NotImplementedError(f"VM type {vm_type} (confidential VMs: KVM_TDX_INIT_VM, "
                                      "...) is not implemented by the KVM backend")
        if irqchip == "split":
            raise NotImplementedError("irqchip='split' (KVM_CAP_SPLIT_IRQCHIP) is not "
                                      "implemented by the KVM backend yet")
        if irqchip != "kernel":
            raise ValueError("irqchip must be 'kernel' or 'split'")
        self.trace = None  # no tracing on the real backend
        self.clock = KvmClock()
        self.x2apic_cpuid = x2apic_cpuid
        self.tsc_deadline_cpuid = tsc_deadline_cpuid
        self.mcg_cap = mcg_cap
        self.host_parameters = host_module_parameters()
        for name, want in (("enable_apicv", enable_apicv), ("flexpriority", flexpriority),
                           ("vector_hashing", vector_hashing),
                           ("min_timer_period_us", min_timer_period_us),
                           ("lapic_timer_advance", lapic_timer_advance)):
            have = self.host_parameters[name]
            if want is not None and want != have:
                raise ValueError(
                    f"{name}={want!r}: the real KVM's module parameter is {have!r} on this host "
                    f"(a module parameter cannot be changed per VM)")
        self.agent = load_agent()
        try:
            self._kvm_fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
            self._setup(nr_vcpus, x2apic_api, vcpu_ids, bsp_vcpu_id, apic_bus_cycle_ns,
                        disabled_quirks, maxphyaddr, tsc_khz)
        except BaseException:
            self.close()
            raise

    def _setup(self, nr_vcpus, x2apic_api, vcpu_ids, bsp_vcpu_id, apic_bus_cycle_ns,
               disabled_quirks, maxphyaddr, tsc_khz) -> None:
        kfd = self._kvm_fd
        self._vcpu_mmap_size = _ioctl(kfd, K.KVM_GET_VCPU_MMAP_SIZE)
        self._supported_cpuid = get_supported_cpuid(kfd)
        host_maxphyaddr = cpuid_maxphyaddr(self._supported_cpuid)
        if maxphyaddr is not None and not 32 <= maxphyaddr <= host_maxphyaddr:
            raise ValueError(f"maxphyaddr={maxphyaddr}: this host supports 32..{host_maxphyaddr} "
                             f"(CPUID 0x80000008 EAX[7:0] = {host_maxphyaddr})")
        self.maxphyaddr = host_maxphyaddr if maxphyaddr is None else maxphyaddr
        self._vm_fd = _ioctl(kfd, K.KVM_CREATE_VM, 0)
        os.set_inheritable(self._vm_fd, False)
        host_khz = self._host_tsc_khz()
        if tsc_khz is not None and tsc_khz != host_khz:
            raise ValueError(f"tsc_khz={tsc_khz}: the guest TSC runs at the host's {host_khz} kHz "
                             "(no TSC scaling on this backend)")
        self.tsc_khz = host_khz
        _ioctl(self._vm_fd, K.KVM_CREATE_IRQCHIP)
        if apic_bus_cycle_ns != 1:
            self.enable_cap(K.KVM_CAP_X86_APIC_BUS_CYCLES_NS, apic_bus_cycle_ns)
        if disabled_quirks:
            self.enable_cap(K.KVM_CAP_DISABLE_QUIRKS2, disabled_quirks)
        if x2apic_api:
            # before the vCPUs (as QEMU does and the model does): enabling it later does not
            # refresh KVM's optimized APIC map
            self.enable_cap(K.KVM_CAP_X2APIC_API, x2apic_api)
        if bsp_vcpu_id:
            self.set_boot_cpu_id(bsp_vcpu_id)
        self._setup_memory()
        for vid in (vcpu_ids if vcpu_ids is not None else range(nr_vcpus)):
            self.create_vcpu(vid)

    # ------------------------------------------------------------------ host facts
    @property
    def smm(self) -> bool:
        """KVM_CAP_X86_SMM: whether an SMI can be injected at all."""
        return self.check_extension(K.KVM_CAP_X86_SMM) > 0

    @property
    def supported_mce_cap(self) -> int:
        """KVM_X86_GET_MCE_CAP_SUPPORTED (on /dev/kvm)."""
        v = ctypes.c_uint64(0)
        _ioctl(self._kvm_fd, K.KVM_X86_GET_MCE_CAP_SUPPORTED, v)
        return v.value

    def _host_tsc_khz(self) -> int:
        r, _ = _ioctl_raw(self._vm_fd, K.KVM_GET_TSC_KHZ)
        if r > 0:
            return r
        # older kernels: only per vCPU; ask a throwaway VM's vCPU
        fd = _ioctl(self._kvm_fd, K.KVM_CREATE_VM, 0)
        try:
            vfd = _ioctl(fd, K.KVM_CREATE_VCPU, 0)
            try:
                return _ioctl(vfd, K.KVM_GET_TSC_KHZ)
            finally:
                os.close(vfd)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ guest memory
    def _map(self, slot: int, gpa: int, size: int, skip: int = 0) -> mmap.mmap:
        """Map *size* bytes for guest physical *gpa*; the first *skip* bytes of the mapping
        stay out of the memslot (so that the mapping can still be indexed by GPA)."""
        mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                        prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._mems.append(mem)
        probe = ctypes.c_char.from_buffer(mem)
        hva = ctypes.addressof(probe)
        del probe  # release the buffer export so that close() can unmap
        region = K.kvm_userspace_memory_region(slot=slot, flags=0, guest_phys_addr=gpa + skip,
                                               memory_size=size - skip,
                                               userspace_addr=hva + skip)
        _ioctl(self._vm_fd, K.KVM_SET_USER_MEMORY_REGION, region)
        return mem

    def _setup_memory(self) -> None:
        # guest page 0 is left unbacked: an APIC base of 0 (IA32_APIC_BASE = 0, or EN with
        # base 0) must reach the LAPIC's MMIO window, not RAM (KVM consults MMIO devices only
        # for guest-physical addresses no memslot covers)
        ram = self.mem = self._map(0, 0, RAM_SIZE, skip=RAM_SLOT_START)
        rom = self._map(1, ROM_GPA, ROM_SIZE)
        agent = self.agent
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
        struct.pack_into("<2048Q", ram, PD_GPA, *((i * _2M) | 0x83 for i in range(2048)))

    # ------------------------------------------------------------------ VM ioctls
    def create_vcpu(self, vcpu_id: int) -> KvmVcpu:
        """KVM_CREATE_VCPU (then mmap kvm_run, KVM_SET_CPUID2, KVM_X86_SETUP_MCE if mcg_cap)."""
        self._check_open()
        if not 0 <= vcpu_id <= 0xFFFFFFFF:
            raise KvmError(MU.EINVAL, "KVM_CREATE_VCPU", f"vcpu_id {vcpu_id} out of range")
        if len(self.vcpus) >= MAX_VCPUS:
            raise KvmError(MU.EINVAL, "KVM_CREATE_VCPU", f"at most {MAX_VCPUS} vCPUs")
        fd = _ioctl(self._vm_fd, K.KVM_CREATE_VCPU, vcpu_id)
        try:
            os.set_inheritable(fd, False)
            vcpu = KvmVcpu(self, vcpu_id, len(self.vcpus), fd)
        except BaseException:
            os.close(fd)
            raise
        self.vcpus.append(vcpu)
        self._by_id[vcpu_id] = vcpu
        vcpu.set_cpuid(x2apic=self.x2apic_cpuid, tsc_deadline=self.tsc_deadline_cpuid)
        if self.mcg_cap:
            vcpu.setup_mce(self.mcg_cap)
        return vcpu

    def vcpu(self, vcpu_id: int) -> KvmVcpu:
        """The vCPU with this vcpu_id (``vm.vcpus[i]`` indexes by creation order)."""
        return self._by_id[vcpu_id]

    def set_boot_cpu_id(self, vcpu_id: int) -> None:
        """KVM_SET_BOOT_CPU_ID."""
        self._check_open()
        if not 0 <= vcpu_id <= _U64:
            raise KvmError(MU.EINVAL, "KVM_SET_BOOT_CPU_ID", f"{vcpu_id} out of range")
        _ioctl(self._vm_fd, K.KVM_SET_BOOT_CPU_ID, vcpu_id)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd."""
        self._check_open()
        return _ioctl(self._vm_fd, K.KVM_CHECK_EXTENSION, cap)

    def enable_cap(self, cap: int, *args: int) -> None:
        """KVM_ENABLE_CAP on the VM fd (up to 4 arguments)."""
        self._check_open()
        enable_vm_cap(self._vm_fd, cap, *args)

    def signal_msi(self, address_lo: int, address_hi: int = 0, data: int = 0,
                   flags: int = 0, devid: int = 0) -> int:
        """KVM_SIGNAL_MSI: the number of APICs that accepted the interrupt.

        Raises KvmError with the ioctl's errno: EPERM when no APIC matched at all (KVM
        returns -1), EINVAL for bad flags or routes."""
        self._check_open()
        msi = K.kvm_msi(address_lo=address_lo & 0xFFFFFFFF, address_hi=address_hi & 0xFFFFFFFF,
                        data=data & 0xFFFFFFFF, flags=flags & 0xFFFFFFFF,
                        devid=devid & 0xFFFFFFFF)
        r, e = _ioctl_raw(self._vm_fd, K.KVM_SIGNAL_MSI, msi)
        if r < 0:
            raise KvmError(e, "KVM_SIGNAL_MSI",
                           "no APIC matched the destination" if e == _errno.EPERM else "")
        return r

    # ------------------------------------------------------------------ irqchip
    def irq_line(self, irq: int, level: int) -> int:
        """KVM_IRQ_LINE_STATUS: drive GSI *irq* to *level* (as the userspace IRQ source) and
        return KVM's status: the number of APICs the interrupt was delivered to, 0 when it
        was coalesced (the pin was already pending), -1 when it was masked or nowhere to go
        (for level 0: what the line clears). KvmError with the ioctl's errno otherwise."""
        self._check_open()
        if not 0 <= irq <= 0xFFFFFFFF:
            raise ValueError(f"GSI {irq:#x} does not fit in 32 bits")
        if not 0 <= level <= 0xFFFFFFFF:
            raise ValueError(f"level {level:#x} does not fit in 32 bits")
        lv = K.kvm_irq_level(irq=irq, level=level)
        _ioctl(self._vm_fd, K.KVM_IRQ_LINE_STATUS, lv)
        return lv.status

    @staticmethod
    def _irqchip_size(chip_id: int) -> int:
        """The used bytes of the kvm_irqchip union for this chip (0 for unknown ids)."""
        if chip_id in (MU.KVM_IRQCHIP_PIC_MASTER, MU.KVM_IRQCHIP_PIC_SLAVE):
            return MU.KVM_PIC_STATE_SIZE
        if chip_id == MU.KVM_IRQCHIP_IOAPIC:
            return MU.KVM_IOAPIC_STATE_SIZE
        return 0

    def get_irqchip(self, chip_id: int) -> bytes:
        """KVM_GET_IRQCHIP: the chip's state -- struct kvm_pic_state (16 bytes) for chips 0
        and 1 (PIC master, slave), struct kvm_ioapic_state (216 bytes) for chip 2 (IOAPIC).
        Any other id is passed to KVM; its errno comes back as KvmError."""
        self._check_open()
        if not 0 <= chip_id <= 0xFFFFFFFF:
            raise ValueError(f"chip id {chip_id:#x} does not fit in 32 bits")
        chip = K.kvm_irqchip(chip_id=chip_id)
        _ioctl(self._vm_fd, K.KVM_GET_IRQCHIP, chip)
        raw = ctypes.string_at(ctypes.addressof(chip.chip), MU.KVM_IRQCHIP_STATE_SIZE)
        n = self._irqchip_size(chip_id)
        return raw[:n] if n else raw

    def set_irqchip(self, chip_id: int, data: bytes) -> None:
        """KVM_SET_IRQCHIP: load the chip's state. *data* is the used part of the union (16
        bytes for a PIC, 216 for the IOAPIC; the rest is sent as zeros) or all 512 bytes.
        ValueError for other lengths; KVM's errno (e.g. an unknown chip id) as KvmError."""
        self._check_open()
        data = bytes(data)
        if not 0 <= chip_id <= 0xFFFFFFFF:
            raise ValueError(f"chip id {chip_id:#x} does not fit in 32 bits")
        n = self._irqchip_size(chip_id)
        if len(data) not in {n, MU.KVM_IRQCHIP_STATE_SIZE} - {0}:
            want = f"{n} or {MU.KVM_IRQCHIP_STATE_SIZE}" if n else str(MU.KVM_IRQCHIP_STATE_SIZE)
            raise ValueError(f"chip {chip_id} state must be {want} bytes, got {len(data)}")
        chip = K.kvm_irqchip(chip_id=chip_id)
        ctypes.memmove(ctypes.addressof(chip.chip), data, len(data))
        _ioctl(self._vm_fd, K.KVM_SET_IRQCHIP, chip)

    # ------------------------------------------------------------------ guest RAM (VMM side)
    def read_guest(self, gpa: int, size: int) -> bytes:
        """The VMM reads guest RAM (the RAM memslot's mmap, no ioctl); ValueError unless
        [gpa, gpa + size) is RAM (apicv.memory.in_ram, the model's rule)."""
        self._check_open()
        if not in_ram(gpa, size):
            raise ValueError(f"[{gpa:#x}, {gpa + size:#x}) is not guest RAM")
        return bytes(self.mem[gpa:gpa + size])

    def write_guest(self, gpa: int, data: bytes) -> None:
        """The VMM writes guest RAM (the RAM memslot's mmap, no ioctl); ValueError unless
        [gpa, gpa + len(data)) is RAM (apicv.memory.in_ram)."""
        self._check_open()
        data = bytes(data)
        if not in_ram(gpa, len(data)):
            raise ValueError(f"[{gpa:#x}, {gpa + len(data):#x}) is not guest RAM")
        self.mem[gpa:gpa + len(data)] = data

    @property
    def apicv_inhibits(self) -> None:
        """Not observable on the real KVM (kvm->arch.apicv_inhibit_reasons is internal)."""
        return None

    def set_or_clear_apicv_inhibit(self, reason, set_: bool) -> None:
        """APICv inhibits are internal to KVM. On a host without APICv (enable_apicv=0, as
        here) an inhibit changes nothing, so this does nothing; with APICv it cannot be done
        from userspace and raises ApicvError."""
        if not self.host_parameters.get("enable_apicv"):
            return None
        raise ApicvError("APICv inhibits are internal to KVM: userspace cannot set or clear "
                         "them on a host with APICv")

    def enable_tracing(self, limit: int | None = None) -> None:
        """No tracing on the real backend (KVM's own tracepoints are not read): None."""
        return None

    # ------------------------------------------------------------------ lifetime
    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the VM is closed")

    def close(self) -> None:
        """Close every vCPU fd, unmap kvm_run and guest memory, close the VM and /dev/kvm."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        for v in getattr(self, "vcpus", []):
            v._close()
        if self._vm_fd >= 0:
            os.close(self._vm_fd)
            self._vm_fd = -1
        for m in self._mems:
            m.close()
        self._mems = []
        self.mem = None
        if self._kvm_fd >= 0:
            os.close(self._kvm_fd)
            self._kvm_fd = -1

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __enter__(self) -> KvmVm:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KvmVm(backend='kvm', vcpus={[v.vcpu_id for v in self.vcpus]})"


# ---------------------------------------------------------------- the vCPU
class KvmVcpu:
    """One vCPU of a :class:`KvmVm`: the vCPU ioctls and the guest agent's operations."""

    def __init__(self, vm: KvmVm, vcpu_id: int, vcpu_idx: int, fd: int) -> None:
        self.vm = vm
        self.vcpu_id = vcpu_id
        self.vcpu_idx = vcpu_idx
        self.fd = fd
        self.sipi: tuple[int, int, int] | None = None  # (CS selector, CS base, RIP) after SIPI
        self.taken: list[int] = []  # vectors taken, not yet returned by take_interrupts
        self.tpr_accesses: list[tuple[int, bool]] = []  # KVM_EXIT_TPR_ACCESS (rip, is_write)
        self.log_dropped = 0
        self.pv_eoi_skipped = 0  # handler EOIs replaced by clearing the PV-EOI flag
        self.last_iterations = 0  # loop iterations of the last interrupt window
        self._run_mm = mmap.mmap(fd, vm._vcpu_mmap_size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        probe = ctypes.c_char.from_buffer(self._run_mm)
        # from_address, not from_buffer: no buffer export, so close() can always unmap
        self._run = K.kvm_run.from_address(ctypes.addressof(probe))
        del probe
        self._area = PERCPU_GPA + vcpu_idx * PERCPU_SIZE
        self._mb = self._area
        self._stack_top = self._area + PERCPU_SIZE
        self._seq = 0
        self._needs_setup = True  # the agent has not been set up yet (or must be again)
        self._crashed = False  # ... because it died (unblock NMIs when re-establishing)
        self._win_pde = 0  # the APIC window PDE the agent last stored
        self._lapic = K.kvm_lapic_state()
        self._sregs = K.kvm_sregs()
        self._msrs = K.kvm_msrs_1()
        self._mp = K.kvm_mp_state()
        mem = vm.mem
        mem[self._area:self._area + PERCPU_SIZE] = bytes(PERCPU_SIZE)
        self._put32(MB_IDLE_MAX, IDLE_MAX)
        self._put32(MB_ITER_MAX, ITER_MAX)

    @property
    def apicv_active(self) -> bool:
        """Whether KVM runs this vCPU with APICv: only if the host's kvm_intel has it (never
        on these machines); KVM does not report the per-vCPU state."""
        return bool(self.vm.host_parameters.get("enable_apicv"))

    @property
    def location(self) -> str:
        """Between calls the real backend's vCPUs are always out of KVM_RUN."""
        return "host"

    def _close(self) -> None:
        self._run = None
        if self._run_mm is not None:
            self._run_mm.close()
            self._run_mm = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- mailbox access --
    def _put32(self, off: int, v: int) -> None:
        struct.pack_into("<I", self.vm.mem, self._mb + off, v & 0xFFFFFFFF)

    def _put64(self, off: int, v: int) -> None:
        struct.pack_into("<Q", self.vm.mem, self._mb + off, v & _U64)

    def _get32(self, off: int) -> int:
        return struct.unpack_from("<I", self.vm.mem, self._mb + off)[0]

    def _get64(self, off: int) -> int:
        return struct.unpack_from("<Q", self.vm.mem, self._mb + off)[0]

    def _ioctl(self, req: int, arg=0, name: str | None = None) -> int:
        self.vm._check_open()
        return _ioctl(self.fd, req, arg, name)

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

    def _get_mp_state(self) -> int:
        self._ioctl(K.KVM_GET_MP_STATE, self._mp)
        return self._mp.mp_state

    def _note_sipi(self, sregs: K.kvm_sregs) -> None:
        """A runnable vCPU whose CS is no longer the agent's, with CS.base == CS.selector << 4,
        has accepted a SIPI (kvm_vcpu_deliver_sipi_vector: selector = vector << 8, base =
        vector << 12, RIP 0). Without an INIT first the vCPU is still in long mode."""
        cs = sregs.cs
        if cs.selector != SEL_CODE and cs.base == cs.selector << 4 and not cs.selector & 0xFF:
            self.sipi = (cs.selector, cs.base, self.get_regs().rip)

    def set_mp_state(self, state: int) -> None:
        """KVM_SET_MP_STATE."""
        self._ioctl(K.KVM_SET_MP_STATE, K.kvm_mp_state(mp_state=state & 0xFFFFFFFF))

    def get_msr(self, index: int) -> int:
        """KVM_GET_MSRS for one MSR. MsrRejected when KVM processes 0 MSRs."""
        m = self._msrs
        m.nmsrs = 1
        m.entries[0].index = index & 0xFFFFFFFF
        m.entries[0].data = 0
        if self._ioctl(K.KVM_GET_MSRS, m) != 1:
            raise MsrRejected("KVM_GET_MSRS", index)
        return m.entries[0].data

    def set_msr(self, index: int, value: int) -> bool:
        """KVM_SET_MSRS for one MSR: True if KVM set it (returned 1)."""
        if not 0 <= value <= _U64:
            raise ValueError(f"MSR value {value:#x} does not fit in 64 bits")
        m = self._msrs
        m.nmsrs = 1
        m.entries[0].index = index & 0xFFFFFFFF
        m.entries[0].data = value
        return self._ioctl(K.KVM_SET_MSRS, m) == 1

    def nmi(self) -> None:
        """KVM_NMI."""
        self._ioctl(K.KVM_NMI)

    def setup_mce(self, mcg_cap: int) -> None:
        """KVM_X86_SETUP_MCE."""
        self._ioctl(K.KVM_X86_SETUP_MCE, ctypes.c_uint64(mcg_cap & _U64))

    def set_cpuid(self, *, x2apic: bool = True, tsc_deadline: bool = True) -> None:
        """KVM_SET_CPUID2: what KVM_GET_SUPPORTED_CPUID reports, with this vCPU's APIC IDs
        (leaf 1 EBX[31:24], leaves 0xB/0x1F EDX), CPUID.1:ECX x2APIC (bit 21) and TSC-deadline
        (bit 24) as asked, and the VM's MAXPHYADDR. KVM refuses a different CPUID once the
        vCPU has run (EINVAL)."""
        buf = vcpu_cpuid(self.vm._supported_cpuid, self.vcpu_id, x2apic=x2apic,
                         tsc_deadline=tsc_deadline, maxphyaddr=self.vm.maxphyaddr)
        self._ioctl(K.KVM_SET_CPUID2, buf)

    def set_tpr_access_reporting(self, enabled: bool, flags: int = 0) -> None:
        """KVM_TPR_ACCESS_REPORTING (reports arrive as KVM_EXIT_TPR_ACCESS during guest
        operations and are collected in ``tpr_accesses``)."""
        ctl = K.kvm_tpr_access_ctl(enabled=int(bool(enabled)), flags=flags & 0xFFFFFFFF)
        self._ioctl(K.KVM_TPR_ACCESS_REPORTING, ctl)

    def get_sregs(self) -> K.kvm_sregs:
        """KVM_GET_SREGS (a fresh copy)."""
        s = K.kvm_sregs()
        self._ioctl(K.KVM_GET_SREGS, s)
        return s

    def get_regs(self) -> K.kvm_regs:
        """KVM_GET_REGS."""
        r = K.kvm_regs()
        self._ioctl(K.KVM_GET_REGS, r)
        return r

    # ------------------------------------------------------------------ guest operations
    def mmio_read(self, offset: int, size: int = 4) -> int:
        """The guest reads *size* bytes at APIC base + *offset* (xAPIC MMIO)."""
        self._check_mmio(offset, size)
        return self._op(CMD_MMIO_READ, offset=offset, size=size)

    def mmio_write(self, offset: int, value: int, size: int = 4) -> None:
        """The guest writes *value* (*size* bytes) at APIC base + *offset*."""
        self._check_mmio(offset, size)
        if not 0 <= value < (1 << (8 * size)):
            raise ValueError(f"value {value:#x} does not fit in {size} bytes")
        self._op(CMD_MMIO_WRITE, offset=offset, size=size, arg1=value)

    def rdmsr(self, index: int) -> int:
        """The guest executes RDMSR; GuestFault(13) where KVM injects #GP."""
        self._check_msr_index(index)
        return self._op(CMD_RDMSR, arg0=index, what=f"RDMSR {index:#x}")

    def wrmsr(self, index: int, value: int) -> None:
        """The guest executes WRMSR; GuestFault(13) where KVM injects #GP."""
        self._check_msr_index(index)
        if not 0 <= value <= _U64:
            raise ValueError(f"MSR value {value:#x} does not fit in 64 bits")
        self._op(CMD_WRMSR, arg0=index, arg1=value, what=f"WRMSR {index:#x} <- {value:#x}")

    def write_cr8(self, value: int) -> None:
        """The guest executes MOV CR8, value (64-bit mode): TPR = (value & 0xf) << 4."""
        if not 0 <= value <= 0xF:
            raise GuestFault(13, f"MOV to CR8 with reserved bits set ({value:#x})")
        self._op(CMD_WRITE_CR8, arg1=value)

    def read_cr8(self) -> int:
        """The guest executes MOV reg, CR8: TPR[7:4]."""
        return self._op(CMD_READ_CR8)

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
        lim = NO_LIMIT if limit is None else min(limit, NO_LIMIT)
        self._op(CMD_TAKE_INTERRUPTS, limit=lim, eoi=eoi)
        out, self.taken = self.taken, []
        return out

    def run(self) -> list[int]:
        """One KVM_RUN in which the guest only exits back (OUT): injects what is pending
        (NMIs with IF=0) and returns vectors taken since the last take_interrupts."""
        self._op(CMD_RUN)
        return list(self.taken)

    def ioapic_read(self, offset: int, size: int = 4) -> int:
        """The guest loads *size* bytes at IOAPIC base (0xFEC00000) + *offset*; the in-kernel
        IOAPIC (ioapic_mmio_read) answers without an exit to userspace."""
        self._check_ioapic(offset, size)
        return self._op(CMD_LOAD, arg0=MU.KVM_IOAPIC_DEFAULT_BASE_ADDRESS + offset, size=size)

    def ioapic_write(self, offset: int, value: int, size: int = 4) -> None:
        """The guest stores *value* (*size* bytes) at IOAPIC base (0xFEC00000) + *offset*
        (ioapic_mmio_write in the kernel)."""
        self._check_ioapic(offset, size)
        if not 0 <= value < (1 << (8 * size)):
            raise ValueError(f"value {value:#x} does not fit in {size} bytes")
        self._op(CMD_STORE, arg0=MU.KVM_IOAPIC_DEFAULT_BASE_ADDRESS + offset, size=size,
                 arg1=value)

    def inb(self, port: int) -> int:
        """The guest executes IN AL, DX on a port of the in-kernel i8259 PIC (0x20, 0x21,
        0xA0, 0xA1) or its ELCR (0x4D0, 0x4D1); KVM handles it without a userspace exit."""
        self._check_port(port)
        return self._op(CMD_IN, arg0=port) & 0xFF

    def outb(self, port: int, value: int) -> None:
        """The guest executes OUT DX, AL on a PIC/ELCR port (see inb)."""
        self._check_port(port)
        if not 0 <= value <= 0xFF:
            raise ValueError(f"value {value:#x} does not fit in a byte")
        self._op(CMD_OUT, arg0=port, arg1=value)

    def set_vapic_addr(self, gpa: int) -> None:
        """KVM_SET_VAPIC_ADDR: the guest-physical address of the 32-bit VAPIC word that KVM
        writes before entry (kvm_lapic_sync_to_vapic) and reads TPR from after each exit
        (kvm_lapic_sync_from_vapic); 0 turns it off. KvmError(EINVAL) for an address KVM
        cannot map (kvm_gfn_to_hva_cache_init fails outside a memslot)."""
        if not 0 <= gpa <= _U64:
            raise ValueError(f"address {gpa:#x} does not fit in 64 bits")
        self._ioctl(K.KVM_SET_VAPIC_ADDR, K.kvm_vapic_addr(vapic_addr=gpa))

    def guest_load(self, gpa: int, size: int = 4) -> int:
        """The guest loads *size* bytes of RAM at *gpa* (inside KVM_RUN, so KVM's entry work --
        kvm_lapic_sync_to_vapic, PV-EOI arming -- happens before it and the exit work --
        kvm_lapic_sync_from_vapic, the PV-EOI check -- after it)."""
        self._check_ram(gpa, size)
        return self._op(CMD_LOAD, arg0=gpa, size=size)

    def guest_store(self, gpa: int, value: int, size: int = 4) -> None:
        """The guest stores *value* (*size* bytes) to RAM at *gpa* (see guest_load). Storing
        over the agent's own pages (below SCRATCH_GPA, or the per-vCPU area) breaks it."""
        self._check_ram(gpa, size)
        if not 0 <= value < (1 << (8 * size)):
            raise ValueError(f"value {value:#x} does not fit in {size} bytes")
        self._op(CMD_STORE, arg0=gpa, size=size, arg1=value)

    # -- argument checks (as the model makes them) --
    @staticmethod
    def _check_ioapic(offset: int, size: int) -> None:
        if size not in (1, 2, 4, 8):
            raise ValueError(f"MMIO size must be 1, 2, 4 or 8, not {size}")
        if not 0 <= offset <= IOAPIC_MMIO_SIZE - size:
            raise ValueError(f"offset {offset:#x} is outside the IOAPIC's "
                             f"{IOAPIC_MMIO_SIZE:#x}-byte window")

    @staticmethod
    def _check_port(port: int) -> None:
        if port not in PIC_PORTS:
            raise ValueError(f"port {port:#x} is not an in-kernel PIC/ELCR port "
                             f"({', '.join(f'{p:#x}' for p in sorted(PIC_PORTS))})")

    @staticmethod
    def _check_ram(gpa: int, size: int) -> None:
        if size not in (1, 2, 4, 8):
            raise ValueError(f"access size must be 1, 2, 4 or 8, not {size}")
        if not in_ram(gpa, size):
            raise ValueError(f"[{gpa:#x}, {gpa + size:#x}) is not guest RAM")

    @staticmethod
    def _check_mmio(offset: int, size: int) -> None:
        if size not in (1, 2, 4, 8):
            raise ValueError(f"MMIO size must be 1, 2, 4 or 8, not {size}")
        if not 0 <= offset <= 0x1000 - size:
            raise ValueError(f"offset {offset:#x} is outside the 4 KiB APIC page")

    @staticmethod
    def _check_msr_index(index: int) -> None:
        if not 0 <= index <= 0xFFFFFFFF:
            raise ValueError(f"MSR index {index:#x} does not fit in 32 bits")

    # ------------------------------------------------------------------ agent plumbing
    def _op(self, cmd: int, *, offset: int = 0, size: int = 0, arg0: int = 0, arg1: int = 0,
            limit: int = NO_LIMIT, eoi: bool = True, what: str = "") -> int:
        """One guest operation: prepare the vCPU, post the command, KVM_RUN to PORT_DONE."""
        self.vm._check_open()
        st = self._get_mp_state()
        if st in _NOT_RUNNING:
            raise VcpuNotRunnable(self.vcpu_id, st,
                                  "waiting for SIPI" if st == MU.KVM_MP_STATE_INIT_RECEIVED
                                  else "no INIT/SIPI pending")
        sregs = self._sregs
        self._ioctl(K.KVM_GET_SREGS, sregs)
        if (self._needs_setup or not sregs.cr0 & K.X86_CR0_PG
                or sregs.cs.selector != SEL_CODE):  # reset by INIT, or moved by a SIPI
            self._establish(sregs)
        apic_base = sregs.apic_base
        va = self._apic_va(apic_base)
        if cmd in (CMD_MMIO_READ, CMD_MMIO_WRITE):
            arg0 = va + offset
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        self._put32(MB_CMD, cmd)
        self._put32(MB_SEQ, self._seq)
        self._put64(MB_ARG0, arg0)
        self._put64(MB_ARG1, arg1)
        self._put32(MB_SIZE, size)
        self._put64(MB_RESULT, 0)
        self._put32(MB_FAULT, 0)
        x2 = (apic_base & (A.MSR_IA32_APICBASE_ENABLE | A.X2APIC_ENABLE)
              == (A.MSR_IA32_APICBASE_ENABLE | A.X2APIC_ENABLE))
        self._put32(MB_X2APIC, int(x2))
        self._put64(MB_APIC_VA, va)
        self._put32(MB_EOI, int(bool(eoi)))
        self._put64(MB_PV_EOI, self._pv_eoi_gpa() if cmd in (CMD_TAKE_INTERRUPTS, CMD_RUN)
                    else 0)  # interrupt handlers run only in these (other commands: IF=0)
        self._put32(MB_LIMIT, limit)
        mmio_exits: list[tuple[int, int, bool]] = []
        try:
            self._run_agent(mmio_exits)
        finally:
            self._drain_log()
        if cmd == CMD_TAKE_INTERRUPTS:
            self.last_iterations = self._get32(MB_ITERATIONS)
        if mmio_exits:
            gpa, n, is_write = mmio_exits[0]
            raise MmioExit(gpa, n, is_write)
        if self._get32(MB_FAULT):
            raise GuestFault(self._get32(MB_FAULT), what)
        return self._get64(MB_RESULT)

    def _pv_eoi_gpa(self) -> int:
        """Where the handlers find the PV-EOI flag: MSR_KVM_PV_EOI_EN (KVM_GET_MSRS) without
        its flag bits when enabled, else 0 (the handlers then always EOI the APIC)."""
        try:
            v = self.get_msr(MU.MSR_KVM_PV_EOI_EN)
        except MsrRejected:
            return 0
        return v & ~3 if v & MU.KVM_MSR_ENABLED else 0

    def _apic_va(self, apic_base: int) -> int:
        """Where the agent finds the APIC page: its GPA when below 4 GiB (identity map), else
        a 2 MiB window of this vCPU's own at 4 GiB + idx * 2 MiB, which the agent maps."""
        gpa = apic_base & ~0xFFF & ((1 << self.vm.maxphyaddr) - 1)
        if gpa + 0x1000 <= _4G:
            self._put32(MB_WIN_SET, 0)
            return gpa
        pde = (gpa & ~(_2M - 1)) | 0x83
        if self._win_pde != pde:
            # the agent stores the PDE itself so that KVM's MMU sees the page-table write
            self._put64(MB_WIN_PDE_ADDR, PD_WIN_GPA + 8 * self.vcpu_idx)
            self._put64(MB_WIN_PDE, pde)
            self._put32(MB_WIN_SET, 1)
            self._win_pde = pde
        else:
            self._put32(MB_WIN_SET, 0)
        va = WIN_VA + self.vcpu_idx * _2M + (gpa & (_2M - 1))
        return va

    def _drain_log(self) -> None:
        n = self._get32(MB_LOG_COUNT)
        if n:
            start = self._mb + MB_LOG
            self.taken.extend(self.vm.mem[start:start + min(n, LOG_CAPACITY)])
            self._put32(MB_LOG_COUNT, 0)
        skipped = self._get32(MB_PV_EOI_SKIPPED)
        if skipped:
            self.pv_eoi_skipped += skipped
            self._put32(MB_PV_EOI_SKIPPED, 0)
        dropped = self._get32(MB_LOG_DROPPED)
        if dropped:
            self.log_dropped += dropped
            self._put32(MB_LOG_DROPPED, 0)

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
        for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
            _flat(seg, SEL_DATA, type_=3, db=1, long=0)
        _flat(sregs.cs, SEL_CODE, type_=0xB, db=0, long=1)
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
        self._ioctl(K.KVM_SET_SREGS, sregs)
        regs = K.kvm_regs(rip=AGENT_GPA + self.vm.agent.entry, rsp=self._stack_top,
                          r15=self._mb, rflags=K.X86_EFLAGS_FIXED)
        self._ioctl(K.KVM_SET_REGS, regs)
        self._needs_setup = self._crashed = False
        self._put32(MB_WIN_SET, 0)
        if tpr & 0xF:
            self._restore_tpr(tpr, sregs.apic_base)

    def _restore_tpr(self, tpr: int, apic_base: int) -> None:
        """Write TPR back as the guest would (KVM_SET_SREGS truncated it to CR8 << 4)."""
        en = apic_base & A.MSR_IA32_APICBASE_ENABLE
        if en and apic_base & A.X2APIC_ENABLE:
            self._op(CMD_WRMSR, arg0=A.APIC_BASE_MSR + (A.APIC_TASKPRI >> 4), arg1=tpr)
        elif en:
            self._op(CMD_MMIO_WRITE, offset=A.APIC_TASKPRI, size=4, arg1=tpr)

    def _run_agent(self, mmio_exits: list[tuple[int, int, bool]]) -> None:
        """KVM_RUN until the agent reports the command done (or the vCPU stops running)."""
        run = self._run
        deadline = time.monotonic() + RUN_DEADLINE_S
        fd = self.fd
        with _RunWatchdog():
            while True:
                r, e = _ioctl_raw(fd, K.KVM_RUN)
                if r < 0:
                    if e == _errno.EAGAIN:
                        continue
                    if e != _errno.EINTR:
                        raise KvmError(e, "KVM_RUN")
                    st = self._get_mp_state()
                    if st == MU.KVM_MP_STATE_RUNNABLE:
                        if time.monotonic() > deadline:
                            self._needs_setup = self._crashed = True
                            raise KvmExitError(self.vcpu_id, "the guest agent did not finish "
                                               f"within {RUN_DEADLINE_S} s")
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
                    if port == PORT_DONE and io.direction == K.KVM_EXIT_IO_OUT:
                        if self._get32(MB_DONE) == self._seq:
                            return
                        continue
                    if port == PORT_KICK:
                        continue  # the interrupt window's exit: re-enter at once
                    if port == PORT_RESET:
                        return  # the BSP was reset by INIT; re-established next time
                    if port == PORT_EXCEPTION:
                        self._needs_setup = self._crashed = True
                        raise KvmExitError(
                            self.vcpu_id,
                            f"unexpected guest exception vector {self._get64(MB_EXC_VECTOR)} "
                            f"(error code {self._get64(MB_EXC_ERROR):#x}) at RIP "
                            f"{self._get64(MB_EXC_RIP):#x}")
                    self._needs_setup = self._crashed = True
                    kind = "OUT to" if io.direction == K.KVM_EXIT_IO_OUT else "IN from"
                    raise KvmExitError(self.vcpu_id, f"unexpected KVM_EXIT_IO: {kind} port "
                                       f"{port:#x}, size {io.size}")
                if reason == K.KVM_EXIT_MMIO:
                    m = run.u.mmio
                    mmio_exits.append((m.phys_addr, m.len, bool(m.is_write)))
                    if not m.is_write:
                        for i in range(8):
                            m.data[i] = 0xFF
                    continue  # the next KVM_RUN completes the access
                if reason == K.KVM_EXIT_TPR_ACCESS:
                    t = run.u.tpr_access
                    self.tpr_accesses.append((t.rip, bool(t.is_write)))
                    continue
                if reason in (K.KVM_EXIT_INTR, K.KVM_EXIT_IRQ_WINDOW_OPEN):
                    continue
                self._needs_setup = self._crashed = True
                raise KvmExitError(self.vcpu_id, self._describe_exit(reason))

    def _describe_exit(self, reason: int) -> str:
        run = self._run
        name = K.EXIT_REASON_NAMES.get(reason, f"exit reason {reason}")
        if reason == K.KVM_EXIT_INTERNAL_ERROR:
            i = run.u.internal
            data = ", ".join(f"{i.data[k]:#x}" for k in range(min(i.ndata, 16)))
            sub = {1: "emulation failure", 2: "simultaneous exceptions",
                   3: "event delivery", 4: "unexpected exit reason"}.get(i.suberror, "")
            return f"{name}: suberror {i.suberror} {sub} [{data}]"
        if reason == K.KVM_EXIT_FAIL_ENTRY:
            f = run.u.fail_entry
            return (f"{name}: hardware_entry_failure_reason "
                    f"{f.hardware_entry_failure_reason:#x} on cpu {f.cpu}")
        if reason == K.KVM_EXIT_SHUTDOWN:
            return f"{name}: the guest triple-faulted"
        if reason == K.KVM_EXIT_SYSTEM_EVENT:
            return f"{name}: type {run.u.system_event.type}"
        return f"unexpected {name}"

    def __repr__(self) -> str:
        return f"KvmVcpu(id={self.vcpu_id})"


def _flat(seg: K.kvm_segment, selector: int, *, type_: int, db: int, long: int) -> None:
    seg.base, seg.limit, seg.selector, seg.type = 0, 0xFFFFFFFF, selector, type_
    seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g, seg.avl, seg.unusable = (
        1, 0, db, 1, long, 1, 0, 0)
