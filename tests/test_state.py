"""KVM_GET_LAPIC / KVM_SET_LAPIC (kvm_apic_get_state, kvm_apic_set_state,
kvm_apic_state_fixup) and the userspace view of the page. Numbers refer to
selftests_behaviours.md."""

from __future__ import annotations

import pytest
from conftest import make_vm, msi, to_x2apic

import apicv
from apicv import apicdef as A
from apicv.errors import StateError
from apicv.state import LapicState, diff

U32 = apicv.KVM_X2APIC_API_USE_32BIT_IDS


def test_roundtrip_is_byte_exact_including_reserved_bytes():
    """#45: the page is copied verbatim (reserved bytes too) except the documented fix-ups."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    s = LapicState(cpu.get_lapic())
    s.data[0x24] = 0xAB  # reserved bytes after ID
    s.data[0x3FF] = 0xCD
    s["ESR"] = 0x40  # KVM takes ESR as given
    s.irr = [0x30, 0xFF]
    s.isr = [0x20]
    s.tmr = [0x30]
    cpu.set_lapic(bytes(s))
    back = LapicState(cpu.get_lapic())
    assert back.data[0x24] == 0xAB and back.data[0x3FF] == 0xCD
    assert back["ESR"] == 0x40 and cpu.mmio_read(A.APIC_ESR) == 0x40
    assert back.irr == s.irr and back.isr == s.isr and back.tmr == s.tmr


def test_lvr_recomputed_and_no_lvt_masking():
    """#45: LVR is recomputed (the user value is overwritten); LVTs and SPIV are not masked."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    s = LapicState(cpu.get_lapic())
    s["LVR"] = 0x12345678
    s["LVTERR"] = 0xFFFFFFFF
    s["SPIV"] = 0xFFFFFFFF
    cpu.set_lapic(bytes(s))
    back = LapicState(cpu.get_lapic())
    assert back["LVR"] == 0x50014
    assert back["LVTERR"] == 0xFFFFFFFF and back["SPIV"] == 0xFFFFFFFF


def test_x2apic_id_legacy_vs_32bit_format():
    """#12: in x2APIC mode KVM_GET_LAPIC reports ID = vcpu_id << 24 without USE_32BIT_IDS and
    ID = vcpu_id with it (seen: 0x02000000 vs 0x2 for vCPU 2)."""
    for flags, expect in ((0, 0x02000000), (U32, 0x2)):
        vm = make_vm(3, flags)
        cpu = vm.vcpus[2]
        to_x2apic(cpu)
        assert LapicState(cpu.get_lapic())["ID"] == expect


def test_x2apic_set_legacy_ignores_id_32bit_rejects_mismatch():
    """#13: legacy format: KVM_SET_LAPIC ignores the ID (always succeeds, reads back
    vcpu_id << 24); 32-bit IDs: an ID != vcpu_id fails with EINVAL."""
    vm = make_vm(3)
    cpu = vm.vcpus[2]
    to_x2apic(cpu)
    s = LapicState(cpu.get_lapic())
    for i in range(256):
        s["ID"] = i << 24
        cpu.set_lapic(bytes(s))
        assert LapicState(cpu.get_lapic())["ID"] == 2 << 24
    vm = make_vm(3, U32)
    cpu = vm.vcpus[2]
    to_x2apic(cpu)
    s = LapicState(cpu.get_lapic())
    s["ID"] = 3
    with pytest.raises(apicv.KvmError) as e:
        cpu.set_lapic(bytes(s))
    assert e.value.errno == apicv.EINVAL
    s["ID"] = 2
    cpu.set_lapic(bytes(s))


def test_failed_set_lapic_has_already_applied_spiv():
    """kvm_apic_set_state applies SPIV (apic_set_spiv) before kvm_apic_state_fixup can fail, so
    an EINVAL restore still leaves the new software-enable state."""
    vm = make_vm(1, U32)
    cpu = vm.vcpus[0]
    to_x2apic(cpu)
    s = LapicState(cpu.get_lapic())
    s["ID"] = 7
    s["SPIV"] = 0xFF
    with pytest.raises(apicv.KvmError):
        cpu.set_lapic(bytes(s))
    assert cpu.rdmsr(0x80F) == 0xFF
    assert vm.signal_msi(*msi(0, 0x41)) == 0  # software-disabled now


def test_x2apic_set_forces_ldr():
    """#14: in x2APIC mode KVM_SET_LAPIC overwrites LDR with the derived value (0x1234 -> 0x4
    for vCPU 2)."""
    vm = make_vm(3)
    cpu = vm.vcpus[2]
    to_x2apic(cpu)
    s = LapicState(cpu.get_lapic())
    s["LDR"] = 0x1234
    cpu.set_lapic(bytes(s))
    assert LapicState(cpu.get_lapic())["LDR"] == 0x4


def test_x2apic_icr_split_and_merged():
    """#15: the 64-bit x2APIC ICR is exchanged split (0x300 low, 0x310 high); KVM_SET_LAPIC
    merges them; the internal high half at 0x304 shows in the page on VMX."""
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    to_x2apic(cpu)
    s = LapicState(cpu.get_lapic())
    s["ICR"] = 0x000400FE
    s["ICR2"] = 0xDEAD
    cpu.set_lapic(bytes(s))
    assert cpu.rdmsr(0x830) == (0xDEAD << 32) | 0x400FE
    back = LapicState(cpu.get_lapic())
    assert back["ICR2"] == 0xDEAD and back[0x304] == 0xDEAD


def test_set_lapic_all_zero_on_x2apic_vcpu_accepted():
    """recalc_apic_map_test: an all-zero KVM_SET_LAPIC on an x2APIC vCPU is accepted (legacy
    ID format); the software-disabled state makes the vCPU drop fixed interrupts."""
    vm = make_vm(2)
    cpu = vm.vcpus[0]
    to_x2apic(cpu)
    cpu.set_lapic(bytes(1024))
    assert vm.signal_msi(*msi(0, 0x41)) == 0


def test_set_lapic_wrong_size_is_an_error():
    vm = make_vm(1)
    with pytest.raises(ValueError):
        vm.vcpus[0].set_lapic(bytes(100))


def test_set_lapic_resets_arb_prio_and_recalculates_map():
    """kvm_apic_set_state: apic_arb_prio = 0; the map is marked dirty and rebuilt (a restored
    xAPIC ID takes effect for routing)."""
    vm = make_vm(2)
    cpu = vm.vcpus[1]
    cpu.arch.apic_arb_prio = 5
    s = LapicState(cpu.get_lapic())
    s["ID"] = 0x07000000
    cpu.set_lapic(bytes(s))
    assert cpu.arch.apic_arb_prio == 0
    assert vm.signal_msi(*msi(7, 0x41)) == 1
    assert vm.signal_msi(*msi(1, 0x41)) == 0


# ------------------------------------------------------------------ files, decode, diff
def test_state_file_errors(tmp_path):
    bad = tmp_path / "short.bin"
    bad.write_bytes(b"\0" * 100)
    with pytest.raises(StateError, match="exactly 1024"):
        LapicState.load(str(bad))
    with pytest.raises(StateError, match="cannot read"):
        LapicState.load(str(tmp_path / "missing.bin"))


def test_decode_and_diff():
    vm = make_vm(1)
    cpu = vm.vcpus[0]
    a = LapicState(cpu.get_lapic())
    vm.signal_msi(*msi(0, 0x41))
    cpu.mmio_write(A.APIC_TASKPRI, 0x10)
    b = LapicState(cpu.get_lapic())
    d = {x.name: x for x in diff(a, b)}
    assert set(d) == {"IRR", "TPR", "PPR"}
    assert "only in B: 0x41" in d["IRR"].detail
    rows = {r.reg.short: r for r in b.decode()}
    assert rows["IRR0"].fields_text() == "vectors=[0x41]" and rows["IRR0"].value == 1 << 0x41
    assert rows["SVR"].fields_text() == ("vector=0xff apic_enabled=1 focus_disabled=0 "
                                         "directed_eoi=0")
