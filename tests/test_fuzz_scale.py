"""Fuzz campaigns at scale (issue 16): the case list from the seed alone, the same summary on
1 and 2 worker processes, a reset VM as good as a new one, campaign directories (resume,
duration), shrinking through hypothesis, the host fingerprint, and a campaign on a local Ray
cluster equal to the single-process one. No timing assertions here (rates: make bench)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from apicv.kvm import kvm_available

ROOT = Path(__file__).resolve().parents[1]
KVM_OK, KVM_WHY = kvm_available()
needs_kvm = pytest.mark.skipif(not KVM_OK, reason=f"no usable /dev/kvm: {KVM_WHY}")


class Sink:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def print(self, text: str = "", style=None) -> None:
        self.lines.append(text)


def campaign(tmp_path: Path, name: str, **kw) -> tuple[int, dict, list[str]]:
    """Run a campaign into tmp_path/name: (status, campaign.json's summary, printed lines)."""
    from apicv.campaign import run

    sink = Sink()
    d = tmp_path / name
    kw.setdefault("out_path", None)
    status = run(out=sink, quiet=True, campaign_dir=str(d), **kw)
    return status, json.loads((d / "campaign.json").read_text())["summary"], sink.lines


def comparable(summary: dict) -> dict:
    """A summary without where its reproducers were written."""
    out = dict(summary)
    out["groups"] = {k: {f: v for f, v in g.items() if f != "file"}
                     for k, g in summary["groups"].items()}
    return out


# ---------------------------------------------------------------- the case list
def test_cases_come_from_the_seed_and_index_alone():
    from apicv.fuzz import case

    a = [case(11, i) for i in range(50)]
    b = [case(11, i) for i in reversed(range(50))][::-1]
    assert a == b
    assert case(12, 0) != case(11, 0)
    assert all(1 <= d["vm"]["vcpus"] <= 3 for d, _ in a)


def test_hypothesis_replays_a_case_from_its_choices():
    """The integers drawn are hypothesis' choice sequence for the same strategy: a case goes
    into the shrinker exactly as it was drawn."""
    from hypothesis.internal.conjecture.data import ConjectureData

    from apicv.fuzz import case, scenarios

    for i in range(40):
        doc, choices = case(5, i, 12)
        assert ConjectureData.for_choices(choices).draw(scenarios(12)) == doc


def test_shrink_is_deterministic_and_minimal():
    """A predicate (no KVM): 'some step is an NMI'. The shrunk case is the generator's
    shortest such scenario, the same every time."""
    from apicv.fuzz import case, shrink

    def has_nmi(doc):
        return any(s["do"] == "nmi" for s in doc["step"])

    i = next(i for i in range(500) if has_nmi(case(3, i, 6)[0]))
    doc, choices = case(3, i, 6)
    a = shrink(choices, 6, has_nmi)
    b = shrink(choices, 6, has_nmi)
    assert a == b and has_nmi(a)
    assert len(a["step"]) < len(doc["step"])
    assert [s["do"] for s in a["step"]][-1] == "nmi"
    assert shrink(choices, 6, lambda d: False) is None


# ---------------------------------------------------------------- reset vs a new VM
@needs_kvm
def test_a_reset_vm_gives_what_a_new_one_gives():
    """Many random cases, each on a new VM and on a VM reused from the cases before it (and
    reset): step by step the same outcomes, the same state comparison, the same result."""
    from apicv.crosscheck import Crosscheck, format_report, probe_host
    from apicv.fuzz import case
    from apicv.scenario import parse_doc
    from apicv.vmpool import VmPool

    diffs = probe_host()

    def trail(sc, vms):
        steps = []

        def on_step(rep):
            steps.append((rep.step.index, rep.model.result_text(), rep.kvm.result_text(),
                          [(m.what, m.model, m.kvm) for m in rep.mismatches],
                          [(v, [r.name for r in rows]) for v, rows in rep.state_diffs]))

        res = Crosscheck(sc, diffs, vms=vms).run(on_step)
        return steps, res.steps_compared, res.stopped, format_report(res)

    with VmPool() as pool:
        for i in range(150):
            doc, _ = case(2031, i, 16)
            sc = parse_doc(doc, f"<case {i}>")
            assert trail(sc, pool) == trail(sc, None), f"case {i}"
        # cases that create a PIT, change the routing or attach irqfds get a fresh VM
        assert pool.reused > 40


@needs_kvm
def test_reset_restores_what_userspace_can_read():
    """After a busy case, every KVM_GET_* a new VM answers is answered the same."""
    from apicv.crosscheck import Crosscheck, probe_host
    from apicv.fuzz import case
    from apicv.kvm import KvmVm
    from apicv.memory import SCRATCH_GPA, SCRATCH_SIZE
    from apicv.scenario import parse_doc
    from apicv.vmpool import VmPool

    def snapshot(vm):
        return ([(c.get_lapic(), c.get_msr(0x1B), c.peek_mp_state(), c.get_vcpu_events(),
                  c.get_msr(0x6E0), c.get_msr(0x4B564D04)) for c in vm.vcpus],
                [vm.get_irqchip(k) for k in (0, 1, 2)], vm.read_guest(SCRATCH_GPA, SCRATCH_SIZE))

    doc = next(d for d, _ in (case(9, i) for i in range(200)) if d["vm"]["vcpus"] == 3)
    sc = parse_doc(doc, "<busy>")
    with VmPool() as pool:
        Crosscheck(sc, probe_host(), vms=pool).run()
        vm = pool.acquire(sc)
        try:
            with KvmVm(sc.vm) as new:
                assert snapshot(vm) == snapshot(new)
        finally:
            pool.release(vm)


def test_what_is_reused():
    from apicv.scenario import parse_doc
    from apicv.vmpool import reusable

    def sc(*steps, **vm):
        return parse_doc({"vm": {"vcpus": 1, **vm}, "step": list(steps)}, "<t>")

    assert reusable(sc({"do": "nmi", "vcpu": 0}))
    assert reusable(sc({"do": "guest_store", "vcpu": 0, "gpa": 0x80004, "value": 1}))
    assert not reusable(sc({"do": "guest_store", "vcpu": 0, "gpa": 0x70000, "value": 1}))
    assert not reusable(sc({"do": "wrmsr", "vcpu": 0, "index": "KVM_PV_EOI_EN",
                            "value": 0x70001}))
    assert not reusable(sc({"do": "create_pit2"}))
    assert not reusable(sc({"do": "nmi", "vcpu": 0}, irqchip="split"))


# ---------------------------------------------------------------- workers, resume, duration
@needs_kvm
def test_one_and_two_workers_give_the_same_summary(tmp_path):
    s1, one, lines1 = campaign(tmp_path, "one", seed=4, count=48, max_steps=12, workers=1)
    s2, two, lines2 = campaign(tmp_path, "two", seed=4, count=48, max_steps=12, workers=2)
    assert s1 == s2
    assert comparable(one) == comparable(two)
    assert one["done"] == [[0, 48]] and one["cases"] == 48
    first = [ln.split(" compared in ")[0] for ln in (lines1[0], lines2[0])]
    assert first[0] == first[1] and first[0].startswith("fuzz: seed 4: 48 cases")
    assert any(ln.startswith("  host ") for ln in lines1)
    assert (tmp_path / "one" / "summary.txt").read_text().startswith("fuzz: seed 4:")


@needs_kvm
def test_resume_continues_where_a_campaign_stopped(tmp_path):
    from apicv.campaign import run

    _, whole, _ = campaign(tmp_path, "whole", seed=6, count=40, max_steps=10, workers=1)
    _, part, _ = campaign(tmp_path, "part", seed=6, count=16, max_steps=10, workers=1)
    assert part["done"] == [[0, 16]]
    sink = Sink()
    run(out=sink, quiet=True, out_path=None, resume=str(tmp_path / "part"), count=40,
        workers=2)
    resumed = json.loads((tmp_path / "part" / "campaign.json").read_text())["summary"]
    assert comparable(resumed) == comparable(whole)
    assert "24 cases" in sink.lines[2]  # this run: only the cases not done before


@needs_kvm
def test_a_campaign_directory_is_not_overwritten(tmp_path):
    from apicv.errors import ApicvError

    campaign(tmp_path, "c", seed=1, count=2, max_steps=4, workers=1)
    with pytest.raises(ApicvError, match="--resume"):
        campaign(tmp_path, "c", seed=1, count=2, max_steps=4, workers=1)


@needs_kvm
def test_duration_stops_starting_cases(tmp_path):
    _, s, lines = campaign(tmp_path, "d", seed=8, count=None, max_steps=8, workers=1,
                           duration=0.5)
    assert 0 < s["cases"] < 10_000
    assert s["done"] == [[0, s["cases"]]]


def test_disagreements_merge_by_host_and_field_whatever_the_order(tmp_path):
    """Records merged in any order give the same groups: one per (host, first field), its
    representative the lowest case index; each group's reproducer goes to the corpus, the
    first also to --out."""
    from apicv.campaign import CampaignDir, Spec, Summary, print_groups

    def rec(i, host, field):
        return {"index": i, "steps": 3, "fingerprint": host,
                "disagreement": {"field": field, "report": [f"case {i}"], "choices": [i]}}

    recs = [rec(9, "a", "IRR"), rec(4, "a", "IRR"), rec(5, "b", "IRR"), rec(7, "a", "TPR"),
            {"index": 1, "steps": 2, "fingerprint": "a", "stopped": "H1"}]
    sums = []
    for order in (recs, recs[::-1]):
        s = Summary(1, 20, False)
        for r in order:
            s.add(r)
        sums.append(s.to_json())
    assert sums[0] == sums[1]
    s = Summary.from_json(sums[0])
    assert s.disagreements == 4 and s.stop_reasons == {"H1": 1}
    assert {k: (g["count"], g["first"]) for k, g in s.groups.items()} == {
        "a IRR": (2, 4), "b IRR": (1, 5), "a TPR": (1, 7)}
    for g in s.groups.values():
        g.update(doc={"vm": {"vcpus": 1}, "step": [{"do": "nmi", "vcpu": 0}]}, shrunk=True)
    sink = Sink()
    out = tmp_path / "d.toml"
    print_groups(s, Spec(1, 20), str(out), CampaignDir(str(tmp_path / "c")), sink.print, False)
    assert sorted(p.name for p in (tmp_path / "c" / "corpus").iterdir()) == [
        "a-4-irr.toml", "a-7-tpr.toml", "b-5-irr.toml"]
    assert "case 4, shrunk disagreement (IRR)" in out.read_text()
    assert [ln for ln in s.report_lines() if ln.startswith("on host")] == ["on host a:",
                                                                           "on host b:"]


# ---------------------------------------------------------------- the host fingerprint
@needs_kvm
def test_host_fingerprint_names_the_host():
    from apicv.kvm.fingerprint import fingerprint_text, host_fingerprint

    fp = host_fingerprint({"H1": True, "H2": False})
    assert fp["kernel"] == os.uname().release
    assert fp["caps"]["IRQCHIP"] == 1 and "X2APIC_API" in fp["caps"]
    assert fp["differences"] == ["H1"]
    assert set(fp["resolved"]) >= {"enable_apicv", "vector_hashing"}
    assert fp == host_fingerprint({"H1": True, "H2": False})
    assert fingerprint_text(fp).startswith(fp["id"] + ": Linux " + fp["kernel"])


# ---------------------------------------------------------------- Ray
def test_cluster_without_ray_names_the_extra():
    code = ("import sys; sys.modules['ray'] = None\n"
            "from apicv.cli import main; sys.exit(main(['fuzz', '--count', '1', "
            "'--cluster', 'auto']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "pip install 'apicv[cluster]'" in err[0], r.stderr


@needs_kvm
def test_a_ray_campaign_reports_what_one_process_reports(tmp_path):
    """A local Ray cluster started here (this machine, 2 CPUs: 2 worker processes): the same
    seed gives the same summary, disagreements and all, as one process."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'apicv[cluster]')")
    kw = dict(seed=4, count=48, max_steps=12)
    _, local, _ = campaign(tmp_path, "local", workers=1, **kw)
    _, ray_, lines = campaign(tmp_path, "ray", workers=2, cluster="local", **kw)
    assert comparable(ray_) == comparable(local)
    assert "Ray cluster local: 1 node(s) with KVM, 2 CPU(s)" in lines[1]
