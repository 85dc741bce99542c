"""The APIC timer on the virtual clock (lapic.c timer interface). Numbers refer to
selftests_behaviours.md (#47-#55)."""

from __future__ import annotations

import pytest
from conftest import make_vm

import apicv
from apicv import apicdef as A
from apicv.state import LapicState

ONESHOT, PERIODIC, TSCDEADLINE = 0, 1 << 17, 2 << 17
MASKED = 1 << 16
VEC = 0xEF


def timer_vm(mode=ONESHOT, tdcr=0xB, **kw):
    vm = make_vm(1, **kw)
    cpu = vm.vcpus[0]
    cpu.mmio_write(A.APIC_TDCR, tdcr)
    cpu.mmio_write(A.APIC_LVTT, mode | VEC)
    return vm, cpu


@pytest.mark.parametrize("tdcr,div", [(0xB, 1), (0x0, 2), (0x3, 16), (0xA, 128)])
def test_oneshot_period_and_tmcct(tdcr, div):
    """#47: period = TMICT * bus_cycle_ns (1) * divide; TMCCT counts the remaining time down in
    ticks of bus_cycle_ns * divide; the interrupt arrives once, at expiry."""
    vm, cpu = timer_vm(tdcr=tdcr)
    cpu.mmio_write(A.APIC_TMICT, 10_000)
    period = 10_000 * div
    vm.clock.advance(period // 4)
    assert cpu.mmio_read(A.APIC_TMCCT) == (period - period // 4) // div
    vm.clock.advance(period - period // 4 - 1)
    assert cpu.take_interrupts() == []
    vm.clock.advance(1)
    assert cpu.take_interrupts() == [VEC]
    assert cpu.mmio_read(A.APIC_TMCCT) == 0
    vm.clock.advance(10 * period)
    assert cpu.take_interrupts() == []


def test_bus_cycle_ns_scales_period():
    """#47/#48: KVM_CAP_X86_APIC_BUS_CYCLES_NS sets the tick length (here 40 ns)."""
    vm, cpu = timer_vm(apic_bus_cycle_ns=40)
    cpu.mmio_write(A.APIC_TMICT, 1000)
    vm.clock.advance(39_999)
    assert cpu.take_interrupts() == []
    vm.clock.advance(1)
    assert cpu.take_interrupts() == [VEC]


def test_bus_cycle_cap_errors():
    """#48: 0 or an overflowing value -> EINVAL; after a vCPU exists -> EINVAL."""
    vm = apicv.Vm(0)
    for bad in (0, 1 << 40):
        with pytest.raises(apicv.KvmError) as e:
            vm.enable_cap(apicv.KVM_CAP_X86_APIC_BUS_CYCLES_NS, bad)
        assert e.value.errno == apicv.EINVAL
    vm.enable_cap(apicv.KVM_CAP_X86_APIC_BUS_CYCLES_NS, 40)
    vm.create_vcpu(0)
    with pytest.raises(apicv.KvmError):
        vm.enable_cap(apicv.KVM_CAP_X86_APIC_BUS_CYCLES_NS, 40)


def test_periodic_reloads_clamps_and_does_not_catch_up():
    """#54: periodic timers reload; the period is clamped to min_timer_period_us (200 us);
    missed periods are not replayed and at most one timer interrupt is pending."""
    vm, cpu = timer_vm(PERIODIC)
    cpu.mmio_write(A.APIC_TMICT, 1000)  # 1 us, clamped to 200 us
    assert cpu.apic.period == 200_000
    vm.clock.advance(199_999)
    assert cpu.take_interrupts() == []
    vm.clock.advance(1)
    assert cpu.take_interrupts() == [VEC]
    vm.clock.advance(200_000)
    assert cpu.take_interrupts() == [VEC]
    vm.clock.advance(10 * 200_000)
    assert cpu.take_interrupts() == [VEC]


def test_periodic_tmcct_modulo_period():
    """apic_get_tmcct: remaining time modulo the period; with the clamp it can exceed TMICT."""
    vm, cpu = timer_vm(PERIODIC)
    cpu.mmio_write(A.APIC_TMICT, 1000)
    vm.clock.advance(50_000)
    assert cpu.mmio_read(A.APIC_TMCCT) == 150_000


def test_tmict_zero_and_tscdeadline_tmcct():
    """#50: TMICT = 0 -> TMCCT 0; in TSC-deadline mode TMICT writes are ignored and TMCCT
    reads 0."""
    vm, cpu = timer_vm()
    cpu.mmio_write(A.APIC_TMICT, 0)
    assert cpu.mmio_read(A.APIC_TMCCT) == 0
    cpu.mmio_write(A.APIC_LVTT, TSCDEADLINE | VEC)
    cpu.mmio_write(A.APIC_TMICT, 5000)
    assert cpu.mmio_read(A.APIC_TMICT) == 0
    assert cpu.mmio_read(A.APIC_TMCCT) == 0


def test_mode_change_to_tscdeadline_cancels_and_zeroes_tmict():
    """#53: crossing into or out of TSC-deadline mode cancels the timer and zeroes TMICT."""
    vm, cpu = timer_vm()
    cpu.mmio_write(A.APIC_TMICT, 10_000)
    cpu.mmio_write(A.APIC_LVTT, TSCDEADLINE | VEC)
    assert cpu.mmio_read(A.APIC_TMICT) == 0
    cpu.mmio_write(A.APIC_LVTT, ONESHOT | VEC)
    vm.clock.advance(20_000)
    assert cpu.take_interrupts() == []


def test_oneshot_to_periodic_keeps_counting():
    """apic_update_lvtt: a change between one-shot and periodic keeps the timer running."""
    vm, cpu = timer_vm()
    cpu.mmio_write(A.APIC_TMICT, 300_000)
    cpu.mmio_write(A.APIC_LVTT, PERIODIC | VEC)
    vm.clock.advance(300_000)
    assert cpu.take_interrupts() == [VEC]


def test_tdcr_change_rescales_remaining():
    """#52: a TDCR change while counting rescales the remaining time by new/old divisor."""
    vm, cpu = timer_vm(tdcr=0x0)  # /2
    cpu.mmio_write(A.APIC_TMICT, 10_000)  # 20 us
    vm.clock.advance(10_000)  # 10 us remain
    cpu.mmio_write(A.APIC_TDCR, 0x1)  # /4: 20 us remain
    vm.clock.advance(19_999)
    assert cpu.take_interrupts() == []
    vm.clock.advance(1)
    assert cpu.take_interrupts() == [VEC]


def test_masked_expiry_raises_nothing_until_unmasked():
    """#55: an expiry while LVTT is masked raises no IRQ. The expiry stays pending
    (apic_has_pending_timer ignores it while masked), so unmasking delivers it."""
    vm, cpu = timer_vm()
    cpu.mmio_write(A.APIC_LVTT, MASKED | VEC)
    cpu.mmio_write(A.APIC_TMICT, 1000)
    vm.clock.advance(1000)
    assert cpu.take_interrupts() == []
    assert LapicState(cpu.get_lapic()).irr == 0
    cpu.mmio_write(A.APIC_LVTT, VEC)
    assert cpu.take_interrupts() == [VEC]


def test_expiry_with_apic_hw_disabled_no_irq():
    """#55: expiry with the APIC hardware-disabled raises no IRQ."""
    vm, cpu = timer_vm()
    cpu.mmio_write(A.APIC_TMICT, 1000)
    cpu.set_msr(0x1B, 0)
    vm.clock.advance(1000)
    cpu.set_msr(0x1B, 0xFEE00900)
    assert LapicState(cpu.get_lapic()).irr == 0


def test_spiv_disable_clears_pending_expiry():
    """SPIV write with bit 8 clear: LVTs masked and the pending expiry count zeroed (the expiry
    is held pending while LVTT is masked, so it is not injected before the SPIV write)."""
    vm, cpu = timer_vm()
    cpu.mmio_write(A.APIC_LVTT, MASKED | VEC)
    cpu.mmio_write(A.APIC_TMICT, 1000)
    vm.clock.advance(1000)
    cpu.mmio_write(A.APIC_SPIV, 0xFF)
    cpu.mmio_write(A.APIC_SPIV, 0x1FF)
    cpu.mmio_write(A.APIC_LVTT, VEC)
    assert cpu.take_interrupts() == []


def test_expiry_outside_kvm_run_injected_at_next_entry():
    """apic_timer_expired() while the vCPU is out of KVM_RUN: pending + KVM_REQ_UNBLOCK; the next
    KVM_RUN bails out of vcpu_enter_guest (kvm_vcpu_exit_request) and vcpu_run injects the timer
    before any guest code runs: a following SPIV disable cannot stop it."""
    vm, cpu = timer_vm()
    cpu.mmio_write(A.APIC_TMICT, 1000)
    vm.clock.advance(1000)
    assert LapicState(cpu.get_lapic()).irr == 0  # not yet: the vCPU has not run
    cpu.mmio_write(A.APIC_SPIV, 0xFF)
    assert LapicState(cpu.get_lapic()).irr == 1 << VEC
    cpu.mmio_write(A.APIC_SPIV, 0x1FF)
    assert cpu.take_interrupts() == [VEC]


def test_tsc_deadline_msr():
    """IA32_TSC_DEADLINE: reads 0 unless in TSC-deadline mode; a future deadline fires (the
    hrtimer is armed timer_advance_ns early); the MSR reads 0 after the interrupt; writes
    outside TSC-deadline mode are ignored."""
    vm, cpu = timer_vm()
    cpu.wrmsr(A.MSR_IA32_TSC_DEADLINE, 50_000)
    assert cpu.rdmsr(A.MSR_IA32_TSC_DEADLINE) == 0
    cpu.mmio_write(A.APIC_LVTT, TSCDEADLINE | VEC)
    now_tsc = cpu.rdmsr(A.MSR_IA32_TSC)
    cpu.wrmsr(A.MSR_IA32_TSC_DEADLINE, now_tsc + 50_000)
    assert cpu.rdmsr(A.MSR_IA32_TSC_DEADLINE) == now_tsc + 50_000
    vm.clock.advance(50_000 - 1001)
    assert cpu.take_interrupts() == []
    vm.clock.advance(1001)
    assert cpu.take_interrupts() == [VEC]
    assert cpu.rdmsr(A.MSR_IA32_TSC_DEADLINE) == 0


def test_tsc_deadline_in_the_past_fires_at_once():
    vm, cpu = timer_vm(TSCDEADLINE)
    vm.clock.advance(10_000)
    cpu.wrmsr(A.MSR_IA32_TSC_DEADLINE, 5)
    assert cpu.take_interrupts() == [VEC]


def test_tsc_deadline_zero_disarms():
    vm, cpu = timer_vm(TSCDEADLINE)
    cpu.wrmsr(A.MSR_IA32_TSC_DEADLINE, cpu.rdmsr(A.MSR_IA32_TSC) + 10_000)
    cpu.wrmsr(A.MSR_IA32_TSC_DEADLINE, 0)
    vm.clock.advance(20_000)
    assert cpu.take_interrupts() == []


# ------------------------------------------------------------------ save/restore of the timer
def test_restore_tmcct_oneshot():
    """#51: KVM_SET_LAPIC restarts the timer from the saved TMCCT: TMCCT = 0 (one-shot) expires
    at once; TMCCT = TMICT resumes a full count; TMCCT > TMICT is clamped to TMICT; the TMCCT
    register itself reads back as computed."""
    vm, cpu = timer_vm()
    cpu.mmio_write(A.APIC_TMICT, 10_000)
    s = LapicState(cpu.get_lapic())
    for tmcct, fires_after in ((0, 0), (10_000, 10_000), (4_000, 4_000), (50_000, 10_000)):
        s["TMCCT"] = tmcct
        cpu.set_lapic(bytes(s))
        if fires_after:
            vm.clock.advance(fires_after - 1)
            assert cpu.take_interrupts() == [], tmcct
            vm.clock.advance(1)
        assert cpu.take_interrupts() == [VEC], tmcct


def test_restore_tmcct_zero_periodic_full_period():
    """#51: periodic with TMCCT 0 restarts a full period."""
    vm, cpu = timer_vm(PERIODIC)
    cpu.mmio_write(A.APIC_TMICT, 300_000)
    s = LapicState(cpu.get_lapic())
    s["TMCCT"] = 0
    cpu.set_lapic(bytes(s))
    vm.clock.advance(299_999)
    assert cpu.take_interrupts() == []
    vm.clock.advance(1)
    assert cpu.take_interrupts() == [VEC]


def test_get_lapic_tmcct_is_live():
    """#46: KVM_GET_LAPIC computes TMCCT from the running timer."""
    vm, cpu = timer_vm()
    cpu.mmio_write(A.APIC_TMICT, 10_000)
    vm.clock.advance(2_500)
    assert LapicState(cpu.get_lapic())["TMCCT"] == 7_500
