"""Virtual time for the model: a nanosecond clock with hrtimer-like one-shot timers.

KVM's APIC timer is an hrtimer on CLOCK_MONOTONIC; here it is an :class:`HrTimer` on a
:class:`Clock`. Time moves only when the user says so (``vm.clock.advance(ns)``), so every run is
deterministic. Timers due in the advanced span fire in expiry order, each at its own instant
(``clock.now`` equals the expiry while its callback runs), like ``__hrtimer_run_queues``.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable


class HrTimer:
    """struct hrtimer: a callback armed at an absolute expiry time (ns).

    The callback returns True for HRTIMER_RESTART (re-armed at ``self.expires``, which the
    callback has moved on, as ``hrtimer_set_expires`` does) or False for HRTIMER_NORESTART.

    ``gen`` counts starts and cancels: a queued entry whose generation is not the timer's
    current one is stale and skipped, so cancelling never searches the queue.
    """

    __slots__ = ("clock", "function", "expires", "gen", "active")

    def __init__(self, clock: Clock, function: Callable[[], bool]) -> None:
        self.clock = clock
        self.function = function
        self.expires = 0
        self.gen = 0
        self.active = False

    def start(self, expires: int) -> None:
        """hrtimer_start(HRTIMER_MODE_ABS): (re)arm at absolute time *expires*."""
        self.gen += 1
        self.expires = expires
        self.active = True
        self.clock.enqueue(self)

    def cancel(self) -> bool:
        """hrtimer_cancel: returns whether the timer was armed."""
        was = self.active
        if was:
            self.gen += 1
            self.active = False
        return was


class Clock:
    """The VM's clock: ``now`` in nanoseconds since VM creation.

    By default time moves only through :meth:`advance`. A clock can instead *follow* a time
    source (``clock.follow(fn)``, fn returning nanoseconds): then :meth:`sync`, which the model
    calls on entry to every vCPU operation and at every exit it handles, moves ``now`` up to
    the source, so that time passes during guest operations as it does on real hardware (the
    crosscheck follows the real VM's clock; a VMM follows CLOCK_MONOTONIC)."""

    def __init__(self, start_ns: int = 0) -> None:
        self.now = start_ns
        # a heap of (expires, seq, gen, timer); an entry whose gen is not the timer's is stale
        self.queue: list[tuple[int, int, int, HrTimer]] = []
        self._seq = 0
        self.source = None
        self.after_fire = None  # called after each timer callback

    def follow(self, source) -> None:
        """Track *source* (a callable returning ns on the same scale), or None to stop."""
        self.source = source

    def sync(self) -> None:
        src = self.source
        if src is not None:
            t = src()
            if t > self.now:
                self.advance_to(t)

    def enqueue(self, timer: HrTimer) -> None:
        """Queue *timer* at its ``expires``, tagged with its current ``gen``."""
        self._seq += 1
        heapq.heappush(self.queue, (timer.expires, self._seq, timer.gen, timer))

    def timer(self, function: Callable[[], bool]) -> HrTimer:
        return HrTimer(self, function)

    def next_expiry(self) -> int | None:
        """Expiry of the earliest armed timer, or None."""
        q = self.queue
        while q and (q[0][3].gen != q[0][2] or not q[0][3].active):
            heapq.heappop(q)
        return q[0][0] if q else None

    def advance(self, ns: int) -> int:
        """Move time forward by *ns* nanoseconds, firing every timer that falls due.

        Returns the number of timer callbacks that ran."""
        if ns < 0:
            raise ValueError(f"time cannot go backwards (advance by {ns} ns)")
        return self.advance_to(self.now + ns)

    def advance_to(self, t: int) -> int:
        if t < self.now:
            raise ValueError(f"time cannot go backwards (now {self.now} ns, asked {t} ns)")
        fired = 0
        q = self.queue
        while q and q[0][0] <= t:
            expires, _seq, gen, timer = heapq.heappop(q)
            if gen != timer.gen or not timer.active:
                continue  # cancelled or re-armed since queued
            self.now = max(self.now, expires)
            timer.active = False
            fired += 1
            if timer.function():
                timer.start(timer.expires)
            if self.after_fire is not None:
                self.after_fire()
        self.now = t
        return fired
