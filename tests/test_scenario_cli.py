"""Scenario files and the command line: every example runs as written, bad input is a readable
error naming file, step and field, and the CLI never shows a traceback."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from apicv import ScenarioError
from apicv.cli import main
from apicv.scenario import Runner, load, parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.toml")))


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_examples_run_as_expected(path):
    sc = load(path)
    vm = sc.make_vm()
    failures = [o for o in Runner(sc, vm).run() if o.failure]
    assert not failures, [(o.step.index, o.failure) for o in failures]


BAD = [
    ("[vm]\nvcpus = 'two'\n", None, "vm.vcpus", "integer"),
    ("[vm]\nfoo = 1\n", None, "vm.foo", "unknown VM option"),
    ("[[step]]\nvcpu = 0\n", 1, "do", "missing"),
    ("[[step]]\ndo = 'frobnicate'\n", 1, "do", "unknown operation"),
    ("[[step]]\ndo = 'mmio_read'\nvcpu = 0\n", 1, "offset", "missing"),
    ("[[step]]\ndo = 'mmio_read'\nvcpu = 0\noffset = 'NOPE'\n", 1, "offset", "integer"),
    ("[[step]]\ndo = 'mmio_read'\nvcpu = 3\noffset = 'TPR'\n", 1, "vcpu", "no vCPU 3"),
    ("[[step]]\ndo = 'mmio_read'\nvcpu = 0\noffset = 'TPR'\nbogus = 1\n", 1, "bogus",
     "unknown field"),
    ("[[step]]\ndo = 'advance'\nns = 1\n[[step]]\ndo = 'set_lapic'\nvcpu = 0\n", 2, "from",
     "exactly one"),
    ("[[step]]\ndo = 'get_lapic'\nvcpu = 0\nexpect = { XYZ = 1 }\n", 1, "expect.XYZ",
     "unknown register"),
    ("[[step]]\ndo = 'set_mp_state'\nvcpu = 0\nstate = 'SLEEPY'\n", 1, "state", "integer"),
    ("this is = = not toml", None, None, "not valid TOML"),
]


@pytest.mark.parametrize("text,step,field,msg", BAD)
def test_bad_scenarios_name_file_step_field(text, step, field, msg):
    with pytest.raises(ScenarioError) as e:
        parse(text, "bad.toml")
    err = e.value
    assert err.file == "bad.toml" and err.step == step and err.field == field
    assert msg in str(err)


def test_set_lapic_from_unknown_name_is_a_scenario_error():
    """Found when the file is checked, before any step runs (issue 12)."""
    with pytest.raises(ScenarioError, match="no state saved") as e:
        parse("[[step]]\ndo = 'set_lapic'\nvcpu = 0\nfrom = 'nothing'\n", "x.toml")
    assert (e.value.step, e.value.field) == (1, "from")


def test_expectation_failure_reported():
    sc = parse("[[step]]\ndo = 'mmio_read'\nvcpu = 0\noffset = 'LVR'\nexpect = 1\n", "x.toml")
    (o,) = list(Runner(sc, sc.make_vm()).run())
    assert o.failure == "returned 0x50014, expected 0x1"


def test_cli_run_ok_and_failing(tmp_path, capsys):
    assert main(["--plain", "run", EXAMPLES[0]]) == 0
    bad = tmp_path / "fail.toml"
    bad.write_text("[[step]]\ndo = 'mmio_read'\nvcpu = 0\noffset = 'LVR'\nexpect = 1\n")
    assert main(["--plain", "run", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "1 step(s) failed" in out


@pytest.mark.parametrize("args,needle", [
    (["run", "/nonexistent.toml"], "cannot read"),
    (["state", "decode", "/nonexistent.bin"], "cannot read"),
])
def test_cli_errors_are_one_line(args, needle, capsys):
    assert main(["--plain", *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_cli_state_decode_and_diff(tmp_path, capsys):
    import apicv

    vm = apicv.Vm(1)
    a = tmp_path / "a.bin"
    b = tmp_path / "b.bin"
    a.write_bytes(vm.vcpus[0].get_lapic())
    vm.vcpus[0].mmio_write(0xF0, 0x1FF)
    vm.signal_msi(0xFEE00000, 0, 0x41)
    b.write_bytes(vm.vcpus[0].get_lapic())
    assert main(["--plain", "state", "decode", str(b)]) == 0
    out = capsys.readouterr().out
    assert "vectors=[0x41]" in out and "0x00050014" in out
    assert main(["--plain", "state", "diff", str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "only in B: 0x41" in out and "apic_enabled: 0 -> 1" in out
    assert main(["--plain", "state", "diff", str(a), str(a)]) == 0
    short = tmp_path / "short.bin"
    short.write_bytes(b"x" * 10)
    assert main(["--plain", "state", "decode", str(short)]) == 2
    assert "exactly 1024" in capsys.readouterr().err


def test_cli_demo_and_trace_out(tmp_path, capsys):
    out_json = tmp_path / "t.json"
    assert main(["--plain", "demo", "--trace-out", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "all as expected" in out
    assert "kvm_apic_ipi: dst 0 vec 0 (INIT|physical|assert|edge|all-but-self)" in out
    doc = json.loads(out_json.read_text())
    names = {e["name"] for e in doc["traceEvents"]}
    assert "thread_name" in names and "kvm_apic_accept_irq" in names
    assert any(e["ph"] == "C" for e in doc["traceEvents"])
    assert "VM exits for the same guest work" in out and "APICv off" in out


def test_demo_exit_table_shows_what_apicv_saves():
    """The demo's guest work, counted by VMX exit reason with APICv on and off: posted
    interrupts remove the kick (EXTERNAL_INTERRUPT) of the vCPU in guest mode and every
    interrupt window; APIC-register virtualization turns the xAPIC accesses that exit without
    it (APIC_ACCESS) into trap-like APIC_WRITE exits, except the TMCCT read, which is never
    virtualized; the HLT exits either way."""
    from importlib import resources

    from apicv.cli import exit_comparison
    from apicv.scenario import parse

    sc = parse(resources.files("apicv").joinpath("data/demo.toml").read_text(), "demo.toml")
    headers, rows = exit_comparison(sc)
    table = {r[0]: (int(r[2]), int(r[3])) for r in rows}
    assert table["EXTERNAL_INTERRUPT"] == (0, 1)
    assert table["INTERRUPT_WINDOW"][0] == 0 and table["INTERRUPT_WINDOW"][1] > 0
    assert table["APIC_ACCESS"][0] == 1  # mmio_read TMCCT
    assert table["APIC_WRITE"][1] == 0  # no APIC-write exits without APICv
    assert table["HLT"] == (1, 1)
    assert table["total"][0] < table["total"][1]


def test_console_script_installed():
    """The `apicv` entry point runs from the virtual environment."""
    exe = os.path.join(os.path.dirname(sys.executable), "apicv")
    if not os.path.exists(exe):
        pytest.skip("apicv console script not installed in this environment")
    r = subprocess.run([exe, "--plain", "run", EXAMPLES[0]], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("step, field", [
    ('do = "set_lapic"\nvcpu = 0\nfrom = "x"\npatch = { TPR = 0x1ffffffff }', "patch.TPR"),
    ('do = "signal_msi"\naddress_lo = 0x1fee00000\ndata = 0x41', "address_lo"),
    ('do = "irq_line"\nirq = 0x100000000\nlevel = 1', "irq"),
    ('do = "set_or_clear_apicv_inhibit"\nreason = "NOPE"\nset = true', "reason"),
    ('do = "advance"\nns = 0x7fffffffffffffff', "ns"),
    ('do = "mmio_write"\nvcpu = 0\noffset = "SPIV"\nvalue = 1\nsize = 3', "size"),
    ('do = "set_gsi_routing"\nroutes = [{ gsi = 1, irqchip = "IOAPIC" }]', "routes[0]"),
])
def test_bad_values_are_found_when_the_file_is_parsed(step, field):
    """The whole file is validated before any step runs (issue 12): a value that does not fit
    its UAPI field, an inhibit reason KVM does not have, a time step the real backend would
    sleep for centuries -- each names the step and the field."""
    text = '[[step]]\ndo = "nmi"\nvcpu = 0\n\n[[step]]\n' + step + "\n"
    with pytest.raises(ScenarioError) as ei:
        parse(text, "bad.toml")
    assert ei.value.step == 2 and ei.value.field.startswith(field), str(ei.value)
