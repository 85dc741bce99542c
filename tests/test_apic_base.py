"""IA32_APIC_BASE: kvm_apic_set_base / __kvm_apic_set_base (selftests_behaviours #8-#11)."""

from __future__ import annotations

import pytest
from conftest import make_vm

import apicv
from apicv import apicdef as A
from apicv.kvm_host import ApicvInhibit
from apicv.state import LapicState

EN, EXTD, BSP = 1 << 11, 1 << 10, 1 << 8
BASE = 0xFEE00000
MODES = {"disabled": 0, "xapic": EN, "x2apic": EN | EXTD}


def set_mode(cpu, mode: str) -> None:
    assert cpu.set_msr(0x1B, BASE | MODES[mode] | (cpu.get_msr(0x1B) & BSP))


# (from, to) -> allowed for a guest WRMSR ; the host may do every valid transition
GUEST_TRANSITIONS = {
    ("disabled", "xapic"): True, ("xapic", "disabled"): True, ("xapic", "x2apic"): True,
    ("x2apic", "disabled"): True, ("x2apic", "xapic"): False, ("disabled", "x2apic"): False,
}


@pytest.mark.parametrize("frm,to", list(GUEST_TRANSITIONS))
def test_guest_vs_host_mode_transitions(frm, to):
    """#8: x2APIC->xAPIC and disabled->x2APIC are rejected for a guest WRMSR (#GP) but
    accepted host-initiated (KVM_SET_MSRS)."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    set_mode(cpu, frm)
    value = BASE | MODES[to] | BSP
    if GUEST_TRANSITIONS[(frm, to)]:
        cpu.wrmsr(0x1B, value)
        assert cpu.get_msr(0x1B) == value
    else:
        with pytest.raises(apicv.GuestFault):
            cpu.wrmsr(0x1B, value)
        assert cpu.get_msr(0x1B) != value
        assert cpu.set_msr(0x1B, value) is True
        assert cpu.get_msr(0x1B) == value


@pytest.mark.parametrize("value", [EXTD | BASE, BASE | EN | 0x1, BASE | EN | 0x200,
                                   BASE | EN | (1 << 48), BASE | EN | (1 << 63)])
def test_reserved_and_invalid_rejected(value):
    """#9: EXTD without EN, reserved bits 0-7 and 9, bits above MAXPHYADDR: rejected both by
    the guest (#GP) and the host (KVM_SET_MSRS returns 0)."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    before = cpu.get_msr(0x1B)
    assert cpu.set_msr(0x1B, value) is False
    with pytest.raises(apicv.GuestFault):
        cpu.wrmsr(0x1B, value)
    assert cpu.get_msr(0x1B) == before


def test_extd_needs_x2apic_cpuid():
    """#9: EXTD while guest CPUID lacks x2APIC is a reserved bit."""
    vm = make_vm(1, x2apic_cpuid=False)
    cpu = vm.vcpus[0]
    assert cpu.set_msr(0x1B, BASE | EN | EXTD | BSP) is False


def test_enable_resets_xapic_id_and_x2apic_derives_id_ldr():
    """#11: disabled->enabled resets the xAPIC ID to vcpu_id<<24; entering x2APIC sets ID =
    vcpu_id and the derived LDR; x2APIC->xAPIC (host) restores ID = vcpu_id<<24. Registers
    are not reset by a hardware disable."""
    vm = make_vm(3)
    cpu = vm.vcpus[2]
    cpu.mmio_write(A.APIC_ID, 0x09000000)
    cpu.mmio_write(A.APIC_TASKPRI, 0x30)
    set_mode(cpu, "disabled")
    assert LapicState(cpu.get_lapic())["TPR"] == 0x30  # not reset
    set_mode(cpu, "xapic")
    assert LapicState(cpu.get_lapic())["ID"] == 2 << 24
    set_mode(cpu, "x2apic")
    assert cpu.rdmsr(0x802) == 2 and cpu.rdmsr(0x80D) == 1 << 2
    set_mode(cpu, "xapic")
    assert LapicState(cpu.get_lapic())["ID"] == 2 << 24


def test_base_relocation_moves_mmio_window_and_sets_inhibit():
    """#10: a non-default base is accepted (even 0) and sets APIC_BASE_MODIFIED (sticky);
    the MMIO window follows the base."""
    vm = make_vm(1, enable_apicv=True)
    cpu = vm.vcpus[0]
    assert not vm.apicv_inhibits & (1 << ApicvInhibit.APIC_BASE_MODIFIED)
    assert cpu.set_msr(0x1B, 0xFEB00000 | EN | BSP)
    assert cpu.apic.base_address == 0xFEB00000
    assert cpu.mmio_read(A.APIC_LVR) == 0x50014
    assert vm.apicv_inhibits & (1 << ApicvInhibit.APIC_BASE_MODIFIED)
    assert cpu.set_msr(0x1B, BASE | EN | BSP)
    assert vm.apicv_inhibits & (1 << ApicvInhibit.APIC_BASE_MODIFIED)  # never cleared
    assert cpu.set_msr(0x1B, EN)  # base 0 (set_sregs_test regression)


def test_bsp_bit_is_writable():
    vm = make_vm(2)
    ap = vm.vcpus[1]
    assert ap.set_msr(0x1B, BASE | EN | BSP)
    assert ap.get_msr(0x1B) == BASE | EN | BSP


def test_hw_disable_drops_from_map_and_fixed_delivery():
    """__kvm_apic_set_base: EN 1->0 marks the map dirty; a hardware-disabled APIC is not
    present: MSIs to it find nobody (-1 -> EPERM through KVM_SIGNAL_MSI's slow path... or 0
    through the fast path)."""
    vm = make_vm(2)
    cpu = vm.vcpus[1]
    set_mode(cpu, "disabled")
    assert vm.apic_map.phys_map[1] is None
    assert vm.signal_msi(0xFEE01000, 0, 0x41) == 0
