"""The in-kernel i8254 PIT (issue 13), the same checks on both backends: the model and this
machine's KVM.

Each test names the KVM code it checks (arch/x86/kvm/x86.c kvm_arch_vm_ioctl's KVM_CREATE_PIT2,
KVM_GET/SET_PIT2, KVM_REINJECT_CONTROL; arch/x86/kvm/i8254.c kvm_create_pit, kvm_pit_reset,
pit_ioport_read/write, speaker_ioport_read/write, kvm_vm_ioctl_get/set_pit2, pit_do_work). The
``backend`` fixture runs each on "model" and on "kvm" (marked ``kvm``, skipped where /dev/kvm
cannot be used), the model configured as this host.

Only what is deterministic on a real host is compared: ``count_load_time`` is the host's ktime
on KVM and the model's clock on the model, so it is never compared (except channel 0's, which
KVM leaves at 0 from kzalloc until KVM_SET_PIT2 sets it); live counts are compared by range
(the host's time moves during an operation).
"""

from __future__ import annotations

import pytest
from pit_vm import model_vm

import apicv
from apicv import uapi as U
from apicv.api import VmConfig
from apicv.errors import IoExit, KvmError
from apicv.i8254 import pack_pit_state2, unpack_pit_state2
from apicv.kvm import kvm_available

KVM_OK, KVM_WHY = kvm_available()
KVM_PARAM = pytest.param("kvm", marks=[pytest.mark.kvm, pytest.mark.skipif(
    not KVM_OK, reason=f"the KVM backend cannot run here: {KVM_WHY}")])
BACKENDS = ["model", KVM_PARAM]
SPIV = 0xF0

_HOST_CONFIG: VmConfig | None = None


def host_config() -> VmConfig:
    global _HOST_CONFIG
    if _HOST_CONFIG is None:
        if KVM_OK:
            with apicv.Vm(0, backend="kvm") as probe:
                _HOST_CONFIG = probe.config
        else:
            _HOST_CONFIG = VmConfig(enable_apicv=False, flexpriority=False, smm=False)
    return _HOST_CONFIG


def make_vm(backend: str, **options):
    cfg = host_config().replace(nr_vcpus=1, **options)
    vm = model_vm(cfg) if backend == "model" else apicv.Vm(cfg, backend=backend)
    for cpu in vm.vcpus:
        cpu.mmio_write(SPIV, 0x1FF)
    return vm


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def vm(backend):
    v = make_vm(backend)
    yield v
    v.close()


def errno_of(call) -> int:
    with pytest.raises(KvmError) as e:
        call()
    return e.value.errno


def test_ioctls_without_a_pit_are_enxio(vm):
    """KVM_GET_PIT2, KVM_SET_PIT2, KVM_REINJECT_CONTROL: -ENXIO while kvm->arch.vpit is NULL."""
    assert errno_of(vm.get_pit2) == U.ENXIO
    assert errno_of(lambda: vm.set_pit2(bytes(U.KVM_PIT_STATE2_SIZE))) == U.ENXIO
    assert errno_of(lambda: vm.reinject_control(True)) == U.ENXIO
    assert errno_of(lambda: vm.reinject_control(0)) == U.ENXIO


def test_create_twice_is_eexist(vm):
    """KVM_CREATE_PIT2: -EEXIST when kvm->arch.vpit exists; any flags bits are taken."""
    vm.create_pit2(0xFFFFFFFE)
    assert errno_of(vm.create_pit2) == U.EEXIST
    assert errno_of(lambda: vm.create_pit2(U.KVM_PIT_SPEAKER_DUMMY)) == U.EEXIST


def test_create_without_in_kernel_pic_is_enoent(backend):
    """KVM_CREATE_PIT2 with a split irqchip: -ENOENT on this 6.18 KVM (no in-kernel PIC)."""
    v = make_vm(backend, irqchip="split")
    try:
        assert errno_of(v.create_pit2) == U.ENOENT
        assert errno_of(v.get_pit2) == U.ENXIO
    finally:
        v.close()


def test_bad_arguments_are_value_errors(vm):
    vm.create_pit2()
    for call in (lambda: vm.create_pit2(1 << 32), lambda: vm.set_pit2(bytes(111)),
                 lambda: vm.reinject_control(256), lambda: vm.reinject_control(-1)):
        with pytest.raises(ValueError):
            call()


def test_initial_state(vm):
    """kvm_pit_reset: flags 0, every channel mode 0xFF with count 0x10000, gates 1, 1, 0; the
    rest zero (kzalloc), channel 0's load time included."""
    vm.create_pit2()
    st = unpack_pit_state2(vm.get_pit2())
    assert st["flags"] == 0
    for i, c in enumerate(st["channels"]):
        assert c.pop("count_load_time") == 0 or i > 0
        assert c == dict(count=0x10000, latched_count=0, count_latched=0, status_latched=0,
                         status=0, read_state=0, write_state=0, write_latch=0, rw_mode=0,
                         mode=0xFF, bcd=0, gate=int(i != 2))


def test_ports_exit_to_userspace_without_a_device(vm):
    """No PIT: 0x40-0x43 and 0x61 are nobody's (KVM_EXIT_IO); with a PIT created without
    KVM_PIT_SPEAKER_DUMMY, 0x61 still is."""
    cpu = vm.vcpus[0]
    for port in (0x40, 0x43, 0x61):
        with pytest.raises(IoExit):
            cpu.inb(port)
    vm.create_pit2(0)
    cpu.outb(0x43, 0x34)
    with pytest.raises(IoExit):
        cpu.outb(0x61, 3)


def test_set_get_round_trip(vm):
    """kvm_vm_ioctl_set_pit2 copies channels and flags, then reloads each count: mode, access
    and latch state come back as set, a count of 0 as 0x10000, the flags word whole."""
    vm.create_pit2()
    chans = unpack_pit_state2(vm.get_pit2())["channels"]
    chans[0].update(count=11932, mode=2, rw_mode=3, read_state=3, write_state=4, write_latch=7,
                    latched_count=0x1234, count_latched=3, status=0xB4, status_latched=1,
                    count_load_time=0)
    chans[1].update(count=0, mode=5, rw_mode=1, read_state=1, write_state=1, bcd=1, gate=0)
    chans[2].update(count=0x12345, mode=7, rw_mode=2, read_state=2, write_state=2, gate=1)
    vm.set_pit2(pack_pit_state2(chans, 0xFFFFFFF0))
    got = unpack_pit_state2(vm.get_pit2())
    assert got["flags"] == 0xFFFFFFF0
    for i, (want, have) in enumerate(zip(chans, got["channels"], strict=True)):
        have, want = dict(have), dict(want)
        if i:
            have.pop("count_load_time")  # KVM: ktime_get() at the reload
            want.pop("count_load_time")
        want["count"] = want["count"] or 0x10000
        assert have == want, i


def test_guest_programs_mode2_and_reads_a_latched_count(vm):
    """pit_ioport_write: control word 0x34 (channel 0, lo/hi, mode 2), count lo then hi;
    a counter latch then two reads return a count in (0, programmed]; KVM_GET_PIT2 shows
    what the guest wrote."""
    vm.create_pit2()
    cpu = vm.vcpus[0]
    cpu.outb(0x43, 0x34)
    cpu.outb(0x40, 0x9C)
    cpu.outb(0x40, 0x2E)  # 0x2E9C = 11932
    vm.clock.advance(1_000_000)
    cpu.outb(0x43, 0x00)
    lo = cpu.inb(0x40)
    hi = cpu.inb(0x40)
    assert 0 < lo | hi << 8 <= 11932
    c0 = unpack_pit_state2(vm.get_pit2())["channels"][0]
    assert (c0["count"], c0["mode"], c0["rw_mode"], c0["read_state"], c0["write_state"],
            c0["write_latch"], c0["count_latched"], c0["bcd"]) == (11932, 2, 3, 3, 3, 0x9C, 0, 0)


def test_read_back_status(vm):
    """Read-back command 0xE4 (latch channel 1's status): OUT (0: mode 0 before its count of
    0xFFFF, ~55 ms, runs out), access 3, mode 0, BCD as written."""
    vm.create_pit2()
    cpu = vm.vcpus[0]
    cpu.outb(0x43, 0x71)  # channel 1, lo/hi, mode 0, BCD
    cpu.outb(0x41, 0xFF)
    cpu.outb(0x41, 0xFF)
    cpu.outb(0x43, 0xE4)
    assert cpu.inb(0x41) == 0x31
    c1 = unpack_pit_state2(vm.get_pit2())["channels"][1]
    assert (c1["status_latched"], c1["status"], c1["bcd"]) == (0, 0x31, 1)


def test_speaker_port(vm):
    """With KVM_PIT_SPEAKER_DUMMY: an OUT to 0x61 sets the data flag (bit 1) and channel 2's
    gate (bit 0); an IN gives them back (bits 5 and 4, OUT and refresh, not compared)."""
    vm.create_pit2(U.KVM_PIT_SPEAKER_DUMMY)
    cpu = vm.vcpus[0]
    cpu.outb(0x61, 3)
    assert cpu.inb(0x61) & 3 == 3
    st = unpack_pit_state2(vm.get_pit2())
    assert st["flags"] & U.KVM_PIT_FLAGS_SPEAKER_DATA_ON and st["channels"][2]["gate"] == 1
    cpu.outb(0x61, 0)
    assert cpu.inb(0x61) & 3 == 0
    assert unpack_pit_state2(vm.get_pit2())["flags"] == 0


def test_reinject_control_with_a_pit(vm):
    vm.create_pit2()
    vm.reinject_control(False)
    vm.reinject_control(False)
    vm.reinject_control(1)


def test_pit_tick_reaches_the_guest(vm):
    """A PIT-driven timer tick: mode 2 at ~1 ms; pit_do_work raises GSI 0, which the default
    routing sends to IOAPIC pin 0 (pointed at vector 0x30; the PIC masked)."""
    vm.create_pit2()
    cpu = vm.vcpus[0]
    cpu.outb(0x21, 0xFF)
    cpu.ioapic_write(0x00, 0x10)
    cpu.ioapic_write(0x10, 0x30)
    cpu.ioapic_write(0x00, 0x11)
    cpu.ioapic_write(0x10, 0)
    cpu.outb(0x43, 0x34)
    cpu.outb(0x40, 0xA9)
    cpu.outb(0x40, 0x04)  # 1193: ~1 ms
    vm.clock.advance(3_000_000)
    assert cpu.take_interrupts(limit=1) == [0x30]
