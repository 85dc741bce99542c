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
    from apicv.vmm import Machine

    import _thread

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
