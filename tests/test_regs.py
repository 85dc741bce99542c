"""Table-driven tests: every row of the register table against the model's behaviour.

KVM facts: kvm_lapic_readable_reg_mask (which offsets a read may touch per mode),
kvm_lapic_reg_write (masks, read-only registers, "ret 1" = dropped for MMIO, #GP for x2APIC),
kvm_lapic_reset (RESET values; selftests_behaviours #3, #4), x2APIC MSR = 0x800 + offset >> 4.
"""

from __future__ import annotations

import pytest
from conftest import make_vm, to_x2apic

import apicv
from apicv import apicdef as A
from apicv.regs import BY_OFFSET, REGISTERS, decode_fields, lookup, readable_reg_mask
from apicv.state import LapicState

PLAIN = [r for r in REGISTERS if r.name not in ("ISR", "TMR", "IRR")]
# registers whose write has side effects beyond storing (IPIs, EOI, timer) are tested elsewhere
SIDE_EFFECTS = {A.APIC_ICR, A.APIC_EOI, A.APIC_SELF_IPI, A.APIC_TMICT}


def reset_value(reg, vcpu_id: int, bsp: bool) -> int:
    if reg.offset == A.APIC_ID:
        return vcpu_id << 24
    if reg.offset == A.APIC_LVT0 and bsp:
        return 0x700
    return reg.reset


@pytest.mark.parametrize("vcpu_id", [0, 1])
def test_reset_values_in_get_lapic(vcpu_id):
    """selftests_behaviours #3/#4: the RESET register page; the BSP's LINT0 is ExtINT (0x700)."""
    vm = apicv.Vm(2)
    s = LapicState(vm.vcpus[vcpu_id].get_lapic())
    for reg in REGISTERS:
        if reg.offset == A.APIC_LVTCMCI:
            continue  # not initialised without MCG_CMCI_P (6 LVTs)
        assert s[reg.offset] == reset_value(reg, vcpu_id, vcpu_id == 0), reg.name
    assert s.reserved_bytes() == []


def test_apic_base_reset_values():
    """selftests_behaviours #1: APICBASE is 0xFEE00900 for the BSP and 0xFEE00800 for an AP."""
    vm = apicv.Vm(3, bsp_vcpu_id=1)
    assert [c.get_msr(0x1B) for c in vm.vcpus] == [0xFEE00800, 0xFEE00900, 0xFEE00800]
    assert [c.get_mp_state() for c in vm.vcpus] == [apicv.KVM_MP_STATE_UNINITIALIZED,
                                                    apicv.KVM_MP_STATE_RUNNABLE,
                                                    apicv.KVM_MP_STATE_UNINITIALIZED]


@pytest.mark.parametrize("reg", REGISTERS, ids=lambda r: f"{r.short}@{r.offset:#x}")
def test_xapic_mmio_readability(reg):
    """kvm_lapic_readable_reg_mask in xAPIC mode: readable rows return the register, the rest
    are rejected (the model returns 0 for a rejected read)."""
    vm = make_vm(1, enable=False)
    cpu = vm.vcpus[0]
    mask = readable_reg_mask(x2apic=False, nr_lvt_entries=6)
    readable = bool(mask >> (reg.offset >> 4) & 1)
    assert readable == (reg.read in ("always", "xapic"))
    cpu.mmio_write(A.APIC_TASKPRI, 0x20)  # something nonzero to see in TPR/PPR
    got = cpu.mmio_read(reg.offset)
    if readable:
        expect = LapicState(cpu.get_lapic())[reg.offset]
        if reg.offset == A.APIC_ARBPRI:
            expect = 0  # ARBPRI always reads 0
        assert got == expect
    else:
        assert got == 0


@pytest.mark.parametrize("reg", REGISTERS, ids=lambda r: f"{r.short}@{r.offset:#x}")
def test_x2apic_msr_readability(reg):
    """x2APIC RDMSR 0x800 + (offset >> 4): unreadable registers (and ARBPRI/DFR/ICR2) #GP."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    to_x2apic(cpu)
    readable = reg.read == "always"
    if readable:
        cpu.rdmsr(reg.msr)
    else:
        with pytest.raises(apicv.GuestFault) as e:
            cpu.rdmsr(reg.msr)
        assert e.value.vector == 13


@pytest.mark.parametrize("reg", [r for r in PLAIN if r.offset not in SIDE_EFFECTS],
                         ids=lambda r: r.short)
def test_xapic_write_mask(reg):
    """kvm_lapic_reg_write masks: a guest write of all-ones keeps only the table's mask bits
    (plus forced ones, DFR); read-only registers drop the write (MMIO ret 1 is ignored)."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    before = LapicState(cpu.get_lapic())[reg.offset]
    cpu.mmio_write(reg.offset, 0xFFFFFFFF)
    after = LapicState(cpu.get_lapic())[reg.offset]
    if reg.offset == A.APIC_LVTCMCI:
        assert after == before  # no CMCI LVT with 6 entries: "ret 1", dropped
    elif reg.offset == A.APIC_ESR:
        assert after == 0  # never stored
    elif reg.write in ("both", "xapic"):
        mask = reg.mask
        if reg.offset == A.APIC_LVTT:
            mask |= 3 << 17  # timer_mode_mask with TSC-deadline in guest CPUID
        expect = (0xFFFFFFFF & mask) | reg.force
        if reg.offset == A.APIC_ID:
            expect = 0xFF000000
        assert after == expect, f"{reg.name}: {after:#x} != {expect:#x}"
    else:
        assert after == before


@pytest.mark.parametrize("reg", [r for r in PLAIN if r.offset not in SIDE_EFFECTS],
                         ids=lambda r: r.short)
def test_x2apic_write_rules(reg):
    """x2APIC WRMSR: read-only ID/LDR, no DFR/ICR2/ARBPRI, nonzero ESR, and unknown registers
    #GP; writable registers keep the same mask as in xAPIC mode."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    to_x2apic(cpu)
    value = 0xFFFFFFFF
    should_gp = reg.write in ("never", "xapic") or reg.offset in (A.APIC_ESR, A.APIC_LVTCMCI)
    if should_gp:
        with pytest.raises(apicv.GuestFault):
            cpu.wrmsr(reg.msr, value)
    else:
        cpu.wrmsr(reg.msr, value)
        mask = reg.mask | ((3 << 17) if reg.offset == A.APIC_LVTT else 0)
        assert cpu.rdmsr(reg.msr) == value & mask


def test_x2apic_high_bits_gp():
    """kvm_lapic_msr_write: bits 63:32 are reserved in every register except ICR."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    to_x2apic(cpu)
    with pytest.raises(apicv.GuestFault):
        cpu.wrmsr(0x808, 1 << 32)
    cpu.wrmsr(0x808, 0x10)
    assert cpu.rdmsr(0x808) == 0x10


def test_msr_index_mapping_and_lookup():
    """x2APIC MSR = 0x800 + (offset >> 4) (selftests apic.h); the table resolves names."""
    assert lookup("TPR").msr == 0x808
    assert lookup("APIC_ICR").msr == 0x830
    assert lookup("SELF_IPI").msr == 0x83F
    assert lookup("EOI").msr == 0x80B
    assert lookup(0x350) is BY_OFFSET[A.APIC_LVT0]
    assert lookup("0x3e0").short == "TDCR"


def test_decode_fields_lvt():
    reg = lookup("LVT0")
    assert dict(decode_fields(reg, 0x700)) == {
        "vector": "0x0", "delivery_mode": "ExtINT", "delivery_status": "0", "polarity": "0",
        "remote_irr": "0", "trigger": "edge", "masked": "0"}


def test_lvr_with_cmci_has_seven_lvts():
    """selftests_behaviours #5: MCG_CMCI_P gives 7 LVTs (LVR[23:16] = 6), LVTCMCI masked and
    readable; without it LVTCMCI accesses are rejected."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    assert cpu.mmio_read(A.APIC_LVR) == 0x50014
    cpu.setup_mce(0x400 | 0x100 | 10)  # MCG_CMCI_P | MCG_CTL_P | 10 banks
    assert cpu.mmio_read(A.APIC_LVR) == 0x60014
    assert cpu.mmio_read(A.APIC_LVTCMCI) == 0x10000
    cpu.mmio_write(A.APIC_LVTCMCI, 0x1FFFF)
    assert cpu.mmio_read(A.APIC_LVTCMCI) == 0x117FF


def test_setup_mce_rejects_bad_caps():
    vm = apicv.Vm(1)
    with pytest.raises(apicv.KvmError) as e:
        vm.vcpus[0].setup_mce(0)
    assert e.value.errno == apicv.EINVAL
