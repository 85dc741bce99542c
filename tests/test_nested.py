"""Nested VMX interrupts (issue 17): L1 and L2 on one vCPU. Model-only (no VMX on these hosts):
each test names the KVM function or SDM rule it checks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import apicv
from apicv import apicdef as A
from apicv.nested_guest import enable_nested
from apicv.vmx.nested import (
    INTR_INFO_VALID_MASK,
    KVM_6_9,
    KVM_6_13,
    KVM_6_18,
    KVM_6_19,
    NotInL2Error,
    Vmcs12,
    VmFail,
)

VAPIC = 0x80000  # L1's virtual-APIC page for L2 (in the scratch RAM)
DESC = 0x81000  # L1's posted-interrupt descriptor for L2
NV = 0xE0  # L1's notification vector for L2


def nested_vm(apicv_on: bool = True, version=KVM_6_18, n: int = 2, x2apic: bool = False):
    vm = apicv.Vm(n, enable_apicv=apicv_on, trace=True)
    for c in vm.vcpus:
        c.set_mp_state(apicv.KVM_MP_STATE_RUNNABLE)
        c.mmio_write(A.APIC_SPIV, 0x1FF)
        if x2apic:
            c.wrmsr(A.MSR_IA32_APICBASE, (c.get_msr(A.MSR_IA32_APICBASE) & 0x100) | 0xFEE00C00)
    v = enable_nested(vm.vcpus[0], version)
    v.vmxon()
    return vm, v


def launch(v, **controls):
    v.vmptrld(Vmcs12.build(**controls))
    v.vmlaunch()


def msi(vm, vector: int, dest: int = 0) -> None:
    vm.signal_msi(0xFEE00000 | dest << 12, 0, vector)


def post_to_l2(vm, vector: int) -> None:
    """L1 on vCPU 1 posts *vector* for L2 on vCPU 0: PIR and ON in the descriptor, then an IPI
    with the notification vector (the way KVM as L1 does it)."""
    sender = vm.vcpus[1]
    byte = sender.guest_load(DESC + vector // 8, 1)
    sender.guest_store(DESC + vector // 8, byte | 1 << (vector % 8), 1)
    sender.guest_store(DESC + 32, sender.guest_load(DESC + 32, 1) | 1, 1)
    sender.mmio_write(A.APIC_ICR2, 0)
    sender.mmio_write(A.APIC_ICR, NV)


VID_PI = dict(tpr_shadow=True, virtual_apic_page=VAPIC, virtualize_apic_accesses=True,
              apic_register_virt=True, virtual_intr_delivery=True, posted_interrupts=True,
              posted_intr_nv=NV, posted_intr_desc=DESC)


# ------------------------------------------------------------------ entering and leaving L2
def test_vmlaunch_enters_l2_and_guest_ops_need_their_level():
    vm, v = nested_vm()
    launch(v)
    assert v.level == "L2" and v.vmcs12.launch_state == 0
    with pytest.raises(NotInL2Error):
        v.take_interrupts()
    assert v.l2.take_interrupts() == []
    assert v.exit_counts["VMLAUNCH"] == 1  # the VMX instruction is L1's exit


@pytest.mark.parametrize("controls, why", [
    (dict(virtual_intr_delivery=True, tpr_shadow=True, virtual_apic_page=VAPIC,
          ext_intr_exiting=False), "external-interrupt exiting"),
    (dict(VID_PI, ack_intr_on_exit=False), "acknowledge interrupt on exit"),
    (dict(tpr_shadow=True, virtual_apic_page=VAPIC + 8), "page_address_valid"),
    (dict(virtual_intr_delivery=True), "TPR shadow"),
    (dict(tpr_shadow=True, virtual_apic_page=VAPIC, virtualize_x2apic_mode=True,
          virtualize_apic_accesses=True), "exclusive"),
])
def test_nested_vmx_check_controls_vmfail(controls, why):
    """nested_vmx_check_controls (SDM 27.2.1.1): VMfailValid, error 7; L1 stays L1."""
    vm, v = nested_vm()
    v.vmptrld(Vmcs12.build(**controls))
    with pytest.raises(VmFail, match=why) as e:
        v.vmlaunch()
    assert e.value.error == 7 and v.vmcs12.vm_instruction_error == 7 and v.level == "L1"


def test_apicv_controls_not_offered_without_enable_apicv():
    """nested_vmx_setup_ctls_msrs: VID/PI/ARV need enable_apicv."""
    vm, v = nested_vm(apicv_on=False)
    v.vmptrld(Vmcs12.build(**VID_PI))
    with pytest.raises(VmFail):
        v.vmlaunch()


def test_vmresume_of_an_unlaunched_vmcs_fails():
    vm, v = nested_vm()
    v.vmptrld(Vmcs12.build())
    with pytest.raises(VmFail) as e:
        v.vmresume()
    assert e.value.error == 5


# ------------------------------------------------------------------ vmx_check_nested_events
@pytest.mark.parametrize("apicv_on", [False, True])
def test_external_interrupt_exit_acknowledged_on_exit(apicv_on):
    """vmx_check_nested_events: exit on interrupt with ack -> EXTERNAL_INTERRUPT with the vector
    in exit-interruption information, acked after the exit (SVI in vmcs01)."""
    vm, v = nested_vm(apicv_on)
    launch(v)
    v.l2.enter_guest(False)  # L2 runs with IF=0: L1's interrupt exits all the same
    msi(vm, 0x41)
    assert v.level == "L1"
    [ex] = v.nested.pop_exits()
    assert ex.reason == "EXTERNAL_INTERRUPT" and ex.intr_info == INTR_INFO_VALID_MASK | 0x41
    assert v.vmcs12.vm_exit_reason == 1
    assert v.take_interrupts() == [0x41]  # L1's exit handler ran the vector's handler
    assert v.apic.isr == 0 and v.l2.taken() == []


def test_external_interrupt_exit_without_ack_leaves_it_in_irr():
    """nested_exit_intr_ack_set() false: exit info 0, the interrupt stays pending for L1."""
    vm, v = nested_vm()
    launch(v, ack_intr_on_exit=False)
    v.l2.enter_guest(True)
    msi(vm, 0x51)
    [ex] = v.nested.pop_exits()
    assert ex.reason == "EXTERNAL_INTERRUPT" and ex.intr_info == 0
    assert v.take_interrupts() == [0x51]


@pytest.mark.parametrize("apicv_on", [False, True])
def test_without_external_interrupt_exiting_l1_interrupt_goes_to_l2(apicv_on):
    """kvm_cpu_has_injectable_intr in guest mode (no VID for L2) + kvm_check_and_inject_events:
    injected into L2 through its IDT, no nested exit."""
    vm, v = nested_vm(apicv_on)
    launch(v, ext_intr_exiting=False, guest_if=False)
    msi(vm, 0x61)
    assert v.l2.take_interrupts() == [0x61]
    assert v.nested.exits == [] and v.level == "L2"


def test_nmi_exit():
    """vmx_check_nested_events: NMI exiting -> EXCEPTION_NMI, NMI blocked in L1 afterwards."""
    vm, v = nested_vm()
    launch(v)
    v.nmi()
    v.l2.run()
    [ex] = v.nested.pop_exits()
    assert ex.reason == "EXCEPTION_NMI" and ex.intr_info == 0x80000202
    assert v.nmi_pending == 0 and v.nmi_masked


def test_init_latched_in_vmx_root_and_exits_from_l2():
    """vmx_apic_init_signal_blocked: INIT blocked in VMX root; in L2 it is an INIT-signal exit
    (vmx_check_nested_events); after VMXOFF a new INIT resets the vCPU."""
    vm, v = nested_vm()
    sender = vm.vcpus[1]
    sender.mmio_write(A.APIC_ICR2, 0)
    sender.mmio_write(A.APIC_ICR, 0x4500)  # INIT to APIC 0
    assert v.get_mp_state() == apicv.KVM_MP_STATE_RUNNABLE
    assert v.apic.pending_events  # latched
    launch(v)  # KVM_REQ_EVENT at VM-Enter (pending INIT), an immediate exit after the run
    assert [e.reason for e in v.nested.pop_exits()] == ["INIT_SIGNAL"]
    assert v.level == "L1" and not v.apic.pending_events


# ------------------------------------------------------------------ nested posted interrupts
def test_nested_posted_interrupt_while_l2_runs():
    """vmx_deliver_nested_posted_interrupt: NV for L2 while L2 runs -> POSTED_INTR_NESTED_VECTOR,
    processed by the CPU with vmcs02 (PIR to L2's VIRR, RVI), no exit to L1."""
    vm, v = nested_vm(n=2)
    launch(v, **VID_PI)
    v.l2.enter_guest(False)
    post_to_l2(vm, 0x71)
    assert v.level == "L2" and v.nested.exits == []
    assert v.nested.vmcs02.rvi == 0x71
    assert v.l2.take_interrupts() == [0x71]
    assert v.apic.irr == 0 and v.nested.l2_exit_counts["EXTERNAL_INTERRUPT"] == 0


def test_nested_posted_interrupt_completed_at_entry():
    """vmx_check_nested_events -> vmx_complete_nested_posted_interrupt: the notification came
    while the vCPU was out of guest mode (pi_pending + KVM_REQ_EVENT)."""
    vm, v = nested_vm(n=2)
    launch(v, **VID_PI)
    post_to_l2(vm, 0x72)
    assert v.nested.pi_pending
    assert v.l2.take_interrupts() == [0x72]


def test_notification_vector_pending_at_vmlaunch():
    """nested_vmx_run: "Emulate processing of posted interrupts on VM-Enter"."""
    vm, v = nested_vm(n=2)
    v.vmptrld(Vmcs12.build(**VID_PI))
    vm.vcpus[1].guest_store(DESC + 0x73 // 8, 1 << (0x73 % 8), 1)
    vm.vcpus[1].guest_store(DESC + 32, 1, 1)
    msi(vm, NV)  # the notification reaches L1's APIC before the VMLAUNCH
    v.vmlaunch()
    assert v.l2.take_interrupts() == [0x73] and v.nested.exits == []


def test_sync_pir_to_irr_in_guest_mode_requests_an_event():
    """vmx_sync_pir_to_irr, is_guest_mode branch: no RVI in vmcs01, KVM_REQ_EVENT -> the exit."""
    vm, v = nested_vm()
    launch(v)
    msi(vm, 0x44)  # posted to L1's PIR while the vCPU is out of KVM_RUN
    assert v.pi_desc.pir >> 0x44 & 1
    v.apic.ops.sync_pir_to_irr(v.apic)
    assert v.guest_intr_status & 0xFF == 0 and "EVENT" in v.pending_requests
    v.l2.run()
    assert [e.reason for e in v.nested.pop_exits()] == ["EXTERNAL_INTERRUPT"]


# ------------------------------------------------------------------ the historical bugs
@pytest.mark.parametrize("version, wakes", [(KVM_6_9, False), (KVM_6_18, True)])
def test_vmx_has_nested_events_wakes_halted_l2(version, wakes):
    """vmx_has_nested_events (2024): a nested posted interrupt wakes a halted L2; before 6.10
    kvm_vcpu_has_events did not see it and L2 stayed in HLT."""
    vm, v = nested_vm(version=version, n=2)
    launch(v, hlt_exiting=False, **VID_PI)
    v.l2.halt(True)
    assert v.location == "halted"
    post_to_l2(vm, 0x75)
    assert (v.location == "guest") is wakes
    assert v.l2.taken() == ([0x75] if wakes else [])


@pytest.mark.parametrize("version, stale", [(KVM_6_13, True), (KVM_6_18, False)])
def test_svi_after_eoi_while_l2_runs(version, stale):
    """vmx_hwapic_isr_update (b682d2fbf17c): L2 EOIs L1's APIC through a passed-through x2APIC
    EOI MSR; the SVI update waits for vmcs01. Before 6.14 it went to vmcs02 and L1 ran with a
    stale SVI: a lower-priority interrupt then stays blocked by vPPR."""
    vm, v = nested_vm(version=version, x2apic=True)
    msi(vm, 0x80)
    assert v.take_interrupts(eoi=False) == [0x80]  # L1 leaves 0x80 in service
    assert v.guest_intr_status >> 8 == 0x80
    launch(v, msr_intercepts=frozenset(), ext_intr_exiting=True)
    v.l2.wrmsr(0x80B, 0)  # L2's EOI reaches L1's APIC (L0 emulates it)
    assert v.apic.isr == 0
    v.nmi()
    v.l2.run()  # an NMI exit takes the vCPU back to L1
    assert v.level == "L1"
    assert (v.guest_intr_status >> 8 == 0x80) is stale
    msi(vm, 0x51)
    assert v.take_interrupts() == ([] if stale else [0x51])


@pytest.mark.parametrize("version, refreshed", [(KVM_6_18, False), (KVM_6_19, True)])
def test_apicv_update_while_l2_runs(version, refreshed):
    """update_vmcs01_apicv_status: an inhibit arriving while L2 runs; at the nested exit 6.18
    raises KVM_REQ_APICV_UPDATE, which __kvm_vcpu_update_apicv ignores (apicv_active already
    changed): vmcs01 keeps APICv on. The Dec 2025 fix refreshes the controls at once."""
    vm, v = nested_vm(version=version)
    launch(v)
    v.l2.enter_guest(False)
    vm.set_or_clear_apicv_inhibit("BLOCKIRQ", True)
    assert not v.apic.apicv_active and v.nested.update_vmcs01_apicv_status
    assert v.apic.vmx.apicv  # vmcs01 untouched while L2 runs
    v.nmi()
    v.l2.run()
    v.run()
    assert v.level == "L1" and v.apic.vmx.apicv is (not refreshed)


def test_deferred_virtual_apic_mode_and_eoi_exitmap():
    """vmx_set_virtual_apic_mode and vcpu_scan_ioapic while L2 runs: applied when vmcs01 is
    current again (change_vmcs01_virtual_apic_mode, load_eoi_exitmap_pending)."""
    vm, v = nested_vm()
    launch(v)
    v.set_msr(A.MSR_IA32_APICBASE, 0xFEE00C00 | 0x100)  # x2APIC, host-initiated
    assert v.nested.change_vmcs01_virtual_apic_mode and v.apic.vmx.vaa
    v.nmi()
    v.l2.run()
    assert v.level == "L1" and not v.apic.vmx.vaa and v.apic.vmx.vx2


# ------------------------------------------------------------------ L2's APIC accesses
def test_l2_apic_accesses_through_l1_configuration():
    """SDM 29.4: with VAA, TPR shadow and ARV L2's reads come from L1's virtual-APIC page; an
    unvirtualized write exits to L1 as APIC_WRITE; without ARV a read is an APIC-access exit."""
    vm, v = nested_vm()
    vm.write_guest(VAPIC + A.APIC_LVT0, (0x1234).to_bytes(4, "little"))
    launch(v, tpr_shadow=True, virtual_apic_page=VAPIC, virtualize_apic_accesses=True,
           apic_register_virt=True, virtual_intr_delivery=True)
    assert v.l2.mmio_read(A.APIC_LVT0) == 0x1234
    v.l2.mmio_write(A.APIC_TASKPRI, 0x30)
    assert vm.mem.read_int(VAPIC + A.APIC_TASKPRI, 4) == 0x30 and v.nested.exits == []
    v.l2.mmio_write(A.APIC_LVT0, 0x10000)
    [ex] = v.nested.pop_exits()
    assert (ex.reason, ex.exit_qualification) == ("APIC_WRITE", A.APIC_LVT0)


def test_l2_eoi_exit_bitmap_gives_eoi_induced_exit():
    """SDM 29.1.3 / 29.4.3.3: EOI virtualization with vmcs12's EOI-exit bitmap bit set."""
    vm, v = nested_vm()
    irr_word = VAPIC + A.APIC_IRR + 0x10 * (0x91 // 32)
    vm.write_guest(irr_word, (1 << (0x91 % 32)).to_bytes(4, "little"))
    launch(v, tpr_shadow=True, virtual_apic_page=VAPIC, virtualize_apic_accesses=True,
           virtual_intr_delivery=True, guest_intr_status=0x91, eoi_exit_bitmap=1 << 0x91,
           guest_if=False)
    assert v.l2.take_interrupts() == [0x91]
    [ex] = v.nested.pop_exits()
    assert (ex.reason, ex.exit_qualification) == ("EOI_INDUCED", 0x91)


def test_nested_interrupt_window_exit():
    """L1 asked for an interrupt window (vmcs12): L2 opening IF exits to L1."""
    vm, v = nested_vm()
    launch(v, intr_window_exiting=True, guest_if=False)
    v.l2.take_interrupts()
    assert [e.reason for e in v.nested.pop_exits()] == ["INTERRUPT_WINDOW"]


# ------------------------------------------------------------------ trace and accounting
def test_nested_tracepoints_and_exit_accounting():
    vm, v = nested_vm()
    launch(v)
    v.l2.mmio_read(A.APIC_ID)  # L2 reads L1's APIC (no VAA): an exit L0 handles
    v.l2.enter_guest(False)
    msi(vm, 0x41)
    lines = vm.trace.lines()
    assert any("kvm_nested_vmenter: rip: 0x0000000000000000 vmcs: 0x0000000000010000" in ln
               for ln in lines)
    assert any(ln.endswith("kvm_nested_vmexit_inject: reason: EXTERNAL_INTERRUPT ext_inf1: "
                           "0x0000000000000000 ext_inf2: 0x0000000000000000 ext_int: 0x80000041 "
                           "ext_int_err: 0x00000000") for ln in lines)
    assert v.nested.l2_exit_counts["EPT_MISCONFIG"] == 1
    assert v.exit_counts["EPT_MISCONFIG"] == 0
    assert v.nested.l1_exit_counts["EXTERNAL_INTERRUPT"] == 1


# ------------------------------------------------------------------ properties
vectors = st.lists(st.integers(0x20, 0xEF).filter(lambda x: x != NV), min_size=1, max_size=6,
                   unique=True)


@settings(max_examples=40, deadline=None)
@given(vecs=vectors, apicv_on=st.booleans(), ack=st.booleans(), l2_if=st.booleans())
def test_l1_interrupt_never_reaches_l2_when_l1_exits_on_it(vecs, apicv_on, ack, l2_if):
    """For all inputs: with external-interrupt exiting nothing of L1's is delivered to L2, and
    every vector reaches L1 exactly once (nothing lost across the entries and exits)."""
    vm, v = nested_vm(apicv_on)
    launch(v, ack_intr_on_exit=ack, guest_if=l2_if)
    got: list[int] = []
    for vec in vecs:
        if v.level == "L1":
            got += v.take_interrupts()
            v.vmresume()
        v.l2.enter_guest(l2_if)
        msi(vm, vec)
    assert v.l2.taken() == []
    if v.level == "L2":
        v.nmi()
        v.l2.run()
    got += v.take_interrupts()
    assert sorted(got) == sorted(vecs)


def _observe(apicv_on: bool, vecs, exiting: bool, ack: bool, via_lapic_state: bool,
             version=KVM_6_18):
    vm, v = nested_vm(apicv_on, version)
    launch(v, ext_intr_exiting=exiting, ack_intr_on_exit=ack, guest_if=False)
    l1: list[int] = []
    l2: list[int] = []
    for vec in vecs:
        msi(vm, vec)
        if via_lapic_state and v.level == "L2":
            v.set_lapic(v.get_lapic())  # KVM_GET/SET_LAPIC with L2 active
        if v.level == "L2":
            l2 += v.l2.take_interrupts()
        if v.level == "L1":
            l1 += v.take_interrupts()
            v.vmresume()
    if v.level == "L2":
        v.nmi()
        v.l2.run()
    l1 += v.take_interrupts()
    return l1, l2, [e.reason for e in v.nested.exits]


@settings(max_examples=30, deadline=None)
@given(vecs=vectors, exiting=st.booleans(), ack=st.booleans(), state=st.booleans())
def test_l1_and_l2_observe_the_same_with_apicv_off_and_on(vecs, exiting, ack, state):
    """For all inputs: APICv changes how L1's interrupts travel, not what L1 and L2 see; and
    nothing is lost across L2 entries/exits and KVM_GET/SET_LAPIC with L2 active."""
    off = _observe(False, vecs, exiting, ack, state)
    on = _observe(True, vecs, exiting, ack, state)
    assert off == on
    assert sorted(off[0] + off[1]) == sorted(vecs)
    if exiting:
        assert off[1] == []


@settings(max_examples=20, deadline=None)
@given(vecs=vectors, toggles=st.lists(st.booleans(), min_size=1, max_size=4))
def test_nothing_lost_across_apicv_toggles_with_l2_active(vecs, toggles):
    """With the Dec 2025 fix (6.19 behaviour) an inhibit set or cleared while L2 runs loses no
    interrupt of L1's (6.18 loses them: test_apicv_update_while_l2_runs)."""
    vm, v = nested_vm(True, KVM_6_19)
    launch(v, guest_if=False)
    got: list[int] = []
    for i, vec in enumerate(vecs):
        if v.level == "L1":
            got += v.take_interrupts()
            v.vmresume()
        v.l2.enter_guest(False)
        vm.set_or_clear_apicv_inhibit("BLOCKIRQ", toggles[i % len(toggles)])
        msi(vm, vec)
    if v.level == "L2":
        v.nmi()
        v.l2.run()
    vm.set_or_clear_apicv_inhibit("BLOCKIRQ", False)
    got += v.take_interrupts()
    assert sorted(got) == sorted(vecs)
