"""apicv restore-check (apicv.restore) and the restore-side ioctls it drives: KVM_GET/SET_SREGS
(APIC part), host-initiated IA32_TSC (kvm_synchronize_tsc), IA32_TSC_DEADLINE
(kvm_set_lapic_tscdeadline_msr), KVM_SET_LAPIC (kvm_apic_set_state, before and after
9cfec6d097c6), KVM_SET_TSC_KHZ and KVM_GET/SET_CLOCK -- on the model, and on this host's KVM
where the ioctl is deterministic here. Each test names the KVM function it checks."""

from __future__ import annotations

import glob
import os

import pytest

import apicv
from apicv import apicdef as A
from apicv import restore
from apicv.cli import main
from apicv.errors import KvmError, ScenarioError
from apicv.kvm import kvm_available
from apicv.state import LapicState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "restore", "*.toml")))
KVM_OK, KVM_WHY = kvm_available()
KVM_PARAM = pytest.param("kvm", marks=[pytest.mark.kvm, pytest.mark.skipif(
    not KVM_OK, reason=f"the KVM backend cannot run here: {KVM_WHY}")])
BACKENDS = ["model", KVM_PARAM]


def ex(name: str) -> str:
    return os.path.join(ROOT, "examples", "restore", name)


def findings(res) -> list[str]:
    return [f"{f.kind}: {f.text}" for p in res.points for f in p.findings]


def notes(res) -> str:
    return "\n".join(n for p in res.points for _, ns in p.restore.steps for n in ns)


# ---------------------------------------------------------------- the examples and their verdicts
@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_verdict(path):
    """Every examples/restore file gets the verdict it declares (``expect``)."""
    rs = restore.load(path)
    assert rs.expect is not None
    assert restore.check(rs).verdict == rs.expect


def test_firecracker_deadline_before_tsc_is_lost():
    """start_sw_tscdeadline compares the deadline with the TSC at the write; kvm_synchronize_tsc
    does not re-arm the timer: the deadline written first fires 2 s late."""
    res = restore.check(restore.load(ex("firecracker_tsc_deadline_before_tsc.toml")))
    assert res.verdict == "lost"
    text = "\n".join(findings(res))
    assert "timer never fires" in text and "never wakes" in text
    assert "[restore 3] set_msr(vcpu 0, IA32_TSC_DEADLINE" in text  # the culprit
    assert "before IA32_TSC was restored" in notes(res)
    fixed = restore.check(restore.load(ex("firecracker_tsc_before_deadline.toml")),
                          every_step=True)
    assert fixed.verdict == "same"


def test_kata_msrs_before_lapic_is_lost():
    """kvm_set_lapic_tscdeadline_msr ignores the write unless LVTT is in TSC-deadline mode;
    kvm_apic_set_state (apic_update_lvtt) then leaves the deadline 0."""
    res = restore.check(restore.load(ex("kata_msrs_before_lapic.toml")))
    assert res.verdict == "lost"
    assert "ignored: LVTT is not in TSC-deadline mode" in notes(res)
    assert any("had no effect" in f for f in findings(res))
    assert restore.check(restore.load(ex("kata_lapic_before_msrs.toml")),
                         every_step=True).verdict == "same"


def test_crosvm_old_kernel_drops_the_timer_fired_in_set_lapic():
    """kvm_apic_set_state before 9cfec6d097c6: the expired one-shot fires into the PIR
    (8e6ed96cdd50) and vmx_apicv_post_state_restore clears it; resending the saved IRR does not
    help. 6.6: kept. 6.2: restarted with a whole period (late). APICv off: nothing lost."""
    rs = restore.load(ex("crosvm_set_lapic_apicv_6_5.toml"))
    res = restore.check(rs)
    assert res.verdict == "lost" and "9cfec6d097c6" in notes(res)
    assert restore.check(restore.load(ex("crosvm_set_lapic_apicv_6_5.toml")),
                         kvm_version=(6, 6)).verdict == "same"
    late = restore.check(restore.load(ex("crosvm_set_lapic_apicv_6_5.toml")),
                         kvm_version=(6, 2))
    assert late.verdict == "differs"
    assert any(f.startswith("late:") for f in findings(late))
    assert "8e6ed96cdd50" in notes(late)
    rs = restore.load(ex("crosvm_set_lapic_apicv_6_5.toml"))
    rs.workload.vm = rs.workload.vm.replace(enable_apicv=False, flexpriority=False)
    assert restore.check(rs).verdict == "same"


def test_cloud_hypervisor_apic_base_twice():
    """kvm_apic_set_base returns at once for the value the vCPU has: the second write is a
    no-op. KVM_SET_SREGS after KVM_SET_LAPIC: kvm_set_cr8 drops TPR[3:0]."""
    res = restore.check(restore.load(ex("cloud_hypervisor_apic_base_twice.toml")))
    assert res.verdict == "same" and "no-op" in notes(res)
    bad = restore.check(restore.load(ex("cloud_hypervisor_sregs_after_lapic.toml")))
    assert bad.verdict == "differs"
    assert any("TPR: saved 0x2f, restored 0x20" in f for f in findings(bad))
    assert "kvm_set_cr8" in notes(bad)


def test_recommended_order_every_step_loses_only_pending_periodic_ticks():
    """At every snapshot point the recommended order restores everything KVM_GET_* reports;
    what it loses is a periodic expiry held in lapic_timer.pending (not in KVM_GET_LAPIC)."""
    res = restore.check(restore.load(ex("recommended_order.toml")), every_step=True)
    for p in res.points:
        if p.verdict != "same":
            assert all("0xed on vCPU 1" in f.text or "vCPU 1 IRR" in f.text
                       for f in p.findings), p.findings
            assert any("periodic timer expiry was pending" in n
                       for _, ns in p.restore.steps for n in ns)
    assert sum(p.verdict == "same" for p in res.points) >= len(res.points) - 4


# ---------------------------------------------------------------- the engine
SMALL = '''
description = "t"
[vm]
vcpus = 1
[[workload]]
do = "mmio_write"
vcpu = 0
offset = "SPIV"
value = 0x1ff
[[workload]]
do = "signal_msi"
address_lo = 0xfee00000
data = 0x41
[[workload]]
do = "snapshot"
[[workload]]
do = "take_interrupts"
vcpu = 0
[[save]]
do = "get_lapic"
save = "lapic"
'''


def test_engine_verdicts():
    """No restore at all loses the pending MSI; restoring the page keeps it."""
    lost = restore.check(restore.parse(SMALL))
    assert lost.verdict == "lost"
    assert any("vector 0x41 on vCPU 0" in f for f in findings(lost))
    same = restore.check(restore.parse(SMALL + '[[restore]]\ndo = "set_lapic"\n'
                                       'state = "$lapic"\n'))
    assert same.verdict == "same"
    dup = restore.check(restore.parse(SMALL + '[[restore]]\ndo = "set_lapic"\nstate = '
                                       '"$lapic"\n[[restore]]\ndo = "resend_irr"\nstate = '
                                       '"$lapic"\n'))
    assert dup.verdict == "same"  # the vector is still in IRR: the MSI sets the same bit


@pytest.mark.parametrize("extra, field", [
    ('[[restore]]\ndo = "set_lapic"\nstate = "$nothing"\n', "restore[1]"),
    ('[[restore]]\ndo = "fly"\n', "restore[1].do"),
    ('[[restore]]\ndo = "set_msr"\nindex = "TSC"\n', "restore[1].value"),
    ('[[save]]\ndo = "get_sregs"\n', "save[2].save"),
    ('[[restore]]\ndo = "set_lapic"\nvcpu = 3\nstate = "$lapic"\n', "restore[1].vcpu"),
])
def test_engine_errors(extra, field):
    with pytest.raises(ScenarioError) as e:
        restore.check(restore.parse(SMALL + extra))
    assert field in str(e.value)


def test_no_snapshot_point_and_versions():
    with pytest.raises(ScenarioError, match="no snapshot point"):
        restore.check(restore.parse(SMALL.replace('do = "snapshot"', 'do = "run"\nvcpu = 0')))
    with pytest.raises(ScenarioError):
        restore.parse_version("3.10")
    assert restore.parse_version("6.5") == (6, 5)


def test_cli_exit_status(capsys):
    assert main(["restore-check", ex("kata_msrs_before_lapic.toml")]) == 1
    assert "verdict: lost" in capsys.readouterr().out
    assert main(["restore-check", ex("kata_lapic_before_msrs.toml")]) == 0
    assert main(["restore-check", "--kvm-version", "6.6",
                 ex("crosvm_set_lapic_apicv_6_5.toml")]) == 0
    assert main(["restore-check", "--kvm-version", "1.0", ex("kata_lapic_before_msrs.toml")]) == 2


# ---------------------------------------------------------------- the model's ioctls
def test_set_sregs_apic_base_and_cr8_model():
    """__set_sregs_common: kvm_apic_set_base(host_initiated) then kvm_set_cr8 -> TPR."""
    vm = apicv.Vm(1)
    cpu = vm.vcpus[0]
    cpu.mmio_write("SPIV", 0x1FF)
    cpu.mmio_write("TPR", 0x5A)
    assert cpu.get_sregs() == apicv.Sregs(0xFEE00900, 5)
    cpu.set_sregs(apicv.Sregs(0xFEE00D00, 3))  # to x2APIC, TPR = 0x30
    assert cpu.get_msr(A.MSR_IA32_APICBASE) == 0xFEE00D00
    assert cpu.rdmsr(0x808) == 0x30
    with pytest.raises(KvmError) as e:  # EXTD without EN: LAPIC_MODE_INVALID
        cpu.set_sregs(apicv.Sregs(0xFEE00500, 3))
    assert e.value.errno_name == "EINVAL"
    cpu.set_sregs(apicv.Sregs(0xFEE00D00, 0x10))  # reserved CR8 bits: kvm_set_cr8 fails quietly
    assert cpu.rdmsr(0x808) == 0x30
    with pytest.raises(ValueError):
        apicv.Sregs(1 << 64)


def test_kvm_synchronize_tsc_model():
    """kvm_synchronize_tsc: a user value sets the TSC; 0 and values within one second of the
    previous write's are taken as synchronization (the VM's current offset)."""
    vm = apicv.Vm(2)
    a, b = vm.vcpus
    vm.clock.advance(10**9)
    a.set_msr(A.MSR_IA32_TSC, 50 * 10**9)
    assert a.get_msr(A.MSR_IA32_TSC) == 50 * 10**9
    b.set_msr(A.MSR_IA32_TSC, 50 * 10**9 + 10**6)  # 1 ms apart: matched
    assert b.get_msr(A.MSR_IA32_TSC) == 50 * 10**9
    b.set_msr(A.MSR_IA32_TSC, 90 * 10**9)  # far apart: set
    assert b.get_msr(A.MSR_IA32_TSC) == 90 * 10**9
    b.set_msr(A.MSR_IA32_TSC, 0)  # zero: synchronize with the current offset
    assert b.get_msr(A.MSR_IA32_TSC) == 90 * 10**9


def test_tsc_deadline_rules_model():
    """kvm_set_lapic_tscdeadline_msr ignores a write outside TSC-deadline mode;
    kvm_apic_set_state -> apic_update_lvtt zeroes the deadline on a mode change; a deadline set
    against the wrong TSC keeps its hrtimer when IA32_TSC changes."""
    vm = apicv.Vm(1)
    cpu = vm.vcpus[0]
    cpu.mmio_write("SPIV", 0x1FF)
    cpu.set_msr(A.MSR_IA32_TSC_DEADLINE, 5000)
    assert cpu.get_msr(A.MSR_IA32_TSC_DEADLINE) == 0  # ignored
    cpu.mmio_write("LVTT", 0x400EC)
    cpu.set_msr(A.MSR_IA32_TSC_DEADLINE, 5000)
    assert cpu.get_msr(A.MSR_IA32_TSC_DEADLINE) == 5000
    page = LapicState(cpu.get_lapic())
    page["LVTT"] = 0xEC  # one-shot: leaving TSC-deadline mode zeroes the deadline
    cpu.set_lapic(bytes(page))
    assert cpu.get_msr(A.MSR_IA32_TSC_DEADLINE) == 0
    page["LVTT"] = 0x400EC
    cpu.set_lapic(bytes(page))
    cpu.set_msr(A.MSR_IA32_TSC_DEADLINE, 10**6)
    expires = cpu.apic.timer.expires
    cpu.set_msr(A.MSR_IA32_TSC, 10**9)
    assert cpu.apic.timer.expires == expires  # not re-armed


def test_set_lapic_pir_before_and_after_9cfec6d097c6_model():
    """kvm_apic_set_state with APICv: an expired one-shot fired inside the ioctl survives on
    6.6+ (vmx_apicv_pre_state_restore runs first) and is dropped on 6.3-6.5."""
    def restored(version):
        src = apicv.Vm(1)
        c = src.vcpus[0]
        for reg, v in (("SPIV", 0x1FF), ("TDCR", 0xB), ("LVTT", 0xEC), ("TMICT", 1000)):
            c.mmio_write(reg, v)
        src.clock.advance(5000)
        page = c.get_lapic()
        dst = apicv.Vm(1)
        dst.kvm.kvm_version = version
        d = dst.vcpus[0]
        d.set_lapic(page)
        return d.take_interrupts()

    assert restored((6, 18)) == [0xEC]
    assert restored((6, 6)) == [0xEC]
    assert restored((6, 5)) == []


def test_tsc_khz_and_clock_model():
    """KVM_SET_TSC_KHZ (kvm_set_tsc_khz: the rate changes, the offset stays), KVM_GET/SET_CLOCK
    (kvm_vm_ioctl_set_clock: kvmclock only)."""
    vm = apicv.Vm(1)
    cpu = vm.vcpus[0]
    assert cpu.get_tsc_khz() == 1_000_000
    vm.clock.advance(10**6)
    cpu.set_tsc_khz(2_000_000)
    assert cpu.get_tsc_khz() == 2_000_000 and cpu.get_msr(A.MSR_IA32_TSC) == 2 * 10**6
    cpu.set_tsc_khz(0)
    assert cpu.get_tsc_khz() == 1_000_000
    with pytest.raises(KvmError):
        cpu.set_tsc_khz(0xFFFFFFFF)
    assert vm.get_clock() == 10**6
    vm.set_clock(7 * 10**9)
    vm.clock.advance(5)
    assert vm.get_clock() == 7 * 10**9 + 5
    with pytest.raises(KvmError):
        vm.set_clock(0, flags=1)


# ---------------------------------------------------------------- both backends
@pytest.mark.parametrize("backend", BACKENDS)
def test_sregs_roundtrip_both(backend):
    """KVM_GET_SREGS / KVM_SET_SREGS: apic_base through kvm_apic_set_base, cr8 through
    kvm_set_cr8 (TPR = cr8 << 4)."""
    vm = apicv.Vm(1, backend=backend)
    try:
        cpu = vm.vcpus[0]
        cpu.mmio_write("SPIV", 0x1FF)
        cpu.mmio_write("TPR", 0x37)
        s = cpu.get_sregs()
        assert s.apic_base == 0xFEE00900 and s.cr8 == 3
        cpu.set_sregs(s.replace(cr8=2))
        assert cpu.get_sregs().cr8 == 2 and cpu.mmio_read("TPR") == 0x20
        cpu.set_sregs(s.replace(apic_base=0xFEE00D00))
        assert cpu.get_msr(A.MSR_IA32_APICBASE) == 0xFEE00D00
        with pytest.raises(KvmError):
            cpu.set_sregs(s.replace(apic_base=0xFEE00500))
    finally:
        vm.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_clock_and_tsc_khz_both(backend):
    """KVM_SET_CLOCK then KVM_GET_CLOCK (kvm_vm_ioctl_set_clock / get_kvmclock); KVM_GET_TSC_KHZ
    and KVM_SET_TSC_KHZ of the current rate (kvm_set_tsc_khz within tolerance)."""
    vm = apicv.Vm(1, backend=backend)
    try:
        vm.set_clock(10**12)
        assert 10**12 <= vm.get_clock() < 10**12 + 10**9  # wall time passes on the real backend
        cpu = vm.vcpus[0]
        khz = cpu.get_tsc_khz()
        assert khz == vm.config.tsc_khz
        cpu.set_tsc_khz(khz)
        assert cpu.get_tsc_khz() == khz
    finally:
        vm.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_restore_check_runs_on_both(backend):
    """The same save/restore sequence (LAPIC state with a pending MSI) on either backend."""
    same = restore.check(restore.parse(SMALL + '[[restore]]\ndo = "set_lapic"\n'
                                       'state = "$lapic"\n'), backend=backend)
    assert same.verdict == "same"
    lost = restore.check(restore.parse(SMALL), backend=backend)
    assert lost.verdict == "lost"
