"""The vCPU side: INIT/SIPI and mp_state (kvm_apic_accept_events, KVM_GET/SET_MP_STATE),
NMIs (process_nmi), priorities and injection (kvm_check_and_inject_events, kvm_cpu_get_interrupt,
apic_set_eoi). Numbers refer to selftests_behaviours.md."""

from __future__ import annotations

import pytest
from conftest import make_vm, msi, to_x2apic

import apicv
from apicv import apicdef as A
from apicv.state import LapicState

RUNNABLE = apicv.KVM_MP_STATE_RUNNABLE
INIT_RECEIVED = apicv.KVM_MP_STATE_INIT_RECEIVED
UNINIT = apicv.KVM_MP_STATE_UNINITIALIZED


def send(cpu, icr: int, dest: int = 0) -> None:
    cpu.mmio_write(A.APIC_ICR2, dest << 24)
    cpu.mmio_write(A.APIC_ICR, icr)


# ------------------------------------------------------------------ INIT / SIPI
def test_init_sipi_sipi_starts_an_ap():
    """#56: INIT puts an AP in INIT_RECEIVED; a SIPI there makes it RUNNABLE with
    CS = vector << 8 (base vector << 12), RIP 0; the second SIPI is dropped."""
    vm = apicv.Vm(2)
    bsp, ap = vm.vcpus
    bsp.mmio_write(A.APIC_SPIV, 0x1FF)
    assert ap.get_mp_state() == UNINIT
    send(bsp, 0x4500, dest=1)
    assert ap.get_mp_state() == INIT_RECEIVED
    send(bsp, 0x4612, dest=1)
    assert ap.get_mp_state() == RUNNABLE
    assert ap.sipi == (0x1200, 0x12000, 0)
    send(bsp, 0x4634, dest=1)
    assert ap.get_mp_state() == RUNNABLE
    assert ap.sipi == (0x1200, 0x12000, 0)
    ap.mmio_write(A.APIC_SPIV, 0x1FF)  # the AP now runs guest code


def test_sipi_outside_init_received_dropped():
    """#56: a SIPI to a vCPU not in INIT_RECEIVED is dropped."""
    vm = make_vm(2)
    send(vm.vcpus[0], 0x4612, dest=1)
    assert vm.vcpus[1].get_mp_state() == RUNNABLE
    assert vm.vcpus[1].sipi is None


def test_init_resets_registers_keeps_base_and_id():
    """#56: the INIT reset keeps APICBASE and the xAPIC ID; LVTs are masked, SPIV = 0xFF,
    TPR/IRR/ISR/TMR/ICR/TMICT/TDCR are cleared; BSP -> RUNNABLE, AP -> INIT_RECEIVED."""
    vm = make_vm(2)
    bsp, ap = vm.vcpus
    ap.mmio_write(A.APIC_ID, 0x05000000)
    ap.mmio_write(A.APIC_TASKPRI, 0x20)
    ap.mmio_write(A.APIC_TDCR, 0x3)
    ap.mmio_write(A.APIC_TMICT, 1000)
    ap.mmio_write(A.APIC_LVTERR, 0x33)
    vm.signal_msi(*msi(5, 0x8041))  # level: IRR + TMR
    send(bsp, 0x4500, dest=5)
    assert ap.get_mp_state() == INIT_RECEIVED
    s = LapicState(ap.get_lapic())
    assert s["ID"] == 0x05000000
    assert ap.get_msr(0x1B) == 0xFEE00800
    assert (s["TPR"], s["TDCR"], s["TMICT"], s.irr, s.tmr, s["SPIV"]) == (0, 0, 0, 0, 0, 0xFF)
    assert s["LVTERR"] == 0x10000 and s["LVT0"] == 0x10000


def test_init_to_bsp_stays_runnable_and_lint0_extint():
    """kvm_apic_accept_events: after INIT the BSP is RUNNABLE; kvm_lapic_reset re-enables LINT0
    as ExtINT on the reset BSP (KVM_X86_QUIRK_LINT0_REENABLED)."""
    vm = make_vm(2)
    bsp, ap = vm.vcpus
    bsp.mmio_write(A.APIC_LVT0, 0x10000)
    send(ap, 0x4500, dest=0)
    assert bsp.get_mp_state() == RUNNABLE
    assert LapicState(bsp.get_lapic())["LVT0"] == 0x700


def test_init_keeps_x2apic_mode_and_ldr():
    """kvm_lapic_reset(INIT): apic_base (x2APIC mode) and the x2APIC LDR are kept; the 64-bit
    ICR is cleared."""
    vm = make_vm(2)
    ap = vm.vcpus[1]
    to_x2apic(ap)
    ap.wrmsr(0x830, (5 << 32) | 0x4041)  # an ICR value to see cleared
    vm.signal_msi(*msi(0xFF, 0x4500 >> 8 << 8))  # INIT broadcast (MSI delivery mode 5)
    assert ap.get_mp_state() == INIT_RECEIVED
    assert ap.get_msr(0x1B) == 0xFEE00C00
    s = LapicState(ap.get_lapic())
    assert s["LDR"] == 1 << 1 and s["ICR"] == 0 and s["ICR2"] == 0


def test_init_level_deassert_ignored():
    """#56: INIT level de-assert (trig && !level) is ignored."""
    vm = make_vm(2)
    send(vm.vcpus[0], 0x8500, dest=1)
    assert vm.vcpus[1].get_mp_state() == RUNNABLE
    send(vm.vcpus[0], 0xC500, dest=1)
    assert vm.vcpus[1].get_mp_state() == INIT_RECEIVED


def test_init_clears_a_pending_sipi():
    """__apic_accept_irq: INIT *assigns* pending_events, dropping a SIPI received before it."""
    vm = apicv.Vm(2)
    bsp, ap = vm.vcpus
    bsp.mmio_write(A.APIC_SPIV, 0x1FF)
    send(bsp, 0x4612, dest=1)  # SIPI while UNINITIALIZED: pending, not yet processed
    send(bsp, 0x4500, dest=1)  # INIT replaces it
    assert ap.get_mp_state() == INIT_RECEIVED


def test_guest_op_on_uninitialized_ap_not_runnable():
    """kvm_arch_vcpu_ioctl_run: an UNINITIALIZED (or INIT_RECEIVED) vCPU runs no guest code."""
    vm = apicv.Vm(2)
    with pytest.raises(apicv.VcpuNotRunnable):
        vm.vcpus[1].mmio_read(A.APIC_LVR)
    vm.vcpus[0].mmio_write(A.APIC_SPIV, 0x1FF)
    send(vm.vcpus[0], 0x4500, dest=1)
    with pytest.raises(apicv.VcpuNotRunnable):
        vm.vcpus[1].mmio_read(A.APIC_LVR)


# ------------------------------------------------------------------ KVM_SET_MP_STATE
@pytest.mark.parametrize("state", [5, 6, 7, 8, 10, 11])
def test_set_mp_state_invalid(state):
    """KVM_SET_MP_STATE: STOPPED..LOAD, SUSPENDED and unknown values are EINVAL on x86."""
    vm = apicv.Vm(1)
    with pytest.raises(apicv.KvmError) as e:
        vm.vcpus[0].set_mp_state(state)
    assert e.value.errno == apicv.EINVAL


def test_set_mp_state_sipi_received():
    """KVM_SET_MP_STATE(SIPI_RECEIVED) stores INIT_RECEIVED plus a pending SIPI, which the next
    accept_events delivers with the last SIPI vector."""
    vm = make_vm(2)
    ap = vm.vcpus[1]
    ap.set_mp_state(apicv.KVM_MP_STATE_SIPI_RECEIVED)
    assert ap.mp_state == INIT_RECEIVED
    assert ap.get_mp_state() == RUNNABLE
    assert ap.sipi == (0, 0, 0)


def test_halted_wakes_on_nmi_not_on_masked_irq():
    """vcpu_block / kvm_vcpu_has_events: a HALTED vCPU with IF=0 wakes for an NMI, not for an
    IRQ (interrupts not allowed)."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    cpu.set_mp_state(apicv.KVM_MP_STATE_HALTED)
    vm.signal_msi(*msi(0, 0x41))
    with pytest.raises(apicv.VcpuNotRunnable):
        cpu.run()
    cpu.nmi()
    assert cpu.run() == [2]
    assert cpu.get_mp_state() == RUNNABLE


def test_remote_read_sets_pv_unhalted():
    """__apic_accept_irq(APIC_DM_REMRD): pv_unhalted; KVM_GET_MP_STATE reports a HALTED vCPU
    with pv_unhalted as RUNNABLE."""
    vm = make_vm(2)
    vm.vcpus[1].set_mp_state(apicv.KVM_MP_STATE_HALTED)
    send(vm.vcpus[0], 0x4300, dest=1)
    assert vm.vcpus[1].mp_state == apicv.KVM_MP_STATE_HALTED
    assert vm.vcpus[1].get_mp_state() == RUNNABLE


# ------------------------------------------------------------------ NMI / SMI
def test_nmi_ipi_taken_with_if0_at_most_two():
    """process_nmi: NMIs are not masked by IF; at most two are pending at once."""
    vm = make_vm(2)
    for _ in range(3):
        send(vm.vcpus[0], 0x4400, dest=1)
    assert vm.vcpus[1].mmio_read(A.APIC_LVR) == 0x50014
    assert vm.vcpus[1].take_interrupts() == [2, 2]


def test_self_nmi_taken_during_the_same_run():
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    cpu.mmio_write(A.APIC_ICR, 0x44400)
    assert cpu.take_interrupts() == [2]


def test_smi_accepted():
    """__apic_accept_irq(APIC_DM_SMI): accepted (KVM_REQ_SMI); the guest enters SMM once."""
    vm = make_vm(1)
    assert vm.signal_msi(*msi(0, 0, dm=2)) == 1
    vm.vcpus[0].run()
    assert vm.vcpus[0].smi_count == 1


# ------------------------------------------------------------------ priorities and injection
def test_if0_holds_interrupts_until_sti():
    """#37: with IF=0 a pending IRR vector stays pending; after STI it is delivered once."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    vm.signal_msi(*msi(0, 0x41))
    cpu.mmio_read(A.APIC_LVR)
    cpu.run()
    assert LapicState(cpu.get_lapic()).irr == 1 << 0x41
    assert cpu.take_interrupts() == [0x41]
    assert cpu.take_interrupts() == []


def test_tpr_blocks_until_lowered():
    """#35: vector v is deliverable only if (v & 0xF0) > PPR: TPR class 2 blocks 0x20,
    class 1 lets it through (xapic_tpr_test)."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    cpu.mmio_write(A.APIC_TASKPRI, 0x20)
    vm.signal_msi(*msi(0, 0x20))
    assert cpu.take_interrupts() == []
    cpu.mmio_write(A.APIC_TASKPRI, 0x10)
    assert cpu.take_interrupts() == [0x20]


def test_ack_moves_irr_to_isr_and_raises_ppr():
    """#39: acknowledging moves the vector from IRR to ISR and PPR rises; #38: EOI clears the
    highest ISR bit and recomputes PPR; an EOI with an empty ISR does nothing."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    vm.signal_msi(*msi(0, 0x61))
    assert cpu.take_interrupts(eoi=False) == [0x61]
    s = LapicState(cpu.get_lapic())
    assert (s.irr, s.isr, s["PPR"]) == (0, 1 << 0x61, 0x60)
    cpu.mmio_write(A.APIC_EOI, 77)
    s = LapicState(cpu.get_lapic())
    assert (s.isr, s["PPR"]) == (0, 0)
    cpu.mmio_write(A.APIC_EOI, 0)
    assert LapicState(cpu.get_lapic()).isr == 0


def test_priority_order_and_nesting_without_eoi():
    """Highest vector first; without EOIs a lower or equal class waits behind the one in
    service, a higher class is still taken."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    for v in (0x41, 0x52, 0x45):
        vm.signal_msi(*msi(0, v))
    assert cpu.take_interrupts(eoi=False) == [0x52]
    vm.signal_msi(*msi(0, 0x71))
    assert cpu.take_interrupts(eoi=False) == [0x71]
    cpu.mmio_write(A.APIC_EOI, 0)  # EOIs 0x71
    cpu.mmio_write(A.APIC_EOI, 0)  # EOIs 0x52
    assert cpu.take_interrupts() == [0x45, 0x41]


def test_take_interrupts_limit():
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    for v in (0x41, 0x52, 0x63):
        vm.signal_msi(*msi(0, v))
    assert cpu.take_interrupts(limit=1) == [0x63]
    assert cpu.take_interrupts(limit=0) == []
    assert cpu.take_interrupts() == [0x52, 0x41]


def test_stale_ppr_after_set_lapic():
    """#40: KVM_SET_LAPIC computes PPR before it recounts ISR: with no ISR before, restoring
    ISR 0x50 with TPR 0x20 leaves PPR at 0x20 in the next KVM_GET_LAPIC, until a PPR read."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    s = LapicState(cpu.get_lapic())
    s.isr = [0x50]
    s["TPR"] = 0x20
    cpu.set_lapic(bytes(s))
    assert LapicState(cpu.get_lapic())["PPR"] == 0x20
    assert cpu.mmio_read(A.APIC_PROCPRI) == 0x50
    assert LapicState(cpu.get_lapic())["PPR"] == 0x50


def test_set_lapic_irr_injected_after_restore():
    """#45: KVM_SET_LAPIC raises KVM_REQ_EVENT: a restored IRR vector is delivered."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    s = LapicState(cpu.get_lapic())
    s.irr = [0x66]
    cpu.set_lapic(bytes(s))
    assert cpu.take_interrupts() == [0x66]


def test_eoi_of_level_vector_broadcasts_to_ioapic_hook():
    """apic_set_eoi -> kvm_ioapic_send_eoi: only vectors in ioapic_handled_vectors are sent,
    with trigger mode from TMR."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    cpu.arch.ioapic_handled_vectors = 1 << 0x44
    vm.signal_msi(0xFEE00000, 0, 0x8044)
    vm.signal_msi(0xFEE00000, 0, 0x43)
    assert cpu.take_interrupts() == [0x44, 0x43]
    assert vm.eoi_broadcasts == [(0, 0x44, True)]
