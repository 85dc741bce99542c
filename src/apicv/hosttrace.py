"""Recording what the host's KVM did, from the host itself: KVM's tracepoints through tracefs.

:class:`HostTrace` records the ``kvm:*`` tracepoints of *this process only* into a private
tracefs instance (``instances/apicv-<pid>``: its own ring buffer, event switches and
``set_event_pid``), so the global trace buffer, other users' instances and their settings are
never touched. tracefs is mounted at ``/sys/kernel/tracing`` when it is not mounted yet.
Leaving the ``with`` block -- normally, by an exception or by Ctrl-C -- disables the events,
empties the pid filter, turns the instance's tracing off and removes the instance; SIGINT is
held while that happens. An instance left behind by a killed process (``apicv-<pid>`` whose
pid is gone) is removed the next time a HostTrace starts.

The text read back is the ``trace`` file's (``<task>-<pid> [<cpu>] <flags> <secs>: <event>:
<fields>``); :func:`to_report_layout` turns a line into ``trace-cmd report``'s layout (no
flags column), the layout :mod:`apicv.trace` writes for the model.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import signal
import threading
from collections.abc import Iterable, Iterator

from .errors import ApicvError

TRACEFS_MOUNTS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
INSTANCE_PREFIX = "apicv-"

# the tracepoints the model writes (apicv.trace.Tracer): the ones the crosscheck compares
COMPARED_EVENTS = (
    "kvm_apic", "kvm_apic_ipi", "kvm_apic_accept_irq", "kvm_apicv_accept_irq", "kvm_eoi",
    "kvm_pv_eoi", "kvm_msi_set_irq", "kvm_inj_virq", "kvm_apicv_inhibit_changed",
    "kvm_set_irq", "kvm_ioapic_set_irq", "kvm_ioapic_delayed_eoi_inj", "kvm_pic_set_irq",
    "kvm_ack_irq",
)
# recorded besides them by `apicv trace record` (interrupt-related, not modelled)
EXTRA_EVENTS = ("kvm_inj_exception", "kvm_userspace_exit",
                "kvm_wait_lapic_expire", "kvm_vcpu_wakeup", "kvm_msr")


_INSTANCE_SEQ = itertools.count(1)


class TraceUnavailable(ApicvError):
    """The host's trace cannot be recorded here (not root, no tracefs, an event missing)."""


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _mounted(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "available_events"))


def tracefs_root(mount: bool = True) -> str:
    """The tracefs mount point; mounts tracefs at /sys/kernel/tracing if it is not mounted
    (and *mount*). TraceUnavailable with one readable line when that is impossible."""
    for p in TRACEFS_MOUNTS:
        if _mounted(p):
            return p
    if os.geteuid() != 0:
        raise TraceUnavailable("recording the host's KVM trace needs root (tracefs is not "
                               "mounted and only root can mount or write it)")
    if not mount:
        raise TraceUnavailable("tracefs is not mounted")
    target = TRACEFS_MOUNTS[0]
    if not os.path.isdir(target):
        raise TraceUnavailable(f"tracefs is absent: no {target} (kernel without "
                               "CONFIG_TRACING?)")
    rc = os.system(f"mount -t tracefs nodev {target} >/dev/null 2>&1")
    if rc != 0 or not _mounted(target):
        raise TraceUnavailable(f"tracefs is absent: `mount -t tracefs nodev {target}` failed "
                               "(kernel without CONFIG_TRACING, or no permission)")
    return target


def check_available(events: Iterable[str] = COMPARED_EVENTS) -> str:
    """The tracefs root if the host trace can be recorded here, else TraceUnavailable."""
    if os.geteuid() != 0:
        raise TraceUnavailable("recording the host's KVM trace needs root (tracefs)")
    root = tracefs_root()
    missing = [e for e in events
               if not os.path.isdir(os.path.join(root, "events", "kvm", e))]
    if missing:
        raise TraceUnavailable("this kernel has no tracepoint " + ", ".join(missing)
                               + " (KVM built without it, or not loaded)")
    return root


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_instances(root: str) -> list[str]:
    """Remove instances apicv-<pid> whose process is gone (a run killed by SIGKILL)."""
    removed = []
    inst = os.path.join(root, "instances")
    with contextlib.suppress(OSError):
        for name in os.listdir(inst):
            if not name.startswith(INSTANCE_PREFIX):
                continue
            tail = name[len(INSTANCE_PREFIX):].split(".")[0]
            if tail.isdigit() and not _pid_alive(int(tail)):
                _teardown(os.path.join(inst, name))
                removed.append(name)
    return removed


def _teardown(path: str) -> None:
    """Switch an instance off and remove it; every part is tried even if one fails."""
    for rel, text in (("tracing_on", "0"), ("events/enable", "0"), ("set_event_pid", ""),
                      ("set_event", "")):
        with contextlib.suppress(OSError):
            _write(os.path.join(path, rel), text)
    with contextlib.suppress(OSError):
        os.rmdir(path)


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """SIGINT waits while tracing is switched on or off (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class HostTrace:
    """``with HostTrace() as ht: ...; lines = ht.take()`` -- the host's kvm:* events of this
    process (every thread, and threads created later) since the previous take()."""

    def __init__(self, events: Iterable[str] = COMPARED_EVENTS, buffer_kb: int = 4096) -> None:
        self.events = tuple(events)
        self.buffer_kb = buffer_kb
        self.path: str | None = None

    # -- switching on and off --
    def __enter__(self) -> HostTrace:
        root = check_available(self.events)
        remove_stale_instances(root)
        path = os.path.join(root, "instances",
                            f"{INSTANCE_PREFIX}{os.getpid()}.{next(_INSTANCE_SEQ)}")
        with _sigint_held():
            try:
                os.mkdir(path)
            except OSError as e:
                raise TraceUnavailable(f"cannot create the tracefs instance {path}: "
                                       f"{os.strerror(e.errno or errno.EIO)}") from None
            self.path = path
            try:
                self._switch_on()
            except BaseException:
                self.close()
                raise
        return self

    def _switch_on(self) -> None:
        p = self.path
        assert p is not None
        _write(os.path.join(p, "tracing_on"), "0")
        with contextlib.suppress(OSError):
            _write(os.path.join(p, "buffer_size_kb"), str(self.buffer_kb))
        with contextlib.suppress(OSError):
            _write(os.path.join(p, "options/event-fork"), "1")
        tids = [t for t in os.listdir("/proc/self/task") if t.isdigit()]
        _write(os.path.join(p, "set_event_pid"), " ".join(tids))
        for e in self.events:
            _write(os.path.join(p, "events", "kvm", e, "enable"), "1")
        _write(os.path.join(p, "trace"), "")  # empty the buffer
        _write(os.path.join(p, "tracing_on"), "1")

    def close(self) -> None:
        if self.path is None:
            return
        with _sigint_held():
            _teardown(self.path)
            self.path = None

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading --
    def take(self) -> list[str]:
        """The event lines recorded since the previous take() (the buffer is emptied)."""
        if self.path is None:
            raise TraceUnavailable("the host trace is not being recorded")
        p = os.path.join(self.path, "trace")
        text = _read(p)
        _write(p, "")
        return [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]

    def lost(self) -> int:
        """Events the ring buffer overwrote (per-CPU 'overrun' counts added up)."""
        total = 0
        if self.path is None:
            return 0
        per_cpu = os.path.join(self.path, "per_cpu")
        with contextlib.suppress(OSError):
            for cpu in os.listdir(per_cpu):
                with contextlib.suppress(OSError):
                    for line in _read(os.path.join(per_cpu, cpu, "stats")).splitlines():
                        if line.startswith("overrun:"):
                            total += int(line.split()[1])
        return total


_LINE = re.compile(
    r"^\s*(?P<task>.+?)-(?P<pid>\d+)\s+(?:\(\s*[\d-]+\)\s+)?\[(?P<cpu>\d+)\]\s+"
    r"(?:(?P<flags>[^\s\d][^\s]{3,5}|\.\.\.\.\.?)\s+)?(?P<ts>\d+\.\d+):\s+(?P<event>[\w]+):"
    r"\s?(?P<fields>.*)$")


def split_line(line: str) -> dict[str, str] | None:
    """A trace line's parts (task, pid, cpu, flags, ts, event, fields), or None."""
    m = _LINE.match(line)
    return None if m is None else m.groupdict()


def to_report_layout(line: str) -> str:
    """``trace`` file line -> trace-cmd report layout: ``task-pid [cpu] secs: event: fields``."""
    d = split_line(line)
    if d is None:
        return line
    return f"{d['task'].strip()}-{d['pid']} [{d['cpu']}] {d['ts']}: {d['event']}: {d['fields']}"
