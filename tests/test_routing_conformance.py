"""GSI routing, irqfd and the split irqchip (issue 13), run unchanged on both backends: the
model and this machine's KVM.

Each test names the KVM source it checks (virt/kvm/irqchip.c kvm_set_irq_routing and
setup_routing_entry, arch/x86/kvm/irq.c kvm_set_routing_entry / kvm_set_msi /
kvm_arch_irqfd_allowed / kvm_scan_ioapic_routes, virt/kvm/eventfd.c kvm_irqfd_assign /
irqfd_wakeup / irqfd_update / irqfd_resampler_ack, arch/x86/kvm/lapic.c kvm_ioapic_send_eoi,
arch/x86/kvm/x86.c KVM_CAP_SPLIT_IRQCHIP and KVM_EXIT_IOAPIC_EOI). The tests talk to a VM only
through the declared API (``apicv.Vm(..., backend=...)``); the ``backend`` fixture runs each
of them on "model" and on "kvm" (the latter marked ``kvm`` and skipped where /dev/kvm cannot be
used), with the model configured as this host (its resolved VmConfig: no APICv, no SMM).

Where this host's KVM differs from upstream the expectation branches on ``vm.backend`` and the
assertion names the difference: H1 (host-kvm-notes.md, item 1) -- an injected interrupt acts
as its own EOI, so an IOAPIC EOI exit, an ack notifier and a resamplefd signal come at
injection, without the guest's EOI. The model keeps upstream's answer; the model-only tests at
the end show the upstream behaviour the host cannot.

irqfd injection: KVM injects asynchronously (irqfd_wakeup runs on the eventfd write; a non-MSI
route goes through a work item), the model when its next operation starts. ``wait_irr`` polls
KVM_GET_LAPIC -- an operation on the model too -- for up to a second, which serves both.
"""

from __future__ import annotations

import errno
import os
import select
import struct
import time

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import apicv
from apicv import uapi as U
from apicv.api import IrqchipRoute, MsiRoute, VmConfig, default_routing
from apicv.errors import IoExit, KvmError, MmioExit
from apicv.kvm import kvm_available

KVM_OK, KVM_WHY = kvm_available()
KVM_PARAM = pytest.param("kvm", marks=[pytest.mark.kvm, pytest.mark.skipif(
    not KVM_OK, reason=f"the KVM backend cannot run here: {KVM_WHY}")])
BACKENDS = ["model", KVM_PARAM]

EOI, SPIV, ISR, IRR = 0xB0, 0xF0, 0x100, 0x200
IOREGSEL, IOWIN = 0x00, 0x10
RTE_LEVEL, RTE_REMOTE_IRR = 1 << 15, 1 << 14
MSI_ADDR = 0xFEE00000  # physical destination APIC ID 0
MSI_LEVEL = 1 << 15  # MSI data: trigger mode level
MASTER, SLAVE, IOAPIC = 0, 1, 2
H1 = "H1 (this host: an injected interrupt is its own EOI)"

_HOST_CONFIG: VmConfig | None = None


def host_config() -> VmConfig:
    """This host's resolved VmConfig (module parameters, SMM, TSC, MAXPHYADDR), so that the
    model answers as this host; without /dev/kvm, what these hosts are known to have."""
    global _HOST_CONFIG
    if _HOST_CONFIG is None:
        if KVM_OK:
            with apicv.Vm(0, backend="kvm") as probe:
                _HOST_CONFIG = probe.config
        else:
            _HOST_CONFIG = VmConfig(enable_apicv=False, flexpriority=False, smm=False)
    return _HOST_CONFIG


def make_vm(backend: str, nr_vcpus: int = 1, **options):
    """``apicv.Vm`` on *backend* with this host's configuration, every vCPU RUNNABLE (APs
    start UNINITIALIZED) and its APIC software-enabled."""
    vm = apicv.Vm(host_config().replace(nr_vcpus=nr_vcpus, **options), backend=backend)
    for cpu in vm.vcpus:
        if cpu.get_mp_state() != U.KVM_MP_STATE_RUNNABLE:
            cpu.set_mp_state(U.KVM_MP_STATE_RUNNABLE)
        cpu.mmio_write(SPIV, 0x1FF)
    return vm


def irr(cpu) -> list[int]:
    return vectors(cpu.get_lapic(), IRR)


def isr(cpu) -> list[int]:
    return vectors(cpu.get_lapic(), ISR)


def vectors(page: bytes, base: int) -> list[int]:
    return [32 * i + b for i in range(8) for b in range(32)
            if struct.unpack_from("<I", page, base + 16 * i)[0] >> b & 1]


def wait_irr(cpu, vector: int, timeout: float = 1.0) -> bool:
    """Whether *vector* shows in IRR within *timeout* seconds. KVM injects an irqfd write
    asynchronously; the model when an operation starts -- KVM_GET_LAPIC is one, so its first
    answer is already final there."""
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


def rte(vm, pin: int) -> int:
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


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def new_vm(backend):
    """``new_vm(nr_vcpus=1, **options)``: a VM on the test's backend, closed at teardown."""
    made: list = []

    def make(nr_vcpus: int = 1, **options):
        made.append(make_vm(backend, nr_vcpus, **options))
        return made[-1]

    yield make
    for v in made:
        v.close()


@pytest.fixture
def vm(new_vm):
    return new_vm(1)


@pytest.fixture
def split(new_vm):
    return new_vm(1, irqchip="split", reserved_ioapic_pins=8)


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


def test_x2apic_format_refuses_msi_address_hi_low_byte(new_vm):
    """kvm_msi_route_invalid: with KVM_X2APIC_API_USE_32BIT_IDS, an MSI route whose
    address_hi has bits 7:0 set is EINVAL; bits 31:8 (destination ID 31:8) are fine."""
    v = new_vm(1, x2apic_api=U.KVM_X2APIC_API_USE_32BIT_IDS)
    assert errno_of(v.set_gsi_routing, [MsiRoute(30, MSI_ADDR, 1, 0x51)]) == errno.EINVAL
    v.set_gsi_routing([MsiRoute(30, MSI_ADDR, 0x100, 0x51)])
    v = new_vm(1)
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
    nothing re-fires. Upstream the ack waits for the guest's EOI (the vector sits in ISR,
    remote IRR stays set until then); this host signals at injection (H1)."""
    cpu = vm.vcpus[0]
    fd, rfd = efd(), efd()
    set_rte(cpu, 17, RTE_LEVEL | 0x62)
    vm.irqfd(fd, 17, resamplefd=rfd)
    os.eventfd_write(fd, 1)
    assert wait_irr(cpu, 0x62)
    assert rte(vm, 17) & RTE_REMOTE_IRR
    assert not readable(rfd, 0)
    assert cpu.take_interrupts(eoi=eoi) == [0x62]
    if not eoi:
        if vm.backend == "kvm":
            assert readable(rfd, 1.0), f"{H1}: the resamplefd is signalled at injection"
        else:
            assert not readable(rfd, 0.05)
            assert rte(vm, 17) & RTE_REMOTE_IRR
            assert isr(cpu) == [0x62]
        cpu.mmio_write(EOI, 0)  # the guest's EOI, late
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


def test_split_eoi_exit_comes_at_the_guests_eoi(split):
    """kvm_ioapic_send_eoi runs from the guest's EOI (apic_set_eoi): upstream KVM sets ISR at
    injection and exits with KVM_EXIT_IOAPIC_EOI only when the guest writes EOI. This host
    EOIs at injection itself (H1): the exit comes before the guest's EOI, which then finds
    nothing in service."""
    cpu = split.vcpus[0]
    split.set_gsi_routing([MsiRoute(2, MSI_ADDR, data=MSI_LEVEL | 0x61)])
    assert split.irq_line(2, 1) == 1
    assert cpu.take_interrupts(eoi=False) == [0x61]
    before = cpu.pop_exits()
    cpu.mmio_write(EOI, 0)
    after = cpu.pop_exits()
    if split.backend == "kvm":
        assert (before, after) == ([("IOAPIC_EOI", 0x61)], []), f"{H1}: exit at injection"
    else:
        assert (before, after) == ([], [("IOAPIC_EOI", 0x61)])


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
def test_split_reserved_pins_are_kept_in_a_u8(new_vm, reserved, exiting):
    """KVM_CAP_SPLIT_IRQCHIP accepts args[0] up to MAX_NR_RESERVED_IOAPIC_PINS (4096) but
    stores it in kvm->arch.nr_reserved_ioapic_pins, a u8: kvm_scan_ioapic_routes scans the
    GSIs below args[0] % 256 (256 and 4096 scan none). Upstream KVM, not this host alone.
    VmConfig refuses more than 4096 before KVM is asked."""
    gsis = (2, 4, 23, 254, 255, 4095)
    v = new_vm(1, irqchip="split", reserved_ioapic_pins=reserved)
    cpu = v.vcpus[0]
    v.set_gsi_routing([MsiRoute(g, MSI_ADDR, data=MSI_LEVEL | 0x40 + g % 64) for g in gsis])
    got = []
    for g in gsis:
        assert v.irq_line(g, 1) == 1
        assert cpu.take_interrupts() == [0x40 + g % 64]
        if cpu.pop_exits() == [("IOAPIC_EOI", 0x40 + g % 64)]:
            got.append(g)
    assert got == exiting
    with pytest.raises(ValueError):
        new_vm(1, irqchip="split", reserved_ioapic_pins=4097)


# ---------------------------------------------------------------- the model alone
# What upstream KVM does and this host cannot show (H1: it EOIs an injected interrupt itself),
# or what is cheap to sweep on the model only.
@pytest.fixture
def model_vm():
    made: list = []

    def make(nr_vcpus: int = 1, **options):
        made.append(make_vm("model", nr_vcpus, **options))
        return made[-1]

    yield make
    for v in made:
        v.close()


def test_model_resamplefds_signalled_only_at_the_guests_eoi(model_vm, efd):
    """irqfd_resampler_ack runs from kvm_notify_acked_irq at the guest's EOI of the level pin
    (kvm_ioapic_update_eoi), not at injection: until then the resamplefds stay quiet, remote
    IRR stays set and a second write changes nothing (the line is still asserted). At the EOI
    the line is de-asserted once and every resamplefd of the GSI is signalled once."""
    vm = model_vm(1)
    cpu = vm.vcpus[0]
    fd1, fd2, r1, r2 = efd(), efd(), efd(), efd()
    set_rte(cpu, 17, RTE_LEVEL | 0x62)
    vm.irqfd(fd1, 17, resamplefd=r1)
    vm.irqfd(fd2, 17, resamplefd=r2)
    os.eventfd_write(fd1, 1)
    assert wait_irr(cpu, 0x62)
    assert cpu.take_interrupts(eoi=False) == [0x62]
    assert isr(cpu) == [0x62] and irr(cpu) == []
    os.eventfd_write(fd2, 1)
    assert irr(cpu) == []
    assert rte(vm, 17) & RTE_REMOTE_IRR
    assert not readable(r1, 0) and not readable(r2, 0)
    cpu.mmio_write(EOI, 0)
    assert (count(r1), count(r2)) == (1, 1)
    assert not rte(vm, 17) & RTE_REMOTE_IRR
    assert isr(cpu) == irr(cpu) == []
    assert cpu.take_interrupts() == []


def test_model_deassigning_the_last_resampler_deasserts_the_line(model_vm, efd):
    """irqfd_resampler_shutdown: when the last resampling irqfd of a GSI goes, its ack
    notifier is unregistered and the line de-asserted; the guest's EOI then signals no
    resamplefd, and the pin (no longer asserted) does not fire again."""
    vm = model_vm(1)
    cpu = vm.vcpus[0]
    fd, rfd = efd(), efd()
    set_rte(cpu, 17, RTE_LEVEL | 0x62)
    vm.irqfd(fd, 17, resamplefd=rfd)
    os.eventfd_write(fd, 1)
    assert wait_irr(cpu, 0x62)
    assert cpu.take_interrupts(eoi=False) == [0x62]
    vm.irqfd(fd, 17, deassign=True)
    cpu.mmio_write(EOI, 0)
    assert not readable(rfd, 0)
    assert not rte(vm, 17) & RTE_REMOTE_IRR
    assert cpu.take_interrupts() == []


def test_model_split_eoi_exit_for_an_eoi_owed_from_an_older_routing(model_vm):
    """kvm_scan_ioapic_irq: after the route of a level vector moves to another APIC, a vCPU
    that still has the vector in service keeps its EOI exit (kvm_apic_pending_eoi) and
    records it as highest_stale_pending_ioapic_eoi; that EOI exits and rescans, and the
    next injection of the vector to it exits no more."""
    vm = model_vm(2, irqchip="split", reserved_ioapic_pins=8)
    cpu = vm.vcpus[0]
    vm.set_gsi_routing([MsiRoute(2, MSI_ADDR, data=MSI_LEVEL | 0x61)])
    assert vm.irq_line(2, 1) == 1
    assert cpu.take_interrupts(eoi=False) == [0x61]
    vm.set_gsi_routing([MsiRoute(2, MSI_ADDR | 1 << 12, data=MSI_LEVEL | 0x61)])
    assert cpu.pop_exits() == []
    cpu.mmio_write(EOI, 0)
    assert cpu.pop_exits() == [("IOAPIC_EOI", 0x61)]
    assert vm.signal_msi(MSI_ADDR, 0, MSI_LEVEL | 0x61) == 1
    assert cpu.take_interrupts() == [0x61]
    assert cpu.pop_exits() == []


def test_model_count_pending_at_assign_injected_once_not_consumed(model_vm, efd):
    """kvm_irqfd_assign: a count written before KVM_IRQFD is injected once (schedule_work of
    the inject item, which does not read the eventfd); the model leaves it there and does not
    inject it again at later operations. The next write consumes the whole count
    (irqfd_wakeup's eventfd_ctx_do_read) and injects once more."""
    vm = model_vm(1)
    cpu = vm.vcpus[0]
    fd = efd()
    vm.set_gsi_routing([MsiRoute(30, MSI_ADDR, data=0x51)])
    os.eventfd_write(fd, 2)
    vm.irqfd(fd, 30)
    assert irr(cpu) == [0x51]
    assert cpu.take_interrupts() == [0x51]
    for _ in range(3):
        assert irr(cpu) == []
        assert cpu.take_interrupts() == []
    os.eventfd_write(fd, 1)
    assert irr(cpu) == [0x51]
    assert not readable(fd, 0)
    assert cpu.take_interrupts() == [0x51]
    assert irr(cpu) == []


@pytest.mark.parametrize("reserved", [0, 1, 3, 255, 256, 257, 259, 511, 512, 4095, 4096])
def test_model_reserved_ioapic_pins_modulo_256(model_vm, reserved):
    """kvm->arch.nr_reserved_ioapic_pins is a u8: kvm_scan_ioapic_routes scans the GSIs below
    reserved_ioapic_pins % 256 (bounded by the table's nr_rt_entries)."""
    vm = model_vm(1, irqchip="split", reserved_ioapic_pins=reserved)
    cpu = vm.vcpus[0]
    gsis = (0, 1, 2, 3, 200, 254, 255, 256, 300)
    vm.set_gsi_routing([MsiRoute(g, MSI_ADDR, data=MSI_LEVEL | 0x40 + i)
                        for i, g in enumerate(gsis)])
    got = []
    for i, g in enumerate(gsis):
        assert vm.irq_line(g, 1) == 1
        assert cpu.take_interrupts() == [0x40 + i]
        if cpu.pop_exits() == [("IOAPIC_EOI", 0x40 + i)]:
            got.append(g)
    assert got == [g for g in gsis if g < reserved % 256]


# ---------------------------------------------------------------- KVM_SET_GSI_ROUTING properties
# mostly valid values (a table of 20 entries is refused if any one is bad), some bad ones
_GSI = st.integers(0, 40)
_GSIS = st.one_of(_GSI, _GSI, _GSI, _GSI, st.sampled_from([255, 4095, 4096, 5000, 0xFFFFFFFF]))
_MSI = st.builds(
    MsiRoute, gsi=_GSIS,
    address_lo=st.builds(lambda dest, logical: MSI_ADDR | dest << 12 | (4 if logical else 0),
                         st.sampled_from([0, 1, 5, 0xFF]), st.booleans()),
    address_hi=st.sampled_from([0, 1, 0x100, 0x1FF]),
    data=st.builds(lambda vec, level: vec | (MSI_LEVEL if level else 0),
                   st.integers(0x20, 0xFE), st.booleans()),
    devid=st.none() | st.integers(0, 0xFFFF))
_IRQCHIP = st.builds(IrqchipRoute, gsi=_GSIS, irqchip=st.sampled_from([0, 1, 2, 2, 2, 3]),
                     pin=st.one_of(st.integers(0, 23), st.integers(0, 25), st.just(0xFFFFFFFF)))
TABLES = st.lists(st.one_of(_MSI, _IRQCHIP), max_size=20)
VM_KINDS = st.sampled_from([
    {}, {"irqchip": "split", "reserved_ioapic_pins": 8},
    {"x2apic_api": U.KVM_X2APIC_API_USE_32BIT_IDS},
])


def _delivery(vm, gsis) -> tuple:
    """What raising and lowering each GSI does: kvm_set_irq's statuses, then every vCPU's
    LAPIC page and (full irqchip) the PIC and IOAPIC state."""
    statuses = [(vm.irq_line(g, 1), vm.irq_line(g, 0)) for g in gsis]
    pages = [c.get_lapic() for c in vm.vcpus]
    chips = [] if vm.config.irqchip == "split" else [vm.get_irqchip(c) for c in range(3)]
    return statuses, pages, chips


def _probe_gsis(*tables) -> list[int]:
    return sorted({0, 2, 9, 17, 30} | {r.gsi for t in tables for r in t if r.gsi < 4096})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=VM_KINDS, old=TABLES, new=TABLES)
def test_model_set_gsi_routing_is_all_or_nothing(kind, old, new):
    """kvm_set_irq_routing builds and validates the whole new table (setup_routing_entry,
    kvm_set_routing_entry) before it swaps it in: a table either raises KvmError(EINVAL) and
    leaves the previous one in force -- get_gsi_routing and what each GSI delivers are those
    of a VM that only ever had the previous table -- or is installed exactly, delivering as
    on a VM that was given it alone."""
    with make_vm("model", 2, **kind) as ref_old, make_vm("model", 2, **kind) as vm:
        try:
            ref_old.set_gsi_routing(old)
        except KvmError:
            old = list(ref_old.get_gsi_routing())  # the initial table stays
        else:
            vm.set_gsi_routing(old)
        assert vm.get_gsi_routing() == tuple(old) == ref_old.get_gsi_routing()
        try:
            vm.set_gsi_routing(new)
        except KvmError as e:
            assert e.errno == errno.EINVAL
            event("refused")
            ref = ref_old
        else:
            event("accepted")
            assert vm.get_gsi_routing() == tuple(new)
            ref = make_vm("model", 2, **kind)
            ref.set_gsi_routing(new)
        try:
            gsis = _probe_gsis(old, new)
            assert _delivery(vm, gsis) == _delivery(ref, gsis)
        finally:
            if ref is not ref_old:
                ref.close()


@pytest.mark.kvm
@pytest.mark.skipif(not KVM_OK, reason=f"the KVM backend cannot run here: {KVM_WHY}")
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=VM_KINDS, table=TABLES)
def test_set_gsi_routing_verdict_matches_this_host(kind, table):
    """The model accepts exactly the tables this host's KVM accepts (and refuses the others
    with the same errno); an accepted table then gives the same kvm_set_irq statuses for
    each GSI on both."""
    with make_vm("model", 1, **kind) as model, make_vm("kvm", 1, **kind) as real:
        verdicts = []
        for v in (model, real):
            try:
                v.set_gsi_routing(table)
                verdicts.append(0)
            except KvmError as e:
                verdicts.append(e.errno)
        assert verdicts[0] == verdicts[1], f"model {verdicts[0]}, kvm {verdicts[1]}: {table}"
        event("refused" if verdicts[0] else "accepted")
        gsis = _probe_gsis(table)
        assert ([(model.irq_line(g, 1), model.irq_line(g, 0)) for g in gsis]
                == [(real.irq_line(g, 1), real.irq_line(g, 0)) for g in gsis])
