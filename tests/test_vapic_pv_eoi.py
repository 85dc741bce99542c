"""VAPIC (KVM_SET_VAPIC_ADDR, kvm_lapic_sync_to/from_vapic) and PV EOI (MSR_KVM_PV_EOI_EN,
apic_sync_pv_eoi_to/from_guest): each test names the KVM behaviour it checks."""

from __future__ import annotations

import struct

import pytest
from conftest import make_vm, msi

import apicv
from apicv import apicdef as A
from apicv.memory import SCRATCH_GPA
from apicv.state import LapicState
from apicv.uapi import MSR_KVM_PV_EOI_EN

VAPIC = SCRATCH_GPA
FLAG = SCRATCH_GPA + 0x100


def word(vm, gpa=VAPIC) -> int:
    return int.from_bytes(vm.read_guest(gpa, 4), "little")


def in_service(cpu, vector: int) -> bool:
    page = cpu.get_lapic()
    return bool(struct.unpack_from("<I", page, A.APIC_ISR + 0x10 * (vector >> 5))[0]
                >> (vector & 31) & 1)


def set_isr(cpu, vector: int, tmr: bool = False) -> None:
    page = bytearray(cpu.get_lapic())
    struct.pack_into("<I", page, A.APIC_ISR + 0x10 * (vector >> 5), 1 << (vector & 31))
    if tmr:
        struct.pack_into("<I", page, A.APIC_TMR + 0x10 * (vector >> 5), 1 << (vector & 31))
    cpu.set_lapic(bytes(page))


# ------------------------------------------------------------------ VAPIC
def test_set_vapic_addr_needs_guest_ram():
    """kvm_lapic_set_vapic_addr(): -EINVAL when the word is not in a memslot
    (kvm_gfn_to_hva_cache_init fails); 0 turns VAPIC syncing off."""
    cpu = make_vm(1).vcpus[0]
    for bad in (0xFEE00000, 0x500, 0x10FFFFE, 0xFEC00000, 1 << 40):
        with pytest.raises(apicv.KvmError) as e:
            cpu.set_vapic_addr(bad)
        assert e.value.errno == apicv.EINVAL
    cpu.set_vapic_addr(VAPIC)
    assert cpu.apic.arch.apic_attention & 1  # KVM_APIC_CHECK_VAPIC
    cpu.set_vapic_addr(0)
    assert not cpu.apic.arch.apic_attention & 1
    cpu.set_vapic_addr(0xFFFF0000)  # a read-only memslot is mapped too (seen on this host)


def test_sync_to_vapic_word_layout():
    """kvm_lapic_sync_to_vapic(): TPR | (highest ISR & 0xf0) << 8 | highest IRR << 24,
    written on the next entry that handles KVM_REQ_EVENT."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    cpu.mmio_write(A.APIC_TASKPRI, 0x20)
    vm.write_guest(VAPIC, (0x20).to_bytes(4, "little"))
    cpu.set_vapic_addr(VAPIC)
    set_isr(cpu, 0x62)
    vm.signal_msi(*msi(0, 0x71))
    cpu.run()
    assert word(vm) == 0x20 | 0x60 << 8 | 0x71 << 24


def test_vapic_word_wins_over_a_tpr_register_write():
    """kvm_lapic_sync_from_vapic() runs after every exit: a TPR register write (an exit that
    KVM emulates) is overwritten by the word's TPR at the next exit (seen on this host: MMIO
    TPR 0x30 reverted to the word's 0x10)."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    vm.write_guest(VAPIC, (0x10).to_bytes(4, "little"))
    cpu.set_vapic_addr(VAPIC)
    cpu.mmio_write(A.APIC_TASKPRI, 0x30)
    assert cpu.get_lapic()[A.APIC_TASKPRI] == 0x10


def test_sync_from_vapic_sets_tpr_after_the_exit():
    """kvm_lapic_sync_from_vapic(): after every exit with KVM_APIC_CHECK_VAPIC set, TPR =
    the word's low byte (apic_set_tpr also recomputes PPR)."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    cpu.set_vapic_addr(VAPIC)
    cpu.guest_store(VAPIC, 0x30, size=1)
    page = cpu.get_lapic()
    assert page[A.APIC_TASKPRI] == 0x30 and page[A.APIC_PROCPRI] == 0x30


def test_vmm_write_is_overwritten_only_on_event_passes():
    """The word is written at entry only on a KVM_REQ_EVENT pass: with nothing pending, a
    TPR the VMM stored in the word is what KVM reads back after the next exit; with an event
    pending, KVM's own write comes first."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    cpu.set_vapic_addr(VAPIC)
    cpu.run()  # settle: KVM_REQ_EVENT handled
    vm.write_guest(VAPIC, (0x40).to_bytes(4, "little"))
    cpu.run()
    assert cpu.get_lapic()[A.APIC_TASKPRI] == 0x40
    vm.write_guest(VAPIC, (0x50).to_bytes(4, "little"))
    vm.signal_msi(*msi(0, 0x81))  # KVM_REQ_EVENT: the entry rewrites the word first
    cpu.run()
    assert cpu.get_lapic()[A.APIC_TASKPRI] == 0x40


def test_init_clears_apic_attention_but_keeps_vapic_addr():
    """kvm_lapic_reset(): apic_attention = 0 (no more VAPIC syncing) while vapic_addr stays,
    so update_cr8_intercept keeps passing max_irr = -1."""
    vm = make_vm(2)
    cpu = vm.vcpus[1]
    cpu.set_vapic_addr(VAPIC)
    vm.vcpus[0].mmio_write(A.APIC_ICR2, 1 << 24)
    vm.vcpus[0].mmio_write(A.APIC_ICR, 0x4500)  # INIT
    cpu.get_mp_state()
    assert cpu.apic.arch.apic_attention == 0
    assert cpu.apic.vapic_addr == VAPIC


# ------------------------------------------------------------------ PV EOI
def test_pv_eoi_msr_rules():
    """kvm_lapic_set_pv_eoi(): the address must be 4-byte aligned (#GP otherwise); an
    enabled address must be in guest RAM (#GP otherwise); disabled, any aligned value is
    stored; RDMSR returns it."""
    cpu = make_vm(1).vcpus[0]
    for bad in (FLAG | 2 | 1, 0xFEE00001, 0x2000001 | 1):
        with pytest.raises(apicv.GuestFault):
            cpu.wrmsr(MSR_KVM_PV_EOI_EN, bad)
    cpu.wrmsr(MSR_KVM_PV_EOI_EN, 0xFEE00000)
    assert cpu.rdmsr(MSR_KVM_PV_EOI_EN) == 0xFEE00000
    cpu.wrmsr(MSR_KVM_PV_EOI_EN, FLAG | 1)
    assert cpu.rdmsr(MSR_KVM_PV_EOI_EN) == FLAG | 1


def test_pv_eoi_replaces_the_eoi_write():
    """apic_sync_pv_eoi_to_guest() arms the flag when the injected vector is the only one
    in service and nothing is in IRR; the guest clears it instead of writing EOI (no EOI
    exit); at the next exit KVM sees 0 and does the EOI itself (kvm_pv_eoi)."""
    vm = make_vm(1, trace=True)
    cpu = vm.vcpus[0]
    cpu.wrmsr(MSR_KVM_PV_EOI_EN, FLAG | 1)
    vm.signal_msi(*msi(0, 0x51))
    before = dict(cpu.exit_counts)
    assert cpu.take_interrupts() == [0x51]
    after = cpu.exit_counts
    assert after.get("EPT_MISCONFIG", 0) == before.get("EPT_MISCONFIG", 0)  # no EOI exit
    assert not in_service(cpu, 0x51)
    assert vm.read_guest(FLAG, 1) == b"\0"
    assert any(e.name == "kvm_pv_eoi" and e.text.endswith("vector 81")
               for e in vm.trace.events)


def test_pv_eoi_not_armed_with_irr_pending():
    """apic_sync_pv_eoi_to_guest(): with a vector still in IRR (the handler may be
    interrupted), PV EOI is not armed: the guest writes EOI."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    cpu.wrmsr(MSR_KVM_PV_EOI_EN, FLAG | 1)
    vm.signal_msi(*msi(0, 0x51))
    vm.signal_msi(*msi(0, 0x41))
    before = cpu.exit_counts.get("EPT_MISCONFIG", 0)
    assert cpu.take_interrupts() == [0x51, 0x41]
    # 0x51's EOI is a real write (0x41 in IRR); 0x41's uses PV EOI
    assert cpu.exit_counts.get("EPT_MISCONFIG", 0) - before == 1


def test_pv_eoi_not_armed_for_ioapic_vectors():
    """apic_sync_pv_eoi_to_guest(): a vector the IOAPIC handles needs its EOI broadcast, so
    PV EOI stays off (the level interrupt's EOI is a register write)."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    cpu.wrmsr(MSR_KVM_PV_EOI_EN, FLAG | 1)
    cpu.ioapic_write(0, 0x30)
    cpu.ioapic_write(0x10, 0x8061)  # pin 16: level, vector 0x61, dest 0
    vm.irq_line(16, 1)
    vm.irq_line(16, 0)
    before = cpu.exit_counts.get("EPT_MISCONFIG", 0)
    assert cpu.take_interrupts() == [0x61]
    assert cpu.exit_counts.get("EPT_MISCONFIG", 0) - before == 1
    assert vm.eoi_broadcasts[-1] == (0, 0x61, True)


def test_pv_eoi_never_armed_under_apicv():
    """With APICv the ISR cache is always -1 (the CPU owns vISR): PV EOI is never armed."""
    vm = make_vm(1, enable_apicv=True)
    cpu = vm.vcpus[0]
    cpu.wrmsr(MSR_KVM_PV_EOI_EN, FLAG | 1)
    vm.signal_msi(*msi(0, 0x51))
    assert cpu.take_interrupts() == [0x51]
    assert not cpu.apic.pv_eoi_pending()
    assert vm.read_guest(FLAG, 1) == b"\0"


def test_pv_eoi_flag_left_set_is_disarmed():
    """pv_eoi_test_and_clr_pending(): if the guest did not clear the flag, KVM clears it at the
    next exit and does nothing (the vector stays in service)."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    cpu.wrmsr(MSR_KVM_PV_EOI_EN, FLAG | 1)
    vm.signal_msi(*msi(0, 0x62))
    # the injection entry arms it (ISR cache 0x62, IRR empty); the handler does not EOI
    assert cpu.take_interrupts(eoi=False) == [0x62]
    assert vm.read_guest(FLAG, 1) == b"\0"  # ... and the exit disarmed it
    assert in_service(cpu, 0x62)
    assert not cpu.apic.pv_eoi_pending()


def test_pv_eoi_not_armed_after_set_lapic():
    """KVM_SET_LAPIC leaves the ISR cache at -1 (kvm_apic_update_apicv), so a vector put in
    service by a restore never arms PV EOI (seen on this host: the flag byte is left alone)."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    cpu.wrmsr(MSR_KVM_PV_EOI_EN, FLAG | 1)
    vm.write_guest(FLAG, b"\x07")
    set_isr(cpu, 0x35)
    cpu.run()
    assert vm.read_guest(FLAG, 1) == b"\x07"
    assert in_service(cpu, 0x35)


def test_pv_eoi_saves_exits():
    """Exit accounting: 20 interrupts EOI'd the PV way cost no EOI exits."""
    counts = []
    for pv in (False, True):
        vm = make_vm(1)
        cpu = vm.vcpus[0]
        if pv:
            cpu.wrmsr(MSR_KVM_PV_EOI_EN, FLAG | 1)
        before = sum(cpu.exit_counts.values())
        for i in range(20):
            vm.signal_msi(*msi(0, 0x40 + i))
            cpu.take_interrupts()
        counts.append(sum(cpu.exit_counts.values()) - before)
    assert counts[0] - counts[1] == 20


def test_a_refused_kvm_run_does_not_sync_from_the_vapic_word():
    """kvm_lapic_sync_from_vapic runs in vcpu_enter_guest after a VM exit: a KVM_RUN that never
    entered the guest (an UNINITIALIZED vCPU) leaves a TPR restored by KVM_SET_LAPIC alone,
    whatever the VAPIC word says (found by `apicv fuzz --seed 7`, case 324)."""
    vm = apicv.Vm(2, enable_apicv=False, flexpriority=False)
    ap = vm.vcpus[1]
    ap.set_vapic_addr(0x80000)
    s = LapicState(ap.get_lapic())
    s["TPR"] = 0x5F
    ap.set_lapic(bytes(s))
    with pytest.raises(apicv.VcpuNotRunnable):
        ap.mmio_read(0x80)
    assert LapicState(ap.get_lapic())["TPR"] == 0x5F
