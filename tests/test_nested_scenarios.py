"""Nested VMX in the scenario format (model only): the nested ops' parse errors name the step and
the field, the nested examples hold on the model, the version switch changes what the
stale-SVI and halted-L2 examples show, and the real backend stops at a nested step saying why."""

from __future__ import annotations

import glob
import os

import pytest

from apicv.errors import ScenarioError
from apicv.scenario import Runner, load, parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "nested_*.toml")))
SVI_BUG = os.path.join(ROOT, "examples", "nested_stale_svi_6_13.toml")
SVI_FIXED = os.path.join(ROOT, "examples", "nested_stale_svi_6_18.toml")
WAKEUP = os.path.join(ROOT, "examples", "nested_halted_l2_wakeup.toml")

ON = "[[step]]\ndo = 'enable_nested'\nvcpu = 0\n"  # step 1 of most texts below


def _run(sc):
    return list(Runner(sc, sc.make_vm()).run())


# ------------------------------------------------------------------ parse errors
BAD = [
    ("[[step]]\ndo = 'enable_nested'\nvcpu = 0\nversion = '6.12'\n", 1, "version",
     "a KVM version"),
    ("[[step]]\ndo = 'enable_nested'\nvcpu = 0\nversion = 6\n", 1, "version", "a KVM version"),
    (ON + "[[step]]\ndo = 'vmptrld'\nvcpu = 0\ncontrols = { bogus = true }\n", 2,
     "controls.bogus", "not a vmcs12 control"),
    (ON + "[[step]]\ndo = 'vmptrld'\nvcpu = 0\ncontrols = { tpr_shadow = 1 }\n", 2,
     "controls.tpr_shadow", "true or false"),
    (ON + "[[step]]\ndo = 'vmptrld'\nvcpu = 0\ncontrols = { msr_intercepts = 'EOI' }\n", 2,
     "controls.msr_intercepts", "list of MSRs"),
    (ON + "[[step]]\ndo = 'vmptrld'\nvcpu = 0\ncontrols = { msr_intercepts = ['NOPE'] }\n", 2,
     "controls.msr_intercepts", "integer or a name"),
    (ON + "[[step]]\ndo = 'vmptrld'\nvcpu = 0\ncontrols = { eoi_exit_bitmap = [300] }\n", 2,
     "controls.eoi_exit_bitmap", "out of range"),
    (ON + "[[step]]\ndo = 'vmptrld'\nvcpu = 0\ncontrols = 5\n", 2, "controls", "a table"),
    ("[[step]]\ndo = 'l2_mmio_read'\nvcpu = 0\noffset = 'TPR'\n", 1, "vcpu",
     "has no nested VMX"),
    (ON + "[[step]]\ndo = 'vmlaunch'\nvcpu = 1\n", 2, "vcpu", "no vCPU 1"),
    (ON + "[[step]]\ndo = 'l2_mmio_read'\nvcpu = 0\n", 2, "offset", "missing"),
    (ON + "[[step]]\ndo = 'l2_wrmsr'\nvcpu = 0\nindex = 'X2APIC_EOI'\nvalue = 0\nfoo = 1\n", 2,
     "foo", "unknown field"),
    (ON + "[[step]]\ndo = 'nested_exits'\nvcpu = 0\nexpect = [{ reason = 'NOPE' }]\n", 2,
     "expect[0].reason", "unknown exit reason"),
    (ON + "[[step]]\ndo = 'nested_exits'\nvcpu = 0\nexpect = [{ vector = 0x41 }]\n", 2,
     "expect[0]", "with a reason"),
    (ON + "[[step]]\ndo = 'nested_exits'\nvcpu = 0\n"
          "expect = [{ reason = 'HLT', vektor = 1 }]\n", 2, "expect[0].vektor",
     "unknown exit field"),
    (ON + "[[step]]\ndo = 'nested_exits'\nvcpu = 0\nexpect = 'HLT'\n", 2, "expect",
     "list of exit tables"),
    (ON + "[[step]]\ndo = 'level'\nvcpu = 0\nexpect = 'L3'\n", 2, "expect", "'L1', 'L2'"),
    (ON + "[[step]]\ndo = 'vmlaunch'\nvcpu = 0\nexpect = 'guest'\n", 2, "expect", "'L1', 'L2'"),
    (ON + "[[step]]\ndo = 'vmcs12'\nvcpu = 0\nexpect = { exit_reason = 1 }\n", 2,
     "expect.exit_reason", "not a vmcs12 field"),
    (ON + "[[step]]\ndo = 'guest_intr_status'\nvcpu = 0\nvmcs = 'vmcs12'\n", 2, "vmcs",
     "'vmcs01', 'vmcs02'"),
    (ON + "[[step]]\ndo = 'vmxon'\nvcpu = 0\nexpect_vmfail = 7\n", 2, "expect_vmfail",
     "only vmlaunch and vmresume"),
    (ON + "[[step]]\ndo = 'vmlaunch'\nvcpu = 0\nexpect_vmfail = 'seven'\n", 2,
     "expect_vmfail", "integer"),
    ("[vm]\nvm_type = 'tdx'\nirqchip = 'split'\n" + ON, 1, "do", "no VMX"),
]


@pytest.mark.parametrize("text,step,field,msg", BAD)
def test_nested_parse_errors_name_step_and_field(text, step, field, msg):
    with pytest.raises(ScenarioError) as e:
        parse(text, "bad.toml")
    err = e.value
    assert (err.file, err.step, err.field) == ("bad.toml", step, field), str(err)
    assert msg in str(err)


def test_versions_and_controls_parse():
    sc = parse(ON.replace("vcpu = 0\n", "vcpu = 0\nversion = '6.13'\n")
               + "[[step]]\ndo = 'vmptrld'\nvcpu = 0\ncontrols = { msr_intercepts = "
                 "['X2APIC_EOI', 0x808], eoi_exit_bitmap = [0x91], posted_intr_nv = 0xe0 }\n",
               "ok.toml")
    assert sc.steps[0].args["version"] == "6.13"
    ctl = sc.steps[1].args["controls"]
    assert ctl["msr_intercepts"] == frozenset({0x80B, 0x808})
    assert ctl["eoi_exit_bitmap"] == 1 << 0x91 and ctl["posted_intr_nv"] == 0xE0


# ------------------------------------------------------------------ outcomes of nested steps
def test_vmfail_is_a_reportable_outcome():
    """A VMLAUNCH that fails its control checks (VID without TPR shadow: error 7) is the
    step's error; expect_vmfail names the VM-instruction error."""
    base = (ON + "[[step]]\ndo = 'vmxon'\nvcpu = 0\n[[step]]\ndo = 'vmptrld'\nvcpu = 0\n"
            "controls = { virtual_intr_delivery = true }\n[[step]]\ndo = 'vmlaunch'\nvcpu = 0\n")
    *_, o = _run(parse(base + "expect_vmfail = 7\n", "x.toml"))
    assert o.failure is None and o.error.error == 7
    *_, o = _run(parse(base + "expect_vmfail = 5\n", "x.toml"))
    assert o.failure.startswith("expected VMfail with VM-instruction error 5, got VmFail: "
                                "VM-instruction error 7")
    *_, o = _run(parse(base, "x.toml"))
    assert o.failure.startswith("unexpected error: VmFail") and "TPR shadow" in o.failure
    *_, o = _run(parse(base + "expect = 'L2'\n", "x.toml"))
    assert o.failure.startswith("unexpected error: VmFail")


def test_vmx_instruction_outside_vmx_operation_is_a_ud():
    *_, o = _run(parse(ON + "[[step]]\ndo = 'vmlaunch'\nvcpu = 0\nexpect_fault = 6\n", "x.toml"))
    assert o.failure is None


def test_l2_op_while_l1_runs_is_an_error_outcome():
    out = _run(parse(ON + "[[step]]\ndo = 'vmxon'\nvcpu = 0\n"
                          "[[step]]\ndo = 'l2_take_interrupts'\nvcpu = 0\n", "x.toml"))
    assert out[-1].failure == "unexpected error: NotInL2Error: L1 is running, not L2"


def test_nested_expectation_failures_read_well():
    text = (ON + "[[step]]\ndo = 'vmxon'\nvcpu = 0\n[[step]]\ndo = 'vmptrld'\nvcpu = 0\n"
            "[[step]]\ndo = 'vmlaunch'\nvcpu = 0\nexpect = 'L1'\n"
            "[[step]]\ndo = 'nmi'\nvcpu = 0\n[[step]]\ndo = 'l2_run'\nvcpu = 0\n"
            "[[step]]\ndo = 'nested_exits'\nvcpu = 0\n"
            "expect = [{ reason = 'EXTERNAL_INTERRUPT', vector = 2 }]\n"
            "[[step]]\ndo = 'vmcs12'\nvcpu = 0\nexpect = { vm_exit_reason = 1 }\n"
            "[[step]]\ndo = 'nested_exits'\nvcpu = 0\nexpect = [{ reason = 'HLT' }]\n")
    fails = [o.failure for o in _run(parse(text, "x.toml")) if o.failure]
    assert fails == [
        "returned L2, expected L1",
        "exit 0: reason = EXCEPTION_NMI, expected EXTERNAL_INTERRUPT",
        "vm_exit_reason = 0x0, expected 0x1",
        "0 nested exits [], expected 1",
    ]


# ------------------------------------------------------------------ the examples
def test_the_nested_examples_are_there():
    names = {os.path.basename(p) for p in EXAMPLES}
    assert {"nested_external_interrupt.toml", "nested_posted_interrupt.toml",
            "nested_stale_svi_6_13.toml", "nested_stale_svi_6_18.toml",
            "nested_halted_l2_wakeup.toml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_nested_example_holds_on_the_model(path):
    """Every step runs and every expectation holds; each description cites KVM functions."""
    sc = load(path)
    out = _run(sc)
    assert len(out) == len(sc.steps) and all(o.skipped is None for o in out)
    assert not [o for o in out if o.failure], [(o.step.index, o.failure) for o in out
                                               if o.failure]
    assert "model only" in sc.description and "()" in sc.description


def _with_version(path: str, version: str):
    """The example with its enable_nested step set to *version*."""
    sc = load(path)
    [step] = [s for s in sc.steps if s.op == "enable_nested"]
    step.args["version"] = version
    return sc


def _failed_ops(sc) -> list[str]:
    return [o.step.op for o in _run(sc) if o.failure]


def test_stale_svi_examples_are_one_scenario():
    """The 6.13 and 6.18 files run the same steps; only the expectations differ."""
    bug, fixed = load(SVI_BUG), load(SVI_FIXED)
    strip = [(s.op, {k: v for k, v in s.args.items() if k != "version"}) for s in bug.steps]
    assert strip == [(s.op, {k: v for k, v in s.args.items() if k != "version"})
                     for s in fixed.steps]
    assert [s.args.get("version") for s in bug.steps if s.op == "enable_nested"] == ["6.13"]
    assert [s.args.get("version") for s in fixed.steps if s.op == "enable_nested"] == ["6.18"]


@pytest.mark.parametrize("version, stale", [("6.9", True), ("6.13", True), ("6.18", False),
                                            ("6.19", False)])
def test_version_switch_changes_the_stale_svi_outcome(version, stale):
    """b682d2fbf17c: before 6.14 vmcs01's SVI stays 0x80 after L2's EOI of L1's interrupt and
    a later 0x51 is stuck; from 6.14 the SVI update waits for vmcs01 and 0x51 is delivered."""
    bug_expectations = _failed_ops(_with_version(SVI_BUG, version))
    fixed_expectations = _failed_ops(_with_version(SVI_FIXED, version))
    changed = ["guest_intr_status", "take_interrupts", "get_lapic"]
    if stale:
        assert bug_expectations == [] and fixed_expectations == changed
    else:
        assert bug_expectations == changed and fixed_expectations == []


@pytest.mark.parametrize("version, wakes", [("6.9", False), ("6.13", True), ("6.18", True)])
def test_version_switch_changes_the_halted_l2_wakeup(version, wakes):
    """vmx_has_nested_events (6.10+): the nested posted interrupt wakes the halted L2."""
    failed = _failed_ops(_with_version(WAKEUP, version))
    assert (failed == []) is wakes
    if not wakes:
        assert failed[0] == "location"


# ------------------------------------------------------------------ the real backend
class _RealVm:
    backend = "kvm"


def test_real_backend_stops_at_a_nested_step_saying_why():
    sc = load(EXAMPLES[0])
    first = next(s for s in sc.steps if s.op == "enable_nested")
    sc.steps = sc.steps[first.index - 1:]
    (o,) = list(Runner(sc, _RealVm()).run())
    assert o.skipped.startswith("enable_nested is model-only on the kvm backend (nested VMX "
                                "runs on the model only: the real backend's guest agent "
                                "cannot act as an L1 hypervisor, and this host")
    assert o.skipped.endswith("; the run stops here")


def test_crosscheck_says_nested_scenarios_are_model_only():
    from apicv.kvm import kvm_available

    ok, why = kvm_available()
    if not ok:
        pytest.skip(f"needs the real KVM backend: {why}")
    from apicv.crosscheck import Crosscheck

    res = Crosscheck(load(os.path.join(ROOT, "examples", "nested_external_interrupt.toml"))).run()
    assert res.ok and res.steps_compared == 1
    assert res.stopped.startswith("step 2: enable_nested is model-only (nested VMX runs on the "
                                  "model only")
