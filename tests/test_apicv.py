"""APICv (Intel VMX APIC virtualization) as KVM drives it: activation and inhibits, posted
interrupts, virtual-interrupt delivery, the accesses the processor virtualizes, where a vCPU is,
and what it all costs in VM exits. Facts cite KVM (vmx.c, posted_intr.c, lapic.c, x86.c) or
the Intel SDM Vol. 3C chapter "APIC Virtualization and Virtual Interrupts"."""

from __future__ import annotations

import pytest
from conftest import make_vm, msi, to_x2apic

import apicv
from apicv import apicdef as A
from apicv.kvm_host import ApicvInhibit
from apicv.state import LapicState


def apicv_vm(n: int = 1, **kw) -> apicv.Vm:
    kw.setdefault("enable_apicv", True)
    return make_vm(n, **kw)


def exits(cpu) -> dict[str, int]:
    return dict(cpu.vmx.exit_counts)


def reset_exits(vm) -> None:
    for c in vm.vcpus:
        c.vmx.exit_counts.clear()


# ------------------------------------------------------------------ activation and inhibits
def test_apicv_active_from_creation_and_default_on():
    """kvm_create_lapic(): apicv_active = enable_apicv (default on for a modern Intel host),
    KVM_REQ_APICV_UPDATE evaluated at the first entry; the inhibit mask is empty once the
    irqchip exists (ABSENT cleared by KVM_CREATE_IRQCHIP)."""
    vm = apicv.Vm(2)
    assert vm.apicv_inhibits == 0
    assert all(c.apic.apicv_active for c in vm.vcpus)
    off = apicv.Vm(1, enable_apicv=False, flexpriority=False)
    assert off.apicv_inhibits == 1 << ApicvInhibit.DISABLED
    assert not off.vcpus[0].apic.apicv_active


def test_inhibit_toggle_deactivates_at_next_entry_and_back():
    """kvm_set_or_clear_apicv_inhibit: zero <-> nonzero raises KVM_REQ_APICV_UPDATE on every
    vCPU; __kvm_vcpu_update_apicv at the next entry: deactivation recounts ISR, sets
    highest_isr_cache = -1, irr_pending and KVM_REQ_EVENT; activation pins isr_count = 1 and
    writes SVI."""
    vm = apicv_vm(1)
    cpu = vm.vcpus[0]
    vm.signal_msi(*msi(0, 0x61))
    assert cpu.take_interrupts(eoi=False) == [0x61]
    assert cpu.vmx.svi == 0x61 and cpu.apic.isr_count == 1
    vm.set_or_clear_apicv_inhibit("HYPERV", True)
    assert cpu.apic.apicv_active  # not before the next entry
    cpu.run()
    assert not cpu.apic.apicv_active
    assert cpu.apic.isr_count == 1 and cpu.apic.highest_isr_cache == -1
    vm.set_or_clear_apicv_inhibit("HYPERV", False)
    cpu.mmio_write(A.APIC_EOI, 0)
    assert cpu.apic.apicv_active and cpu.vmx.svi == 0
    assert LapicState(cpu.get_lapic()).isr == 0


def test_only_vmx_inhibits_count():
    """VMX_REQUIRED_APICV_INHIBITS: AVIC-only reasons (IRQWIN, PIT_REINJ, SEV, NESTED,
    LOGICAL_ID_ALIASED) are ignored on VMX, untraced and not in the mask."""
    vm = apicv_vm(1)
    for reason in ("IRQWIN", "PIT_REINJ", "SEV", "NESTED", "LOGICAL_ID_ALIASED"):
        vm.set_or_clear_apicv_inhibit(reason, True)
    assert vm.apicv_inhibits == 0
    vm.set_or_clear_apicv_inhibit(ApicvInhibit.BLOCKIRQ, True)
    assert vm.apicv_inhibits == 1 << ApicvInhibit.BLOCKIRQ


def test_apic_id_change_inhibits_and_reactivates():
    """kvm_recalculate_apic_map: an xAPIC ID != vcpu_id sets APIC_ID_MODIFIED (APICv off on
    every vCPU at its next entry); restoring it clears the inhibit."""
    vm = apicv_vm(2)
    a, b = vm.vcpus
    b.mmio_write(A.APIC_ID, 0x09000000)
    assert vm.apicv_inhibits == 1 << ApicvInhibit.APIC_ID_MODIFIED
    a.run()
    assert not a.apic.apicv_active
    b.mmio_write(A.APIC_ID, 0x01000000)
    assert vm.apicv_inhibits == 0
    a.run()
    assert a.apic.apicv_active


def test_blockirq_guest_debug():
    """KVM_SET_GUEST_DEBUG(BLOCKIRQ): APICV_INHIBIT_REASON_BLOCKIRQ while any vCPU has it, and
    kvm_check_and_inject_events returns before injecting -- after KVM_REQ_EVENT was consumed
    and without asking for an interrupt window. Clearing BLOCKIRQ raises no KVM_REQ_EVENT, so
    the pending interrupt waits for the next event."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    cpu.set_guest_debug(enable=True, blockirq=True)
    # enable_apicv=0: kvm_set_or_clear_apicv_inhibit is a no-op (only DISABLED is set)
    assert vm.apicv_inhibits == 1 << ApicvInhibit.DISABLED
    vm.signal_msi(*msi(0, 0x41))
    assert cpu.take_interrupts() == []
    cpu.set_guest_debug(enable=False)
    assert cpu.take_interrupts() == []
    vm.signal_msi(*msi(0, 0x42))
    assert cpu.take_interrupts() == [0x42, 0x41]
    on = apicv_vm(1)
    on.vcpus[0].set_guest_debug(enable=True, blockirq=True)
    assert on.apicv_inhibits == 1 << ApicvInhibit.BLOCKIRQ


# ------------------------------------------------------------------ posted interrupts
def test_posted_interrupt_to_vcpu_in_host():
    """vmx_deliver_posted_interrupt: PIR bit and ON set, no notification (the vCPU is not in
    guest mode: kvm_vcpu_wake_up); vmx_sync_pir_to_irr at the next entry or in KVM_GET_LAPIC
    moves PIR to IRR and sets RVI."""
    vm = apicv_vm(1)
    cpu = vm.vcpus[0]
    reset_exits(vm)
    assert vm.signal_msi(*msi(0, 0x55)) == 1
    pi = cpu.vmx.pi_desc
    assert pi.pir == 1 << 0x55 and pi.on
    assert cpu.apic.irr == 0
    assert LapicState(cpu.get_lapic()).irr == 1 << 0x55  # KVM_GET_LAPIC syncs PIR first
    assert pi.pir == 0 and not pi.on
    assert cpu.take_interrupts() == [0x55]
    assert exits(cpu) == {}  # delivered by the CPU, EOI virtualized


def test_set_lapic_drops_pending_posted_interrupts():
    """kvm_apic_set_state -> vmx_apicv_pre_state_restore: ON cleared, PIR zeroed."""
    vm = apicv_vm(1)
    cpu = vm.vcpus[0]
    page = cpu.get_lapic()
    vm.signal_msi(*msi(0, 0x55))
    cpu.set_lapic(page)
    assert cpu.vmx.pi_desc.pir == 0
    assert cpu.take_interrupts() == []


def test_migration_between_apicv_on_and_off():
    """KVM_GET_LAPIC with APICv active syncs PIR -> IRR, so nothing posted is lost; the page
    restores onto a VM with APICv off and the guest sees the same interrupts."""
    src = apicv_vm(1)
    src.signal_msi(*msi(0, 0x66))
    src.signal_msi(*msi(0, 0x44))
    page = src.vcpus[0].get_lapic()
    dst = make_vm(1)  # software LAPIC
    dst.vcpus[0].set_lapic(page)
    assert dst.vcpus[0].take_interrupts() == [0x66, 0x44]


def test_apicv_accept_trace():
    """vmx_deliver_interrupt traces kvm_apicv_accept_irq after a successful post."""
    vm = apicv_vm(1)
    tr = vm.enable_tracing()
    vm.signal_msi(*msi(0, 0x41))
    names = [e.name for e in tr.events]
    assert names == ["kvm_msi_set_irq", "kvm_apic_accept_irq", "kvm_apicv_accept_irq"]


# ------------------------------------------------------------------ where the vCPU is
@pytest.mark.parametrize("x2apic", [False, True])
def test_msi_to_running_vcpu_exit_cost(x2apic):
    """The issue's case: an edge MSI taken and EOI'd by a vCPU running in guest mode (IF=1).
    With APICv: posted-interrupt notification, virtual-interrupt delivery, EOI virtualization:
    no VM exit. Without: the kick IPI (EXTERNAL_INTERRUPT) to inject, then the EOI (x2APIC
    WRMSR 0x80B -> MSR_WRITE; xAPIC MMIO -> APIC_ACCESS, flexpriority on)."""
    counts = {}
    for on in (True, False):
        vm = make_vm(1, enable_apicv=on, flexpriority=True)
        cpu = vm.vcpus[0]
        if x2apic:
            to_x2apic(cpu)
        cpu.enter_guest(interrupts=True)
        reset_exits(vm)
        vm.signal_msi(*msi(0, 0x41))
        assert cpu.location == "guest"
        assert cpu.take_interrupts() == [0x41]
        counts[on] = exits(cpu)
    assert counts[True] == {}
    eoi_exit = "MSR_WRITE" if x2apic else "APIC_ACCESS"
    assert counts[False] == {"EXTERNAL_INTERRUPT": 1, eoi_exit: 1}


def test_interrupt_window_exit_without_apicv():
    """Without APICv an interrupt that arrives while IF=0 needs an interrupt-window exit when
    the guest opens IF (enable_irq_window); with APICv the CPU delivers it at STI."""
    for on, expect in ((True, {}), (False, {"INTERRUPT_WINDOW": 1, "APIC_ACCESS": 1})):
        vm = make_vm(1, enable_apicv=on, flexpriority=True)
        cpu = vm.vcpus[0]
        vm.signal_msi(*msi(0, 0x41))
        cpu.run()  # KVM_REQ_EVENT handled with IF=0: the window is requested
        reset_exits(vm)
        assert cpu.take_interrupts() == [0x41]
        assert exits(cpu) == expect


def test_halted_vcpu_woken_by_ipi():
    """A vCPU blocked in HLT (IF=1) wakes for an IPI: with APICv through the posted-interrupt
    wake-up (kvm_vcpu_wake_up, PIR synced by vcpu_block's has_events check), then VID; the
    HLT itself is one exit either way."""
    for on in (True, False):
        vm = make_vm(2, enable_apicv=on, flexpriority=True)
        a, b = vm.vcpus
        reset_exits(vm)
        b.halt(interrupts=True)
        assert b.location == "halted" and b.mp_state == apicv.KVM_MP_STATE_HALTED
        a.mmio_write(A.APIC_ICR2, 1 << 24)
        a.mmio_write(A.APIC_ICR, 0x4041)
        assert b.location == "guest" and b.mp_state == apicv.KVM_MP_STATE_RUNNABLE
        assert b.take_interrupts() == [0x41]
        assert exits(b).get("HLT") == 1


@pytest.mark.parametrize("on", [True, False], ids=["apicv", "no-apicv"])
def test_vcpu_taken_out_of_sti_hlt_keeps_its_if(on):
    """A signal takes a halted vCPU out of KVM_RUN (-EINTR) but the guest is still in HLT
    with RFLAGS.IF=1: at the next KVM_RUN, vcpu_block's kvm_vcpu_has_events() sees an
    interrupt sent meanwhile (kvm_arch_interrupt_allowed reads the guest's IF), the vCPU
    wakes, takes it, and only then does its next operation. Halted with IF=0 it stays
    blocked."""
    vm = make_vm(1, enable_apicv=on, flexpriority=True)
    cpu = vm.vcpus[0]
    cpu.halt(interrupts=True)
    cpu.leave_guest()
    assert cpu.mp_state == apicv.KVM_MP_STATE_HALTED
    vm.signal_msi(*msi(0, 0x41))
    assert cpu.read_cr8() == 0
    assert cpu.take_interrupts() == [0x41]
    cpu.halt(interrupts=False)
    cpu.leave_guest()
    vm.signal_msi(*msi(0, 0x42))
    with pytest.raises(apicv.VcpuNotRunnable):
        cpu.read_cr8()


def test_halt_with_pending_interrupt_does_not_block():
    vm = apicv_vm(1)
    cpu = vm.vcpus[0]
    vm.signal_msi(*msi(0, 0x41))
    cpu.halt()
    assert cpu.location == "guest"
    assert cpu.take_interrupts() == [0x41]


def test_timer_fires_into_running_guest():
    """The hrtimer kicks a vCPU in guest mode (EXTERNAL_INTERRUPT); vcpu_run injects the
    expiry and the guest takes it at once."""
    for on in (True, False):
        vm = make_vm(1, enable_apicv=on, flexpriority=True)
        cpu = vm.vcpus[0]
        cpu.mmio_write(A.APIC_LVTT, 0xEF)
        cpu.mmio_write(A.APIC_TMICT, 5000)
        cpu.enter_guest(interrupts=True)
        reset_exits(vm)
        vm.clock.advance(10_000)
        assert cpu.take_interrupts() == [0xEF]
        assert exits(cpu)["EXTERNAL_INTERRUPT"] == 1


# ------------------------------------------------------------------ virtualized accesses
def test_virtualized_register_accesses_do_not_exit():
    """APIC-register virtualization: reads of ID/LVR/TPR/ISR/IRR/... come from the virtual-APIC
    page; PPR and TMCCT reads cause APIC-access exits; writes to ordinary registers are
    trap-like APIC-write exits; TPR and EOI writes are virtualized."""
    vm = apicv_vm(1)
    cpu = vm.vcpus[0]
    reset_exits(vm)
    for off in (A.APIC_ID, A.APIC_LVR, A.APIC_TASKPRI, A.APIC_IRR, A.APIC_LVT0):
        cpu.mmio_read(off)
    assert exits(cpu) == {}
    cpu.mmio_read(A.APIC_PROCPRI)
    cpu.mmio_read(A.APIC_TMCCT)
    assert exits(cpu) == {"APIC_ACCESS": 2}
    reset_exits(vm)
    cpu.mmio_write(A.APIC_TASKPRI, 0x20)
    assert exits(cpu) == {}
    # An EOI with nothing in service is virtualized for vector SVI = 0 -- and vector 0 is in
    # vCPU 0's EOI-exit bitmap: kvm_ioapic_scan_entry() always scans the RTC pin (GSI 8),
    # whose reset RTE (vector 0, physical destination 0) matches APIC 0.
    cpu.mmio_write(A.APIC_EOI, 0)
    assert exits(cpu) == {"EOI_INDUCED": 1}
    reset_exits(vm)
    cpu.mmio_write(A.APIC_LVTERR, 0x33)
    assert exits(cpu) == {"APIC_WRITE": 1}
    assert cpu.mmio_read(A.APIC_LVTERR) == 0x33


def test_xapic_self_ipi_virtualized():
    """APIC-write emulation of ICR low: a fixed, edge, self IPI with vector >= 16 is
    self-IPI virtualization (no exit); anything else is an APIC-write exit KVM emulates."""
    vm = apicv_vm(1)
    cpu = vm.vcpus[0]
    reset_exits(vm)
    cpu.mmio_write(A.APIC_ICR, 0x44051)
    assert exits(cpu) == {}
    assert cpu.take_interrupts() == [0x51]
    cpu.mmio_write(A.APIC_ICR, 0x44400)  # self NMI
    assert exits(cpu) == {"APIC_WRITE": 1}
    assert cpu.take_interrupts() == [2]


def test_x2apic_tpr_and_eoi_reserved_bits_gp_with_virtualization():
    """SDM WRMSR special processing (virtualize x2APIC mode): 808H (TPR) and 83FH (self IPI)
    #GP if EDX or EAX[31:8] is nonzero, 80BH (EOI) #GP if the value is nonzero. KVM's emulation
    (no APICv, no TPR shadow) drops TPR bits 31:8 and ignores the EOI value."""
    vm = apicv_vm(1)
    cpu = vm.vcpus[0]
    to_x2apic(cpu)
    with pytest.raises(apicv.GuestFault):
        cpu.wrmsr(0x808, 0x120)
    with pytest.raises(apicv.GuestFault):
        cpu.wrmsr(0x80B, 1)
    soft = make_vm(1)
    sc = soft.vcpus[0]
    to_x2apic(sc)
    sc.wrmsr(0x808, 0x120)
    sc.wrmsr(0x80B, 1)
    assert sc.rdmsr(0x808) == 0x20


def test_eoi_exit_bitmap_causes_eoi_induced_exit():
    """EOI virtualization: a vector set in the EOI-exit bitmap (vcpu_load_eoi_exitmap from
    ioapic_handled_vectors) makes a trap-like EOI-induced exit; KVM then runs
    kvm_apic_set_eoi_accelerated (the IOAPIC EOI)."""
    vm = apicv_vm(1)
    cpu = vm.vcpus[0]
    cpu.arch.ioapic_handled_vectors = 1 << 0x44
    cpu.vmx.eoi_exit_bitmap = 1 << 0x44  # as vcpu_load_eoi_exitmap would load it
    vm.signal_msi(0xFEE00000, 0, 0x8044)
    vm.signal_msi(0xFEE00000, 0, 0x43)
    reset_exits(vm)
    assert cpu.take_interrupts() == [0x44, 0x43]
    assert exits(cpu) == {"EOI_INDUCED": 1}
    assert vm.eoi_broadcasts == [(0, 0x44, True)]


def test_tpr_shadow_threshold_exit_without_apicv():
    """TPR shadow without virtual-interrupt delivery: TPR writes are virtualized, and only a
    write that drops VTPR[7:4] below TPR_THRESHOLD (vmx_update_cr8_intercept) exits."""
    vm = make_vm(1, enable_apicv=False, flexpriority=True)
    cpu = vm.vcpus[0]
    cpu.write_cr8(5)
    vm.signal_msi(*msi(0, 0x41))
    cpu.run()  # entry: TPR_THRESHOLD = highest IRR class (4)
    assert cpu.vmx.tpr_threshold == 4
    reset_exits(vm)
    cpu.write_cr8(4)
    assert exits(cpu) == {}
    cpu.write_cr8(3)
    assert exits(cpu) == {"TPR_BELOW_THRESHOLD": 1}
    assert cpu.take_interrupts() == [0x41]


def test_partial_register_writes_reach_kvm_with_apicv():
    """With APIC-register virtualization a 1-byte write inside ICR low is virtualized and
    becomes an APIC-write exit for offset 0x300: KVM sends the IPI from the page. Without
    APICv KVM drops any MMIO write that is not 4 bytes (apic_mmio_write)."""
    for on, expect in ((True, [0x51]), (False, [])):
        vm = make_vm(1, enable_apicv=on)
        cpu = vm.vcpus[0]
        cpu.mmio_write(A.APIC_ICR + 2, 0x4, size=1)  # shorthand self in bits 19:18
        cpu.mmio_write(A.APIC_ICR, 0x51, size=1)
        assert cpu.take_interrupts() == expect
