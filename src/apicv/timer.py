"""The local-APIC timer (lapic.c "timer interface"): one-shot, periodic and TSC-deadline modes on
the model's virtual :class:`~apicv.clock.Clock`.

:class:`LapicTimerMixin` is part of :class:`apicv.lapic.LocalApic`; it holds KVM's
``struct kvm_timer`` fields and the functions of lapic.c that work on them, under their KVM
names. There is no VMX preemption timer in the model (``hv_timer_in_use`` is always False, as on
these hosts), so every start goes the ``start_sw_timer`` way.

Time: ``period`` and ``target_expiration`` are nanoseconds on the VM clock; the guest TSC runs at
``arch.virtual_tsc_khz`` from ``arch.tsc_offset`` (``kvm_read_l1_tsc``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import apicdef as A
from .kvm_host import KVM_REQ_UNBLOCK

if TYPE_CHECKING:
    from .arch import KvmArch, VcpuArch
    from .clock import Clock, HrTimer
    from .trace import Tracer

LAPIC_TIMER_ADVANCE_ADJUST_MIN = 100  # clock cycles
LAPIC_TIMER_ADVANCE_ADJUST_MAX = 10000
LAPIC_TIMER_ADVANCE_NS_INIT = 1000
LAPIC_TIMER_ADVANCE_NS_MAX = 5000
LAPIC_TIMER_ADVANCE_ADJUST_STEP = 8

U64 = (1 << 64) - 1


class LapicTimerMixin:
    """struct kvm_timer and the lapic.c timer functions (mixed into LocalApic)."""

    __slots__ = ()

    # fields of LocalApic the timer code reads
    arch: VcpuArch
    kvm: KvmArch
    clock: Clock
    vcpu_id: int
    hw_enabled: bool
    apicv_active: bool
    irr: int
    isr: int
    trace: Tracer | None
    # struct kvm_timer
    timer: HrTimer
    period: int
    target_expiration: int
    timer_mode: int
    timer_mode_mask: int
    tscdeadline: int
    expired_tscdeadline: int
    timer_advance_ns: int
    timer_pending: int  # atomic_t pending
    hv_timer_in_use: bool
    divide_count: int

    # -- TSC helpers (kvm_read_l1_tsc, nsec_to_cycles) --
    def guest_tsc(self) -> int:
        arch = self.arch
        return (arch.tsc_offset + self.clock.now * arch.virtual_tsc_khz // 1_000_000) & U64

    def nsec_to_cycles(self, ns: int) -> int:
        return ns * self.arch.virtual_tsc_khz // 1_000_000

    # -- mode predicates --
    def apic_lvtt_oneshot(self) -> bool:
        return self.timer_mode == A.APIC_LVT_TIMER_ONESHOT

    def apic_lvtt_period(self) -> bool:
        return self.timer_mode == A.APIC_LVT_TIMER_PERIODIC

    def apic_lvtt_tscdeadline(self) -> bool:
        return self.timer_mode == A.APIC_LVT_TIMER_TSCDEADLINE

    # -- divide / period --
    def update_divide_count(self) -> None:
        """update_divide_count(): TDCR bits 0,1,3 select /2 ... /128, 0xB selects /1."""
        tmp1 = self.kvm_lapic_get_reg(A.APIC_TDCR) & 0xF
        tmp2 = ((tmp1 & 0x3) | ((tmp1 & 0x8) >> 1)) + 1
        self.divide_count = 1 << (tmp2 & 0x7)

    def tmict_to_ns(self, tmict: int) -> int:
        return tmict * self.kvm.apic_bus_cycle_ns * self.divide_count

    def limit_periodic_timer_frequency(self) -> None:
        """Periodic timers are clamped to min_timer_period_us (module parameter, 200 us)."""
        if self.apic_lvtt_period() and self.period:
            min_period = self.kvm.min_timer_period_us * 1000
            if self.period < min_period:
                self.period = min_period

    def cancel_apic_timer(self) -> None:
        self.timer.cancel()
        self.timer_pending = 0

    def apic_update_lvtt(self) -> None:
        """apic_update_lvtt(): crossing into or out of TSC-deadline mode stops the timer and
        zeroes TMICT; the periodic clamp is re-applied on any mode change."""
        timer_mode = self.kvm_lapic_get_reg(A.APIC_LVTT) & self.timer_mode_mask
        if self.timer_mode != timer_mode:
            if self.apic_lvtt_tscdeadline() != (timer_mode == A.APIC_LVT_TIMER_TSCDEADLINE):
                self.cancel_apic_timer()
                self.kvm_lapic_set_reg(A.APIC_TMICT, 0)
                self.period = 0
                self.tscdeadline = 0
            self.timer_mode = timer_mode
            self.limit_periodic_timer_frequency()

    def apic_get_tmcct(self) -> int:
        """apic_get_tmcct(): remaining time modulo the period, in timer ticks."""
        if self.kvm_lapic_get_reg(A.APIC_TMICT) == 0 or self.period == 0:
            return 0
        remaining = self.target_expiration - self.clock.now
        if remaining < 0:
            remaining = 0
        ns = remaining % self.period
        return (ns // (self.kvm.apic_bus_cycle_ns * self.divide_count)) & 0xFFFFFFFF

    # -- expiry and injection --
    def lapic_timer_int_injected(self) -> bool:
        if self.hw_enabled:
            vec = self.kvm_lapic_get_reg(A.APIC_LVTT) & A.APIC_VECTOR_MASK
            bitmap = self.irr if self.apicv_active else self.isr
            if bitmap >> vec & 1:
                return True
        return False

    def adjust_lapic_timer_advance(self, advance_expire_delta: int) -> None:
        if not (LAPIC_TIMER_ADVANCE_ADJUST_MIN <= abs(advance_expire_delta)
                <= LAPIC_TIMER_ADVANCE_ADJUST_MAX):
            return
        khz = self.arch.virtual_tsc_khz
        ns = abs(advance_expire_delta) * 1_000_000 // khz
        step = ns // LAPIC_TIMER_ADVANCE_ADJUST_STEP
        if advance_expire_delta < 0:  # too early
            self.timer_advance_ns = (self.timer_advance_ns - step) & 0xFFFFFFFF
        else:  # too late
            self.timer_advance_ns = (self.timer_advance_ns + step) & 0xFFFFFFFF
        if self.timer_advance_ns > LAPIC_TIMER_ADVANCE_NS_MAX:
            self.timer_advance_ns = LAPIC_TIMER_ADVANCE_NS_INIT

    def __kvm_wait_lapic_expire(self) -> None:
        tsc_deadline = self.expired_tscdeadline
        self.expired_tscdeadline = 0
        guest_tsc = self.guest_tsc()
        self.adjust_lapic_timer_advance(guest_tsc - tsc_deadline)
        if guest_tsc < tsc_deadline:
            # __wait_lapic_expire busy-waits: on the virtual clock, time passes.
            cycles = min(tsc_deadline - guest_tsc, self.nsec_to_cycles(self.timer_advance_ns))
            ns = -(-cycles * 1_000_000 // self.arch.virtual_tsc_khz)
            self.clock.advance(ns)

    def kvm_wait_lapic_expire(self) -> None:
        """Called just before VM entry (vmx_vcpu_run): wait out an early-fired TSC deadline."""
        if self.expired_tscdeadline and self.timer_advance_ns and self.lapic_timer_int_injected():
            self.__kvm_wait_lapic_expire()

    def kvm_apic_inject_pending_timer_irqs(self) -> None:
        self.kvm_apic_local_deliver(A.APIC_LVTT)
        if self.apic_lvtt_tscdeadline():
            self.tscdeadline = 0
        elif self.apic_lvtt_oneshot():
            self.tscdeadline = 0
            self.target_expiration = 0

    def apic_timer_expired(self, from_timer_fn: bool) -> None:
        """apic_timer_expired(): at most one expiry is pending; it becomes an interrupt when
        the vCPU runs (kvm_inject_apic_timer_irqs), or at once if APICv is active and this
        vCPU is the one running."""
        if self.timer_pending:
            return
        if self.apic_lvtt_tscdeadline() or self.hv_timer_in_use:
            self.expired_tscdeadline = self.tscdeadline
        if not from_timer_fn and self.apicv_active:
            # (6.18: no wants_to_run condition any more)
            self.kvm_apic_inject_pending_timer_irqs()
            return
        self.timer_pending += 1
        self.arch.requests |= KVM_REQ_UNBLOCK
        if from_timer_fn:
            self.kvm_vcpu_kick()

    def start_sw_tscdeadline(self) -> None:
        tscdeadline = self.tscdeadline
        khz = self.arch.virtual_tsc_khz
        if not tscdeadline or not khz:
            return
        now = self.clock.now
        guest_tsc = self.guest_tsc()
        if tscdeadline > guest_tsc:
            ns = (tscdeadline - guest_tsc) * 1_000_000 // khz
            if ns > self.timer_advance_ns:
                self.timer.start(now + ns - self.timer_advance_ns)
                return
        self.apic_timer_expired(False)

    def update_target_expiration(self, old_divisor: int) -> None:
        """A TDCR change while counting rescales the remaining time by new/old divisor."""
        self.period = self.tmict_to_ns(self.kvm_lapic_get_reg(A.APIC_TMICT))
        self.limit_periodic_timer_frequency()
        now = self.clock.now
        remaining = self.target_expiration - now
        if remaining < 0:
            remaining = 0
        ns_remaining_new = remaining * self.divide_count // old_divisor
        self.tscdeadline = (self.tscdeadline + self.nsec_to_cycles(ns_remaining_new)
                            - self.nsec_to_cycles(remaining)) & U64
        self.target_expiration = now + ns_remaining_new

    def set_target_expiration(self, count_reg: int) -> bool:
        now = self.clock.now
        self.period = self.tmict_to_ns(self.kvm_lapic_get_reg(A.APIC_TMICT))
        if not self.period:
            self.tscdeadline = 0
            return False
        self.limit_periodic_timer_frequency()
        deadline = self.period
        if (self.apic_lvtt_period() or self.apic_lvtt_oneshot()) and count_reg != A.APIC_TMICT:
            deadline = self.tmict_to_ns(self.kvm_lapic_get_reg(count_reg))
            if deadline <= 0:
                # an expired one-shot fires at once since 8e6ed96cdd50 (6.3); before, it was
                # restarted with a whole period, like a periodic timer
                oneshot_fires = self.kvm.kvm_version >= (6, 3)
                deadline = (0 if self.apic_lvtt_oneshot() and oneshot_fires
                            else self.period)
            elif deadline > self.period:
                # "requested lapic timer restore with starting count register ... > initial
                # count ... Using initial count to start timer." (pr_info_ratelimited)
                self.kvm_lapic_set_reg(count_reg, 0)
                deadline = self.period
        self.tscdeadline = (self.guest_tsc() + self.nsec_to_cycles(deadline)) & U64
        self.target_expiration = now + deadline
        return True

    def advance_periodic_target_expiration(self) -> None:
        now = self.clock.now
        self.target_expiration += self.period
        if self.target_expiration < now:
            self.target_expiration = now  # no catch-up with missed periods
        delta = self.target_expiration - now
        self.tscdeadline = (self.guest_tsc() + self.nsec_to_cycles(delta)) & U64

    def start_sw_period(self) -> None:
        if not self.period:
            return
        # ktime_after(ktime_get(), target_expiration): on a host time has moved since
        # set_target_expiration read it, so an expiry set to "now" (an expired one-shot
        # restored by KVM_SET_LAPIC) is in the past here; the virtual clock has not moved
        if self.clock.now >= self.target_expiration:
            self.apic_timer_expired(False)
            if self.apic_lvtt_oneshot():
                return
            self.advance_periodic_target_expiration()
        self.timer.start(self.target_expiration)

    def start_sw_timer(self) -> None:
        if not self.apic_lvtt_period() and self.timer_pending:
            return
        if self.apic_lvtt_period() or self.apic_lvtt_oneshot():
            self.start_sw_period()
        elif self.apic_lvtt_tscdeadline():
            self.start_sw_tscdeadline()

    def restart_apic_timer(self) -> None:
        if not self.apic_lvtt_period() and self.timer_pending:
            return
        self.start_sw_timer()  # start_hv_timer() fails: no VMX preemption timer here

    def __start_apic_timer(self, count_reg: int) -> None:
        self.timer_pending = 0
        if ((self.apic_lvtt_period() or self.apic_lvtt_oneshot())
                and not self.set_target_expiration(count_reg)):
            return
        self.restart_apic_timer()

    def start_apic_timer(self) -> None:
        self.__start_apic_timer(A.APIC_TMICT)

    def start_apic_timer_from(self, count_reg: int) -> None:
        """__start_apic_timer(apic, count_reg): used by kvm_apic_set_state with APIC_TMCCT."""
        self.__start_apic_timer(count_reg)

    def apic_timer_fn(self) -> bool:
        """The hrtimer callback; returns True for HRTIMER_RESTART."""
        tr = self.trace
        if tr is not None:
            mode = ("tsc-deadline" if self.apic_lvtt_tscdeadline()
                    else "periodic" if self.apic_lvtt_period() else "one-shot")
            tr.kvm_timer_expired(self.vcpu_id, mode)
        self.apic_timer_expired(True)
        if self.apic_lvtt_period() and self.period:
            self.advance_periodic_target_expiration()
            self.timer.expires = self.target_expiration
            return True
        return False

    def apic_has_pending_timer(self) -> int:
        if self.apic_enabled() and not (self.kvm_lapic_get_reg(A.APIC_LVTT) & A.APIC_LVT_MASKED):
            return self.timer_pending
        return 0

    def kvm_inject_apic_timer_irqs(self) -> None:
        if self.timer_pending > 0:
            self.kvm_apic_inject_pending_timer_irqs()
            self.timer_pending = 0

    # -- IA32_TSC_DEADLINE --
    def kvm_get_lapic_tscdeadline_msr(self) -> int:
        if not self.hw_enabled or not self.apic_lvtt_tscdeadline():
            return 0
        return self.tscdeadline

    def kvm_set_lapic_tscdeadline_msr(self, data: int) -> None:
        if not self.hw_enabled or not self.apic_lvtt_tscdeadline():
            return
        self.timer.cancel()
        self.tscdeadline = data
        self.start_apic_timer()
