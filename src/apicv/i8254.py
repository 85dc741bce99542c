"""KVM's in-kernel i8254 PIT (arch/x86/kvm/i8254.c, i8254.h) and its VM ioctls.

:class:`KvmPit` is ``struct kvm_pit``: three channels (``struct kvm_kpit_channel_state``, every
field as KVM keeps it), the flags word of ``struct kvm_pit_state2``, channel 0's hrtimer on the
model's clock, the reinject bookkeeping (``pending``, ``irq_ack``), and the kthread work item
``pit->expired`` that raises IRQ0. What it does, as KVM does it:

* Counting is derived from time, never stepped. Channel 0 counts from its hrtimer
  (``__kpit_elapsed``: the period minus the time left to the next expiry), channels 1 and 2
  from ``count_load_time`` (``ktime_get()`` when the count was loaded; channel 2 also at a
  rising gate). ``pit_get_count`` and ``pit_get_out`` are KVM's formulas, C integer arithmetic
  included (``mul_u64_u32_div``, a truncating ``%``, the ``int`` counter). BCD counting is not
  supported by KVM either: the bit is stored and reported in the status byte only.
* Loading channel 0's count (``pit_load_count``) starts the timer: modes 0, 1, 4 one-shot,
  2 and 3 periodic (clamped to ``min_timer_period_us``, the first expiry unclamped), any other
  mode (5, or 0xFF after reset) cancels it. No timer is started without an in-kernel IOAPIC
  (a split irqchip) or while KVM_PIT_FLAGS_HPET_LEGACY is set (``create_pit_timer``).
* An expiry (``pit_timer_fn``) counts a pending tick in reinject mode and queues the work;
  the work (``pit_do_work``) raises and lowers GSI 0 through ``kvm_set_irq`` with the PIT's
  own IRQ source id -- in reinject mode only once the previous tick was acknowledged
  (``kvm_pit_ack_irq``, the ack notifier on GSI 0; unmasking GSI 0 resets the bookkeeping,
  ``pit_mask_notifer``) -- then, while any LAPIC has LVT0 in NMI mode, delivers LVT0 on every
  vCPU (``kvm_apic_nmi_wd_deliver``: the NMI watchdog through virtual wire).
* Reinject mode (the default) sets the PIT_REINJ APICv inhibit; KVM_REINJECT_CONTROL with 0
  clears it and detaches the notifiers: then every expiry injects and the irqchip coalesces.

KVM runs the work on a kthread (``kthread_queue_work``); the model runs it from a zero-delay
timer on the clock, so it runs when the operation that queued it settles (the VM fires due
timers then) or, for an expiry, right after the expiry at the same instant -- never inside the
irqchip call that acknowledged IRQ0. Queuing work already queued does nothing, as in KVM.
``kthread_flush_work`` (a new count, ``destroy_pit_timer``) runs queued work at once.

The PIT sees the VM only through its :class:`PitPort` (tests use a fake).
:class:`PitIoctlsMixin` is the VM side: KVM_CREATE_PIT2, KVM_GET_PIT2, KVM_SET_PIT2 and
KVM_REINJECT_CONTROL, and the guest's port I/O.

``count_load_time`` is ``ktime_get()`` in KVM (host CLOCK_MONOTONIC) and the model's
``clock.now`` here (ns since the VM was created): KVM_GET_PIT2 of the two backends can never
agree on it, and a kvm_pit_state2 taken from one backend carries a meaningless load time into
the other (channels 1 and 2 are reloaded with "now" by KVM_SET_PIT2 anyway; channel 0's is
kept but unused -- channel 0 counts from its timer).

Why this module is long: it is all of i8254.c -- the counting formulas, the port decoders, the
timer and reinject machinery and the state ioctls act on the same ``struct kvm_pit``, and the
VM's half of the ioctls is a few lines beside them.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from . import apicdef as A
from . import uapi as U
from .errors import KvmError

if TYPE_CHECKING:
    from .clock import Clock, HrTimer

KVM_PIT_BASE_ADDRESS = 0x40
KVM_SPEAKER_BASE_ADDRESS = 0x61
KVM_PIT_MEM_LENGTH = 4
KVM_PIT_FREQ = 1193181
KVM_PIT_CHANNEL_MASK = 0x3
NSEC_PER_SEC = 1_000_000_000
PIT_GSI = 0  # the PIT drives GSI 0 (and its ack/mask notifiers watch GSI 0)

RW_STATE_LSB = 1
RW_STATE_MSB = 2
RW_STATE_WORD0 = 3
RW_STATE_WORD1 = 4

_U16 = 0xFFFF
_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1

# struct kvm_pit_channel_state: u32 count; u16 latched_count; u8 count_latched,
# status_latched, status, read_state, write_state, write_latch, rw_mode, mode, bcd, gate;
# s64 count_load_time
CHANNEL_FIELDS = ("count", "latched_count", "count_latched", "status_latched", "status",
                  "read_state", "write_state", "write_latch", "rw_mode", "mode", "bcd", "gate",
                  "count_load_time")
_CHANNEL = struct.Struct("<IH10Bq")
_STATE2 = struct.Struct("<" + "IH10Bq" * 3 + "I36x")
assert _CHANNEL.size == U.KVM_PIT_CHANNEL_STATE_SIZE
assert _STATE2.size == U.KVM_PIT_STATE2_SIZE


def _s64(v: int) -> int:
    v &= _U64
    return v - (1 << 64) if v >> 63 else v


def _s32(v: int) -> int:
    v &= _U32
    return v - (1 << 32) if v >> 31 else v


def _cmod(a: int, b: int) -> int:
    """C's ``a % b`` for signed operands: the remainder takes the dividend's sign."""
    r = abs(a) % abs(b)
    return -r if a < 0 else r


def mul_u64_u32_div(a: int, mul: int, div: int) -> int:
    """mul_u64_u32_div(): (u64)a * mul / div with a 96-bit intermediate, as a u64."""
    return ((a & _U64) * mul // div) & _U64


class PitPort(Protocol):
    """What the PIT asks of the VM, and nothing else.

    * ``clock`` -- the VM's clock: ``now`` (``ktime_get``) and ``timer(fn)`` (hrtimers).
    * ``ioapic_in_kernel`` -- ``ioapic_in_kernel(kvm)``: False with a split irqchip, where
      ``create_pit_timer`` starts no timer.
    * ``min_timer_period_us`` -- the kvm module parameter that bounds periodic timers.
    * ``set_irq(irq_source_id, gsi, level) -> int`` -- ``kvm_set_irq(kvm, id, gsi, level,
      false)``, through the GSI routing table.
    * ``request_irq_source_id() -> int`` -- ``kvm_request_irq_source_id``.
    * ``register_ack_notifier(gsi, cb)`` / ``unregister_ack_notifier(gsi, cb)`` --
      ``kvm_(un)register_irq_ack_notifier``; ``cb()`` when the guest acknowledges the GSI.
    * ``register_mask_notifier(gsi, cb)`` / ``unregister_mask_notifier(gsi, cb)`` --
      ``kvm_(un)register_irq_mask_notifier``; ``cb(masked)`` when an irqchip pin of the GSI
      is masked or unmasked.
    * ``set_apicv_inhibit(reason_name, set_)`` -- ``kvm_set/clear_apicv_inhibit`` (the
      reason's name in ``enum kvm_apicv_inhibit`` without its prefix: "PIT_REINJ").
    * ``vapics_in_nmi_mode() -> int`` -- ``kvm->arch.vapics_in_nmi_mode``: how many LAPICs
      have LVT0 unmasked in NMI mode (``apic_manage_nmi_watchdog``).
    * ``nmi_watchdog_deliver()`` -- ``kvm_for_each_vcpu: kvm_apic_nmi_wd_deliver(vcpu)``:
      every vCPU's LVT0 is delivered as programmed (``kvm_apic_local_deliver(APIC_LVT0)``;
      nothing where it is masked). The PIT calls it only while ``vapics_in_nmi_mode() > 0``.
    """

    clock: Clock
    ioapic_in_kernel: bool
    min_timer_period_us: int

    def set_irq(self, irq_source_id: int, gsi: int, level: int) -> int: ...
    def request_irq_source_id(self) -> int: ...
    def register_ack_notifier(self, gsi: int, cb: Callable[[], None]) -> None: ...
    def unregister_ack_notifier(self, gsi: int, cb: Callable[[], None]) -> None: ...
    def register_mask_notifier(self, gsi: int, cb: Callable[[bool], None]) -> None: ...
    def unregister_mask_notifier(self, gsi: int, cb: Callable[[bool], None]) -> None: ...
    def set_apicv_inhibit(self, reason_name: str, set_: bool) -> None: ...
    def vapics_in_nmi_mode(self) -> int: ...
    def nmi_watchdog_deliver(self) -> None: ...


@dataclass(slots=True)
class KvmKpitChannelState:
    """struct kvm_kpit_channel_state: the fields and widths of ``struct
    kvm_pit_channel_state`` (KVM_GET/SET_PIT2 copy it as it is)."""

    count: int = 0  # u32, can be 65536
    latched_count: int = 0  # u16
    count_latched: int = 0  # u8: the rw_mode the latch was taken with (0: none)
    status_latched: int = 0
    status: int = 0
    read_state: int = 0
    write_state: int = 0
    write_latch: int = 0
    rw_mode: int = 0
    mode: int = 0
    bcd: int = 0  # stored, not used for counting
    gate: int = 0
    count_load_time: int = 0  # s64 ns (model clock)

    def pack(self) -> bytes:
        return _CHANNEL.pack(*self.values())

    def values(self) -> tuple[int, ...]:
        return tuple(getattr(self, n) for n in CHANNEL_FIELDS)

    @classmethod
    def unpack(cls, data: bytes) -> KvmKpitChannelState:
        return cls(*_CHANNEL.unpack(data))


class KvmPit:
    """``struct kvm_pit`` as ``kvm_create_pit(kvm, flags)`` makes it: reset (every channel in
    mode 0xFF with count 0x10000, gates 1/1/0), reinject mode on, the PIO device at
    0x40-0x43 and, with KVM_PIT_SPEAKER_DUMMY in *flags*, the speaker device at 0x61."""

    def __init__(self, port: PitPort, flags: int = 0) -> None:
        self.port = port
        self.clock = port.clock
        self.speaker_dummy = bool(flags & U.KVM_PIT_SPEAKER_DUMMY)
        self.irq_source_id = port.request_irq_source_id()
        self.channels = [KvmKpitChannelState() for _ in range(3)]
        self.flags = 0
        self.is_periodic = False
        self.period = 0  # ns
        self.timer: HrTimer = self.clock.timer(self.pit_timer_fn)
        self.expired: HrTimer = self.clock.timer(self._run_expired)  # the kthread work
        self.reinject = False
        self.pending = 0
        self.irq_ack = 0
        self.irqs_raised = 0  # pit_do_work runs that reached kvm_set_irq (statistics)
        self.kvm_pit_reset()
        self.kvm_pit_set_reinject(True)

    # ------------------------------------------------------------------ counting
    def kpit_elapsed(self, channel: int) -> int:
        """kpit_elapsed(): ns since the count was loaded -- channel 0 from its hrtimer
        (``__kpit_elapsed``: 0 while no period was ever set), the others from
        count_load_time."""
        if channel == 0:
            if not self.period:
                return 0
            remaining = self.timer.expires - self.clock.now  # hrtimer_get_remaining
            return self.period - remaining
        return _s64(self.clock.now - self.channels[channel].count_load_time)

    def _ticks(self, channel: int) -> int:
        return _s64(mul_u64_u32_div(self.kpit_elapsed(channel), KVM_PIT_FREQ, NSEC_PER_SEC))

    def pit_get_count(self, channel: int) -> int:
        """pit_get_count(): the counter now. Modes 0, 1, 4, 5 wrap at 16 bits; mode 3 counts
        down by two; mode 2 (and any other) reloads each period."""
        c = self.channels[channel]
        d = self._ticks(channel)
        if c.mode in (0, 1, 4, 5):
            counter = (c.count - d) & 0xFFFF
        elif c.mode == 3:
            counter = c.count - _cmod(_s64(2 * d), c.count)
        else:
            counter = c.count - _cmod(d, c.count)
        return _s32(counter)

    def pit_get_out(self, channel: int) -> int:
        """pit_get_out(): the channel's OUT pin now."""
        c = self.channels[channel]
        d = self._ticks(channel)
        mode = c.mode
        if mode == 1:
            return int(d < c.count)
        if mode == 2:
            return int(_cmod(d, c.count) == 0 and d != 0)
        if mode == 3:
            return int(_cmod(d, c.count) < ((c.count + 1) >> 1))
        if mode in (4, 5):
            return int(d == c.count)
        return int(d >= c.count)  # mode 0 and anything else

    def pit_latch_count(self, channel: int) -> None:
        """pit_latch_count(): latch the counter unless a latch is pending."""
        c = self.channels[channel]
        if not c.count_latched:
            c.latched_count = self.pit_get_count(channel) & _U16
            c.count_latched = c.rw_mode

    def pit_latch_status(self, channel: int) -> None:
        """pit_latch_status(): latch OUT, access mode, mode and BCD (no NULL COUNT bit)."""
        c = self.channels[channel]
        if not c.status_latched:
            c.status = ((self.pit_get_out(channel) << 7) | (c.rw_mode << 4) | (c.mode << 1)
                        | c.bcd) & 0xFF
            c.status_latched = 1

    def pit_set_gate(self, channel: int, val: int) -> None:
        """pit_set_gate(): a rising gate restarts counting in modes 1, 2, 3, 5."""
        c = self.channels[channel]
        if c.mode in (1, 2, 3, 5) and c.gate < val:
            c.count_load_time = self.clock.now
        c.gate = val

    # ------------------------------------------------------------------ timer and IRQ0
    def kthread_queue_work(self) -> None:
        """kthread_queue_work(pit->worker, &pit->expired): queued once until it runs."""
        if not self.expired.active:
            self.expired.start(self.clock.now)

    def kthread_flush_work(self) -> None:
        """kthread_flush_work(&pit->expired): queued work runs now."""
        if self.expired.cancel():
            self.pit_do_work()

    def _run_expired(self) -> bool:
        self.pit_do_work()
        return False

    def pit_do_work(self) -> None:
        """pit_do_work(): in reinject mode only if the last tick was acknowledged (taking
        irq_ack); raise and lower GSI 0; the NMI watchdog through LVT0."""
        if self.reinject:
            ack, self.irq_ack = self.irq_ack, 0
            if not ack:
                return
        port = self.port
        self.irqs_raised += 1
        port.set_irq(self.irq_source_id, PIT_GSI, 1)
        port.set_irq(self.irq_source_id, PIT_GSI, 0)
        if port.vapics_in_nmi_mode() > 0:
            port.nmi_watchdog_deliver()

    def pit_timer_fn(self) -> bool:
        """pit_timer_fn(): count the tick (reinject mode), queue the work; a periodic timer
        moves on by its period (HRTIMER_RESTART)."""
        if self.reinject:
            self.pending += 1
        self.kthread_queue_work()
        if self.is_periodic:
            self.timer.expires += self.period  # hrtimer_add_expires_ns
            return True
        return False

    def kvm_pit_ack_irq(self) -> None:
        """kvm_pit_ack_irq(): the guest acknowledged IRQ0; a tick still pending is
        reinjected (atomic_dec_if_positive(&pending) > 0)."""
        self.irq_ack = 1
        if self.pending > 0:
            self.pending -= 1
            if self.pending > 0:
                self.kthread_queue_work()

    def pit_mask_notifer(self, mask: bool) -> None:
        """pit_mask_notifer() (sic): unmasking GSI 0 forgets the missed ticks."""
        if not mask:
            self.kvm_pit_reset_reinject()

    def kvm_pit_reset_reinject(self) -> None:
        """kvm_pit_reset_reinject()."""
        self.pending = 0
        self.irq_ack = 1

    def kvm_pit_set_reinject(self, reinject: bool) -> None:
        """kvm_pit_set_reinject(): entering reinject mode sets the PIT_REINJ inhibit, resets
        the bookkeeping and attaches the ack and mask notifiers to GSI 0; leaving it undoes
        that. No change, nothing done."""
        reinject = bool(reinject)
        if self.reinject == reinject:
            return
        port = self.port
        if reinject:
            port.set_apicv_inhibit("PIT_REINJ", True)
            self.kvm_pit_reset_reinject()
            port.register_ack_notifier(PIT_GSI, self.kvm_pit_ack_irq)
            port.register_mask_notifier(PIT_GSI, self.pit_mask_notifer)
        else:
            port.set_apicv_inhibit("PIT_REINJ", False)
            port.unregister_ack_notifier(PIT_GSI, self.kvm_pit_ack_irq)
            port.unregister_mask_notifier(PIT_GSI, self.pit_mask_notifer)
        self.reinject = reinject

    def create_pit_timer(self, val: int, is_period: bool) -> None:
        """create_pit_timer(): (re)start channel 0's timer for *val* PIT cycles -- unless there
        is no in-kernel IOAPIC or HPET legacy mode is on (then nothing changes)."""
        if not self.port.ioapic_in_kernel or self.flags & U.KVM_PIT_FLAGS_HPET_LEGACY:
            return
        interval = mul_u64_u32_div(val, NSEC_PER_SEC, KVM_PIT_FREQ)
        self.timer.cancel()
        self.kthread_flush_work()
        self.period = interval
        self.is_periodic = bool(is_period)
        self.kvm_pit_reset_reinject()
        if self.is_periodic:
            min_period = self.port.min_timer_period_us * 1000
            if self.period < min_period:
                self.period = min_period
        self.timer.start(self.clock.now + interval)

    def destroy_pit_timer(self) -> None:
        """destroy_pit_timer(): the timer stops (its period and expiry are kept: channel 0's
        count goes on from them)."""
        self.timer.cancel()
        self.kthread_flush_work()

    def pit_load_count(self, channel: int, val: int) -> None:
        """pit_load_count(): 0 means 0x10000; channels 1 and 2 restart counting now; channel
        0's mode picks its timer (0, 1, 4: one-shot; 2, 3: periodic; else none)."""
        if val == 0:
            val = 0x10000
        c = self.channels[channel]
        c.count = val & _U32
        if channel != 0:
            c.count_load_time = self.clock.now
            return
        if c.mode in (0, 1, 4):
            self.create_pit_timer(val, False)
        elif c.mode in (2, 3):
            self.create_pit_timer(val, True)
        else:
            self.destroy_pit_timer()

    def kvm_pit_load_count(self, channel: int, val: int, hpet_legacy_start: bool) -> None:
        """kvm_pit_load_count(): on entering HPET legacy mode channel 0 is loaded as if in
        mode 0xFF (its timer stops), its mode kept."""
        if hpet_legacy_start:
            c = self.channels[0]
            saved_mode, c.mode = c.mode, 0xFF
            self.pit_load_count(channel, val)
            c.mode = saved_mode
        else:
            self.pit_load_count(channel, val)

    def kvm_pit_reset(self) -> None:
        """kvm_pit_reset(): flags 0; each channel mode 0xFF, gate 1 (channel 2: 0), count
        0x10000; the reinject bookkeeping reset."""
        self.flags = 0
        for i, c in enumerate(self.channels):
            c.mode = 0xFF
            c.gate = int(i != 2)
            self.pit_load_count(i, 0)
        self.kvm_pit_reset_reinject()

    def kvm_free_pit(self) -> None:
        """kvm_free_pit(): notifiers off, the timer and the work cancelled (VM destruction)."""
        self.kvm_pit_set_reinject(False)
        self.timer.cancel()
        self.expired.cancel()

    # ------------------------------------------------------------------ port I/O
    def pit_ioport_write(self, addr: int, val: int) -> bool:
        """pit_ioport_write(): a control word at 0x43 (read-back, counter latch, or access
        mode + mode + BCD of a channel), a count byte at 0x40-0x42. False (not claimed)
        outside 0x40-0x43."""
        if not KVM_PIT_BASE_ADDRESS <= addr < KVM_PIT_BASE_ADDRESS + KVM_PIT_MEM_LENGTH:
            return False
        val &= 0xFF
        addr &= KVM_PIT_CHANNEL_MASK
        if addr == 3:
            channel = val >> 6
            if channel == 3:  # read-back command
                for ch in range(3):
                    if val & (2 << ch):
                        if not val & 0x20:
                            self.pit_latch_count(ch)
                        if not val & 0x10:
                            self.pit_latch_status(ch)
                return True
            s = self.channels[channel]
            access = (val >> 4) & KVM_PIT_CHANNEL_MASK
            if access == 0:
                self.pit_latch_count(channel)
            else:
                s.rw_mode = s.read_state = s.write_state = access
                s.mode = (val >> 1) & 7
                if s.mode > 5:
                    s.mode -= 4
                s.bcd = val & 1
            return True
        s = self.channels[addr]
        ws = s.write_state
        if ws == RW_STATE_MSB:
            self.pit_load_count(addr, val << 8)
        elif ws == RW_STATE_WORD0:
            s.write_latch = val
            s.write_state = RW_STATE_WORD1
        elif ws == RW_STATE_WORD1:
            self.pit_load_count(addr, s.write_latch | (val << 8))
            s.write_state = RW_STATE_WORD0
        else:  # RW_STATE_LSB and anything else
            self.pit_load_count(addr, val)
        return True

    def pit_ioport_read(self, addr: int) -> int | None:
        """pit_ioport_read(): a latched status, else a latched count byte, else the live
        count's byte per the read state; None (not claimed) outside 0x40-0x43. A read of 0x43
        returns without writing the data: upstream KVM's fast PIO then leaves AL as it was
        (the model returns 0, what a guest that zeroed AL first -- the real backend's agent
        does -- would read); this PVM host reads 0xFF there (a host difference)."""
        if not KVM_PIT_BASE_ADDRESS <= addr < KVM_PIT_BASE_ADDRESS + KVM_PIT_MEM_LENGTH:
            return None
        addr &= KVM_PIT_CHANNEL_MASK
        if addr == 3:
            return 0
        s = self.channels[addr]
        if s.status_latched:
            s.status_latched = 0
            return s.status
        if s.count_latched:
            cl = s.count_latched
            if cl == RW_STATE_MSB:
                s.count_latched = 0
                return s.latched_count >> 8
            if cl == RW_STATE_WORD0:
                s.count_latched = RW_STATE_MSB
                return s.latched_count & 0xFF
            s.count_latched = 0  # RW_STATE_LSB and anything else
            return s.latched_count & 0xFF
        rs = s.read_state
        count = self.pit_get_count(addr)
        if rs == RW_STATE_MSB:
            return (count >> 8) & 0xFF
        if rs == RW_STATE_WORD0:
            s.read_state = RW_STATE_WORD1
            return count & 0xFF
        if rs == RW_STATE_WORD1:
            s.read_state = RW_STATE_WORD0
            return (count >> 8) & 0xFF
        return count & 0xFF  # RW_STATE_LSB and anything else

    def speaker_ioport_write(self, addr: int, val: int) -> bool:
        """speaker_ioport_write(): bit 1 is the speaker data bit (a flag of kvm_pit_state2),
        bit 0 channel 2's gate. Only with KVM_PIT_SPEAKER_DUMMY; False (not claimed)
        otherwise."""
        if not self.speaker_dummy or addr != KVM_SPEAKER_BASE_ADDRESS:
            return False
        if val & 2:
            self.flags |= U.KVM_PIT_FLAGS_SPEAKER_DATA_ON
        else:
            self.flags &= ~U.KVM_PIT_FLAGS_SPEAKER_DATA_ON
        self.pit_set_gate(2, val & 1)
        return True

    def speaker_ioport_read(self, addr: int) -> int | None:
        """speaker_ioport_read(): data bit (1), channel 2's gate (0) and OUT (5), and the
        refresh clock (4), which toggles every 2^14 ns of ktime."""
        if not self.speaker_dummy or addr != KVM_SPEAKER_BASE_ADDRESS:
            return None
        refresh_clock = ((self.clock.now & _U32) >> 14) & 1
        return ((int(bool(self.flags & U.KVM_PIT_FLAGS_SPEAKER_DATA_ON)) << 1)
                | self.channels[2].gate | (self.pit_get_out(2) << 5) | (refresh_clock << 4))

    def pio_read(self, port: int) -> int | None:
        """A guest IN (1 byte) on the PIT's devices; None when neither claims *port*."""
        if port == KVM_SPEAKER_BASE_ADDRESS:
            return self.speaker_ioport_read(port)
        return self.pit_ioport_read(port)

    def pio_write(self, port: int, value: int) -> bool:
        """A guest OUT (1 byte); False when neither device claims *port*."""
        if port == KVM_SPEAKER_BASE_ADDRESS:
            return self.speaker_ioport_write(port, value)
        return self.pit_ioport_write(port, value)

    # ------------------------------------------------------------------ KVM_GET/SET_PIT2
    def kvm_vm_ioctl_get_pit2(self) -> bytes:
        """kvm_vm_ioctl_get_pit2(): struct kvm_pit_state2 (the channels, flags, reserved 0)."""
        vals: list[int] = []
        for c in self.channels:
            vals.extend(c.values())
        return _STATE2.pack(*vals, self.flags)

    def kvm_vm_ioctl_set_pit2(self, data: bytes) -> None:
        """kvm_vm_ioctl_set_pit2(): channels and flags taken as given (reserved ignored), then
        each channel's count reloaded (``kvm_pit_load_count``): 0 becomes 0x10000, channels 1
        and 2 restart now, channel 0's timer restarts per its mode -- or stops when this call
        turns HPET legacy mode on."""
        fields = _STATE2.unpack(data)
        n = len(CHANNEL_FIELDS)
        flags = fields[3 * n]
        start = not self.flags & U.KVM_PIT_FLAGS_HPET_LEGACY and flags & \
            U.KVM_PIT_FLAGS_HPET_LEGACY
        self.channels = [KvmKpitChannelState(*fields[i * n:(i + 1) * n]) for i in range(3)]
        self.flags = flags
        for i in range(3):
            self.kvm_pit_load_count(i, self.channels[i].count, bool(start) and i == 0)


def unpack_pit_state2(data: bytes) -> dict[str, Any]:
    """A kvm_pit_state2 as ``{"channels": [{field: value}, ...], "flags": int}`` (for display,
    comparisons and tests; either backend's bytes)."""
    if len(data) != U.KVM_PIT_STATE2_SIZE:
        raise ValueError(f"struct kvm_pit_state2 is {U.KVM_PIT_STATE2_SIZE} bytes, "
                         f"got {len(data)}")
    fields = _STATE2.unpack(data)
    n = len(CHANNEL_FIELDS)
    return {"channels": [dict(zip(CHANNEL_FIELDS, fields[i * n:(i + 1) * n], strict=True))
                         for i in range(3)],
            "flags": fields[3 * n]}


def pack_pit_state2(channels: list[dict[str, int]], flags: int = 0) -> bytes:
    """The inverse of :func:`unpack_pit_state2` (missing channel fields are 0); ValueError
    for a value that does not fit its field."""
    vals: list[int] = []
    for ch in channels:
        unknown = set(ch) - set(CHANNEL_FIELDS)
        if unknown:
            raise ValueError(f"unknown kvm_pit_channel_state fields {sorted(unknown)}")
        vals.extend(ch.get(f, 0) for f in CHANNEL_FIELDS)
    if len(channels) != 3:
        raise ValueError(f"kvm_pit_state2 has 3 channels, got {len(channels)}")
    try:
        return _STATE2.pack(*vals, flags)
    except struct.error as e:
        raise ValueError(f"kvm_pit_state2: {e}") from None


class VmPitPort:
    """The :class:`PitPort` of a VM: the PIT's narrow view of the VM's public KVM functions
    (kvm_set_irq, irq source ids, ack and mask notifiers, the PIT_REINJ inhibit, the LVT0
    NMI watchdog)."""

    __slots__ = ("clock", "ioapic_in_kernel", "min_timer_period_us", "set_irq",
                 "request_irq_source_id", "register_ack_notifier", "unregister_ack_notifier",
                 "register_mask_notifier", "unregister_mask_notifier", "vm")

    def __init__(self, vm: Any) -> None:
        self.vm = vm
        self.clock = vm.clock
        self.ioapic_in_kernel = vm.kvm.ioapic_in_kernel
        self.min_timer_period_us = vm.kvm.min_timer_period_us
        self.set_irq = vm.kvm_set_irq
        self.request_irq_source_id = vm.kvm_request_irq_source_id
        self.register_ack_notifier = vm.kvm_register_irq_ack_notifier
        self.unregister_ack_notifier = vm.kvm_unregister_irq_ack_notifier
        self.register_mask_notifier = vm.kvm_register_irq_mask_notifier
        self.unregister_mask_notifier = vm.kvm_unregister_irq_mask_notifier

    def set_apicv_inhibit(self, reason_name: str, set_: bool) -> None:
        """kvm_set_or_clear_apicv_inhibit(APICV_INHIBIT_REASON_<reason_name>)."""
        from .kvm_host import ApicvInhibit

        self.vm.kvm_set_or_clear_apicv_inhibit(ApicvInhibit[reason_name], set_)

    def vapics_in_nmi_mode(self) -> int:
        return self.vm.kvm.vapics_in_nmi_mode

    def nmi_watchdog_deliver(self) -> None:
        """kvm_apic_nmi_wd_deliver() on every vCPU: kvm_apic_local_deliver(APIC_LVT0)."""
        for v in self.vm.vcpus:
            v.apic.kvm_apic_local_deliver(A.APIC_LVT0)


class PitIoctlsMixin:
    """The PIT's VM ioctls and guest port I/O, mixed into :class:`apicv.vm.Vm`, which provides
    ``self.pit`` (None until KVM_CREATE_PIT2), ``self.pic`` (None without an in-kernel
    PIC), ``self.vm_ioctl()`` (an ioctl whose effects are settled when it ends) and
    ``self.check_open()``; the PIT sees the VM through :class:`VmPitPort`."""

    pit: KvmPit | None
    pic: Any

    if TYPE_CHECKING:
        def vm_ioctl(self) -> Any: ...
        def check_open(self) -> None: ...

    def pit_port(self) -> PitPort:
        return VmPitPort(self)

    def create_pit2(self, flags: int = 0) -> None:
        """KVM_CREATE_PIT2 (``kvm_arch_vm_ioctl`` -> ``kvm_create_pit``): EEXIST when the VM
        has one, ENOENT without an in-kernel PIC (a split irqchip: 6.18 refuses it there;
        older KVMs created a PIT whose timer never ran). *flags* is struct
        kvm_pit_config.flags: KVM_PIT_SPEAKER_DUMMY (1) adds the speaker port 0x61; KVM
        ignores the other bits. ValueError over 32 bits."""
        if isinstance(flags, bool) or not isinstance(flags, int) or not 0 <= flags <= _U32:
            raise ValueError(f"flags={flags!r}: a u32 (struct kvm_pit_config.flags)")
        with self.vm_ioctl():
            if self.pit is not None:
                raise KvmError(U.EEXIST, "KVM_CREATE_PIT2", "the VM already has a PIT")
            if self.pic is None:
                raise KvmError(U.ENOENT, "KVM_CREATE_PIT2", "no in-kernel PIC (split irqchip)")
            self.pit = KvmPit(self.pit_port(), flags)

    def _need_pit(self, ioctl: str) -> KvmPit:
        pit = self.pit
        if pit is None:
            raise KvmError(U.ENXIO, ioctl, "no PIT (KVM_CREATE_PIT2 first)")
        return pit

    def get_pit2(self) -> bytes:
        """KVM_GET_PIT2 (``kvm_vm_ioctl_get_pit2``): struct kvm_pit_state2, 112 bytes; ENXIO
        without a PIT. ``count_load_time`` is the model's clock (see the module's notes)."""
        self.check_open()
        return self._need_pit("KVM_GET_PIT2").kvm_vm_ioctl_get_pit2()

    def set_pit2(self, data: bytes) -> None:
        """KVM_SET_PIT2 (``kvm_vm_ioctl_set_pit2``): load a struct kvm_pit_state2 (112 bytes,
        else ValueError); ENXIO without a PIT. Counts are reloaded as KVM does (0 is 0x10000,
        channel 0's timer restarts, channels 1 and 2 count from now)."""
        data = bytes(data)
        if len(data) != U.KVM_PIT_STATE2_SIZE:
            raise ValueError(f"struct kvm_pit_state2 is {U.KVM_PIT_STATE2_SIZE} bytes, "
                             f"got {len(data)}")
        with self.vm_ioctl():
            self._need_pit("KVM_SET_PIT2").kvm_vm_ioctl_set_pit2(data)

    def reinject_control(self, reinject: bool | int) -> None:
        """KVM_REINJECT_CONTROL (``kvm_vm_ioctl_reinject`` -> ``kvm_pit_set_reinject``):
        struct kvm_reinject_control.pit_reinject, a u8 (nonzero: reinject); ENXIO without a
        PIT."""
        if isinstance(reinject, bool):
            reinject = int(reinject)
        if not isinstance(reinject, int) or not 0 <= reinject <= 0xFF:
            raise ValueError(f"pit_reinject={reinject!r}: a u8")
        with self.vm_ioctl():
            self._need_pit("KVM_REINJECT_CONTROL").kvm_pit_set_reinject(bool(reinject))

    def pit_pio(self, port: int, value: int | None) -> int | None:
        """A guest IN (*value* None: the byte read) or OUT (0) on a PIT port, or None when no
        in-kernel device claims the port (no PIT; 0x61 without KVM_PIT_SPEAKER_DUMMY): then
        it goes to userspace as KVM_EXIT_IO."""
        pit = self.pit
        if pit is None:
            return None
        if value is None:
            return pit.pio_read(port)
        return 0 if pit.pio_write(port, value) else None
