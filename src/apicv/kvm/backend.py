"""The real-KVM VM: :class:`KvmVm` drives /dev/kvm with the API of :class:`apicv.api.VmAPI`.

A :class:`KvmVm` is created from a :class:`~apicv.api.VmConfig` (or the same options as
keyword arguments): one VM with an in-kernel irqchip (KVM_CREATE_IRQCHIP, or with
``irqchip="split"`` KVM_CAP_SPLIT_IRQCHIP: the LAPICs in KVM, no PIC or IOAPIC), guest RAM
laid out for the guest agent (:mod:`apicv.kvm.agent`) and its vCPUs
(:class:`~apicv.kvm.vcpu.KvmVcpu`). Its ``config`` is the resolved one -- every "the backend's
own value" replaced by what this host has -- so that ``apicv.Vm(kvm_vm.config)`` is a model of
this host. :class:`KvmClock` is its wall clock.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as _errno
import mmap
import os
import time
from typing import Any

from .. import uapi as MU
from ..api import IrqchipRoute, MsiRoute, VmConfig, default_routing
from ..errors import ApicvError, KvmError
from ..memory import in_ram
from . import agent as G
from . import uapi as K
from .reuse import ResettableVm
from .state_ioctls import KvmVmClockMixin
from .sys import (
    U64_MAX,
    cpuid_maxphyaddr,
    enable_vm_cap,
    get_supported_cpuid,
    host_module_parameters,
    host_supported_mce_cap,
    host_tsc_khz,
    ioctl,
    ioctl_raw,
)
from .vcpu import KvmVcpu

# the VmConfig fields that are module parameters of the host's kvm / kvm_intel
MODULE_PARAMETERS = ("enable_apicv", "flexpriority", "vector_hashing", "min_timer_period_us",
                     "lapic_timer_advance")


class KvmClock:
    """Wall time for the real backend: ``now`` is CLOCK_MONOTONIC nanoseconds since the VM was
    created, and ``advance(ns)`` sleeps that long (KVM's APIC timers are hrtimers on
    CLOCK_MONOTONIC; they fire by themselves, the host cannot see or count them)."""

    def __init__(self) -> None:
        self._t0 = time.monotonic_ns()

    @property
    def now(self) -> int:
        return time.monotonic_ns() - self._t0

    def restart(self) -> None:
        """Time 0 is now (:meth:`KvmVm.reset`)."""
        self._t0 = time.monotonic_ns()

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


def _u32(name: str, v: int) -> int:
    if not 0 <= v <= 0xFFFFFFFF:
        raise ValueError(f"{name} {v:#x} does not fit in 32 bits")
    return v


IRQFD_SETTLE_S = 0.2  # how long poll_irqfds waits for KVM to consume an eventfd


def _eventfd_count(fd: int) -> int:
    """An eventfd's count (/proc/self/fdinfo), read without consuming it; 0 if unreadable."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
            for line in f:
                if line.startswith("eventfd-count:"):
                    return int(line.split(":", 1)[1], 16)
    except (OSError, ValueError):
        pass
    return 0


class KvmVm(KvmVmClockMixin, ResettableVm):
    """A real KVM VM with an in-kernel irqchip and its vCPUs, with the interface of
    :class:`apicv.api.VmAPI`.

    Takes a :class:`~apicv.api.VmConfig` or its fields (``KvmVm(2, x2apic_api, **options)``;
    unknown options raise TypeError). Options the real KVM takes (``x2apic_api``,
    ``vcpu_ids``, ``bsp_vcpu_id``, ``apic_bus_cycle_ns``, ``disabled_quirks``,
    ``x2apic_cpuid``, ``tsc_deadline_cpuid``, ``mcg_cap``, ``maxphyaddr`` up to the host's,
    which goes into guest CPUID 0x80000008) are applied. What belongs to the host -- the module
    parameters (``enable_apicv``, ``flexpriority``, ``vector_hashing``,
    ``min_timer_period_us``, ``lapic_timer_advance``), ``tsc_khz``, ``smm`` and
    ``supported_mce_cap`` -- may be None (the default) or the host's value; anything else
    raises ValueError. ``irqchip="split"`` enables KVM_CAP_SPLIT_IRQCHIP with
    ``reserved_ioapic_pins`` instead of KVM_CREATE_IRQCHIP: no in-kernel PIC or IOAPIC
    (get/set_irqchip fail with ENXIO, the guest's IOAPIC and PIC accesses exit to userspace
    as MmioExit/IoExit), an empty routing table, level EOIs of reserved GSIs' MSI routes
    reported by ``vcpu.pop_exits()``. Confidential VM types are not implemented.
    ``trace=True`` is accepted but there is no tracing on this backend (``vm.trace`` is None).

    ``config`` is the resolved config: the host's values in place of every None.
    """

    backend = "kvm"

    def __init__(self, nr_vcpus: int | VmConfig = 1, x2apic_api: int = 0,
                 **options: Any) -> None:
        self._kvm_fd = -1
        self._vm_fd = -1
        self._mems: list[mmap.mmap] = []
        self.mem: mmap.mmap | None = None
        self.vcpus: list[KvmVcpu] = []
        self._by_id: dict[int, KvmVcpu] = {}
        self._closed = False
        self.trace = None  # no tracing on the real backend
        self._lines: dict[int, int] = {}  # GSI -> the level irq_line last drove it to
        self._fresh: tuple | None = None  # what save_fresh() recorded (ResettableVm)
        self._pit = False  # an in-kernel PIT was created
        cfg = VmConfig.from_options(nr_vcpus, x2apic_api, **options)
        self.config = cfg  # until the host's values are known (see the end)
        if cfg.vm_type_number:
            # ask the real KVM: a host without that VM type fails KVM_CREATE_VM (EINVAL)
            kfd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
            try:
                os.close(ioctl(kfd, K.KVM_CREATE_VM, cfg.vm_type_number))
            finally:
                os.close(kfd)
            raise NotImplementedError(f"VM type {cfg.vm_type_number} (confidential VMs: "
                                      "KVM_TDX_INIT_VM, ...) is not implemented by the KVM "
                                      "backend")
        # (fd, gsi, count pending at assign) attached with KVM_IRQFD
        self._irqfds: list[tuple[int, int, int]] = []
        # the GSI routing table last set (KVM has no ioctl to read it back)
        self._routing: tuple[MsiRoute | IrqchipRoute, ...] = (
            default_routing() if cfg.irqchip == "kernel" else ())
        self.clock = KvmClock()
        self.x2apic_cpuid = cfg.x2apic_cpuid
        self.tsc_deadline_cpuid = cfg.tsc_deadline_cpuid
        self.mcg_cap = cfg.mcg_cap
        self.host_parameters = host_module_parameters()
        for name in MODULE_PARAMETERS:
            self._host_value(name, getattr(cfg, name), self.host_parameters[name],
                             "the real KVM's module parameter is {have!r} on this host (a "
                             "module parameter cannot be changed per VM)")
        self.agent = G.load_agent()
        try:
            self._kvm_fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
            self._setup(cfg)
        except BaseException:
            self.close()
            raise
        self.config = cfg.replace(**self.host_parameters, tsc_khz=self.tsc_khz,
                                  maxphyaddr=self.maxphyaddr, smm=self.smm,
                                  supported_mce_cap=self.supported_mce_cap)

    @staticmethod
    def _host_value(name: str, want: Any, have: Any, why: str) -> None:
        """ValueError unless *want* is None or the host's value *have*."""
        if want is not None and want != have:
            raise ValueError(f"{name}={want!r}: " + why.format(have=have))

    def _setup(self, cfg: VmConfig) -> None:
        kfd = self._kvm_fd
        self.vcpu_mmap_size = ioctl(kfd, K.KVM_GET_VCPU_MMAP_SIZE)
        self.supported_cpuid = get_supported_cpuid(kfd)
        host_maxphyaddr = cpuid_maxphyaddr(self.supported_cpuid)
        if cfg.maxphyaddr is not None and not 32 <= cfg.maxphyaddr <= host_maxphyaddr:
            raise ValueError(f"maxphyaddr={cfg.maxphyaddr}: this host supports "
                             f"32..{host_maxphyaddr} (CPUID 0x80000008 EAX[7:0] = "
                             f"{host_maxphyaddr})")
        self.maxphyaddr = host_maxphyaddr if cfg.maxphyaddr is None else cfg.maxphyaddr
        self.supported_mce_cap = host_supported_mce_cap(kfd)
        self._host_value("supported_mce_cap", cfg.supported_mce_cap, self.supported_mce_cap,
                         "KVM_X86_GET_MCE_CAP_SUPPORTED is {have:#x} on this host")
        self._vm_fd = ioctl(kfd, K.KVM_CREATE_VM, 0)
        os.set_inheritable(self._vm_fd, False)
        # KVM_CAP_X86_SMM: whether an SMI can be injected at all
        self.smm = ioctl(self._vm_fd, K.KVM_CHECK_EXTENSION, K.KVM_CAP_X86_SMM) > 0
        self._host_value("smm", cfg.smm, self.smm, "KVM_CAP_X86_SMM is {have} on this host")
        self.tsc_khz = host_tsc_khz(kfd, self._vm_fd)
        self._host_value("tsc_khz", cfg.tsc_khz, self.tsc_khz,
                         "the guest TSC runs at the host's {have} kHz (no TSC scaling on this "
                         "backend)")
        if cfg.irqchip == "split":
            # LAPICs in KVM, PIC and IOAPIC in userspace; GSIs below reserved_ioapic_pins are
            # the userspace IOAPIC's (their level MSI routes make EOIs exit); empty routing
            self.enable_cap(MU.KVM_CAP_SPLIT_IRQCHIP, cfg.reserved_ioapic_pins)
        else:
            ioctl(self._vm_fd, K.KVM_CREATE_IRQCHIP)
        if cfg.apic_bus_cycle_ns != 1:
            self.enable_cap(K.KVM_CAP_X86_APIC_BUS_CYCLES_NS, cfg.apic_bus_cycle_ns)
        if cfg.disabled_quirks:
            self.enable_cap(K.KVM_CAP_DISABLE_QUIRKS2, cfg.disabled_quirks)
        if cfg.x2apic_api:
            # before the vCPUs (as QEMU does and the model does): enabling it later does not
            # refresh KVM's optimized APIC map
            self.enable_cap(K.KVM_CAP_X2APIC_API, cfg.x2apic_api)
        if cfg.bsp_vcpu_id:
            self.set_boot_cpu_id(cfg.bsp_vcpu_id)
        self._setup_memory()
        for vid in cfg.ids:
            self.create_vcpu(vid)

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
        ioctl(self._vm_fd, K.KVM_SET_USER_MEMORY_REGION, region)
        return mem

    def _setup_memory(self) -> None:
        # guest page 0 is left unbacked: an APIC base of 0 (IA32_APIC_BASE = 0, or EN with
        # base 0) must reach the LAPIC's MMIO window, not RAM (KVM consults MMIO devices only
        # for guest-physical addresses no memslot covers)
        self.mem = self._map(0, 0, G.RAM_SIZE, skip=G.RAM_SLOT_START)
        rom = self._map(1, G.ROM_GPA, G.ROM_SIZE)
        G.write_agent_image(self.mem, rom, self.agent)

    # ------------------------------------------------------------------ VM ioctls
    def create_vcpu(self, vcpu_id: int) -> KvmVcpu:
        """KVM_CREATE_VCPU (then mmap kvm_run, KVM_SET_CPUID2, KVM_X86_SETUP_MCE if mcg_cap)."""
        self.check_open()
        if not 0 <= vcpu_id <= 0xFFFFFFFF:
            raise KvmError(MU.EINVAL, "KVM_CREATE_VCPU", f"vcpu_id {vcpu_id} out of range")
        if len(self.vcpus) >= G.MAX_VCPUS:
            raise KvmError(MU.EINVAL, "KVM_CREATE_VCPU", f"at most {G.MAX_VCPUS} vCPUs")
        fd = ioctl(self._vm_fd, K.KVM_CREATE_VCPU, vcpu_id)
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
        """The vCPU with this vcpu_id (``vm.vcpus[i]`` indexes by creation order); ValueError
        if there is none."""
        try:
            return self._by_id[vcpu_id]
        except KeyError:
            ids = ", ".join(str(i) for i in self._by_id) or "none"
            raise ValueError(f"no vCPU with id {vcpu_id} (vCPU ids: {ids})") from None

    def set_boot_cpu_id(self, vcpu_id: int) -> None:
        """KVM_SET_BOOT_CPU_ID."""
        self.check_open()
        if not 0 <= vcpu_id <= U64_MAX:
            raise KvmError(MU.EINVAL, "KVM_SET_BOOT_CPU_ID", f"{vcpu_id} out of range")
        ioctl(self._vm_fd, K.KVM_SET_BOOT_CPU_ID, vcpu_id)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd."""
        self.check_open()
        return ioctl(self._vm_fd, K.KVM_CHECK_EXTENSION, cap)

    def enable_cap(self, cap: int, *args: int) -> None:
        """KVM_ENABLE_CAP on the VM fd (up to 4 arguments)."""
        self.check_open()
        enable_vm_cap(self._vm_fd, cap, *args)

    def signal_msi(self, address_lo: int, address_hi: int = 0, data: int = 0,
                   flags: int = 0, devid: int = 0) -> int:
        """KVM_SIGNAL_MSI: the number of APICs that accepted the interrupt.

        ValueError for a field that does not fit in its u32. Raises KvmError with the
        ioctl's errno: EPERM when no APIC matched at all (KVM returns -1), EINVAL for bad
        flags or routes."""
        self.check_open()
        msi = K.kvm_msi(address_lo=_u32("address_lo", address_lo),
                        address_hi=_u32("address_hi", address_hi), data=_u32("data", data),
                        flags=_u32("flags", flags), devid=_u32("devid", devid))
        r, e = ioctl_raw(self._vm_fd, K.KVM_SIGNAL_MSI, msi)
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
        self.check_open()
        if not 0 <= irq <= 0xFFFFFFFF:
            raise ValueError(f"GSI {irq:#x} does not fit in 32 bits")
        lv = K.kvm_irq_level(irq=irq, level=_u32("level", level))
        ioctl(self._vm_fd, K.KVM_IRQ_LINE_STATUS, lv)
        self._lines[irq] = level
        return lv.status

    # ------------------------------------------------------------------ GSI routing, irqfd
    def set_gsi_routing(self, routes: Any) -> None:
        """KVM_SET_GSI_ROUTING: replace the whole routing table with *routes*, a sequence of
        :class:`~apicv.api.MsiRoute` and :class:`~apicv.api.IrqchipRoute` (an MsiRoute with a
        devid sets KVM_MSI_VALID_DEVID). KVM validates the table whole before it replaces the
        old one (kvm_set_irq_routing); a refused table raises KvmError with KVM's errno and
        leaves the old one in force. TypeError for anything else in *routes*."""
        self.check_open()
        routes = tuple(routes)
        for r in routes:
            if not isinstance(r, (MsiRoute, IrqchipRoute)):
                raise TypeError(f"a GSI route is an MsiRoute or an IrqchipRoute, not {r!r}")
        buf = K.kvm_irq_routing_with(len(routes))()
        buf.nr = len(routes)
        for i, r in enumerate(routes):
            e = buf.entries[i]
            e.gsi = r.gsi
            if isinstance(r, MsiRoute):
                e.type = K.KVM_IRQ_ROUTING_MSI
                m = e.u.msi
                m.address_lo, m.address_hi, m.data = r.address_lo, r.address_hi, r.data
                if r.devid is not None:
                    e.flags = K.KVM_MSI_VALID_DEVID
                    m.devid = r.devid
            else:
                e.type = K.KVM_IRQ_ROUTING_IRQCHIP
                e.u.irqchip.irqchip, e.u.irqchip.pin = r.irqchip, r.pin
        ioctl(self._vm_fd, K.KVM_SET_GSI_ROUTING, buf)
        self._routing = routes

    def get_gsi_routing(self) -> tuple[MsiRoute | IrqchipRoute, ...]:
        """The routing table in force (not an ioctl: KVM cannot be asked): the last table
        KVM_SET_GSI_ROUTING accepted, else what the VM started with -- KVM's default routing
        (:func:`apicv.api.default_routing`) with the in-kernel irqchip, none when split."""
        self.check_open()
        return self._routing

    def irqfd(self, fd: int, gsi: int, *, resamplefd: int | None = None,
              deassign: bool = False) -> None:
        """KVM_IRQFD: signalling eventfd *fd* raises GSI *gsi* through the routing table in
        force at that moment (an MSI route is delivered from the eventfd's wakeup, anything
        else from a kernel work item: asynchronous either way). With *resamplefd*
        (KVM_IRQFD_FLAG_RESAMPLE) the GSI is a level line asserted by the write and
        de-asserted at the guest's EOI, when *resamplefd* is signalled; *deassign*
        (KVM_IRQFD_FLAG_DEASSIGN) detaches *fd* from *gsi*. KvmError with KVM's errno: EBADF
        for a closed fd, EINVAL for a file that is no eventfd or a resample KVM refuses (split
        irqchip), EBUSY for an eventfd already attached. ValueError for a field over 32 bits."""
        self.check_open()
        flags = ((K.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0)
                 | (K.KVM_IRQFD_FLAG_RESAMPLE if resamplefd is not None else 0))
        args = K.kvm_irqfd(fd=_u32("fd", fd), gsi=_u32("gsi", gsi), flags=flags,
                           resamplefd=0 if resamplefd is None else _u32("resamplefd",
                                                                        resamplefd))
        ioctl(self._vm_fd, K.KVM_IRQFD, args)
        if deassign:
            self._irqfds = [i for i in self._irqfds if i[:2] != (fd, gsi)]
        else:
            # a count pending at assign is injected but left in the eventfd by KVM
            self._irqfds.append((fd, gsi, _eventfd_count(fd)))

    def poll_irqfds(self) -> None:
        """Let what was written to the irqfds reach the guest: KVM injects from the eventfd's
        wakeup (MSI routes) or a kernel work item (anything else), so wait until KVM has
        consumed each attached eventfd's count (irqfd_wakeup's eventfd_ctx_do_read), at most
        IRQFD_SETTLE_S, and give the work item a moment. (The model injects here.)"""
        self.check_open()
        deadline = time.monotonic() + IRQFD_SETTLE_S
        for fd, _gsi, stale in self._irqfds:
            while _eventfd_count(fd) not in (0, stale) and time.monotonic() < deadline:
                time.sleep(0.0002)
        if self._irqfds:
            time.sleep(0.002)

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
        self.check_open()
        chip = K.kvm_irqchip(chip_id=_u32("chip id", chip_id))
        ioctl(self._vm_fd, K.KVM_GET_IRQCHIP, chip)
        raw = ctypes.string_at(ctypes.addressof(chip.chip), MU.KVM_IRQCHIP_STATE_SIZE)
        n = self._irqchip_size(chip_id)
        return raw[:n] if n else raw

    def set_irqchip(self, chip_id: int, data: bytes) -> None:
        """KVM_SET_IRQCHIP: load the chip's state. *data* is the used part of the union (16
        bytes for a PIC, 216 for the IOAPIC; the rest is sent as zeros) or all 512 bytes.
        ValueError for other lengths; KVM's errno (e.g. an unknown chip id) as KvmError."""
        self.check_open()
        data = bytes(data)
        _u32("chip id", chip_id)
        n = self._irqchip_size(chip_id)
        if len(data) not in {n, MU.KVM_IRQCHIP_STATE_SIZE} - {0}:
            want = f"{n} or {MU.KVM_IRQCHIP_STATE_SIZE}" if n else str(MU.KVM_IRQCHIP_STATE_SIZE)
            raise ValueError(f"chip {chip_id} state must be {want} bytes, got {len(data)}")
        chip = K.kvm_irqchip(chip_id=chip_id)
        ctypes.memmove(ctypes.addressof(chip.chip), data, len(data))
        ioctl(self._vm_fd, K.KVM_SET_IRQCHIP, chip)

    # ------------------------------------------------------------------ the i8254 PIT
    def create_pit2(self, flags: int = 0) -> None:
        """KVM_CREATE_PIT2 with struct kvm_pit_config {flags}: the in-kernel PIT on ports
        0x40-0x43 (and the speaker port 0x61 with KVM_PIT_SPEAKER_DUMMY), IRQ0 through the
        GSI routing, reinject mode on. EEXIST when the VM has one. ValueError over 32 bits."""
        self.check_open()
        if isinstance(flags, bool) or not isinstance(flags, int):
            raise ValueError(f"flags={flags!r}: a u32 (struct kvm_pit_config.flags)")
        ioctl(self._vm_fd, K.KVM_CREATE_PIT2, K.kvm_pit_config(flags=_u32("flags", flags)))
        self._pit = True

    def get_pit2(self) -> bytes:
        """KVM_GET_PIT2: struct kvm_pit_state2 (112 bytes; see apicv.i8254.unpack_pit_state2).
        ENXIO without a PIT. ``count_load_time`` is the host's ktime (CLOCK_MONOTONIC ns):
        it never matches the model's."""
        self.check_open()
        st = K.kvm_pit_state2()
        ioctl(self._vm_fd, K.KVM_GET_PIT2, st)
        return bytes(st)

    def set_pit2(self, data: bytes) -> None:
        """KVM_SET_PIT2: load a struct kvm_pit_state2 (112 bytes, else ValueError). ENXIO
        without a PIT. KVM reloads each count (0 is 0x10000; channels 1 and 2 restart now)."""
        self.check_open()
        data = bytes(data)
        if len(data) != MU.KVM_PIT_STATE2_SIZE:
            raise ValueError(f"struct kvm_pit_state2 is {MU.KVM_PIT_STATE2_SIZE} bytes, "
                             f"got {len(data)}")
        ioctl(self._vm_fd, K.KVM_SET_PIT2, K.kvm_pit_state2.from_buffer_copy(data))

    def reinject_control(self, reinject: bool | int) -> None:
        """KVM_REINJECT_CONTROL with struct kvm_reinject_control {pit_reinject: u8}: nonzero
        reinjects missed ticks (KVM's default), 0 discards them. ENXIO without a PIT;
        ValueError outside a u8."""
        self.check_open()
        if isinstance(reinject, bool):
            reinject = int(reinject)
        if not isinstance(reinject, int) or not 0 <= reinject <= 0xFF:
            raise ValueError(f"pit_reinject={reinject!r}: a u8")
        ioctl(self._vm_fd, K.KVM_REINJECT_CONTROL, K.kvm_reinject_control(pit_reinject=reinject))

    # ------------------------------------------------------------------ guest RAM (VMM side)
    def read_guest(self, gpa: int, size: int) -> bytes:
        """The VMM reads guest RAM (the RAM memslot's mmap, no ioctl); ValueError unless
        [gpa, gpa + size) is RAM (apicv.memory.in_ram, the model's rule)."""
        self.check_open()
        if not in_ram(gpa, size):
            raise ValueError(f"[{gpa:#x}, {gpa + size:#x}) is not guest RAM")
        assert self.mem is not None
        return bytes(self.mem[gpa:gpa + size])

    def write_guest(self, gpa: int, data: bytes) -> None:
        """The VMM writes guest RAM (the RAM memslot's mmap, no ioctl); ValueError unless
        [gpa, gpa + len(data)) is RAM (apicv.memory.in_ram)."""
        self.check_open()
        data = bytes(data)
        if not in_ram(gpa, len(data)):
            raise ValueError(f"[{gpa:#x}, {gpa + len(data):#x}) is not guest RAM")
        assert self.mem is not None
        self.mem[gpa:gpa + len(data)] = data

    @property
    def apicv_inhibits(self) -> None:
        """Not observable on the real KVM (kvm->arch.apicv_inhibit_reasons is internal)."""
        return None

    def set_or_clear_apicv_inhibit(self, reason: Any, set_: bool) -> None:
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
    def check_open(self) -> None:
        """ValueError once the VM is closed (its vCPUs check it before every ioctl)."""
        if self._closed:
            raise ValueError("the VM is closed")

    def close(self) -> None:
        """Close every vCPU fd, unmap kvm_run and guest memory, close the VM and /dev/kvm."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        for v in getattr(self, "vcpus", []):
            v.close()
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

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KvmVm(backend='kvm', vcpus={[v.vcpu_id for v in self.vcpus]})"
