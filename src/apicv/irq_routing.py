"""KVM's GSI routing and irqfds: virt/kvm/irqchip.c, the x86 half in arch/x86/kvm/irq.c, and
virt/kvm/eventfd.c -- mixed into :class:`apicv.vm.Vm`.

* The routing table (``struct kvm_irq_routing_table``): each GSI maps to its entries, in
  ``kvm_irq_map_gsi`` order (``hlist_add_head``: the last one added first); ``chip[irqchip][pin]``
  is the GSI of each irqchip pin (``kvm_irq_map_chip_pin``). KVM_CREATE_IRQCHIP installs
  ``default_routing[]``; a split irqchip starts empty. ``set_gsi_routing`` validates the whole
  table (``kvm_set_irq_routing``, ``setup_routing_entry``, ``kvm_set_routing_entry``) before it
  replaces the old one, so a refused table changes nothing.
* ``kvm_set_irq`` runs a GSI's entries -- IOAPIC pin, PIC pin, MSI -- and adds up their
  statuses as KVM does; KVM_IRQ_LINE(_STATUS) and irqfds go through it.
* Ack and mask notifiers (``kvm_notify_acked_irq``, ``kvm_fire_mask_notifiers``), which the
  IOAPIC, the PIC, irqfd resamplers and the PIT use.
* irqfds (KVM_IRQFD): a write to the eventfd injects as ``irqfd_wakeup``/``irqfd_inject``
  would. KVM is woken by the write itself; the model, which runs nothing between calls, reads
  every irqfd's eventfd (consuming its count, as ``eventfd_ctx_do_read`` in ``irqfd_wakeup``
  does) when an operation starts -- each VM or vCPU ioctl and guest operation, and
  :meth:`IrqRoutingMixin.poll_irqfds` -- and injects once per eventfd that was signalled.
  Several writes between two operations therefore reach the guest as one injection; on KVM the
  guest could not have taken the first one in between either, so IRR, the IOAPIC and the
  resamplefd end up the same. A count already pending when the irqfd is assigned is injected
  at once (KVM: "trigger it as if we didn't miss it") and left in the eventfd, as KVM's
  inject work item leaves it; the next write consumes both.
* Resampling irqfds (KVM_IRQFD_FLAG_RESAMPLE, full in-kernel irqchip only): the line is
  asserted with KVM_IRQFD_RESAMPLE_IRQ_SOURCE_ID and stays asserted until the guest's EOI
  reaches the irqchip pin; then ``irqfd_resampler_ack`` de-asserts it and signals every
  resamplefd on that GSI.
* ``kvm_scan_ioapic_routes``: with a split irqchip, the vectors of level-triggered MSI routes
  of the GSIs below ``reserved_ioapic_pins`` need an EOI exit (KVM_EXIT_IOAPIC_EOI).
"""

from __future__ import annotations

import os
import select
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from . import apicdef as A
from . import uapi as U
from .api import KVM_MAX_IRQ_ROUTES, IrqchipRoute, MsiRoute, default_routing
from .apic_map import kvm_apic_match_dest
from .errors import KvmError

KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
KVM_MSI_VALID_DEVID = 1 << 0
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1
KVM_IRQFD_RESAMPLE_IRQ_SOURCE_ID = 1
KVM_NR_IRQCHIPS = 3
KVM_IRQCHIP_NUM_PINS = U.KVM_IOAPIC_NUM_PINS
PIC_NUM_PINS = 16
IOAPIC_LEVEL_TRIG = 1


@dataclass(frozen=True, slots=True)
class RoutingEntry:
    """struct kvm_kernel_irq_routing_entry (x86: irqchip or MSI). For the slave PIC ``pin`` is
    the 0-15 pin KVM stores (``e->irqchip.pin += PIC_NUM_PINS / 2``)."""

    gsi: int
    type: int
    irqchip: int = 0
    pin: int = 0
    address_lo: int = 0
    address_hi: int = 0
    data: int = 0
    devid: int | None = None

    def as_route(self) -> MsiRoute | IrqchipRoute:
        if self.type == KVM_IRQ_ROUTING_MSI:
            return MsiRoute(self.gsi, self.address_lo, self.address_hi, self.data, self.devid)
        pin = self.pin - 8 if self.irqchip == U.KVM_IRQCHIP_PIC_SLAVE else self.pin
        return IrqchipRoute(self.gsi, self.irqchip, pin)


@dataclass(slots=True)
class RoutingTable:
    """struct kvm_irq_routing_table."""

    map: dict[int, list[RoutingEntry]] = field(default_factory=dict)
    chip: list[list[int]] = field(
        default_factory=lambda: [[-1] * KVM_IRQCHIP_NUM_PINS for _ in range(KVM_NR_IRQCHIPS)])
    nr_rt_entries: int = 1
    routes: tuple[MsiRoute | IrqchipRoute, ...] = ()  # as userspace gave them


@dataclass(slots=True)
class Resampler:
    """struct kvm_kernel_irqfd_resampler: the resampling irqfds of one GSI."""

    gsi: int
    resamplefds: list[int] = field(default_factory=list)
    notifier: Callable[[], None] | None = None  # its kvm_irq_ack_notifier.irq_acked


@dataclass(slots=True)
class Irqfd:
    """struct kvm_kernel_irqfd."""

    fd: int
    gsi: int
    eventfd: int  # the eventfd context's id (eventfd_ctx_fileget: what KVM compares)
    stale: int = 0  # a count pending at assign, injected then but left in the eventfd
    resampler: Resampler | None = None
    resamplefd: int | None = None


class IrqRoutingMixin:
    """GSI routing, notifiers and irqfds of :class:`apicv.vm.Vm` (attributes it uses are the
    VM's: ``kvm``, ``ioapic``, ``pic``, ``router``, ``vcpus``, ``trace``)."""

    def irq_routing_init(self) -> None:
        """kvm_init_irq_routing(), then KVM_CREATE_IRQCHIP's default routing."""
        self.irq_routing = RoutingTable()
        self.irq_ack_notifiers: list[tuple[int, Callable[[], None]]] = []
        self.irq_mask_notifiers: list[tuple[int, Callable[[bool], None]]] = []
        self.irqfds: list[Irqfd] = []
        self.resamplers: list[Resampler] = []
        self._irqfd_poll: select.poll | None = None
        self._irq_source_ids = {U.KVM_USERSPACE_IRQ_SOURCE_ID, KVM_IRQFD_RESAMPLE_IRQ_SOURCE_ID}
        if not self.kvm.irqchip_split:
            self.irq_routing = self.build_routing_table(default_routing(), "KVM_CREATE_IRQCHIP")

    # ------------------------------------------------------------------ KVM_SET_GSI_ROUTING
    def set_gsi_routing(self, routes: Sequence[MsiRoute | IrqchipRoute]) -> None:
        """KVM_SET_GSI_ROUTING: replace the whole table (KvmError(EINVAL) and nothing changed
        if any entry is refused). A split irqchip's VM then rescans its EOI-exit vectors
        (kvm_arch_irq_routing_update)."""
        self.check_open()
        routes = tuple(routes)
        for r in routes:
            if not isinstance(r, MsiRoute | IrqchipRoute):
                raise TypeError(f"a GSI route is an MsiRoute or an IrqchipRoute, not {r!r}")
        if len(routes) > KVM_MAX_IRQ_ROUTES:
            raise KvmError(U.EINVAL, "KVM_SET_GSI_ROUTING",
                           f"{len(routes)} routes (at most {KVM_MAX_IRQ_ROUTES})")
        table = self.build_routing_table(routes, "KVM_SET_GSI_ROUTING")
        with self.vm_ioctl():
            self.irq_routing = table
            if self.kvm.irqchip_split:
                self.kvm_make_scan_ioapic_request()  # kvm_arch_irq_routing_update()

    def get_gsi_routing(self) -> tuple[MsiRoute | IrqchipRoute, ...]:
        """The table in force, as it was given (not an ioctl: KVM has no KVM_GET_GSI_ROUTING;
        userspace keeps its own copy)."""
        return self.irq_routing.routes

    def build_routing_table(self, routes: Sequence[MsiRoute | IrqchipRoute],
                            ioctl: str) -> RoutingTable:
        """kvm_set_irq_routing() up to the swap: the new table, or KvmError(EINVAL)."""
        nr = 0
        for r in routes:
            if r.gsi >= KVM_MAX_IRQ_ROUTES:
                raise KvmError(U.EINVAL, ioctl, f"GSI {r.gsi} (at most {KVM_MAX_IRQ_ROUTES - 1})")
            nr = max(nr, r.gsi)
        table = RoutingTable(nr_rt_entries=nr + 1, routes=tuple(routes))
        for r in routes:
            self.setup_routing_entry(table, r, ioctl)
        return table

    def setup_routing_entry(self, table: RoutingTable, ue: MsiRoute | IrqchipRoute,
                            ioctl: str) -> None:
        """setup_routing_entry() + kvm_set_routing_entry() (x86)."""
        lst = table.map.setdefault(ue.gsi, [])
        for ei in lst:
            # one entry per irqchip per GSI; an MSI route is alone on its GSI
            if (ei.type != KVM_IRQ_ROUTING_IRQCHIP or isinstance(ue, MsiRoute)
                    or ue.irqchip == ei.irqchip):
                raise KvmError(U.EINVAL, ioctl, f"GSI {ue.gsi} has a conflicting route")
        if isinstance(ue, MsiRoute):
            if self.kvm.x2apic_format and ue.address_hi & 0xFF:
                raise KvmError(U.EINVAL, ioctl, "address_hi bits 7:0 must be 0 with 32-bit IDs")
            e = RoutingEntry(ue.gsi, KVM_IRQ_ROUTING_MSI, address_lo=ue.address_lo,
                             address_hi=ue.address_hi, data=ue.data, devid=ue.devid)
        else:
            if self.kvm.irqchip_split:
                raise KvmError(U.EINVAL, ioctl, "irqchip routes need the in-kernel PIC/IOAPIC")
            pin = ue.pin
            if ue.irqchip in (U.KVM_IRQCHIP_PIC_MASTER, U.KVM_IRQCHIP_PIC_SLAVE):
                if ue.pin >= PIC_NUM_PINS // 2:
                    raise KvmError(U.EINVAL, ioctl, f"PIC pin {ue.pin} (0-7)")
                if ue.irqchip == U.KVM_IRQCHIP_PIC_SLAVE:
                    pin += PIC_NUM_PINS // 2
            elif ue.irqchip == U.KVM_IRQCHIP_IOAPIC:
                if ue.pin >= U.KVM_IOAPIC_NUM_PINS:
                    raise KvmError(U.EINVAL, ioctl, f"IOAPIC pin {ue.pin} (0-23)")
            else:
                raise KvmError(U.EINVAL, ioctl, f"irqchip {ue.irqchip} (0, 1 or 2)")
            e = RoutingEntry(ue.gsi, KVM_IRQ_ROUTING_IRQCHIP, irqchip=ue.irqchip, pin=pin)
            table.chip[ue.irqchip][pin] = ue.gsi
        lst.insert(0, e)  # hlist_add_head

    def kvm_irq_map_gsi(self, gsi: int) -> list[RoutingEntry]:
        """kvm_irq_map_gsi(): the GSI's entries, in table order."""
        table = self.irq_routing
        return table.map.get(gsi, []) if gsi < table.nr_rt_entries else []

    def kvm_irq_map_chip_pin(self, irqchip: int, pin: int) -> int:
        """kvm_irq_map_chip_pin(): the GSI routed to this irqchip pin, or -1."""
        return self.irq_routing.chip[irqchip][pin]

    # ------------------------------------------------------------------ kvm_set_irq
    def kvm_set_irq(self, irq_source_id: int, gsi: int, level: int,
                    line_status: bool = False) -> int:
        """kvm_set_irq(): every entry of the GSI, last in the table first; < 0 ignored, 0
        coalesced, > 0 the number of CPUs reached."""
        tr = self.trace
        if tr is not None:
            tr.kvm_set_irq(gsi, level, irq_source_id)
        ret = -1
        lvl = 1 if level else 0
        for e in reversed(self.kvm_irq_map_gsi(gsi)):
            if e.type == KVM_IRQ_ROUTING_MSI:
                r = self.router.kvm_set_msi(e.address_lo, e.address_hi, e.data, lvl)
            elif e.irqchip == U.KVM_IRQCHIP_IOAPIC:
                r = self.ioapic.kvm_ioapic_set_irq(e.pin, irq_source_id, lvl, line_status)
            else:
                r = self.pic.kvm_pic_set_irq(e.pin, irq_source_id, lvl)
            if r < 0:
                continue
            ret = r + (0 if ret < 0 else ret)
        return ret

    def kvm_request_irq_source_id(self) -> int:
        """An IRQ source id of its own (the PIT's), as kvm_request_irq_source_id() hands out
        the lowest free one after userspace's (0) and the resamplers' (1)."""
        sid = 2
        while sid in self._irq_source_ids:
            sid += 1
        self._irq_source_ids.add(sid)
        return sid

    # ------------------------------------------------------------------ notifiers
    def kvm_register_irq_ack_notifier(self, gsi: int, irq_acked: Callable[[], None]) -> None:
        """kvm_register_irq_ack_notifier(): then every vCPU rescans its EOI-exit vectors."""
        self.irq_ack_notifiers.insert(0, (gsi, irq_acked))
        self.kvm_make_scan_ioapic_request()  # kvm_vcpu_request_scan_ioapic

    def kvm_unregister_irq_ack_notifier(self, gsi: int, irq_acked: Callable[[], None]) -> None:
        self.irq_ack_notifiers.remove((gsi, irq_acked))
        self.kvm_make_scan_ioapic_request()

    def kvm_irq_has_notifier(self, irqchip: int, pin: int) -> bool:
        """kvm_irq_has_notifier(): an ack notifier waits on the GSI of this irqchip pin."""
        gsi = self.kvm_irq_map_chip_pin(irqchip, pin)
        return gsi != -1 and any(g == gsi for g, _ in self.irq_ack_notifiers)

    def kvm_notify_acked_irq(self, irqchip: int, pin: int) -> None:
        """kvm_notify_acked_irq(): the guest acknowledged this irqchip pin (IOAPIC EOI, PIC
        ISR clear)."""
        tr = self.trace
        if tr is not None:
            tr.kvm_ack_irq(irqchip, pin)
        gsi = self.kvm_irq_map_chip_pin(irqchip, pin)
        if gsi == -1:
            return
        for g, irq_acked in list(self.irq_ack_notifiers):
            if g == gsi:
                irq_acked()

    def kvm_register_irq_mask_notifier(self, gsi: int, func: Callable[[bool], None]) -> None:
        """kvm_register_irq_mask_notifier()."""
        self.irq_mask_notifiers.insert(0, (gsi, func))

    def kvm_unregister_irq_mask_notifier(self, gsi: int, func: Callable[[bool], None]) -> None:
        self.irq_mask_notifiers.remove((gsi, func))

    def kvm_fire_mask_notifiers(self, irqchip: int, pin: int, mask: bool) -> None:
        """kvm_fire_mask_notifiers(): an irqchip pin was (un)masked."""
        gsi = self.kvm_irq_map_chip_pin(irqchip, pin)
        if gsi == -1:
            return
        for g, func in list(self.irq_mask_notifiers):
            if g == gsi:
                func(mask)

    # ------------------------------------------------------------------ split irqchip
    def kvm_scan_ioapic_routes(self, vcpu) -> int:
        """kvm_scan_ioapic_routes(): with a split irqchip, the vectors of the level-triggered
        MSI routes of the GSIs below reserved_ioapic_pins that aim at this vCPU (or that it
        still owes an EOI: kvm_scan_ioapic_irq)."""
        handled = 0
        table = self.irq_routing
        # kvm->arch.nr_reserved_ioapic_pins is a u8: KVM_CAP_SPLIT_IRQCHIP's argument (up to
        # 4096) is kept modulo 256
        nr = min(table.nr_rt_entries, self.config.reserved_ioapic_pins & 0xFF)
        x2apic_format = self.kvm.x2apic_format
        tr = self.trace
        for gsi in range(nr):
            for e in table.map.get(gsi, ()):
                if e.type != KVM_IRQ_ROUTING_MSI:
                    continue
                if tr is not None:  # kvm_set_msi_irq() traces every route it decodes
                    tr.kvm_msi_set_irq(e.address_lo | ((e.address_hi << 32) if x2apic_format
                                                       else 0), e.data)
                if not (e.data >> 15) & 1:
                    continue  # trig_mode = the data's level bit
                dest_id = (e.address_lo >> 12) & 0xFF
                if x2apic_format:
                    dest_id |= e.address_hi & 0xFFFFFF00
                dest_mode = A.APIC_DEST_LOGICAL if e.address_lo & 4 else A.APIC_DEST_PHYSICAL
                handled = kvm_scan_ioapic_irq(self.kvm, vcpu, dest_id, dest_mode,
                                              e.data & 0xFF, handled)
        return handled

    # ------------------------------------------------------------------ irqfd
    def irqfd(self, fd: int, gsi: int, *, resamplefd: int | None = None,
              deassign: bool = False) -> None:
        """KVM_IRQFD: *fd* (an eventfd, e.g. ``os.eventfd(0)``) injects GSI *gsi* when written
        (see the module docstring for when the model reads it); *resamplefd* makes it a
        resampling (level) irqfd; *deassign* removes it. KvmError with KVM's errno."""
        self.check_open()
        for name, v in (("fd", fd), ("gsi", gsi)) + (
                () if resamplefd is None else (("resamplefd", resamplefd),)):
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 0xFFFFFFFF:
                raise ValueError(f"struct kvm_irqfd: {name}={v!r} is a u32 field")
        if deassign:
            self.kvm_irqfd_deassign(fd, gsi)
            return
        # kvm_arch_irqfd_allowed(): a resampler needs the full in-kernel irqchip
        if resamplefd is not None and self.kvm.irqchip_split:
            raise KvmError(U.EINVAL, "KVM_IRQFD", "a resampling irqfd needs KVM_CREATE_IRQCHIP")
        ctx = eventfd_ctx_fdget(fd, "KVM_IRQFD")
        if resamplefd is not None:
            eventfd_ctx_fdget(resamplefd, "KVM_IRQFD")
        if any(i.eventfd == ctx for i in self.irqfds):
            raise KvmError(U.EBUSY, "KVM_IRQFD", f"fd {fd} is an irqfd already")
        irqfd = Irqfd(fd, gsi, ctx)
        # the operation starts (other irqfds' writes are read) before this irqfd is listed:
        # its pending count is not read as a write, which would consume it
        with self.vm_ioctl():
            if resamplefd is not None:
                res = next((r for r in self.resamplers if r.gsi == gsi), None)
                if res is None:
                    res = Resampler(gsi)
                    res.notifier = lambda: self.irqfd_resampler_ack(res)
                    self.resamplers.insert(0, res)
                    self.kvm_register_irq_ack_notifier(gsi, res.notifier)
                res.resamplefds.append(resamplefd)
                irqfd.resampler, irqfd.resamplefd = res, resamplefd
            self.irqfds.append(irqfd)
            self._irqfd_poll = None
            # "an event already pending on the eventfd": injected as if it had not been
            # missed, and (as KVM does) not consumed -- only a later write counts as new
            irqfd.stale = eventfd_count(fd)
            if irqfd.stale:
                self.irqfd_inject(irqfd)

    def kvm_irqfd_deassign(self, fd: int, gsi: int) -> None:
        """kvm_irqfd_deassign(): every irqfd of this eventfd and GSI (none is not an error);
        the last resampling irqfd of a GSI de-asserts its line."""
        ctx = eventfd_ctx_fdget(fd, "KVM_IRQFD")
        with self.vm_ioctl():
            for irqfd in [i for i in self.irqfds if i.gsi == gsi and i.eventfd == ctx]:
                self.irqfds.remove(irqfd)
                res = irqfd.resampler
                if res is not None:  # irqfd_resampler_shutdown()
                    res.resamplefds.remove(irqfd.resamplefd)
                    if not res.resamplefds:
                        self.resamplers.remove(res)
                        self.kvm_unregister_irq_ack_notifier(res.gsi, res.notifier)
                        self.kvm_set_irq(KVM_IRQFD_RESAMPLE_IRQ_SOURCE_ID, res.gsi, 0)
            self._irqfd_poll = None

    def irqfd_inject(self, irqfd: Irqfd) -> None:
        """irqfd_wakeup() / irqfd_inject(): a pulse on the GSI, or for a resampler the line
        asserted until the EOI."""
        if irqfd.resampler is None:
            self.kvm_set_irq(U.KVM_USERSPACE_IRQ_SOURCE_ID, irqfd.gsi, 1)
            self.kvm_set_irq(U.KVM_USERSPACE_IRQ_SOURCE_ID, irqfd.gsi, 0)
        else:
            self.kvm_set_irq(KVM_IRQFD_RESAMPLE_IRQ_SOURCE_ID, irqfd.gsi, 1)

    def irqfd_resampler_ack(self, res: Resampler) -> None:
        """irqfd_resampler_ack(): de-assert the GSI once, then signal every resamplefd."""
        self.kvm_set_irq(KVM_IRQFD_RESAMPLE_IRQ_SOURCE_ID, res.gsi, 0)
        for rfd in res.resamplefds:
            os.eventfd_write(rfd, 1)

    def irqfds_at_operation_start(self) -> None:
        """Before an operation (no other in progress): what was written to the irqfds since
        the last one is injected, and delivered to vCPUs resting in guest mode or HLT."""
        self._depth += 1
        try:
            fired = self.kvm_irqfd_poll()
        finally:
            self._depth -= 1
        if fired:
            self.settle()

    def poll_irqfds(self) -> None:
        """Deliver what was written to the irqfds so far (the model reads them when each
        operation starts anyway; the real backend waits for KVM's injection here)."""
        with self.vm_ioctl():
            pass

    def kvm_irqfd_poll(self) -> int:
        """Read every signalled irqfd's eventfd and inject (irqfd_wakeup). Returns how many
        irqfds fired."""
        irqfds = self.irqfds
        if not irqfds:
            return 0
        p = self._irqfd_poll
        if p is None:
            p = self._irqfd_poll = select.poll()
            for i in irqfds:
                p.register(i.fd, select.POLLIN)
        ready = p.poll(0)
        if not ready:
            return 0
        fired = 0
        fds = {fd for fd, ev in ready if ev & select.POLLIN}
        for irqfd in list(irqfds):
            if irqfd.fd not in fds:
                continue
            if irqfd.stale:
                if eventfd_count(irqfd.fd) == irqfd.stale:
                    continue  # only the count that was pending at assign
                irqfd.stale = 0
            if _eventfd_take(irqfd.fd):
                self.irqfd_inject(irqfd)
                fired += 1
        return fired


def kvm_scan_ioapic_irq(kvm, vcpu, dest_id: int, dest_mode: int, vector: int,
                        handled: int) -> int:
    """kvm_scan_ioapic_irq(): intercept the EOI if the vCPU is a target of the route, or owes
    an EOI for the vector from an older routing (then remembered as
    ``highest_stale_pending_ioapic_eoi``, whose EOI triggers a rescan)."""
    apic = vcpu.apic
    if kvm_apic_match_dest(kvm, apic, None, A.APIC_DEST_NOSHORT, dest_id, dest_mode):
        return handled | 1 << vector
    if apic.kvm_apic_pending_eoi(vector):
        arch = vcpu.arch
        if vector > arch.highest_stale_pending_ioapic_eoi:
            arch.highest_stale_pending_ioapic_eoi = vector
        return handled | 1 << vector
    return handled


def _eventfd_info(fd: int, key: str) -> int | None:
    """A field of /proc/self/fdinfo/FD (``eventfd-id``, ``eventfd-count``), or None."""
    with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
        info = f.read()
    for line in info.splitlines():
        if line.startswith(key + ":"):
            return int(line.split(":", 1)[1], 16 if key == "eventfd-count" else 10)
    return None


def eventfd_ctx_fdget(fd: int, ioctl: str) -> int:
    """eventfd_ctx_fdget(): the eventfd context behind *fd* (its ``eventfd-id``), KvmError
    EBADF for a closed fd and EINVAL for a file that is no eventfd."""
    try:
        ctx = _eventfd_info(fd, "eventfd-id")
    except OSError:
        raise KvmError(U.EBADF, ioctl, f"fd {fd} is not open") from None
    if ctx is None:
        raise KvmError(U.EINVAL, ioctl, f"fd {fd} is not an eventfd")
    return ctx


def eventfd_count(fd: int) -> int:
    """The eventfd's count, read without consuming it."""
    try:
        return _eventfd_info(fd, "eventfd-count") or 0
    except OSError:
        return 0


def _eventfd_take(fd: int) -> bool:
    """Consume the eventfd's count without blocking; whether it was signalled."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    if not p.poll(0):
        return False
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        return False
    return True
