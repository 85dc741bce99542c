"""Nothing a user types crashes the command line (issue 12): hostile files, bad options, Ctrl-C,
a closed pipe, missing extras. Each case runs ``apicv`` as a subprocess and checks the exit
status and a one-line message, never a Python traceback."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "build" / "guests" / "bench.elf"
APICV = [sys.executable, "-m", "apicv.cli"]


def _kvm_ok() -> tuple[bool, str]:
    from apicv.kvm import kvm_available

    return kvm_available()


KVM_OK, KVM_WHY = _kvm_ok()
needs_kvm = pytest.mark.skipif(not KVM_OK, reason=f"/dev/kvm cannot run guests here: {KVM_WHY}")


def _default_sigint() -> None:
    # a shell without job control starts background jobs with SIGINT ignored, and an ignored
    # signal stays ignored across exec: the child would never see the Ctrl-C sent to it
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def apicv(*args: str, timeout: float = 120, env: dict | None = None,
          **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*APICV, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env, **kw)


def no_traceback(text: str) -> None:
    assert "Traceback" not in text and "Fatal Python error" not in text, text


def one_line(r: subprocess.CompletedProcess, status: int, *words: str) -> str:
    """The run exited *status* with exactly one line on stderr that contains *words*."""
    no_traceback(r.stdout + r.stderr)
    assert r.returncode == status, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- 1: Ctrl-C during apicv boot
@pytest.fixture(scope="module")
def bench_elf() -> Path:
    if not BENCH.exists():
        r = subprocess.run(["make", "-s", "-C", str(ROOT / "guests"),
                            f"OUT={ROOT / 'build' / 'guests'}"], capture_output=True,
                           text=True, timeout=300)
        if r.returncode != 0 or not BENCH.exists():
            pytest.skip(f"cannot build the guest kernels: {r.stderr.strip()[-200:]}")
    return BENCH


@needs_kvm
def test_boot_sigint_at_random_times_never_crashes(bench_elf):
    """SIGINT into `apicv boot bench.elf --smp 2` (model irqchip) at random moments: every
    run ends with "interrupted" and exit 130, never a segfault (a vCPU thread touching
    kvm_run after it was unmapped) or a hang. Seeded, 10 runs: the 50-run loop is by hand."""
    rnd = random.Random(12)
    for i in range(10):
        p = subprocess.Popen([*APICV, "boot", str(bench_elf), "--smp", "2"], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             preexec_fn=_default_sigint)
        time.sleep(rnd.uniform(0.3, 2.5))
        p.send_signal(signal.SIGINT)
        try:
            _, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            pytest.fail(f"run {i}: still running 30 s after SIGINT")
        no_traceback(err)
        assert p.returncode == 130, (i, p.returncode, err)
        assert err.strip().splitlines()[-1] == "apicv: interrupted", (i, err)


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@needs_kvm
def test_machine_interrupted_leaves_no_thread_or_fd(bench_elf):
    """A KeyboardInterrupt in the main thread while the vCPUs run: Machine.run stops and
    joins every vCPU thread before it lets the interrupt go, and close() leaves no fd."""
    import _thread

    from apicv.vmm import Machine

    threads = threading.active_count()
    fds = _fds()
    m = Machine(str(bench_elf), smp=2)
    try:
        timer = threading.Timer(0.7, _thread.interrupt_main)
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            m.run(timeout=30)
        timer.join()
        assert not any(v.thread.is_alive() for v in m.vcpus)
    finally:
        m.close()
    assert threading.active_count() == threads
    assert _fds() == fds
    m.close()  # twice is harmless


# ---------------------------------------------------------------- 2: what boot reads
@needs_kvm
@pytest.mark.parametrize("what", ["kernel", "initrd"])
@pytest.mark.parametrize("kind", ["chardev", "dir", "fifo"])
def test_boot_refuses_what_is_not_a_regular_file(tmp_path, bench_elf, what, kind):
    """/dev/zero, a directory, a FIFO as kernel or initrd: refused before reading (the FIFO
    would block, /dev/zero never ends), one line, exit 2."""
    target = {"chardev": "/dev/zero", "dir": str(tmp_path)}.get(kind)
    if kind == "fifo":
        target = str(tmp_path / "fifo")
        os.mkfifo(target)
    args = [target] if what == "kernel" else [str(bench_elf), "--initrd", target]
    line = one_line(apicv("boot", *args, timeout=30), 2, f"{what} {target}",
                    "not a regular file")
    assert line.startswith("apicv: error:")


@needs_kvm
def test_boot_caps_what_it_reads(tmp_path, bench_elf):
    """A kernel or initrd larger than the guest's RAM is refused from its size, unread."""
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(5 << 20)  # sparse
    one_line(apicv("boot", str(big), "--memory", "4", timeout=30), 2, "kernel", "larger than")
    one_line(apicv("boot", str(bench_elf), "--initrd", str(big), "--memory", "4", timeout=30),
             2, "initrd", "larger than")


# ---------------------------------------------------------------- 3: --trace-out, checked first
@pytest.mark.parametrize("target", ["/nonexistent-dir/t.json", "DIR", "/proc/version"])
@pytest.mark.parametrize("cmd", [["demo"], ["run", "examples/xapic_ipi.toml"],
                                 ["boot", "build/guests/bench.elf"]])
def test_trace_out_that_cannot_be_written_is_refused_before_running(tmp_path, cmd, target):
    """A missing directory, a directory, a file that cannot be written: one line, exit 2,
    before anything runs (nothing on stdout; boot does not exit 125)."""
    if target == "DIR":
        target = str(tmp_path)
    r = apicv(*cmd, "--trace-out", target, timeout=60)
    one_line(r, 2, "--trace-out", target)
    assert r.stdout == ""


def test_trace_out_check_leaves_no_file(tmp_path):
    out = tmp_path / "t.json"
    r = apicv("--plain", "run", "examples/xapic_ipi.toml", "--trace-out", str(out))
    assert r.returncode == 0 and out.stat().st_size > 0
    r = apicv("--plain", "run", str(tmp_path / "missing.toml"), "--trace-out",
              str(tmp_path / "u.json"))
    one_line(r, 2, "missing.toml")
    assert not (tmp_path / "u.json").exists()


# ---------------------------------------------------------------- 4: fuzz options and Ctrl-C
@pytest.mark.parametrize("opt", ["--count", "--steps"])
@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_fuzz_counts_must_be_positive(opt, value):
    line = one_line(apicv("fuzz", f"{opt}={value}"), 2, "apicv fuzz: error:", opt)
    assert "at least 1" in line or "integer" in line


def test_fuzz_out_directory_is_checked_before_the_campaign():
    r = apicv("fuzz", "--count", "5", "--out", "/nonexistent-dir/f.toml")
    one_line(r, 2, "--out", "/nonexistent-dir")
    assert r.stdout == ""


@needs_kvm
def test_fuzz_interrupted_prints_its_partial_summary(tmp_path):
    """Ctrl-C during a campaign: the summary of what ran (marked interrupted), exit 130."""
    p = subprocess.Popen([*APICV, "--plain", "fuzz", "--count", "100000", "--seed", "5",
                          "--out", str(tmp_path / "d.toml")], cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=_default_sigint)
    time.sleep(6)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    no_traceback(out + err)
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1] == "apicv: interrupted"
    summary = [ln for ln in out.splitlines() if ln.startswith("fuzz: seed 5:")]
    assert len(summary) == 1 and summary[0].endswith("; interrupted"), out


def test_fuzz_without_hypothesis_names_the_extra():
    """`pip install .` has no hypothesis: apicv fuzz says which extra it needs."""
    code = ("import sys; sys.modules['hypothesis'] = None\n"
            "from apicv.cli import main; sys.exit(main(['fuzz', '--count', '1']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    one_line(r, 2, "apicv fuzz needs hypothesis", "pip install 'apicv[fuzz]'")


# ---------------------------------------------------------------- 6: the standard library alone
def test_core_imports_with_the_standard_library_alone():
    """Every apicv module but the fuzzer imports with no third-party package, and the CLI
    runs without rich (plain text)."""
    code = """
import sys
for name in ("rich", "hypothesis", "pytest"):
    sys.modules[name] = None
import importlib, pkgutil
import apicv
for m in pkgutil.walk_packages(apicv.__path__, "apicv."):
    if m.name != "apicv.fuzz":
        importlib.import_module(m.name)
foreign = sorted({n.split(".")[0] for n, mod in sys.modules.items() if mod is not None}
                 - set(sys.stdlib_module_names) - {"apicv", "__main__", "_distutils_hack"})
assert not foreign, foreign
from apicv.cli import main
sys.exit(main(["run", "examples/xapic_ipi.toml"]))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    no_traceback(r.stderr)
    assert r.returncode == 0, r.stderr
    assert "all as expected" in r.stdout


# ---------------------------------------------------------------- 5: deep and huge scenarios
DEEP = {
    "array": "x = " + "[" * 5000 + "]" * 5000 + "\n",
    "expect": ("[[step]]\ndo = 'get_lapic'\nvcpu = 0\nexpect = " + "{ a = " * 400 + "1"
               + " }" * 400 + "\n"),
    "dotted": "[[step]]\ndo = 'nmi'\nvcpu = 0\nexpect." + ".".join(["a"] * 2000) + " = 1\n",
}


@pytest.mark.parametrize("kind", sorted(DEEP))
def test_deeply_nested_scenario_is_one_line(tmp_path, kind):
    path = tmp_path / f"{kind}.toml"
    path.write_text(DEEP[kind])
    one_line(apicv("run", str(path)), 2, str(path), "nested too deeply")


@pytest.mark.parametrize("kind", ["dir", "fifo", "chardev"])
def test_scenario_that_is_not_a_regular_file(tmp_path, kind):
    target = {"dir": str(tmp_path), "chardev": "/dev/zero"}.get(kind)
    if kind == "fifo":
        target = str(tmp_path / "fifo")
        os.mkfifo(target)
    one_line(apicv("run", target, timeout=30), 2, target, "cannot read")


def test_steps_stream_while_a_long_scenario_runs(tmp_path):
    """The step lines are printed as the steps run (rich and plain): the first appear long
    before the run ends; the run is interrupted with one line and exit 130."""
    path = tmp_path / "long.toml"
    with open(path, "w") as f:
        f.write("[vm]\nvcpus = 1\n")
        for i in range(100_000):
            f.write(f'[[step]]\ndo = "mmio_write"\nvcpu = 0\noffset = "TPR"\n'
                    f"value = {(i % 16) << 4}\n")
    for plain in ([], ["--plain"]):
        p = subprocess.Popen([*APICV, *plain, "run", str(path)], cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             preexec_fn=_default_sigint)
        seen = []
        for line in p.stdout:
            if "mmio_write" in line:
                seen.append(line)
                if len(seen) == 300:
                    break
        p.send_signal(signal.SIGINT)
        rest, err = p.communicate(timeout=60)
        assert len(seen) == 300, err
        assert "all as expected" not in rest  # printed before the end
        assert p.returncode == 130, err
        assert err.strip().splitlines()[-1] == "apicv: interrupted"
        no_traceback(err)


# ---------------------------------------------------------------- 7: output
def _rich_80(*args: str) -> str:
    env = dict(os.environ, COLUMNS="80", TERM="dumb")
    r = apicv(*args, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_rich_tables_at_80_columns_wrap_instead_of_cutting():
    out = _rich_80("run", "examples/ioapic_level.toml", "examples/lowest_priority.toml")
    assert "\u2026" not in out  # rich's ellipsis
    assert max(len(line) for line in out.splitlines()) <= 80
    # the call column, put back together row by row, holds every call in full
    lines = out.splitlines()
    head = next(ln for ln in lines if " call " in ln and "result" in ln)
    a, b = head.index("call"), head.index("result")
    calls, cur = [], ""
    for ln in lines[lines.index(head) + 2:]:
        if "final state" in ln:
            break
        if ln[:a].strip():  # a new step
            if cur:
                calls.append(cur)
            cur = ""
        cur += ln[a:b].strip() + " "
    calls.append(cur)
    joined = [c.replace(" ", "") for c in calls]
    assert any(c.startswith("irq_line(irq=") and c.endswith(")") for c in joined), joined
    assert all(c.count("(") == c.count(")") for c in joined), joined


def test_plain_tables_are_not_padded_by_long_results():
    r = apicv("--plain", "run", "examples/ioapic_level.toml")
    assert r.returncode == 0
    widths = [len(line) for line in r.stdout.splitlines()]
    assert max(widths) < 200, max(widths)
    assert "216-byte state" in r.stdout and "(447 chars)" in r.stdout  # cut, with its length


def _results(stdout: str, op: str) -> set[str]:
    """The result column of the --plain step rows of *op*."""
    lines = stdout.splitlines()
    head = next(ln for ln in lines if " call " in ln and "result" in ln)
    a = head.index("result")
    return {ln[a:].split("  ")[0].strip() for ln in lines if f" {op}(" in ln}


def test_statuses_and_counts_print_in_decimal():
    r = apicv("--plain", "run", "examples/ioapic_level.toml")
    assert "-0x1" not in r.stdout
    assert {"-1", "0", "1"} <= _results(r.stdout, "irq_line")
    r = apicv("--plain", "run", "examples/lowest_priority.toml")
    got = _results(r.stdout, "signal_msi")
    assert got and all(x.isdigit() for x in got), got


def test_every_option_has_help():
    assert "real KVM" in apicv("run", "--help").stdout.split("--backend")[-1]
    assert "real KVM" in apicv("demo", "--help").stdout.split("--backend")[-1]
    assert "seed" in apicv("fuzz", "--help").stdout.split("--seed SEED")[-1].split("--count")[0]


@pytest.mark.parametrize("args", [["demo"], ["--plain", "demo"],
                                  ["run", "examples/ioapic_level.toml"],
                                  ["--plain", "state", "decode", "DECODE"]])
def test_closed_pipe_is_quiet(tmp_path, args):
    """`apicv demo | head -1`: exit 0, nothing on stderr."""
    if "DECODE" in args:
        import apicv as pkg

        (tmp_path / "s.bin").write_bytes(pkg.Vm(1).vcpus[0].get_lapic())
        args = [a if a != "DECODE" else str(tmp_path / "s.bin") for a in args]
    p = subprocess.Popen([*APICV, *args], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    first = p.stdout.readline()
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=120) == 0, err
    assert first and err == ""


@needs_kvm
def test_boot_output_into_a_closed_pipe_keeps_the_guest_status(bench_elf):
    smp = bench_elf.parent / "smp.elf"
    p = subprocess.Popen([*APICV, "boot", str(smp), "--smp", "3"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.readline()
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=60) == 1, err  # the guest passed
    no_traceback(err)


def test_make_clean_removes_out():
    r = subprocess.run(["make", "-n", "clean"], capture_output=True, text=True, cwd=ROOT,
                       timeout=30)
    assert r.returncode == 0 and " out" in r.stdout, r.stdout


# ---------------------------------------------------------------- 9: no traceback, ever
def _with_failing_demo(exc: str, debug: bool = False) -> subprocess.CompletedProcess:
    code = ("import sys, apicv.cli as c\n"
            f"def boom(args, out):\n    raise {exc}\n"
            "c.cmd_demo = boom\nsys.exit(c.main(['demo']))\n")
    env = dict(os.environ)
    env.pop("APICV_DEBUG", None)
    if debug:
        env["APICV_DEBUG"] = "1"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env=env)


def test_a_bug_is_one_line_and_status_70():
    line = one_line(_with_failing_demo("ZeroDivisionError('x\\ny')"), 70,
                    "internal error: ZeroDivisionError: x y", "please report")
    assert line.startswith("apicv: ")
    one_line(_with_failing_demo("KeyboardInterrupt"), 130, "interrupted")
    r = _with_failing_demo("ZeroDivisionError('x')", debug=True)
    assert r.returncode == 1 and "Traceback" in r.stderr  # APICV_DEBUG=1 re-raises


# ---------------------------------------------------------------- property: parse never crashes
def _toml_values():
    from hypothesis import strategies as st

    scalars = st.one_of(st.integers(-(1 << 70), 1 << 70), st.booleans(), st.text(max_size=12),
                        st.sampled_from(["TPR", "SPIV", "0x300", "X2APIC_ICR", "EINVAL",
                                         "RUNNABLE", "IOAPIC", "HYPERV", "-1", "1e9"]),
                        st.floats(allow_nan=False))
    return st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(["vcpu", "offset", "value", "expect", "patch", "irq",
                                         "level", "do", "size", "from", "x"]), inner,
                        max_size=4)), max_leaves=12)


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v) if isinstance(v, float) and v == v and abs(v) != float("inf") else (
            str(v) if isinstance(v, int) else "0.0")
    if isinstance(v, str):
        return '"' + v.encode("unicode_escape").decode().replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + " }"


def test_parse_random_input_is_a_scenario_or_a_scenario_error():
    """Random bytes, random TOML documents shaped like scenarios: parse() returns a Scenario
    or raises ScenarioError -- never another exception."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from apicv.errors import ScenarioError
    from apicv.scenario import OPS, Scenario, parse

    ops = sorted(OPS) if isinstance(OPS, dict | set | frozenset) else list(OPS)
    step = st.fixed_dictionaries(
        {"do": st.one_of(st.sampled_from(ops), st.text(max_size=8))},
        optional={k: _toml_values() for k in ("vcpu", "offset", "value", "size", "expect",
                                              "patch", "irq", "level", "index", "chip",
                                              "state", "from", "reason", "set", "ns",
                                              "address_lo", "data", "note", "bogus")})
    docs = st.fixed_dictionaries(
        {}, optional={"description": _toml_values(),
                      "vm": st.dictionaries(st.sampled_from(["vcpus", "x2apic_api", "quirks",
                                                             "enable_apicv", "irqchip",
                                                             "vm_type", "nope"]),
                                            _toml_values(), max_size=3),
                      "step": st.lists(step, max_size=4)})

    def text_of(doc: dict) -> str:
        lines = []
        for k in ("description",):
            if k in doc:
                lines.append(f"{k} = {_toml(doc[k])}")
        if "vm" in doc:
            lines.append("[vm]")
            lines += [f"{k} = {_toml(v)}" for k, v in doc["vm"].items()]
        for s in doc.get("step", []):
            lines.append("[[step]]")
            lines += [f"{k} = {_toml(v)}" for k, v in s.items()]
        return "\n".join(lines) + "\n"

    inputs = st.one_of(st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
                       st.text(max_size=200), docs.map(text_of))

    @settings(max_examples=200, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(inputs)
    def check(text: str) -> None:
        try:
            sc = parse(text, "random.toml")
        except ScenarioError as e:
            assert "random.toml" in str(e)
            return
        assert isinstance(sc, Scenario)

    check()
