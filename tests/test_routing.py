"""Acceptance (__apic_accept_irq) and routing (kvm_irq_delivery_to_apic, the optimized map,
kvm_apic_match_dest, MSI decoding). Numbers refer to selftests_behaviours.md."""

from __future__ import annotations

import pytest
from conftest import make_vm, msi, to_x2apic

import apicv
from apicv import apicdef as A
from apicv.kvm_host import ApicvInhibit, LogicalMode
from apicv.state import LapicState

U32 = apicv.KVM_X2APIC_API_USE_32BIT_IDS
NOQUIRK = apicv.KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK


def irr(cpu) -> int:
    return LapicState(cpu.get_lapic()).irr


def irrs(vm) -> list[int]:
    return [irr(c) for c in vm.vcpus]


# ------------------------------------------------------------------ acceptance
def test_fixed_to_software_disabled_apic_discarded_nmi_init_accepted():
    """#26: fixed/lowest-priority to a software-disabled APIC are discarded (KVM_SIGNAL_MSI
    returns 0, 1 after SPIV 0x1FF); NMI, INIT and SIPI do not check the enable bits."""
    vm = make_vm(1, enable=False)
    cpu = vm.vcpus[0]
    assert vm.signal_msi(*msi(0, 0x41)) == 0
    assert vm.signal_msi(*msi(0, 0x41, dm=1)) == 0
    assert vm.signal_msi(*msi(0, 0, dm=4)) == 1  # NMI
    assert cpu.run() == [2]
    cpu.mmio_write(A.APIC_SPIV, 0x1FF)
    assert vm.signal_msi(*msi(0, 0x41)) == 1


def test_msi_count_and_repeat():
    """#31: KVM_SIGNAL_MSI returns how many APICs accepted it (0 for an unknown ID); resending
    a vector already pending still returns 1."""
    vm = make_vm(2)
    assert vm.signal_msi(*msi(1, 0x41)) == 1
    assert vm.signal_msi(*msi(1, 0x41)) == 1
    assert vm.signal_msi(*msi(9, 0x41)) == 0
    assert irrs(vm) == [0, 1 << 0x41]


def test_msi_trigger_sets_tmr_level_bit_ignored():
    """#32: MSI data bit 15 (trigger) sets the TMR bit; bit 14 (level) is ignored: data 0x8043
    sets IRR and TMR; an edge MSI of the same vector clears TMR again."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    assert vm.signal_msi(0xFEE00000, 0, 0x8043) == 1
    s = LapicState(cpu.get_lapic())
    assert s.irr == s.tmr == 1 << 0x43
    vm.signal_msi(0xFEE00000, 0, 0x43)
    assert LapicState(cpu.get_lapic()).tmr == 0


def test_level_triggered_deassert_fixed_ipi_dropped():
    """__apic_accept_irq: a fixed level-triggered de-assert (trig && !level) is dropped."""
    vm = make_vm(2)
    vm.vcpus[0].mmio_write(A.APIC_ICR2, 1 << 24)
    vm.vcpus[0].mmio_write(A.APIC_ICR, 0x8041)  # level, de-assert
    assert irr(vm.vcpus[1]) == 0
    vm.vcpus[0].mmio_write(A.APIC_ICR, 0xC041)  # level, assert
    s = LapicState(vm.vcpus[1].get_lapic())
    assert s.irr == s.tmr == 1 << 0x41


def test_low_vectors_are_accepted():
    """#25: vectors 0-15 still set IRR (KVM does no illegal-vector check)."""
    vm = make_vm(1)
    for v in (0, 1, 15):
        assert vm.signal_msi(*msi(0, v)) == 1
    assert irr(vm.vcpus[0]) == (1 << 0) | (1 << 1) | (1 << 15)


def test_extint_delivery_mode_not_accepted():
    """__apic_accept_irq: APIC_DM_EXTINT is a no-op returning 0."""
    vm = make_vm(1)
    assert vm.signal_msi(*msi(0, 0x30, dm=7)) == 0


# ------------------------------------------------------------------ physical destinations
def test_ipi_to_nonexistent_id_does_nothing():
    """#23: an IPI in any delivery mode to a non-existent APIC ID changes nothing."""
    vm = make_vm(2)
    before = [c.get_lapic() for c in vm.vcpus]
    vm.vcpus[0].mmio_write(A.APIC_ICR2, 0x7 << 24)
    for dm in range(8):
        vm.vcpus[0].mmio_write(A.APIC_ICR, 0x40FF | (dm << 8))
    after = [c.get_lapic() for c in vm.vcpus]
    assert [LapicState(b).irr for b in before] == [LapicState(a).irr for a in after]
    assert [c.get_mp_state() for c in vm.vcpus] == [0, 0]


def test_allbut_with_single_vcpu_does_nothing():
    """#23: ALLBUT with no other vCPU."""
    vm = make_vm(1)
    vm.vcpus[0].mmio_write(A.APIC_ICR, 0xC4041)
    assert irr(vm.vcpus[0]) == 0


def test_shorthands():
    """#2.2 shorthands: SELF = source only, ALLINC = all, ALLBUT = all but the source."""
    vm = make_vm(3)
    src = vm.vcpus[1]
    src.mmio_write(A.APIC_ICR, 0x44041)
    assert irrs(vm) == [0, 1 << 0x41, 0]
    src.mmio_write(A.APIC_ICR, 0x84042)
    assert irrs(vm) == [1 << 0x42, (1 << 0x41) | (1 << 0x42), 1 << 0x42]
    src.mmio_write(A.APIC_ICR, 0xC4043)
    assert irrs(vm) == [3 << 0x42, 3 << 0x41, 3 << 0x42]


def test_aliased_xapic_ids_slow_path_delivers_to_both():
    """#59: aliased physical IDs (no 32-bit IDs) drop the optimized map (PHYSICAL_ID_ALIASED,
    APIC_ID_MODIFIED) but delivery still reaches every APIC with that ID."""
    vm = make_vm(3, enable_apicv=True)
    vm.vcpus[2].mmio_write(A.APIC_ID, 1 << 24)
    assert vm.apic_map is None
    assert vm.apicv_inhibits & (1 << ApicvInhibit.PHYSICAL_ID_ALIASED)
    assert vm.apicv_inhibits & (1 << ApicvInhibit.APIC_ID_MODIFIED)
    assert vm.signal_msi(*msi(1, 0x41)) == 2
    assert irrs(vm) == [0, 1 << 0x41, 1 << 0x41]
    vm.vcpus[2].mmio_write(A.APIC_ID, 2 << 24)
    assert vm.apic_map is not None
    assert not vm.apicv_inhibits & (1 << ApicvInhibit.PHYSICAL_ID_ALIASED)
    assert not vm.apicv_inhibits & (1 << ApicvInhibit.APIC_ID_MODIFIED)


def test_32bit_ids_alias_first_vcpu_wins():
    """kvm_recalculate_phys_map with x2apic_format: an aliased xAPIC ID keeps the first vCPU
    in the optimized map (documented in errata.rst)."""
    vm = make_vm(3, U32)
    vm.vcpus[2].mmio_write(A.APIC_ID, 1 << 24)
    assert vm.apic_map is not None and vm.apic_map.phys_map[1] is vm.vcpus[1].apic
    assert vm.signal_msi(*msi(1, 0x41)) == 1
    assert irrs(vm) == [0, 1 << 0x41, 0]


def test_hotplug_hack_32bit_ids_reach_xapic_vcpu():
    """#30: with 32-bit IDs a physical destination > 0xFF matches a vCPU by its x2APIC ID even
    while it is in xAPIC mode."""
    vm = make_vm(1, U32 | NOQUIRK, vcpu_ids=[300])
    cpu = vm.vcpus[0]
    assert not cpu.apic.x2apic
    assert vm.signal_msi(*msi(300, 0x41)) == 1
    assert irr(cpu) == 1 << 0x41


def test_msi_address_hi_needs_32bit_ids():
    """#33: address_hi bits 31:8 are destination bits 31:8 only with USE_32BIT_IDS (otherwise
    ignored); with them, address_hi bits 7:0 != 0 make the route invalid (EINVAL)."""
    vm = make_vm(1, vcpu_ids=[0x101])  # xAPIC ID = (u8)0x101 = 1
    assert vm.signal_msi(0xFEE01000, 0x200, 0x41) == 1  # dest 1: address_hi ignored
    vm = make_vm(1, U32 | NOQUIRK, vcpu_ids=[0x101])
    assert vm.signal_msi(0xFEE01000, 0x200, 0x41) == 0  # dest 0x201: nobody
    assert vm.signal_msi(0xFEE01000, 0x100, 0x42) == 1  # dest 0x101: the hotplug hack
    with pytest.raises(apicv.KvmError) as e:
        vm.signal_msi(0xFEE01000, 0x101, 0x41)
    assert e.value.errno == apicv.EINVAL


def test_x2apic_api_enabled_late_does_not_refresh_map():
    """KVM_ENABLE_CAP(KVM_CAP_X2APIC_API) only sets kvm->arch.x2apic_format: the optimized map
    built before still files vCPU 0x101 under its xAPIC ID, so 0x101 finds nobody until the
    map is recalculated for another reason (here a SPIV toggle)."""
    vm = make_vm(1, vcpu_ids=[0x101])
    vm.enable_cap(apicv.KVM_CAP_X2APIC_API, U32 | NOQUIRK)
    assert vm.signal_msi(0xFEE01000, 0x100, 0x42) == 0
    cpu = vm.vcpus[0]
    cpu.mmio_write(A.APIC_SPIV, 0xFF)
    cpu.mmio_write(A.APIC_SPIV, 0x1FF)
    assert vm.signal_msi(0xFEE01000, 0x100, 0x42) == 1


def test_signal_msi_eperm_when_nothing_matches():
    """host-kvm-notes #5: KVM_SIGNAL_MSI fails with EPERM when the slow path matches no APIC
    (kvm_irq_delivery_to_apic returns -1): a broadcast with every APIC disabled."""
    vm = make_vm(2)
    for c in vm.vcpus:
        c.set_msr(0x1B, 0)
    with pytest.raises(apicv.KvmError) as e:
        vm.signal_msi(*msi(0xFF, 0x41))
    assert e.value.errno == apicv.EPERM


def test_signal_msi_bad_flags():
    vm = make_vm(1)
    with pytest.raises(apicv.KvmError) as e:
        vm.signal_msi(0xFEE00000, 0, 0x41, flags=2)
    assert e.value.errno == apicv.EINVAL


# ------------------------------------------------------------------ broadcast
def test_broadcast_xapic_and_x2apic():
    """#28: xAPIC 0xFF and x2APIC 0xFFFFFFFF are broadcast to every APIC."""
    vm = make_vm(2)
    assert vm.signal_msi(*msi(0xFF, 0x41)) == 2
    a, b = make_vm(2, U32).vcpus
    to_x2apic(a)
    to_x2apic(b)
    a.wrmsr(0x830, (0xFFFFFFFF << 32) | 0x4042)
    assert irr(a) == irr(b) == 1 << 0x42


def test_broadcast_quirk():
    """#28: unless DISABLE_BROADCAST_QUIRK, an MSI (not an IPI) to 0xFF reaches x2APIC-mode
    APICs as a broadcast; with the quirk disabled 0xFF is an ordinary x2APIC ID."""
    vm = make_vm(2)
    for c in vm.vcpus:
        to_x2apic(c)
    assert vm.signal_msi(*msi(0xFF, 0x41)) == 2
    vm2 = make_vm(2, U32 | NOQUIRK)
    for c in vm2.vcpus:
        to_x2apic(c)
    assert vm2.signal_msi(*msi(0xFF, 0x41)) == 0
    # an x2APIC IPI to 0xFF is not a broadcast even with the quirk
    vm3 = make_vm(2)
    for c in vm3.vcpus:
        to_x2apic(c)
    vm3.vcpus[0].wrmsr(0x830, (0xFF << 32) | 0x4043)
    assert irrs(vm3) == [0, 0]


# ------------------------------------------------------------------ logical destinations
def test_logical_flat():
    """#29: xAPIC flat (DFR 0xFFFFFFFF) matches LDR[31:24] & dest."""
    vm = make_vm(3)
    for i, c in enumerate(vm.vcpus):
        c.mmio_write(A.APIC_LDR, (1 << i) << 24)
    assert vm.apic_map.logical_mode == LogicalMode.XAPIC_FLAT
    assert vm.signal_msi(*msi(0x5, 0x41, logical=True)) == 2
    assert irrs(vm) == [1 << 0x41, 0, 1 << 0x41]


def test_logical_cluster():
    """#29: xAPIC cluster (DFR 0x0FFFFFFF) matches an equal high nibble and overlapping low
    nibble."""
    vm = make_vm(3)
    ldrs = [0x11, 0x12, 0x21]
    for c, ldr in zip(vm.vcpus, ldrs, strict=True):
        c.mmio_write(A.APIC_DFR, 0x0FFFFFFF)
        c.mmio_write(A.APIC_LDR, ldr << 24)
    assert vm.apic_map.logical_mode == LogicalMode.XAPIC_CLUSTER
    assert vm.signal_msi(*msi(0x13, 0x41, logical=True)) == 2
    assert irrs(vm) == [1 << 0x41, 1 << 0x41, 0]


def test_logical_x2apic_cluster():
    """#29: x2APIC logical: (LDR>>16 == dest>>16) && (LDR & dest & 0xffff)."""
    vm = make_vm(18, U32 | NOQUIRK)
    for c in vm.vcpus:
        to_x2apic(c)
    # cluster 1 = vCPUs 16, 17 -> bits 0, 1
    assert vm.signal_msi(*msi((1 << 16) | 0x3, 0x41, logical=True)) == 2
    got = irrs(vm)
    assert [i for i, v in enumerate(got) if v] == [16, 17]


def test_mixed_logical_modes_disable_map_but_deliver():
    """#59: mixed flat/cluster modes make the logical map MAP_DISABLED; delivery takes the
    slow path with the same result."""
    vm = make_vm(2)
    vm.vcpus[0].mmio_write(A.APIC_LDR, 0x01000000)
    vm.vcpus[1].mmio_write(A.APIC_DFR, 0x0FFFFFFF)
    vm.vcpus[1].mmio_write(A.APIC_LDR, 0x12000000)
    assert vm.apic_map.logical_mode == LogicalMode.MAP_DISABLED
    assert vm.signal_msi(*msi(0x01, 0x41, logical=True)) == 1  # flat 0x01 & 0x01
    assert vm.signal_msi(*msi(0x12, 0x42, logical=True)) == 1  # cluster 1, member 0x2
    assert irrs(vm) == [1 << 0x41, 1 << 0x42]


def test_other_dfr_fast_path_cluster_slow_path_nothing():
    """A DFR that is neither flat nor cluster: kvm_recalculate_logical_map files it as cluster
    (fast path delivers), while kvm_apic_match_logical_addr matches nothing (slow path: -1,
    EPERM)."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    cpu.mmio_write(A.APIC_LDR, 0x01000000)
    cpu.mmio_write(A.APIC_DFR, 0x7FFFFFFF)
    assert vm.apic_map.logical_mode == LogicalMode.XAPIC_CLUSTER
    assert vm.signal_msi(*msi(0x01, 0x41, logical=True)) == 1
    vm2 = make_vm(2)
    vm2.vcpus[0].mmio_write(A.APIC_LDR, 0x01000000)
    vm2.vcpus[0].mmio_write(A.APIC_DFR, 0x7FFFFFFF)
    vm2.vcpus[1].mmio_write(A.APIC_LDR, 0x02000000)  # flat: mixed modes, slow path only
    assert vm2.apic_map.logical_mode == LogicalMode.MAP_DISABLED
    with pytest.raises(apicv.KvmError) as e:
        vm2.signal_msi(*msi(0x01, 0x41, logical=True))
    assert e.value.errno == apicv.EPERM


# ------------------------------------------------------------------ lowest priority
def test_lowest_priority_vector_hashing():
    """#27: with vector hashing the target is the (vector % N)-th of the N candidates."""
    vm = make_vm(4)
    for i, c in enumerate(vm.vcpus):
        c.mmio_write(A.APIC_LDR, (1 << i) << 24)
    for vector in (0x40, 0x41, 0x42, 0x43, 0x47):
        before = irrs(vm)
        assert vm.signal_msi(*msi(0x0F, vector, dm=1, logical=True)) == 1
        after = irrs(vm)
        winners = [i for i in range(4) if after[i] != before[i]]
        assert winners == [vector % 4]


def test_lowest_priority_slow_path_skips_sw_disabled():
    """kvm_irq_delivery_to_apic slow path: only software-enabled matches are candidates."""
    vm = make_vm(3)
    for i, c in enumerate(vm.vcpus):
        c.mmio_write(A.APIC_LDR, (1 << i) << 24)
    vm.vcpus[1].mmio_write(A.APIC_SPIV, 0xFF)
    vm.vcpus[2].mmio_write(A.APIC_DFR, 0x0FFFFFFF)  # mixed modes -> slow path
    vm.signal_msi(*msi(0x03, 0x41, dm=1, logical=True))
    assert irrs(vm)[0] == 1 << 0x41 and irrs(vm)[1] == 0


def test_lowest_priority_arb_prio_without_hashing():
    """vector_hashing=0: the lowest apic_arb_prio wins (incremented on every LowestPrio
    acceptance), first found on ties."""
    vm = make_vm(2, vector_hashing=False)
    for i, c in enumerate(vm.vcpus):
        c.mmio_write(A.APIC_LDR, (1 << i) << 24)
    winners = []
    for vector in (0x40, 0x41, 0x42, 0x43):
        before = irrs(vm)
        vm.signal_msi(*msi(0x3, vector, dm=1, logical=True))
        after = irrs(vm)
        winners.append([i for i in range(2) if after[i] != before[i]][0])
    assert winners == [0, 1, 0, 1]


def test_physical_broadcast_lowest_prio_becomes_fixed():
    """#27: physical destination 0xFF with lowest priority is downgraded to fixed: every APIC
    gets it."""
    vm = make_vm(3)
    assert vm.signal_msi(*msi(0xFF, 0x41, dm=1)) == 3


def test_lowest_priority_never_looks_at_tpr():
    """Arbitration never looks at TPR/PPR (kvm_apic_compare_prio uses apic_arb_prio)."""
    vm = make_vm(2)
    for i, c in enumerate(vm.vcpus):
        c.mmio_write(A.APIC_LDR, (1 << i) << 24)
    vm.vcpus[0].mmio_write(A.APIC_TASKPRI, 0xF0)
    vm.signal_msi(*msi(0x3, 0x40, dm=1, logical=True))  # 0x40 % 2 = 0 -> vCPU 0
    assert irrs(vm) == [1 << 0x40, 0]


def test_newest_vcpu_missing_from_map_until_recalculated():
    """kvm_arch_vcpu_create -> kvm_vcpu_reset -> kvm_lapic_reset recalculates the map before the
    vCPU is online, and KVM_CREATE_VCPU does not recalculate it after: an NMI MSI to each APIC
    of a fresh 3-vCPU VM is accepted by [1, 1, 0] (seen on this host), and by all three once a
    KVM_SET_LAPIC marks the map dirty."""
    vm = apicv.Vm(3)
    assert [vm.signal_msi(*msi(i, 0, dm=4)) for i in range(3)] == [1, 1, 0]
    vm.vcpus[0].set_lapic(vm.vcpus[0].get_lapic())
    assert [vm.signal_msi(*msi(i, 0, dm=4)) for i in range(3)] == [1, 1, 1]
