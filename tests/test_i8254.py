"""The i8254 PIT model (apicv.i8254, KVM's arch/x86/kvm/i8254.c) behind a fake port: timer
periods per mode, counts at given times, latches and read-back, the speaker port, reinject vs
discard with and without acks, the mask notifier, the NMI watchdog, kvm_pit_state2; then the
PIT in a model VM (IRQ0 through the default routing to the IOAPIC, acks from the guest's EOI).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pit_vm import model_vm

from apicv import apicdef as A
from apicv import uapi as U
from apicv.clock import Clock
from apicv.errors import IoExit, KvmError
from apicv.i8254 import (
    KVM_PIT_FREQ,
    KvmPit,
    mul_u64_u32_div,
    pack_pit_state2,
    unpack_pit_state2,
)

SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
SRC = 2  # the PIT's IRQ source id from the fake port


class FakePort:
    """A PitPort that records what the PIT asks of the VM."""

    def __init__(self, *, ioapic_in_kernel: bool = True, min_timer_period_us: int = 200,
                 nmi_mode: int = 0) -> None:
        self.clock = Clock()
        self.ioapic_in_kernel = ioapic_in_kernel
        self.min_timer_period_us = min_timer_period_us
        self.nmi_mode = nmi_mode
        self.irqs: list[tuple[int, int, int, int]] = []  # (time, source, gsi, level)
        self.ack: list[tuple[int, object]] = []
        self.mask: list[tuple[int, object]] = []
        self.inhibits: list[tuple[str, bool]] = []
        self.watchdog: list[int] = []

    def set_irq(self, irq_source_id: int, gsi: int, level: int) -> int:
        self.irqs.append((self.clock.now, irq_source_id, gsi, level))
        return 1

    def request_irq_source_id(self) -> int:
        return SRC

    def register_ack_notifier(self, gsi, cb) -> None:
        self.ack.append((gsi, cb))

    def unregister_ack_notifier(self, gsi, cb) -> None:
        self.ack.remove((gsi, cb))

    def register_mask_notifier(self, gsi, cb) -> None:
        self.mask.append((gsi, cb))

    def unregister_mask_notifier(self, gsi, cb) -> None:
        self.mask.remove((gsi, cb))

    def set_apicv_inhibit(self, reason_name: str, set_: bool) -> None:
        self.inhibits.append((reason_name, set_))

    def vapics_in_nmi_mode(self) -> int:
        return self.nmi_mode

    def nmi_watchdog_deliver(self) -> None:
        self.watchdog.append(self.clock.now)

    # -- the guest's side of the VM
    def guest_ack(self, gsi: int = 0) -> None:
        """The guest acknowledged GSI 0 (IOAPIC EOI / PIC ack); queued work then runs when
        the operation settles (clock.advance(0), as the VM's settle does)."""
        for g, cb in list(self.ack):
            if g == gsi:
                cb()
        self.clock.advance(0)

    def unmask(self, gsi: int = 0) -> None:
        for g, cb in list(self.mask):
            if g == gsi:
                cb(False)

    def pulses(self) -> list[int]:
        """The times IRQ0 was raised (each raise is followed by a lower at the same time)."""
        out = []
        for i, (t, src, gsi, level) in enumerate(self.irqs):
            assert src == SRC and gsi == 0
            if level:
                assert self.irqs[i + 1] == (t, SRC, 0, 0)
                out.append(t)
        return out


def period_ns(count: int) -> int:
    return mul_u64_u32_div(count or 0x10000, 10**9, KVM_PIT_FREQ)


def program(pit: KvmPit, channel: int, mode: int, count: int, *, rw: int = 3,
            bcd: int = 0) -> None:
    """Control word (channel, access rw, mode, bcd), then the count as the access mode says."""
    pit.pio_write(0x43, (channel << 6) | (rw << 4) | (mode << 1) | bcd)
    port = 0x40 + channel
    if rw == 1:
        pit.pio_write(port, count & 0xFF)
    elif rw == 2:
        pit.pio_write(port, (count >> 8) & 0xFF)
    else:
        pit.pio_write(port, count & 0xFF)
        pit.pio_write(port, (count >> 8) & 0xFF)


def latch_read(pit: KvmPit, channel: int) -> int:
    """Counter-latch command, then the latched count (lo, hi with access mode 3)."""
    pit.pio_write(0x43, channel << 6)
    lo = pit.pio_read(0x40 + channel)
    hi = pit.pio_read(0x40 + channel)
    return lo | hi << 8


@pytest.fixture
def port():
    return FakePort()


@pytest.fixture
def pit(port):
    return KvmPit(port)


# ---------------------------------------------------------------- creation
def test_create_resets_and_enters_reinject_mode(port, pit):
    """kvm_create_pit: kvm_pit_reset (mode 0xFF, count 0x10000, gates 1/1/0, channel 0's
    load time untouched, 1 and 2 loaded now), then kvm_pit_set_reinject(true): the PIT_REINJ
    inhibit, ack and mask notifiers on GSI 0."""
    st_ = unpack_pit_state2(pit.kvm_vm_ioctl_get_pit2())
    assert st_["flags"] == 0
    assert [c["mode"] for c in st_["channels"]] == [0xFF] * 3
    assert [c["count"] for c in st_["channels"]] == [0x10000] * 3
    assert [c["gate"] for c in st_["channels"]] == [1, 1, 0]
    assert pit.reinject and pit.pending == 0 and pit.irq_ack == 1
    assert port.inhibits == [("PIT_REINJ", True)]
    assert [g for g, _ in port.ack] == [0] and [g for g, _ in port.mask] == [0]
    assert pit.irq_source_id == SRC
    assert not pit.timer.active and pit.period == 0
    port.clock.advance(10**9)
    assert port.irqs == []  # no timer in mode 0xFF


# ---------------------------------------------------------------- timer periods per mode
@pytest.mark.parametrize("mode", [2, 3, 6, 7])
def test_periodic_modes(mode):
    """Modes 2 and 3 (6 and 7 alias them) start a periodic timer: one IRQ0 pulse per period
    of count / 1193181 s (discard mode: no ack needed)."""
    port = FakePort()
    pit = KvmPit(port)
    pit.kvm_pit_set_reinject(False)
    count = 11932  # ~10 ms
    port.clock.advance(12345)
    t0 = port.clock.now
    program(pit, 0, mode, count)
    assert pit.channels[0].mode == (mode - 4 if mode > 5 else mode)
    p = period_ns(count)
    assert pit.period == p and pit.is_periodic
    port.clock.advance(5 * p + 1)
    assert port.pulses() == [t0 + k * p for k in range(1, 6)]


@pytest.mark.parametrize("mode", [0, 1, 4])
def test_one_shot_modes(port, pit, mode):
    """Modes 0, 1 and 4 arm a one-shot timer (create_pit_timer(val, 0)): one pulse."""
    pit.kvm_pit_set_reinject(False)
    program(pit, 0, mode, 1000)
    port.clock.advance(10**9)
    assert port.pulses() == [period_ns(1000)]
    assert not pit.is_periodic


def test_mode5_and_reset_mode_stop_the_timer(port, pit):
    """Mode 5 (and the reset mode 0xFF) cancel the timer (destroy_pit_timer) but keep its
    period: the count goes on from the old expiry."""
    pit.kvm_pit_set_reinject(False)
    program(pit, 0, 2, 11932)
    port.clock.advance(3_000_000)
    program(pit, 0, 5, 500)
    assert not pit.timer.active and pit.period == period_ns(11932)
    port.clock.advance(10**8)
    assert port.pulses() == []


def test_short_periodic_is_clamped_but_first_expiry_is_not(port, pit):
    """create_pit_timer: a periodic period under min_timer_period_us is raised to it; the
    first expiry is still at the unclamped interval."""
    pit.kvm_pit_set_reinject(False)
    program(pit, 0, 2, 10)  # 8380 ns
    interval = period_ns(10)
    assert pit.period == 200_000
    port.clock.advance(interval + 3 * 200_000)
    assert port.pulses() == [interval + k * 200_000 for k in range(4)]


def test_count_zero_is_65536(port, pit):
    program(pit, 0, 2, 0)
    assert pit.channels[0].count == 0x10000
    assert pit.period == period_ns(0x10000)  # ~54.9 ms


@pytest.mark.parametrize("split,hpet", [(True, False), (False, True)])
def test_no_timer_without_ioapic_or_in_hpet_legacy(split, hpet):
    """create_pit_timer returns at once without an in-kernel IOAPIC or with HPET legacy on:
    no timer, and channel 0 counts nothing (its period stays 0)."""
    port = FakePort(ioapic_in_kernel=not split)
    pit = KvmPit(port)
    if hpet:
        pit.flags |= U.KVM_PIT_FLAGS_HPET_LEGACY
    program(pit, 0, 2, 1000)
    port.clock.advance(10**8)
    assert port.irqs == [] and not pit.timer.active
    assert latch_read(pit, 0) == 1000


# ---------------------------------------------------------------- counts at given times
def test_mode2_count_at_given_times(port, pit):
    """pit_get_count, mode 2: count - d % count, d = elapsed * 1193181 / 1e9."""
    program(pit, 0, 2, 1000)
    for t in (0, 1, 100_000, 837_000, 838_000, 1_000_000, 5_555_555):
        port.clock.advance_to(t)
        d = t * KVM_PIT_FREQ // 10**9
        assert pit.pit_get_count(0) == 1000 - d % 1000, t


def test_mode3_counts_down_by_two(port, pit):
    program(pit, 0, 3, 1000)
    port.clock.advance(100_000)  # d = 119
    assert pit.pit_get_count(0) == 1000 - (2 * 119) % 1000


def test_mode0_wraps_after_the_one_shot(port, pit):
    """Mode 0 keeps counting past 0 and wraps at 16 bits (the hrtimer's expiry is in the
    past: hrtimer_get_remaining is negative)."""
    program(pit, 0, 0, 100)
    port.clock.advance(200 * 10**9 // KVM_PIT_FREQ + 1)  # 200 ticks
    assert pit.pit_get_count(0) == (100 - 200) & 0xFFFF


def test_channel2_counts_from_its_load_time(port, pit):
    port.clock.advance(1_000_000)
    program(pit, 2, 2, 5000)
    assert pit.channels[2].count_load_time == 1_000_000
    port.clock.advance(1_000_000)
    assert latch_read(pit, 2) == 5000 - (1_000_000 * KVM_PIT_FREQ // 10**9) % 5000


# ---------------------------------------------------------------- latches, access modes
def test_counter_latch_holds_until_read(port, pit):
    program(pit, 0, 2, 50000)
    port.clock.advance(1_000_000)
    pit.pio_write(0x43, 0x00)
    want = pit.pit_get_count(0)
    port.clock.advance(3_000_000)
    pit.pio_write(0x43, 0x00)  # ignored: a latch is pending
    assert pit.pio_read(0x40) == want & 0xFF
    port.clock.advance(1_000_000)
    assert pit.pio_read(0x40) == want >> 8
    assert pit.channels[0].count_latched == 0
    # unlatched reads follow the read state: lo, then hi, of the live count
    lo = pit.pio_read(0x40)
    assert pit.channels[0].read_state == 4  # RW_STATE_WORD1
    hi = pit.pio_read(0x40)
    assert lo == pit.pit_get_count(0) & 0xFF and hi == pit.pit_get_count(0) >> 8


@pytest.mark.parametrize("rw", [1, 2])
def test_lsb_and_msb_only_access(port, pit, rw):
    """Access mode 1 writes/reads the low byte only, 2 the high byte only."""
    program(pit, 1, 2, 0x1234, rw=rw)
    want = 0x34 if rw == 1 else 0x1200
    assert pit.channels[1].count == want
    pit.pio_write(0x43, 0x40)  # latch channel 1
    assert pit.channels[1].count_latched == rw
    b = pit.pio_read(0x41)
    assert b == (want & 0xFF if rw == 1 else want >> 8)
    assert pit.channels[1].count_latched == 0


def test_latch_with_access_mode_zero_latches_nothing(pit):
    """After reset rw_mode is 0: a counter latch stores latched_count but count_latched
    stays 0 (count_latched = rw_mode), so reads are live."""
    pit.pio_write(0x43, 0x80)  # latch channel 2
    c = pit.channels[2]
    assert c.count_latched == 0 and c.latched_count == 0  # 0x10000 & 0xFFFF


def test_read_back_status_and_count(port, pit):
    """Read-back (0xC0 | ...): bit 5 clear latches counts, bit 4 clear latches status; the
    status is OUT << 7 | rw << 4 | mode << 1 | bcd; status is read before the count."""
    program(pit, 1, 0, 0xFFFF, bcd=1)
    port.clock.advance(10_000)
    pit.pio_write(0x43, 0xC0 | 0x04)  # channel 1, count and status
    status = pit.pio_read(0x41)
    assert status == (0 << 7) | (3 << 4) | (0 << 1) | 1
    lo, hi = pit.pio_read(0x41), pit.pio_read(0x41)
    assert lo | hi << 8 == 0xFFFF - 10_000 * KVM_PIT_FREQ // 10**9
    pit.pio_write(0x43, 0xE0 | 0x04)  # status only
    assert pit.channels[1].status_latched and not pit.channels[1].count_latched


def test_control_port_read_is_zero_and_unclaimed_ports(pit):
    assert pit.pio_read(0x43) == 0
    assert pit.pio_read(0x44) is None and not pit.pio_write(0x3F, 0)
    assert pit.pio_read(0x61) is None and not pit.pio_write(0x61, 3)  # no SPEAKER_DUMMY


# ---------------------------------------------------------------- the speaker port
def test_speaker_port_gate_data_out_and_refresh():
    port = FakePort()
    pit = KvmPit(port, U.KVM_PIT_SPEAKER_DUMMY)
    assert pit.pio_read(0x61) & 0x23 == 0  # gate 0, data 0, OUT 0 (mode 0xFF, d < count)
    program(pit, 2, 0, 1000)
    port.clock.advance(500_000)
    assert pit.pio_write(0x61, 3)  # gate rises: mode 0 does not restart counting
    assert pit.channels[2].gate == 1 and pit.flags & U.KVM_PIT_FLAGS_SPEAKER_DATA_ON
    assert pit.channels[2].count_load_time == 0
    v = pit.pio_read(0x61)
    assert v & 3 == 3 and (v >> 5) & 1 == 0
    port.clock.advance(500_000)  # 1193 ticks > 1000: OUT high in mode 0
    assert (pit.pio_read(0x61) >> 5) & 1 == 1
    pit.pio_write(0x61, 0)
    assert not pit.flags & U.KVM_PIT_FLAGS_SPEAKER_DATA_ON
    # mode 2 restarts on a rising gate
    program(pit, 2, 2, 1000)
    port.clock.advance(100_000)
    pit.pio_write(0x61, 1)
    assert pit.channels[2].count_load_time == port.clock.now
    # the refresh clock is bit 14 of ktime
    port.clock.advance_to((port.clock.now | 0x3FFF) + 1)
    r1 = (pit.pio_read(0x61) >> 4) & 1
    port.clock.advance(1 << 14)
    assert (pit.pio_read(0x61) >> 4) & 1 == r1 ^ 1


# ---------------------------------------------------------------- reinject and discard
def test_reinject_waits_for_acks_and_reinjects_missed_ticks(port, pit):
    """Reinject mode: a tick injects only after the previous one was acked; missed ticks
    are counted in pending and reinjected one per ack (kvm_pit_ack_irq)."""
    program(pit, 0, 2, 11932)
    p = pit.period
    port.clock.advance(4 * p)
    assert port.pulses() == [p]  # ticks 2-4 wait for the ack
    assert pit.pending == 4 and pit.irq_ack == 0
    for k in range(3):
        port.guest_ack()
        assert len(port.pulses()) == k + 2 and pit.pending == 3 - k
    port.guest_ack()  # the last: pending 1 -> 0, nothing queued
    assert len(port.pulses()) == 4 and pit.pending == 0 and pit.irq_ack == 1
    port.clock.advance(p)
    assert len(port.pulses()) == 5


def test_acked_ticks_are_injected_on_time(port, pit):
    program(pit, 0, 2, 11932)
    p = pit.period
    for k in range(1, 5):
        port.clock.advance(p)
        assert port.pulses()[-1] == k * p
        port.guest_ack()
    assert pit.pending == 0


def test_discard_mode_injects_every_tick(port, pit):
    """KVM_REINJECT_CONTROL 0: the PIT_REINJ inhibit is cleared, the notifiers detached, and
    every expiry injects whether or not the guest acked."""
    pit.kvm_pit_set_reinject(False)
    assert port.inhibits[-1] == ("PIT_REINJ", False) and port.ack == [] and port.mask == []
    program(pit, 0, 2, 11932)
    port.clock.advance(4 * pit.period)
    assert len(port.pulses()) == 4 and pit.pending == 0
    pit.kvm_pit_set_reinject(False)  # no change: nothing done
    assert len(port.inhibits) == 2
    pit.kvm_pit_set_reinject(True)  # back: reset bookkeeping, notifiers again
    assert port.inhibits[-1] == ("PIT_REINJ", True) and len(port.ack) == 1
    assert pit.pending == 0 and pit.irq_ack == 1


def test_unmask_forgets_missed_ticks(port, pit):
    """pit_mask_notifer: unmasking GSI 0 resets pending and irq_ack; masking does nothing."""
    program(pit, 0, 2, 11932)
    port.clock.advance(3 * pit.period)
    assert pit.pending == 3 and pit.irq_ack == 0
    for _g, cb in port.mask:
        cb(True)
    assert pit.pending == 3
    port.unmask()
    assert pit.pending == 0 and pit.irq_ack == 1
    port.clock.advance(pit.period)
    assert len(port.pulses()) == 2


def test_new_count_flushes_queued_work(port, pit):
    """create_pit_timer: kthread_flush_work runs queued work before the new count starts;
    the reinject bookkeeping is then reset."""
    program(pit, 0, 2, 11932)
    port.clock.advance(3 * pit.period)
    for _, cb in port.ack:
        cb()  # queued (pending 3 -> 2), not yet run
    assert len(port.pulses()) == 1 and pit.expired.active
    program(pit, 0, 2, 5000)
    assert len(port.pulses()) == 2 and not pit.expired.active
    assert pit.pending == 0 and pit.irq_ack == 1


# ---------------------------------------------------------------- NMI watchdog
@pytest.mark.parametrize("nmi_mode", [0, 1, 2])
def test_nmi_watchdog_follows_every_irq0(nmi_mode):
    """pit_do_work: while vapics_in_nmi_mode > 0, each IRQ0 is followed by
    kvm_apic_nmi_wd_deliver on every vCPU; never otherwise, never without an IRQ0."""
    port = FakePort(nmi_mode=nmi_mode)
    pit = KvmPit(port)
    program(pit, 0, 2, 11932)
    port.clock.advance(3 * pit.period)  # reinject, no acks: one IRQ0
    assert port.watchdog == ([pit.period] if nmi_mode else [])
    port.guest_ack()
    assert len(port.watchdog) == (2 if nmi_mode else 0)


# ---------------------------------------------------------------- kvm_pit_state2
def test_state2_round_trip_and_set_semantics(port, pit):
    program(pit, 0, 2, 11932)
    program(pit, 1, 3, 0x1234, rw=3, bcd=1)
    port.clock.advance(2_500_000)
    pit.pio_write(0x43, 0xC0 | 0x02)  # latch channel 0 count and status
    data = pit.kvm_vm_ioctl_get_pit2()
    assert len(data) == U.KVM_PIT_STATE2_SIZE
    before = unpack_pit_state2(data)
    port.clock.advance(1_000_000)
    pit.kvm_vm_ioctl_set_pit2(data)
    after = unpack_pit_state2(pit.kvm_vm_ioctl_get_pit2())
    for i in range(3):
        b, a = dict(before["channels"][i]), dict(after["channels"][i])
        if i:  # pit_load_count: channels 1 and 2 count from now
            assert a.pop("count_load_time") == port.clock.now
            b.pop("count_load_time")
        assert a == b
    # channel 0's timer restarted from the set
    assert pit.timer.expires == port.clock.now + period_ns(11932)


def test_set_pit2_count_zero_flags_and_hpet_legacy(port, pit):
    chans = unpack_pit_state2(pit.kvm_vm_ioctl_get_pit2())["channels"]
    chans[0].update(count=0, mode=2, rw_mode=3)
    pit.kvm_vm_ioctl_set_pit2(pack_pit_state2(chans, 0xFFFFFFF0))
    st_ = unpack_pit_state2(pit.kvm_vm_ioctl_get_pit2())
    assert st_["flags"] == 0xFFFFFFF0  # stored as given
    assert st_["channels"][0]["count"] == 0x10000 and pit.timer.active
    # entering HPET legacy mode stops channel 0's timer, keeping its mode
    pit.kvm_vm_ioctl_set_pit2(pack_pit_state2(st_["channels"], U.KVM_PIT_FLAGS_HPET_LEGACY))
    assert not pit.timer.active and pit.channels[0].mode == 2
    program(pit, 0, 2, 1000)  # still legacy: no timer
    assert not pit.timer.active
    pit.kvm_vm_ioctl_set_pit2(pack_pit_state2(st_["channels"], 0))
    assert pit.timer.active


# ---------------------------------------------------------------- properties
@SETTINGS
@given(mode=st.integers(0, 7), count=st.integers(0, 0xFFFF), rw=st.integers(1, 3),
       channel=st.integers(0, 2), t=st.integers(0, 200_000_000))
def test_latched_read_matches_pit_get_count(mode, count, rw, channel, t):
    """Any mode and count written through the ports, latched at any time, reads back as
    pit_get_count at that instant (the byte(s) the access mode gives)."""
    port = FakePort()
    pit = KvmPit(port)
    pit.kvm_pit_set_reinject(False)
    program(pit, channel, mode, count, rw=rw)
    port.clock.advance(t)
    pit.pio_write(0x43, channel << 6)
    want = pit.pit_get_count(channel) & 0xFFFF
    p = 0x40 + channel
    if rw == 1:
        assert pit.pio_read(p) == want & 0xFF
    elif rw == 2:
        assert pit.pio_read(p) == want >> 8
    else:
        assert pit.pio_read(p) | pit.pio_read(p) << 8 == want
    assert pit.channels[channel].count_latched == 0
    # and the status read-back agrees with the programmed mode
    pit.pio_write(0x43, 0xE0 | (2 << channel))
    s = pit.pio_read(p)
    m = mode - 4 if mode > 5 else mode
    assert s & 0x7F == (rw << 4) | (m << 1) and s >> 7 == pit.pit_get_out(channel)


@SETTINGS
@given(mode=st.sampled_from([2, 3]), count=st.integers(2, 0xFFFF),
       t=st.integers(0, 100_000_000))
def test_periodic_count_stays_in_range(mode, count, t):
    """Modes 2 and 3: the count is in (0, count] whenever it is read."""
    port = FakePort()
    pit = KvmPit(port)
    program(pit, 0, mode, count)
    port.clock.advance(t)
    assert 0 < pit.pit_get_count(0) <= count


_u8 = st.integers(0, 0xFF)
_channel = st.fixed_dictionaries({
    "count": st.integers(0, 0xFFFFFFFF), "latched_count": st.integers(0, 0xFFFF),
    "count_latched": _u8, "status_latched": _u8, "status": _u8, "read_state": _u8,
    "write_state": _u8, "write_latch": _u8, "rw_mode": _u8, "mode": _u8, "bcd": _u8,
    "gate": _u8, "count_load_time": st.integers(-(1 << 63), (1 << 63) - 1)})


@SETTINGS
@given(chans=st.lists(_channel, min_size=3, max_size=3), flags=st.integers(0, 0xFFFFFFFF),
       t=st.integers(0, 10**9))
def test_set_then_get_pit2(chans, flags, t):
    """KVM_SET_PIT2 then KVM_GET_PIT2 gives back every field as set, except what
    kvm_pit_load_count changes: a count of 0 reads 0x10000, channels 1 and 2 count from now;
    the timer runs exactly for channel 0 in modes 0-4 (not HPET legacy)."""
    port = FakePort()
    pit = KvmPit(port)
    port.clock.advance(t)
    pit.kvm_vm_ioctl_set_pit2(pack_pit_state2(chans, flags))
    got = unpack_pit_state2(pit.kvm_vm_ioctl_get_pit2())
    assert got["flags"] == flags
    for i, (want, have) in enumerate(zip(chans, got["channels"], strict=True)):
        want = dict(want, count=want["count"] or 0x10000)
        if i:
            want["count_load_time"] = t
        assert have == want
    legacy = flags & U.KVM_PIT_FLAGS_HPET_LEGACY
    assert pit.timer.active == (chans[0]["mode"] <= 4 and not legacy)


# ---------------------------------------------------------------- in a model VM
def _vm(**kw):
    vm = model_vm(1, enable_apicv=False, flexpriority=False, **kw)
    cpu = vm.vcpus[0]
    cpu.mmio_write(A.APIC_SPIV, 0x1FF)
    return vm, cpu


def _route_irq0(cpu, vector: int) -> None:
    """The guest points IOAPIC pin 0 (GSI 0 under the default routing) at itself, edge, and
    masks the PIC (GSI 0 also drives PIC pin 0, and the BSP's LVT0 is ExtINT after reset)."""
    cpu.outb(0x21, 0xFF)
    cpu.ioapic_write(0x00, 0x10)
    cpu.ioapic_write(0x10, vector)
    cpu.ioapic_write(0x00, 0x11)
    cpu.ioapic_write(0x10, 0)


def _guest_program(cpu, mode: int, count: int) -> None:
    cpu.outb(0x43, 0x30 | (mode << 1))
    cpu.outb(0x40, count & 0xFF)
    cpu.outb(0x40, count >> 8)


def test_vm_ioctl_errors():
    vm, cpu = _vm()
    with pytest.raises(KvmError) as e:
        vm.reinject_control(True)
    assert e.value.errno == U.ENXIO
    for call in (vm.get_pit2, lambda: vm.set_pit2(bytes(112))):
        with pytest.raises(KvmError) as e:
            call()
        assert e.value.errno == U.ENXIO
    with pytest.raises(IoExit):
        cpu.inb(0x40)
    vm.create_pit2()
    with pytest.raises(KvmError) as e:
        vm.create_pit2()
    assert e.value.errno == U.EEXIST
    with pytest.raises(IoExit):
        cpu.outb(0x61, 0)  # no KVM_PIT_SPEAKER_DUMMY
    with pytest.raises(ValueError):
        vm.set_pit2(bytes(111))
    with pytest.raises(ValueError):
        vm.reinject_control(256)
    vm.close()
    split = model_vm(1, irqchip="split")
    with pytest.raises(KvmError) as e:
        split.create_pit2()
    assert e.value.errno == U.ENOENT


def test_vm_pit_tick_reaches_the_guest_and_is_reinjected_after_eoi():
    """A PIT-driven timer tick: mode 2 at ~1 ms, IRQ0 through the default routing to IOAPIC
    pin 0; in reinject mode ticks missed while the guest did not EOI come one per EOI."""
    vm, cpu = _vm()
    vm.create_pit2(U.KVM_PIT_SPEAKER_DUMMY)
    _route_irq0(cpu, 0x30)
    _guest_program(cpu, 2, 1193)
    p = vm.pit.period
    vm.clock.advance(p)
    assert cpu.take_interrupts() == [0x30]
    vm.clock.advance(3 * p)  # three ticks, one pending in IRR at most
    assert vm.pit.pending == 3
    assert cpu.take_interrupts(limit=1) == [0x30]  # EOI acks: the next missed one comes
    assert vm.pit.pending == 2
    assert cpu.take_interrupts(limit=1) == [0x30]
    assert cpu.take_interrupts(limit=1) == [0x30]
    assert vm.pit.pending == 0
    assert cpu.take_interrupts() == []
    vm.close()


def test_vm_discard_mode_coalesces_in_the_ioapic():
    vm, cpu = _vm()
    vm.create_pit2()
    vm.reinject_control(False)
    _route_irq0(cpu, 0x30)
    _guest_program(cpu, 2, 1193)
    vm.clock.advance(5 * vm.pit.period)
    assert vm.pit.irqs_raised == 5
    assert cpu.take_interrupts() == [0x30]  # the others coalesced
    vm.close()


def test_vm_nmi_watchdog_through_lvt0():
    """LVT0 in NMI mode: every IRQ0 also delivers an NMI (kvm_apic_nmi_wd_deliver)."""
    vm, cpu = _vm()
    vm.create_pit2()
    vm.reinject_control(False)
    cpu.mmio_write(A.APIC_LVT0, A.APIC_DM_NMI)
    assert vm.kvm.vapics_in_nmi_mode == 1
    _guest_program(cpu, 2, 1193)
    vm.clock.advance(vm.pit.period)
    assert cpu.run() == [2]  # the NMI (IRQ0 itself is masked in the IOAPIC)
    vm.close()


def test_vm_guest_latch_read_and_state2():
    vm, cpu = _vm()
    vm.create_pit2()
    _guest_program(cpu, 2, 50000)
    vm.clock.advance(10_000_000)
    cpu.outb(0x43, 0x00)
    lo, hi = cpu.inb(0x40), cpu.inb(0x40)
    assert lo | hi << 8 == 50000 - (10_000_000 * KVM_PIT_FREQ // 10**9) % 50000
    st_ = unpack_pit_state2(vm.get_pit2())
    assert st_["channels"][0]["mode"] == 2 and st_["channels"][0]["count"] == 50000
    vm.close()
