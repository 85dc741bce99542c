"""The model against the real KVM of this machine: the example corpus, a fixed-seed fuzz run
(300 cases), and KVM_GET_LAPIC pages moving between the backends. Skipped, with the reason,
only where /dev/kvm cannot be used."""

from __future__ import annotations

import glob
import os

import pytest

import apicv
from apicv.kvm import kvm_available

OK, WHY = kvm_available()
pytestmark = pytest.mark.skipif(not OK, reason=f"real-KVM crosscheck skipped: {WHY}")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.toml")))


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_agrees_with_real_kvm(path):
    """Every example scenario: model and KVM agree after every step (or stop at a named host
    difference, which must be one of the documented ones)."""
    from apicv.crosscheck import HOST_DIFFERENCES, Crosscheck, format_report
    from apicv.scenario import load

    res = Crosscheck(load(path)).run()
    assert res.error is None, res.error
    assert res.disagreement is None, "\n".join(format_report(res))
    if res.stopped:
        assert any(f"({k})" in res.stopped for k in HOST_DIFFERENCES)


def test_demo_agrees_with_real_kvm():
    from importlib import resources

    from apicv.crosscheck import Crosscheck, format_report
    from apicv.scenario import parse

    sc = parse(resources.files("apicv").joinpath("data/demo.toml").read_text(), "demo.toml")
    res = Crosscheck(sc).run()
    assert res.disagreement is None, "\n".join(format_report(res))
    assert res.steps_compared >= 20


def test_fixed_seed_fuzz_300_cases(tmp_path):
    """300 random scenarios (hypothesis, fixed seed) agree with the real KVM."""
    from apicv.fuzz import fuzz

    out = tmp_path / "disagreement.toml"
    lines: list[str] = []

    class Sink:
        def print(self, text: str = "", style=None) -> None:
            lines.append(text)

    status = fuzz(seed=2026, count=300, max_steps=20, out_path=str(out), out=Sink(),
                  quiet=True)
    report = "\n".join(lines)
    assert status == 0, report + ("\n" + out.read_text() if out.exists() else "")
    assert "300 cases" in report


def test_real_kvm_state_loads_into_model_and_back():
    """A KVM_GET_LAPIC page taken from a real VM loads into the model (KVM_SET_LAPIC) and the
    model gives the same page back (TMCCT 0: no timer running)."""
    with apicv.Vm(2, backend="kvm") as kvm_vm:
        cpu = kvm_vm.vcpus[0]
        cpu.mmio_write(0xF0, 0x1FF)
        cpu.mmio_write(0x80, 0x30)
        cpu.mmio_write(0xD0, 0x04000000)
        kvm_vm.signal_msi(0xFEE00000, 0, 0x8051)
        real = cpu.get_lapic()
    model = apicv.Vm(2)
    m = model.vcpus[0]
    m.set_lapic(real)
    assert m.get_lapic() == real
    m.mmio_read(0xA0)  # the guest reads PPR: recomputed as KVM does
    assert m.take_interrupts() == [0x51]


def test_host_difference_probe_runs():
    from apicv.crosscheck import HOST_DIFFERENCES, probe_host

    found = probe_host()
    assert set(found) <= set(HOST_DIFFERENCES)
    assert isinstance(found["H1"], bool)
