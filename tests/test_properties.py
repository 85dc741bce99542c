"""Property tests (hypothesis): rules that hold for every input."""

from __future__ import annotations

from conftest import make_vm, msi, to_x2apic
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import apicv
from apicv import apicdef as A
from apicv.apic_map import kvm_apic_match_dest
from apicv.state import LapicState

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
vectors = st.integers(min_value=16, max_value=255)


@SETTINGS
@given(tpr=st.integers(0, 255), isr=st.sets(vectors, max_size=4))
def test_ppr_formula(tpr, isr):
    """__apic_update_ppr (#34): PPR = TPR if TPR[7:4] >= ISRV[7:4] else ISRV & 0xF0, where
    ISRV is the highest in-service vector (0 if none)."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    s = LapicState(cpu.get_lapic())
    s.isr = isr
    s["TPR"] = tpr
    cpu.set_lapic(bytes(s))
    isrv = max(isr) if isr else 0
    expect = tpr if (tpr & 0xF0) >= (isrv & 0xF0) else isrv & 0xF0
    assert cpu.mmio_read(A.APIC_PROCPRI) == expect


@SETTINGS
@given(offset=st.integers(0, 0xFFF), size=st.sampled_from([1, 2, 4, 8]),
       value=st.integers(0, (1 << 64) - 1), x2apic=st.booleans())
def test_any_guest_mmio_access_is_safe(offset, size, value, x2apic):
    """No guest MMIO access to any offset, size and value raises anything (KVM drops or
    ignores what it does not handle); the APIC stays usable."""
    vm = make_vm(2)
    cpu = vm.vcpus[0]
    if x2apic:
        to_x2apic(cpu)
    offset -= offset % size
    if offset + size > 0x1000:
        offset = 0x1000 - size
    cpu.mmio_write(offset, value & ((1 << (8 * size)) - 1), size)
    cpu.mmio_read(offset, size)
    cpu.take_interrupts()
    vm.vcpus[1].take_interrupts()
    cpu.get_lapic()


@SETTINGS
@given(msr=st.integers(0x800, 0x8FF), value=st.integers(0, (1 << 64) - 1))
def test_any_x2apic_msr_write_faults_or_succeeds(msr, value):
    """Every x2APIC WRMSR either succeeds or raises GuestFault(13) — nothing else."""
    vm = make_vm(2)
    cpu = vm.vcpus[0]
    to_x2apic(cpu)
    try:
        cpu.wrmsr(msr, value)
    except apicv.GuestFault as e:
        assert e.vector == 13
    try:
        cpu.rdmsr(msr)
    except apicv.GuestFault as e:
        assert e.vector == 13
    cpu.take_interrupts()


@SETTINGS
@given(batches=st.lists(st.lists(vectors, min_size=1, max_size=12), min_size=1, max_size=4))
def test_interrupts_taken_once_in_priority_order(batches):
    """IRR is a set: vectors sent while pending coalesce; with TPR 0 and EOIs, each batch is
    taken highest vector first, each vector exactly once, nothing lost."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    for batch in batches:
        for v in batch:
            assert vm.signal_msi(*msi(0, v)) == 1
        assert cpu.take_interrupts() == sorted(set(batch), reverse=True)
    assert LapicState(cpu.get_lapic()).irr == 0


@SETTINGS
@given(page=st.binary(min_size=1024, max_size=1024))
def test_set_get_lapic_keeps_everything_but_the_fixups(page):
    """kvm_apic_set_state copies the page verbatim; KVM_GET_LAPIC then differs only in LVR
    (recomputed), PPR (recomputed), TMCCT (the live count) and TMICT, which apic_update_lvtt
    zeroes when the restored LVTT crosses into or out of TSC-deadline mode (#53)."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    cpu.set_lapic(page)
    back = LapicState(cpu.get_lapic())
    sent = LapicState(page)
    crossed = (sent["LVTT"] >> 17) & 3 == 2  # the vCPU was in one-shot mode before
    for off in range(0, 0x400, 4):
        if off in (A.APIC_LVR, A.APIC_PROCPRI, A.APIC_TMCCT):
            continue
        if off == A.APIC_TMICT and crossed:
            assert back[off] == 0
            continue
        assert back[off] == sent[off], hex(off)
    assert back["LVR"] == 0x50014


@SETTINGS
@given(ids=st.lists(st.integers(0, 15), min_size=2, max_size=6, unique=True),
       dest=st.integers(0, 0xFF), logical=st.booleans(), cluster=st.booleans(),
       ldrs=st.lists(st.integers(0, 0xFF), min_size=6, max_size=6))
def test_fast_path_equals_slow_path_for_fixed(ids, dest, logical, cluster, ldrs):
    """kvm_irq_delivery_to_apic_fast and the slow path agree for fixed interrupts whenever the
    optimized map can answer (valid flat/cluster setups, unique IDs)."""
    vm = make_vm(len(ids))
    for cpu, i, ldr in zip(vm.vcpus, ids, ldrs, strict=False):
        cpu.mmio_write(A.APIC_ID, i << 24)
        if cluster:
            cpu.mmio_write(A.APIC_DFR, 0x0FFFFFFF)
        cpu.mmio_write(A.APIC_LDR, ldr << 24)
    dm = A.APIC_DEST_LOGICAL if logical else A.APIC_DEST_PHYSICAL
    slow = {c.vcpu_id for c in vm.vcpus
            if c.apic.hw_enabled and kvm_apic_match_dest(vm.kvm, c.apic, None, 0, dest, dm)}
    before = [LapicState(c.get_lapic()).irr for c in vm.vcpus]
    try:
        n = vm.signal_msi(*msi(dest, 0x41, logical=logical))
    except apicv.KvmError as e:
        assert e.errno == apicv.EPERM
        n = 0
    after = [LapicState(c.get_lapic()).irr for c in vm.vcpus]
    got = {c.vcpu_id for c, b, a in zip(vm.vcpus, before, after, strict=True) if a != b}
    if vm.apic_map is not None and vm.apic_map.logical_mode in (1, 2, 0):
        assert got == slow
    assert n == len(got)
