"""Register semantics of one LAPIC (kvm_lapic_reg_write / kvm_lapic_reg_read / apic_mmio_*),
each test naming the KVM fact it checks (numbers refer to selftests_behaviours.md)."""

from __future__ import annotations

import pytest
from conftest import make_vm, msi, to_x2apic

import apicv
from apicv import apicdef as A
from apicv.state import LapicState


def state(cpu) -> LapicState:
    return LapicState(cpu.get_lapic())


# ------------------------------------------------------------------ SPIV and LVTs
def test_spiv_clear_masks_every_lvt_and_forces_mask_on_writes():
    """#41: clearing SPIV bit 8 ORs the mask into every LVT; while software-disabled every LVT
    write is forced masked (0x30 -> 0x10030)."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    cpu.mmio_write(A.APIC_LVTERR, 0x33)
    cpu.mmio_write(A.APIC_LVT1, 0x400)
    assert state(cpu)["LVTERR"] == 0x33
    cpu.mmio_write(A.APIC_SPIV, 0xFF)
    s = state(cpu)
    assert s["LVTERR"] == 0x10033 and s["LVT1"] == 0x10400 and s["LVT0"] == 0x10700
    cpu.mmio_write(A.APIC_LVTPC, 0x30)
    assert state(cpu)["LVTPC"] == 0x10030


def test_spiv_keeps_bits_9_0_and_directed_eoi_only_when_advertised():
    """#41 / kvm_lapic_reg_write(APIC_SPIV): mask 0x3ff, plus bit 12 only if LVR bit 24."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    cpu.mmio_write(A.APIC_SPIV, 0xFFFFFFFF)
    assert state(cpu)["SPIV"] == 0x3FF
    # LVR advertises directed EOI with x2APIC CPUID and no in-kernel IOAPIC (#6)
    vm = make_vm(1, irqchip="split")
    cpu = vm.vcpus[0]
    assert cpu.mmio_read(A.APIC_LVR) == 0x01050014
    cpu.mmio_write(A.APIC_SPIV, 0xFFFFFFFF)
    assert state(cpu)["SPIV"] == 0x13FF


def test_lvt_masks():
    """#42: LINT0/1 keep 0x1F7FF (delivery status and remote IRR as written); thermal/PMC keep
    vector|mode|status|mask; LVTERR vector|status|mask."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    for reg, mask in ((A.APIC_LVT0, 0x1F7FF), (A.APIC_LVT1, 0x1F7FF), (A.APIC_LVTTHMR, 0x117FF),
                      (A.APIC_LVTPC, 0x117FF), (A.APIC_LVTERR, 0x110FF)):
        cpu.mmio_write(reg, 0xFFFFFFFF)
        assert cpu.mmio_read(reg) == mask


def test_lvtt_timer_mode_mask_follows_cpuid():
    """#42: LVTT timer-mode bits: none before KVM_SET_CPUID2, bit 17 without TSC-deadline,
    bits 18:17 with it (0x600EE kept)."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    cpu.mmio_write(A.APIC_LVTT, 0x600EE)
    assert cpu.mmio_read(A.APIC_LVTT) == 0x600EE
    cpu.set_cpuid(x2apic=True, tsc_deadline=False)
    cpu.mmio_write(A.APIC_LVTT, 0x600EE)
    assert cpu.mmio_read(A.APIC_LVTT) == 0x200EE


def test_tdcr_mask_and_divide():
    """#43: guest TDCR writes keep bits 0, 1, 3 (0xFF -> 0xB); KVM_SET_LAPIC stores TDCR raw."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    cpu.mmio_write(A.APIC_TDCR, 0xFF)
    assert cpu.mmio_read(A.APIC_TDCR) == 0xB
    s = state(cpu)
    s["TDCR"] = 0xFF
    cpu.set_lapic(bytes(s))
    assert cpu.mmio_read(A.APIC_TDCR) == 0xFF


@pytest.mark.parametrize("tdcr,div", [(0x0, 2), (0x1, 4), (0x2, 8), (0x3, 16), (0x8, 32),
                                      (0x9, 64), (0xA, 128), (0xB, 1)])
def test_divide_count(tdcr, div):
    """#43 / update_divide_count: the divide table."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    cpu.mmio_write(A.APIC_TDCR, tdcr)
    assert cpu.apic.divide_count == div


def test_ldr_dfr_masks():
    """#44: xAPIC LDR keeps bits 31:24; DFR stores value | 0x0FFFFFFF (0 -> 0x0FFFFFFF)."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    cpu.mmio_write(A.APIC_LDR, 0x12345678)
    cpu.mmio_write(A.APIC_DFR, 0)
    assert cpu.mmio_read(A.APIC_LDR) == 0x12000000
    assert cpu.mmio_read(A.APIC_DFR) == 0x0FFFFFFF


def test_tpr_keeps_low_byte_and_ppr_formula():
    """#34: TPR bits 7:0 kept (0x1FF -> 0xFF); PPR = TPR when TPR[7:4] >= ISRV[7:4], else
    ISRV & 0xF0 (ISR 0x50, TPR 0x20 -> PPR 0x50; TPR 0x7B, empty ISR -> 0x7B)."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    cpu.mmio_write(A.APIC_TASKPRI, 0x1FF)
    assert cpu.mmio_read(A.APIC_TASKPRI) == 0xFF
    cpu.mmio_write(A.APIC_TASKPRI, 0x7B)
    assert cpu.mmio_read(A.APIC_PROCPRI) == 0x7B
    cpu.mmio_write(A.APIC_TASKPRI, 0x20)
    vm.signal_msi(*msi(0, 0x55))
    assert cpu.take_interrupts(eoi=False) == [0x55]
    assert cpu.mmio_read(A.APIC_PROCPRI) == 0x50


def test_esr_never_set_and_x2apic_nonzero_write_gp():
    """#25: KVM never sets ESR (vector 5 MSI sets IRR, ESR stays 0); x2APIC nonzero ESR write
    #GPs, a zero write is fine."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    assert vm.signal_msi(*msi(0, 5)) == 1
    s = state(cpu)
    assert s.irr == 1 << 5 and s["ESR"] == 0
    cpu.mmio_write(A.APIC_ESR, 0xFF)
    assert cpu.mmio_read(A.APIC_ESR) == 0
    to_x2apic(cpu)
    cpu.wrmsr(0x828, 0)
    with pytest.raises(apicv.GuestFault):
        cpu.wrmsr(0x828, 1)


# ------------------------------------------------------------------ ICR
def test_xapic_icr_busy_cleared_and_icr2_masked():
    """#20: BUSY (bit 12) is cleared in the stored ICR; ICR2 keeps bits 31:24."""
    vm = make_vm(2)
    cpu = vm.vcpus[0]
    cpu.mmio_write(A.APIC_ICR2, 0xFFFFFFFF)
    assert cpu.mmio_read(A.APIC_ICR2) == 0xFF000000
    cpu.mmio_write(A.APIC_ICR, 0x10F0 | 0x40000)  # self, vector 0xF0, BUSY
    assert cpu.mmio_read(A.APIC_ICR) == 0x400F0
    assert state(cpu).irr == 1 << 0xF0


@pytest.mark.parametrize("bit", [13, 16, 17] + list(range(20, 32)))
def test_x2apic_icr_reserved_bits_gp(bit):
    """#21: an x2APIC ICR WRMSR with bits 31:20, 17:16 or 13 set #GPs and sends nothing."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    to_x2apic(cpu)
    with pytest.raises(apicv.GuestFault):
        cpu.wrmsr(0x830, 0x40041 | (1 << bit))
    assert state(cpu).irr == 0


def test_x2apic_icr_64bit_store_and_split_in_state():
    """#15/#21/#22: the full 64-bit ICR (BUSY cleared) is stored and read back by RDMSR; the
    destination is ICR[63:32]; KVM_GET_LAPIC reports it split as ICR (low) + ICR2 (high)."""
    vm = make_vm(2, apicv.KVM_X2APIC_API_USE_32BIT_IDS)
    a, b = vm.vcpus
    to_x2apic(a)
    to_x2apic(b)
    a.wrmsr(0x830, (1 << 32) | 0x1000 | 0x4062)
    assert a.rdmsr(0x830) == (1 << 32) | 0x4062
    s = state(a)
    assert s["ICR"] == 0x4062 and s["ICR2"] == 1
    assert state(b).irr == 1 << 0x62


def test_self_ipi_x2apic_only_and_reserved_bits():
    """#24: SELF_IPI (0x83F) in x2APIC mode with only bits 7:0 sets the sender's IRR; other
    bits -> #GP; through xAPIC MMIO it is dropped."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    cpu.mmio_write(A.APIC_SELF_IPI, 0x44)
    assert state(cpu).irr == 0
    to_x2apic(cpu)
    cpu.wrmsr(0x83F, 0x44)
    assert state(cpu).irr == 1 << 0x44
    with pytest.raises(apicv.GuestFault):
        cpu.wrmsr(0x83F, 0x144)


# ------------------------------------------------------------------ MMIO access rules
def test_mmio_unaligned_and_short_writes_ignored():
    """apic_mmio_write: only 4-byte writes at 16-byte-aligned offsets count."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    cpu.mmio_write(A.APIC_TASKPRI, 0x30, size=1)
    cpu.mmio_write(A.APIC_TASKPRI + 4, 0x30)
    cpu.mmio_write(A.APIC_TASKPRI, 0x3030, size=2)
    assert cpu.mmio_read(A.APIC_TASKPRI) == 0
    cpu.mmio_write(A.APIC_TASKPRI, 0x40)
    assert cpu.mmio_read(A.APIC_TASKPRI) == 0x40


def test_mmio_partial_reads():
    """kvm_lapic_reg_read: 1/2/4-byte reads within the first dword, shifted by alignment;
    alignment + len > 4 or an 8-byte read is rejected."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    assert cpu.mmio_read(A.APIC_LVR + 2, size=1) == 0x05
    assert cpu.mmio_read(A.APIC_LVR + 0, size=2) == 0x0014
    assert cpu.mmio_read(A.APIC_LVR + 2, size=2) == 0x0005
    assert cpu.mmio_read(A.APIC_LVR + 3, size=2) == 0
    assert cpu.mmio_read(A.APIC_LVR, size=8) == 0
    assert cpu.mmio_read(0x400) == 0  # beyond 0x3f0


def test_mmio_hole_when_disabled_or_x2apic():
    """#18: hardware-disabled or x2APIC: MMIO reads return all-ones and writes are dropped;
    with KVM_X86_QUIRK_LAPIC_MMIO_HOLE disabled the access exits to userspace."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    to_x2apic(cpu)
    assert cpu.mmio_read(A.APIC_LVR) == 0xFFFFFFFF
    assert cpu.mmio_read(A.APIC_LVR, size=1) == 0xFF
    cpu.mmio_write(A.APIC_TASKPRI, 0x40)
    assert cpu.rdmsr(0x808) == 0
    cpu.wrmsr(0x1B, 0)  # x2APIC -> disabled
    assert cpu.mmio_read(A.APIC_LVR, size=8) == (1 << 64) - 1
    vm2 = make_vm(1, disabled_quirks=apicv.KVM_X86_QUIRK_LAPIC_MMIO_HOLE)
    c2 = vm2.vcpus[0]
    to_x2apic(c2)
    with pytest.raises(apicv.MmioExit):
        c2.mmio_read(A.APIC_LVR)


def test_x2apic_msrs_gp_in_xapic_mode():
    """#19: x2APIC MSRs accessed while not in x2APIC mode #GP (host access is rejected too)."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    with pytest.raises(apicv.GuestFault):
        cpu.rdmsr(0x808)
    with pytest.raises(apicv.GuestFault):
        cpu.wrmsr(0x808, 0)
    with pytest.raises(apicv.MsrRejected):
        cpu.get_msr(0x808)
    assert cpu.set_msr(0x808, 0) is False


def test_x2apic_msr_beyond_0x83f_gp():
    """kvm_lapic_reg_read: offsets > 0x3f0 (MSR >= 0x840) are rejected -> #GP."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    to_x2apic(cpu)
    for msr in (0x840, 0x8FF):
        with pytest.raises(apicv.GuestFault):
            cpu.rdmsr(msr)
        with pytest.raises(apicv.GuestFault):
            cpu.wrmsr(msr, 0)


def test_x2apic_id_ldr_derived_and_readonly():
    """#11/#17: entering x2APIC sets ID = vcpu_id and LDR = ((id>>4)<<16) | 1<<(id&0xf);
    both are read-only (#GP on write)."""
    vm = make_vm(20)
    cpu = vm.vcpus[19]
    to_x2apic(cpu)
    assert cpu.rdmsr(0x802) == 19
    assert cpu.rdmsr(0x80D) == (1 << 16) | (1 << 3)
    for msr in (0x802, 0x80D):
        with pytest.raises(apicv.GuestFault):
            cpu.wrmsr(msr, 0)


def test_guest_xapic_id_write_visible_in_state():
    """#16: in xAPIC mode the guest may write ID bits 31:24 and KVM_GET_LAPIC shows it."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    cpu.mmio_write(A.APIC_ID, 0x07123456)
    assert state(cpu)["ID"] == 0x07000000


def test_tpr_access_reporting_request():
    """KVM_TPR_ACCESS_REPORTING: TPR reads/writes through MMIO (not CR8) raise
    KVM_REQ_REPORT_TPR_ACCESS; flags != 0 is EINVAL."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    with pytest.raises(apicv.KvmError):
        cpu.set_tpr_access_reporting(True, flags=1)
    cpu.set_tpr_access_reporting(True)
    cpu.mmio_write(A.APIC_TASKPRI, 0x10)
    assert cpu.apic.tpr_access_write is True
    cpu.mmio_read(A.APIC_TASKPRI)
    assert cpu.apic.tpr_access_write is False


def test_cr8_and_tpr():
    """#36: CR8 = TPR[7:4]; a CR8 write sets TPR = cr8 << 4."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    cpu.mmio_write(A.APIC_TASKPRI, 0x3F)
    assert cpu.read_cr8() == 3
    cpu.write_cr8(0xA)
    assert cpu.mmio_read(A.APIC_TASKPRI) == 0xA0
    assert cpu.mmio_read(A.APIC_PROCPRI) == 0xA0
    with pytest.raises(apicv.GuestFault):
        cpu.write_cr8(0x10)
