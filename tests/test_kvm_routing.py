"""GSI routing, irqfd and the split irqchip on the real KVM (issue 13), through the KVM backend.

Each test names the KVM source it checks (virt/kvm/irqchip.c kvm_set_irq_routing and
setup_routing_entry, arch/x86/kvm/irq.c kvm_set_routing_entry / kvm_set_msi /
kvm_arch_irqfd_allowed / kvm_scan_ioapic_routes, virt/kvm/eventfd.c kvm_irqfd_assign /
irqfd_wakeup / irqfd_update / irqfd_resampler_ack, arch/x86/kvm/lapic.c kvm_ioapic_send_eoi,
arch/x86/kvm/x86.c KVM_CAP_SPLIT_IRQCHIP and KVM_EXIT_IOAPIC_EOI). These are the answers the
model must give. Facts marked "this host" are where the KVM of these machines (Linux 6.18,
PVM) differs from upstream: injection acts as the EOI (host-kvm-notes.md, item 1), so an
IOAPIC EOI exit, an ack notifier and a resamplefd signal come at injection, without a guest
EOI.

irqfd injection is asynchronous (irqfd_wakeup runs on the eventfd write; a non-MSI route
goes through a work item): the tests poll KVM_GET_LAPIC for up to a second.
"""

from __future__ import annotations

import errno
import os
import select
import struct
import time

import pytest

from apicv import uapi as U
from apicv.api import IrqchipRoute, MsiRoute, default_routing
from apicv.errors import IoExit, KvmError, MmioExit
from apicv.kvm import KvmVm, kvm_available

_OK, _WHY = kvm_available()
pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not _OK, reason=f"the KVM backend cannot run here: {_WHY}"),
]

SPIV, IRR = 0xF0, 0x200
IOREGSEL, IOWIN = 0x00, 0x10
RTE_LEVEL, RTE_REMOTE_IRR = 1 << 15, 1 << 14
MSI_ADDR = 0xFEE00000  # physical destination APIC ID 0
MSI_LEVEL = 1 << 15  # MSI data: trigger mode level
MASTER, SLAVE, IOAPIC = 0, 1, 2


def irr(cpu) -> list[int]:
    page = cpu.get_lapic()
    return [32 * i + b for i in range(8) for b in range(32)
            if struct.unpack_from("<I", page, IRR + 16 * i)[0] >> b & 1]


def wait_irr(cpu, vector: int, timeout: float = 1.0) -> bool:
    """Whether *vector* shows in IRR within *timeout* seconds (irqfd injects asynchronously)."""
    end = time.monotonic() + timeout
    while True:
        if vector in irr(cpu):
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.005)


def count(fd: int) -> int:
    """Read (and so reset) a non-blocking eventfd's counter: 0 when it is not readable."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def errno_of(fn, *args, **kw) -> int:
    with pytest.raises(KvmError) as e:
        fn(*args, **kw)
    return e.value.errno


def rte(vm: KvmVm, pin: int) -> int:
    return struct.unpack_from("<24Q", vm.get_irqchip(IOAPIC), 24)[pin]


def set_rte(cpu, pin: int, lo: int, hi: int = 0) -> None:
    cpu.ioapic_write(IOREGSEL, 0x10 + 2 * pin)
    cpu.ioapic_write(IOWIN, lo)
    cpu.ioapic_write(IOREGSEL, 0x11 + 2 * pin)
    cpu.ioapic_write(IOWIN, hi)


@pytest.fixture
def efd():
    fds: list[int] = []

    def make() -> int:
        fds.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        return fds[-1]

    yield make
    for fd in fds:
        os.close(fd)


@pytest.fixture
def vm():
    with KvmVm(1) as v:
        v.vcpus[0].mmio_write(SPIV, 0x1FF)
        yield v


@pytest.fixture
def split():
    with KvmVm(1, irqchip="split", reserved_ioapic_pins=8) as v:
        v.vcpus[0].mmio_write(SPIV, 0x1FF)
        yield v


# ---------------------------------------------------------------- KVM_SET_GSI_ROUTING
def test_a_vm_starts_with_the_default_routing_or_none(vm, split):
    """KVM_CREATE_IRQCHIP installs default_routing[]; a split irqchip keeps the empty table of
    kvm_init_irq_routing, so every GSI is ignored (kvm_set_irq: -1). get_gsi_routing is the
    table last set (KVM cannot be asked)."""
    assert vm.get_gsi_routing() == default_routing()
    assert split.get_gsi_routing() == ()
    assert split.config.irqchip == "split" and split.config.reserved_ioapic_pins == 8
    assert [split.irq_line(g, 1) for g in (0, 2, 23, 4095, 5000)] == [-1] * 5


def test_gsi_limits(vm):
    """kvm_set_irq_routing: a GSI >= KVM_MAX_IRQ_ROUTES (4096) is EINVAL; the ioctl refuses
    nr > 4096 entries (EINVAL); 4096 entries and GSI 4095 are fine."""
    vm.set_gsi_routing([MsiRoute(4095, MSI_ADDR, data=0x51)])
    assert errno_of(vm.set_gsi_routing, [MsiRoute(4096, MSI_ADDR, data=0x51)]) == errno.EINVAL
    vm.set_gsi_routing([MsiRoute(g, MSI_ADDR, data=0x51) for g in range(4096)])
    assert len(vm.get_gsi_routing()) == 4096
    too_many = [MsiRoute(g % 4096, MSI_ADDR, data=0x51) for g in range(4097)]
    assert errno_of(vm.set_gsi_routing, too_many) == errno.EINVAL


def test_msi_route_with_devid_is_accepted_on_x86(vm):
    """kvm_set_irq_routing accepts KVM_MSI_VALID_DEVID on an MSI entry and x86's
    kvm_set_routing_entry ignores the devid: the route works as without it."""
    vm.set_gsi_routing([MsiRoute(30, MSI_ADDR, data=0x51, devid=7)])
    assert vm.irq_line(30, 1) == 1
    assert irr(vm.vcpus[0]) == [0x51]


@pytest.mark.parametrize("table", [
    [MsiRoute(30, MSI_ADDR, data=0x51), MsiRoute(30, MSI_ADDR, data=0x52)],
    [MsiRoute(30, MSI_ADDR, data=0x51), IrqchipRoute(30, IOAPIC, 5)],
    [IrqchipRoute(30, IOAPIC, 5), MsiRoute(30, MSI_ADDR, data=0x51)],
    [IrqchipRoute(30, IOAPIC, 5), IrqchipRoute(30, IOAPIC, 6)],
    [IrqchipRoute(3, MASTER, 3), IrqchipRoute(3, MASTER, 4)],
], ids=["msi+msi", "msi+irqchip", "irqchip+msi", "ioapic+ioapic", "pic+pic"])
def test_one_gsi_twice_is_einval(vm, table):
    """setup_routing_entry: a GSI may have one non-irqchip route, or irqchip routes to
    different chips; anything else is EINVAL."""
    assert errno_of(vm.set_gsi_routing, table) == errno.EINVAL


def test_one_gsi_on_several_chips_and_one_pin_for_several_gsis(vm):
    """Different chips for one GSI are fine (as default_routing has GSI 0-15), PIC master and
    slave included; two GSIs may share a chip pin (the pin's ack notifier then follows the
    last: rt->chip[chip][pin])."""
    vm.set_gsi_routing([IrqchipRoute(40, MASTER, 1), IrqchipRoute(40, SLAVE, 1),
                        IrqchipRoute(40, IOAPIC, 20), IrqchipRoute(41, IOAPIC, 20)])


@pytest.mark.parametrize("route", [
    IrqchipRoute(1, MASTER, 8), IrqchipRoute(9, SLAVE, 8), IrqchipRoute(1, IOAPIC, 24),
    IrqchipRoute(1, 3, 0), IrqchipRoute(1, MASTER, 0xFFFFFFFF),
], ids=["master-pin-8", "slave-pin-8", "ioapic-pin-24", "chip-3", "pin-u32-max"])
def test_bad_irqchip_pin_is_einval(vm, route):
    """kvm_set_routing_entry: a PIC pin >= 8 (the slave's is checked before + 8), an IOAPIC
    pin >= KVM_IOAPIC_NUM_PINS (24) and an irqchip other than 0-2 are EINVAL."""
    assert errno_of(vm.set_gsi_routing, [route]) == errno.EINVAL


def test_x2apic_format_refuses_msi_address_hi_low_byte():
    """kvm_msi_route_invalid: with KVM_X2APIC_API_USE_32BIT_IDS, an MSI route whose
    address_hi has bits 7:0 set is EINVAL; bits 31:8 (destination ID 31:8) are fine."""
    with KvmVm(1, x2apic_api=U.KVM_X2APIC_API_USE_32BIT_IDS) as v:
        assert errno_of(v.set_gsi_routing, [MsiRoute(30, MSI_ADDR, 1, 0x51)]) == errno.EINVAL
        v.set_gsi_routing([MsiRoute(30, MSI_ADDR, 0x100, 0x51)])
    with KvmVm(1) as v:
        v.set_gsi_routing([MsiRoute(30, MSI_ADDR, 1, 0x51)])  # ignored without x2apic_format


def test_irqchip_routes_on_a_split_irqchip_are_einval(split):
    """kvm_set_routing_entry: KVM_IRQ_ROUTING_IRQCHIP with irqchip_split is EINVAL (there is no
    in-kernel PIC or IOAPIC); MSI routes are fine."""
    for chip, pin in ((IOAPIC, 0), (MASTER, 0), (SLAVE, 0)):
        assert errno_of(split.set_gsi_routing, [IrqchipRoute(0, chip, pin)]) == errno.EINVAL
    split.set_gsi_routing([MsiRoute(0, MSI_ADDR, data=0x51)])
    assert split.get_gsi_routing() == (MsiRoute(0, MSI_ADDR, data=0x51),)


def test_a_refused_table_leaves_the_old_one_in_force(vm):
    """kvm_set_irq_routing validates every entry into a new table before it swaps it in: a
    refused table changes nothing -- GSI 30 still delivers its MSI, GSI 0 stays unrouted."""
    cpu = vm.vcpus[0]
    table = (MsiRoute(30, MSI_ADDR, data=0x51),)
    vm.set_gsi_routing(table)
    bad = [IrqchipRoute(0, IOAPIC, 0), MsiRoute(31, MSI_ADDR, data=0x52),
           IrqchipRoute(1, IOAPIC, 24)]
    assert errno_of(vm.set_gsi_routing, bad) == errno.EINVAL
    assert vm.get_gsi_routing() == table
    assert vm.irq_line(31, 1) == -1
    assert vm.irq_line(0, 1) == -1
    assert vm.irq_line(30, 1) == 1
    assert irr(cpu) == [0x51]


def test_empty_table_unroutes_everything(vm):
    """An empty table (nr = 0) is accepted: every GSI is then ignored (kvm_set_irq: -1), the
    IOAPIC's and PIC's included; setting default_routing() back restores them."""
    vm.set_gsi_routing([])
    assert vm.get_gsi_routing() == ()
    assert [vm.irq_line(g, 1) for g in (0, 2, 17)] == [-1, -1, -1]
    vm.set_gsi_routing(default_routing())
    set_rte(vm.vcpus[0], 17, 0x41)
    assert vm.irq_line(17, 1) == 1


def test_routes_are_type_checked_before_the_ioctl(vm):
    with pytest.raises(TypeError):
        vm.set_gsi_routing([(30, MSI_ADDR, 0, 0x51)])
    assert vm.get_gsi_routing() == default_routing()


# ---------------------------------------------------------------- KVM_IRQ_LINE_STATUS
def test_irq_line_follows_a_custom_msi_route(vm, split):
    """kvm_set_irq through an MSI route: kvm_set_msi delivers on level 1 (the number of APICs
    that accepted it, here 1, IRR set) and returns -1 for level 0; an MSI to an APIC ID no
    vCPU has is accepted by none (0, not -1: the fast path found the map). Same on the split
    irqchip (irqchip_in_kernel holds for it)."""
    for v in (vm, split):
        v.set_gsi_routing([MsiRoute(30, MSI_ADDR, data=0x51),
                           MsiRoute(31, MSI_ADDR | 5 << 12, data=0x52)])
        assert v.irq_line(30, 1) == 1
        assert v.irq_line(30, 1) == 1  # edge MSI: every raise delivers (IRR already set)
        assert v.irq_line(30, 0) == -1
        assert v.irq_line(31, 1) == 0
        assert irr(v.vcpus[0]) == [0x51]
        assert v.vcpus[0].take_interrupts() == [0x51]


# ---------------------------------------------------------------- KVM_IRQFD
def test_irqfd_write_delivers_the_routed_msi(vm, efd):
    """irqfd_wakeup: an eventfd write injects GSI 30's MSI (kvm_arch_set_irq_inatomic) and
    consumes the count (eventfd_ctx_do_read): the eventfd is no longer readable."""
    cpu = vm.vcpus[0]
    fd = efd()
    vm.set_gsi_routing([MsiRoute(30, MSI_ADDR, data=0x51)])
    vm.irqfd(fd, 30)
    os.eventfd_write(fd, 1)
    assert wait_irr(cpu, 0x51)
    assert count(fd) == 0
    assert cpu.take_interrupts() == [0x51]
    os.eventfd_write(fd, 3)
    assert wait_irr(cpu, 0x51)
    assert cpu.take_interrupts() == [0x51]


def test_irqfd_deassign_stops_delivery(vm, efd):
    """kvm_irqfd_deassign detaches the eventfd (waiting for the shutdown work): a later write
    injects nothing and its count stays in the eventfd. Deassigning an fd that is not
    attached to that GSI succeeds (nothing matches); the fd can then be assigned again."""
    cpu = vm.vcpus[0]
    fd = efd()
    vm.set_gsi_routing([MsiRoute(30, MSI_ADDR, data=0x51)])
    vm.irqfd(fd, 30)
    vm.irqfd(fd, 30, deassign=True)
    os.eventfd_write(fd, 1)
    assert not wait_irr(cpu, 0x51, 0.2)
    assert count(fd) == 1
    vm.irqfd(fd, 30, deassign=True)
    vm.irqfd(fd, 31, deassign=True)
    vm.irqfd(fd, 30)
    os.eventfd_write(fd, 1)
    assert wait_irr(cpu, 0x51)


def test_irqfd_refusals(vm, efd):
    """kvm_irqfd_assign: an eventfd already attached (to any GSI) is EBUSY (the eventfd has
    one priority waiter); a closed fd is EBADF; a file that is no eventfd is EINVAL
    (eventfd_ctx_fileget); unknown flags would be EINVAL. Deassign: EBADF / EINVAL alike.
    A GSI is not checked: GSI 5000 (no route can exist) is accepted."""
    fd = efd()
    vm.irqfd(fd, 30)
    assert errno_of(vm.irqfd, fd, 30) == errno.EBUSY
    assert errno_of(vm.irqfd, fd, 31) == errno.EBUSY
    r, w = os.pipe()
    os.close(w)
    try:
        assert errno_of(vm.irqfd, r, 30) == errno.EINVAL
        assert errno_of(vm.irqfd, r, 30, deassign=True) == errno.EINVAL
    finally:
        os.close(r)
    assert errno_of(vm.irqfd, w, 30) == errno.EBADF  # closed above
    assert errno_of(vm.irqfd, w, 30, deassign=True) == errno.EBADF
    fd2 = efd()
    assert errno_of(vm.irqfd, fd2, 30, resamplefd=w) == errno.EBADF
    vm.irqfd(fd2, 5000)
    with pytest.raises(ValueError):
        vm.irqfd(fd2, 1 << 32)


def test_irqfd_before_its_route(vm, efd):
    """KVM_IRQFD before KVM_SET_GSI_ROUTING for its GSI: irqfd_update finds no route, so a
    write goes to the inject work item, whose kvm_set_irq finds no route either: the
    interrupt is lost (and the count consumed). KVM_SET_GSI_ROUTING updates every irqfd
    (kvm_irq_routing_update): the lost write is not replayed, the next write delivers."""
    cpu = vm.vcpus[0]
    fd = efd()
    vm.irqfd(fd, 40)
    os.eventfd_write(fd, 1)
    assert not wait_irr(cpu, 0x52, 0.2)
    assert count(fd) == 0
    vm.set_gsi_routing([MsiRoute(40, MSI_ADDR, data=0x52)])
    assert not wait_irr(cpu, 0x52, 0.2)
    os.eventfd_write(fd, 1)
    assert wait_irr(cpu, 0x52)
    assert cpu.take_interrupts() == [0x52]
    # the route removed again: writes are lost again
    vm.set_gsi_routing([])
    os.eventfd_write(fd, 1)
    assert not wait_irr(cpu, 0x52, 0.2)


def test_irqfd_count_pending_at_assign_is_injected(vm, efd):
    """kvm_irqfd_assign polls the eventfd after registering: a count written before
    KVM_IRQFD is injected once (the inject work item, which does not consume the count: the
    eventfd stays readable)."""
    cpu = vm.vcpus[0]
    fd = efd()
    vm.set_gsi_routing([MsiRoute(30, MSI_ADDR, data=0x51)])
    os.eventfd_write(fd, 1)
    vm.irqfd(fd, 30)
    assert wait_irr(cpu, 0x51)
    assert count(fd) == 1
    assert cpu.take_interrupts() == [0x51]


def test_irqfd_through_the_default_routing_to_the_ioapic(vm, efd):
    """A GSI with irqchip routes (default routing, GSI 17: IOAPIC only) is injected by the
    work item as a pulse (kvm_set_irq 1 then 0): an edge pin delivers its vector."""
    cpu = vm.vcpus[0]
    fd = efd()
    set_rte(cpu, 17, 0x43)
    vm.irqfd(fd, 17)
    os.eventfd_write(fd, 1)
    assert wait_irr(cpu, 0x43)
    assert cpu.take_interrupts() == [0x43]


@pytest.mark.parametrize("eoi", [True, False], ids=["guest-eoi", "no-guest-eoi"])
def test_resample_level_ioapic_pin(vm, efd, eoi):
    """KVM_IRQFD_FLAG_RESAMPLE on the in-kernel irqchip: the write asserts level pin 17
    (remote IRR set, vector in IRR), the EOI runs the ack notifier (irqfd_resampler_ack):
    the line is de-asserted, remote IRR cleared, the resamplefd signalled (count 1) and
    nothing re-fires. This host: with or without the guest's EOI (injection is the EOI)."""
    cpu = vm.vcpus[0]
    fd, rfd = efd(), efd()
    set_rte(cpu, 17, RTE_LEVEL | 0x62)
    vm.irqfd(fd, 17, resamplefd=rfd)
    os.eventfd_write(fd, 1)
    assert wait_irr(cpu, 0x62)
    assert rte(vm, 17) & RTE_REMOTE_IRR
    assert not readable(rfd, 0)
    assert cpu.take_interrupts(eoi=eoi) == [0x62]
    assert readable(rfd, 1.0)
    assert count(rfd) == 1
    assert not rte(vm, 17) & RTE_REMOTE_IRR
    assert irr(cpu) == []
    assert cpu.take_interrupts() == []


def test_resample_is_einval_on_a_split_irqchip(split, efd):
    """kvm_arch_irqfd_allowed: KVM_IRQFD_FLAG_RESAMPLE needs the full in-kernel irqchip
    (EINVAL when split, checked before the fds); a plain irqfd is fine."""
    fd, rfd = efd(), efd()
    assert errno_of(split.irqfd, fd, 2, resamplefd=rfd) == errno.EINVAL
    assert errno_of(split.irqfd, 12345, 2, resamplefd=rfd) == errno.EINVAL
    split.irqfd(fd, 2)


# ---------------------------------------------------------------- split irqchip
def test_split_irqchip_has_no_pic_or_ioapic(split):
    """KVM_CAP_SPLIT_IRQCHIP: KVM_GET/SET_IRQCHIP are ENXIO (irqchip_full is false); the
    guest's IOAPIC window and PIC ports exit to userspace (the backend completes them as a
    VMM with nothing there: all ones); KVM_CREATE_IRQCHIP afterwards is EEXIST."""
    cpu = split.vcpus[0]
    for chip in (MASTER, SLAVE, IOAPIC):
        assert errno_of(split.get_irqchip, chip) == errno.ENXIO
    assert errno_of(split.set_irqchip, IOAPIC, bytes(216)) == errno.ENXIO
    with pytest.raises(MmioExit) as m:
        cpu.ioapic_read(IOWIN)
    assert (m.value.gpa, m.value.size, m.value.is_write) == (0xFEC00010, 4, False)
    with pytest.raises(MmioExit):
        cpu.ioapic_write(IOREGSEL, 0x10)
    with pytest.raises(IoExit) as e:
        cpu.inb(0x21)
    assert (e.value.port, e.value.size, e.value.is_write) == (0x21, 1, False)
    with pytest.raises(IoExit) as e:
        cpu.outb(0xA1, 0xFF)
    assert (e.value.port, e.value.is_write) == (0xA1, True)
    assert cpu.mmio_read(SPIV) == 0x1FF  # the agent goes on
    assert cpu.pop_exits() == []


def test_split_irqchip_eoi_exits_for_reserved_level_msi_routes(split):
    """kvm_scan_ioapic_routes: the level-triggered MSI routes of GSIs below
    reserved_ioapic_pins (8) that target this vCPU put their vectors in
    ioapic_handled_vectors; the EOI of such a vector is KVM_EXIT_IOAPIC_EOI with it
    (kvm_ioapic_send_eoi's split branch). No exit for an edge route, a route at GSI >= 8,
    a route to another APIC ID, or a vector no route has. The bitmap is per vector: an
    edge MSI of a handled vector exits too."""
    cpu = split.vcpus[0]
    split.set_gsi_routing([
        MsiRoute(2, MSI_ADDR, data=MSI_LEVEL | 0x61),
        MsiRoute(3, MSI_ADDR, data=0x62),
        MsiRoute(8, MSI_ADDR, data=MSI_LEVEL | 0x63),
        MsiRoute(4, MSI_ADDR | 1 << 12, data=MSI_LEVEL | 0x64),
    ])
    assert split.irq_line(2, 1) == 1
    assert cpu.take_interrupts() == [0x61]
    assert cpu.pop_exits() == [("IOAPIC_EOI", 0x61)]
    assert cpu.pop_exits() == []
    for gsi, vec in ((3, 0x62), (8, 0x63)):
        assert split.irq_line(gsi, 1) == 1
        assert cpu.take_interrupts() == [vec]
        assert cpu.pop_exits() == []
    assert split.signal_msi(MSI_ADDR, 0, MSI_LEVEL | 0x64) == 1
    assert cpu.take_interrupts() == [0x64]
    assert cpu.pop_exits() == []
    assert split.signal_msi(MSI_ADDR, 0, 0x65) == 1
    assert cpu.take_interrupts() == [0x65]
    assert cpu.pop_exits() == []
    assert split.signal_msi(MSI_ADDR, 0, 0x61) == 1
    assert cpu.take_interrupts() == [0x61]
    assert cpu.pop_exits() == [("IOAPIC_EOI", 0x61)]


def test_split_irqchip_rescans_when_the_routes_change(split, efd):
    """kvm_arch_irq_routing_update requests KVM_REQ_SCAN_IOAPIC on a split irqchip: a route
    removed stops its EOI exits, a route added starts them; an irqfd on a reserved GSI
    delivers its MSI and the EOI exits the same way."""
    cpu = split.vcpus[0]
    split.set_gsi_routing([MsiRoute(2, MSI_ADDR, data=MSI_LEVEL | 0x61)])
    fd = efd()
    split.irqfd(fd, 2)
    os.eventfd_write(fd, 1)
    assert wait_irr(cpu, 0x61)
    assert cpu.take_interrupts() == [0x61]
    assert cpu.pop_exits() == [("IOAPIC_EOI", 0x61)]
    split.set_gsi_routing([MsiRoute(5, MSI_ADDR, data=MSI_LEVEL | 0x71)])
    assert split.signal_msi(MSI_ADDR, 0, MSI_LEVEL | 0x61) == 1
    assert cpu.take_interrupts() == [0x61]
    assert cpu.pop_exits() == []
    assert split.irq_line(5, 1) == 1
    assert cpu.take_interrupts() == [0x71]
    assert cpu.pop_exits() == [("IOAPIC_EOI", 0x71)]


def test_split_eoi_exit_comes_at_injection_on_this_host(split):
    """This host: the EOI exit comes without a guest EOI (the host EOIs at injection);
    upstream KVM sets ISR and exits only at the guest's EOI."""
    cpu = split.vcpus[0]
    split.set_gsi_routing([MsiRoute(2, MSI_ADDR, data=MSI_LEVEL | 0x61)])
    assert split.irq_line(2, 1) == 1
    assert cpu.take_interrupts(eoi=False) == [0x61]
    assert cpu.pop_exits() == [("IOAPIC_EOI", 0x61)]


def test_in_kernel_irqchip_has_no_eoi_exits(vm):
    """With the in-kernel IOAPIC its EOIs stay in the kernel: pop_exits is always []."""
    cpu = vm.vcpus[0]
    set_rte(cpu, 17, RTE_LEVEL | 0x61)
    assert vm.irq_line(17, 1) == 1
    assert vm.irq_line(17, 0) == 1  # low again: the EOI does not re-service the pin
    assert cpu.take_interrupts() == [0x61]
    assert not rte(vm, 17) & RTE_REMOTE_IRR
    assert cpu.pop_exits() == []


@pytest.mark.parametrize("reserved, exiting", [
    (24, [2, 4, 23]), (255, [2, 4, 23, 254]), (256, []), (260, [2]), (4096, []),
])
def test_split_reserved_pins_are_kept_in_a_u8(reserved, exiting):
    """KVM_CAP_SPLIT_IRQCHIP accepts args[0] up to MAX_NR_RESERVED_IOAPIC_PINS (4096) but
    stores it in kvm->arch.nr_reserved_ioapic_pins, a u8: kvm_scan_ioapic_routes scans the
    GSIs below args[0] % 256 (256 and 4096 scan none). Upstream KVM, not this host alone.
    VmConfig refuses more than 4096 before KVM is asked."""
    gsis = (2, 4, 23, 254, 255, 4095)
    with KvmVm(1, irqchip="split", reserved_ioapic_pins=reserved) as v:
        cpu = v.vcpus[0]
        cpu.mmio_write(SPIV, 0x1FF)
        v.set_gsi_routing([MsiRoute(g, MSI_ADDR, data=MSI_LEVEL | 0x40 + g % 64)
                           for g in gsis])
        got = []
        for g in gsis:
            assert v.irq_line(g, 1) == 1
            assert cpu.take_interrupts() == [0x40 + g % 64]
            if cpu.pop_exits() == [("IOAPIC_EOI", 0x40 + g % 64)]:
                got.append(g)
        assert got == exiting
    with pytest.raises(ValueError):
        KvmVm(1, irqchip="split", reserved_ioapic_pins=4097)
