"""Comparing two KVM traces event by event: the model's (:mod:`apicv.trace`) and the host's
(:mod:`apicv.hosttrace`), step by step.

Both streams are parsed into ``(event, fields)`` pairs -- the task, CPU and time stamp are left
aside -- and compared in order. Where this host's KVM is known to differ from upstream KVM
(which the model follows), the difference is matched explicitly and counted under its name
(:data:`TRACE_DIFFERENCES`), never by loosening the comparison:

* H1 -- the host acknowledges an injected interrupt as an EOI: at the injection it logs
  ``kvm_apic: apic_write APIC_EOI = 0x0`` and ``kvm_eoi: apicid A vector V`` where upstream
  (the model) logs ``kvm_inj_virq: IRQ 0xV``; the guest's own EOI then finds nothing in
  service (``kvm_eoi: apicid A vector -1``, model: ``vector V``); where upstream performs
  that EOI through PV EOI (``kvm_eoi`` + ``kvm_pv_eoi``), this host's guest, which never
  sees PV EOI armed, writes the EOI register (``apic_write APIC_EOI`` + ``vector -1``).
* H1 -- this host emits no ``kvm_inj_virq`` at all (not even for an injection it does not
  acknowledge, e.g. with a vector still in ISR from KVM_SET_LAPIC).
* H4 -- timers run on wall time: the ``kvm_apic_accept_irq`` of an APIC timer vector (LVTT)
  may fall into a different step on the two sides; it is matched wherever it is.
* M1 -- tracepoints only the model writes (``kvm_inj_nmi``: the kernel has no such event);
  left out.

The first event that no rule explains is the divergence; :meth:`TraceDiff.report` shows both
streams around it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .hosttrace import COMPARED_EVENTS, split_line

TRACE_DIFFERENCES = {
    "H1": "injection acknowledged as an EOI on this host (apic_write APIC_EOI + kvm_eoi "
          "vector V at injection instead of kvm_inj_virq; the guest's EOI logs vector -1); "
          "this host emits no kvm_inj_virq",
    "H4": "an APIC timer interrupt (kvm_apic_accept_irq of the LVTT vector) falls on wall "
          "time",
    "M1": "a tracepoint only the model writes (kvm_inj_nmi)",
}
MODEL_ONLY_EVENTS = ("kvm_inj_nmi",)


@dataclass(frozen=True, slots=True)
class Ev:
    event: str
    fields: str
    line: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.event, self.fields)

    def text(self) -> str:
        return f"{self.event}: {self.fields}"


_MARK = re.compile(r"^#\s*step\s+(\d+)\b")


def parse_line(line: str) -> Ev | None:
    d = split_line(line)
    if d is None:
        return None
    return Ev(d["event"], d["fields"].rstrip(), line.rstrip("\n"))


def parse_lines(lines) -> list[Ev]:
    out = []
    for ln in lines:
        e = parse_line(ln)
        if e is not None:
            out.append(e)
    return out


def parse_steps(text: str) -> tuple[dict[int, list[Ev]], list[Ev]]:
    """A trace file: events grouped by its ``# step N`` markers (apicv trace record / model
    write them), and all events in order."""
    steps: dict[int, list[Ev]] = {}
    every: list[Ev] = []
    cur = 0
    for ln in text.splitlines():
        m = _MARK.match(ln)
        if m:
            cur = int(m.group(1))
            steps.setdefault(cur, [])
            continue
        if ln.startswith("#") or not ln.strip():
            continue
        e = parse_line(ln)
        if e is None:
            continue
        steps.setdefault(cur, []).append(e)
        every.append(e)
    return steps, every


_INJ = re.compile(r"^IRQ 0x([0-9a-f]+)$")
_EOI = re.compile(r"^apicid ([0-9a-f]+) vector (-?\d+)$")
_ACCEPT = re.compile(r"^apicid ([0-9a-f]+) vec (\d+) \(Fixed\|edge\)$")


@dataclass
class TraceDiff:
    """The outcome of comparing one stretch of the two streams."""

    model: list[Ev]
    host: list[Ev]
    named: dict[str, int] = field(default_factory=dict)
    at: tuple[int, int] | None = None  # (model index, host index) of the first divergence
    why: str = ""

    @property
    def ok(self) -> bool:
        return self.at is None

    def report(self, context: int = 3, a_name: str = "model", b_name: str = "host"
               ) -> list[str]:
        if self.at is None:
            return []
        i, j = self.at
        lines = [f"trace diverges: {self.why}"]
        for name, evs, k in ((a_name, self.model, i), (b_name, self.host, j)):
            lines.append(f"  {name} (event {k + 1} of {len(evs)}):")
            lo, hi = max(0, k - context), min(len(evs), k + context + 1)
            if lo > 0:
                lines.append("      ...")
            for n in range(lo, hi):
                lines.append(f"    {'>' if n == k else ' '} {evs[n].text()}")
            if k >= len(evs):
                lines.append("    > (end of trace)")
            elif hi < len(evs):
                lines.append("      ...")
        return lines


class TraceComparer:
    """Compares the model's and the host's events step after step; keeps what a rule needs
    across steps (vectors the host acknowledged at injection)."""

    def __init__(self, host_differences: bool = True) -> None:
        self.rules = host_differences
        self.acked: dict[tuple[str, int], int] = {}  # (apicid, vector) -> injections acked
        self.named: dict[str, int] = {}

    def _count(self, d: TraceDiff, key: str) -> None:
        d.named[key] = d.named.get(key, 0) + 1
        self.named[key] = self.named.get(key, 0) + 1

    def compare(self, model: list[Ev], host: list[Ev], timer_vectors=frozenset()) -> TraceDiff:
        """*timer_vectors*: {(apicid hex, vector)} of APIC timers that may fire (H4)."""
        model = [e for e in model if e.event in COMPARED_EVENTS or e.event in MODEL_ONLY_EVENTS]
        host = [e for e in host if e.event in COMPARED_EVENTS]
        d = TraceDiff(model, host)
        i = j = 0
        while i < len(model) or j < len(host):
            m = model[i] if i < len(model) else None
            h = host[j] if j < len(host) else None
            if m is not None and h is not None and m.key == h.key:
                i += 1
                j += 1
                continue
            if not self.rules:
                d.at, d.why = (i, j), "the events differ"
                return d
            if m is not None and m.event in MODEL_ONLY_EVENTS:
                self._count(d, "M1")
                i += 1
                continue
            if m is not None and m.event == "kvm_inj_virq":
                mm = _INJ.match(m.fields)
                vec = int(mm.group(1), 16) if mm else -1
                # H1: the host's EOI at injection stands where upstream traces the injection
                if (h is not None and j + 1 < len(host) and h.text() ==
                        "kvm_apic: apic_write APIC_EOI = 0x0" and host[j + 1].event == "kvm_eoi"):
                    em = _EOI.match(host[j + 1].fields)
                    if em and int(em.group(2)) == vec:
                        k = (em.group(1), vec)
                        self.acked[k] = self.acked.get(k, 0) + 1
                        self._count(d, "H1")
                        i += 1
                        j += 2
                        continue
                self._count(d, "H1")  # no kvm_inj_virq on this host
                i += 1
                continue
            if (m is not None and h is not None and m.event == "kvm_eoi"
                    and i + 1 < len(model) and model[i + 1].event == "kvm_pv_eoi"
                    and model[i + 1].fields == m.fields
                    and h.text() == "kvm_apic: apic_write APIC_EOI = 0x0"
                    and j + 1 < len(host) and host[j + 1].event == "kvm_eoi"):
                # H1: upstream arms PV EOI for the injected vector and performs the EOI at the
                # next exit (kvm_pv_eoi); this host's guest never sees PV EOI armed (the vector
                # was acknowledged at injection) and writes the EOI register, which finds
                # nothing in service
                mm, hm = _EOI.match(m.fields), _EOI.match(host[j + 1].fields)
                if mm and hm and mm.group(1) == hm.group(1) and hm.group(2) == "-1":
                    k = (mm.group(1), int(mm.group(2)))
                    if self.acked.get(k):
                        self.acked[k] -= 1
                        self._count(d, "H1")
                        i += 2
                        j += 2
                        continue
            if (m is not None and h is not None and m.event == "kvm_eoi"
                    and h.event == "kvm_eoi"):
                mm, hm = _EOI.match(m.fields), _EOI.match(h.fields)
                if mm and hm and mm.group(1) == hm.group(1) and hm.group(2) == "-1":
                    k = (mm.group(1), int(mm.group(2)))
                    if self.acked.get(k):
                        self.acked[k] -= 1
                        self._count(d, "H1")
                        i += 1
                        j += 1
                        continue
            if timer_vectors:
                if m is not None and m.event == "kvm_apic_accept_irq":
                    am = _ACCEPT.match(m.fields)
                    if am and (am.group(1), int(am.group(2))) in timer_vectors:
                        self._count(d, "H4")
                        i += 1
                        continue
                if h is not None and h.event == "kvm_apic_accept_irq":
                    am = _ACCEPT.match(h.fields)
                    if am and (am.group(1), int(am.group(2))) in timer_vectors:
                        self._count(d, "H4")
                        j += 1
                        continue
            d.at = (i, j)
            if m is None:
                d.why = "the host has more events"
            elif h is None:
                d.why = "the model has more events"
            elif m.event == h.event:
                d.why = f"{m.event} with other fields"
            else:
                d.why = f"model {m.event}, host {h.event}"
            return d
        return d


def named_text(named: dict[str, int]) -> str:
    return ", ".join(f"{k} x{n}" for k, n in sorted(named.items()))


def diff_files(a_path: str, b_path: str, out=print, context: int = 3,
               host_differences: bool = True) -> int:
    """`apicv trace diff A B`: 0 when the traces agree event by event (named host
    differences aside), 1 at the first divergence (both streams around it)."""
    with open(a_path) as f:
        a_steps, a_all = parse_steps(f.read())
    with open(b_path) as f:
        b_steps, b_all = parse_steps(f.read())
    cmp = TraceComparer(host_differences)
    if set(a_steps) - {0} and set(b_steps) - {0}:
        # both have step marks: the steps both ran (a run stops at a model-only step)
        common = sorted(set(a_steps) & set(b_steps))
        pairs = [(f"step {n}", a_steps[n], b_steps[n]) for n in common]
        for name, only in ((a_path, set(a_steps) - set(b_steps)),
                           (b_path, set(b_steps) - set(a_steps))):
            if only:
                out(f"steps only in {name}: {', '.join(map(str, sorted(only)))} (not compared)")
    else:
        pairs = [("trace", a_all, b_all)]
    total = 0
    for label, a, b in pairs:
        d = cmp.compare(a, b)
        total += len(d.model)
        if not d.ok:
            out(f"{a_path} vs {b_path}: {label}: DIFFERENT")
            for line in d.report(context, a_name=a_path, b_name=b_path):
                out("  " + line)
            return 1
    named = f" (named differences: {named_text(cmp.named)})" if cmp.named else ""
    out(f"{a_path} vs {b_path}: {total} events agree"
        + (f" over {len(pairs)} steps" if len(pairs) > 1 else "") + named)
    return 0


# ---------------------------------------------------------------- `apicv trace ...`
def _header(kind: str, sc, extra: str = "") -> list[str]:
    import platform

    return [f"# apicv trace {kind}: {sc.file}{extra}",
            f"# host: Linux {platform.release()}; layout: task-pid [cpu] seconds: event: fields",
            "# '# step N: ...' lines mark where each scenario step begins"]


def record_scenario(path: str, out_file: str | None, every_kvm_event: bool = False,
                    out=print) -> int:
    """`apicv trace record`: run the scenario on the real KVM and record the host's kvm:*
    tracepoints, step by step, in trace-cmd's text layout (to *out_file*, or printed)."""
    from .hosttrace import EXTRA_EVENTS, HostTrace, to_report_layout
    from .kvm import KvmVm, kvm_available
    from .scenario import Runner, load
    from .scenario_ops import MODEL_ONLY_OPS

    sc = load(path)
    ok, why = kvm_available()
    if not ok:
        from .errors import ApicvError

        raise ApicvError(f"the real KVM backend is not available: {why}")
    events = COMPARED_EVENTS + (EXTRA_EVENTS if every_kvm_event else ())
    lines = _header("record", sc, " on the real KVM")
    status = 0
    with HostTrace(events) as ht:
        vm = KvmVm(sc.vm)
        try:
            runner = Runner(sc, vm)
            lines.append("# step 0: VM creation")
            lines += [to_report_layout(ln) for ln in ht.take()]
            for st in sc.steps:
                if st.op in MODEL_ONLY_OPS:
                    lines.append(f"# stopped at step {st.index}: {st.op} is model-only")
                    break
                lines.append(f"# step {st.index}: {st.describe()}")
                o = runner.step(st)
                lines += [to_report_layout(ln) for ln in ht.take()]
                if o.failure:
                    lines.append(f"# step {st.index} not as expected: {o.failure}")
                    status = 1
            lost = ht.lost()
            if lost:
                lines.append(f"# {lost} events lost (ring buffer overrun)")
        finally:
            vm.close()
    _emit(lines, out_file, out)
    return status


def model_scenario(path: str, out_file: str | None = None, this_host: bool = False,
                   out=print) -> int:
    """`apicv trace model`: the model's trace of the scenario, step by step, in the same
    layout (stamped with the model's virtual time). *this_host*: the model configured as this
    machine's KVM (:func:`apicv.kvm.host_config`), the configuration the crosscheck uses."""
    from .scenario import Runner, load
    from .vm import Vm

    sc = load(path)
    cfg = sc.vm
    if this_host:
        from .kvm import host_config

        cfg = host_config(config=sc.vm)
    vm = Vm(cfg, trace=True)
    lines = _header("model", sc, " (model of this host)" if this_host else " (model)")
    status = 0
    try:
        tr = vm.trace
        assert tr is not None
        lines.append("# step 0: VM creation")
        lines += tr.lines()
        seen = len(tr.events)
        for o in Runner(sc, vm).run():
            if o.skipped:
                lines.append(f"# stopped at step {o.step.index}: {o.skipped}")
                break
            lines.append(f"# step {o.step.index}: {o.step.describe()}")
            lines += [e.line() for e in tr.events[seen:]]
            seen = len(tr.events)
            if o.failure:
                lines.append(f"# step {o.step.index} not as expected: {o.failure}")
                status = 1
    finally:
        vm.close()
    _emit(lines, out_file, out)
    return status


def _emit(lines: list[str], out_file: str | None, out) -> None:
    if out_file:
        with open(out_file, "w") as f:
            f.write("\n".join(lines) + "\n")
        out(f"wrote {out_file} ({sum(1 for ln in lines if not ln.startswith('#'))} events)")
    else:
        for ln in lines:
            out(ln)


def cmd_trace(args, out) -> int:
    """The `apicv trace` subcommands (the parser is in apicv.cli)."""
    if args.trace_cmd == "record":
        return record_scenario(args.scenario, args.out, args.all_events, out=out.print)
    if args.trace_cmd == "model":
        return model_scenario(args.scenario, args.out, args.this_host, out=out.print)
    return diff_files(args.a, args.b, out=out.print, context=args.context,
                      host_differences=not args.strict)
