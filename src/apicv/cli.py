"""The ``apicv`` command line: demo, run, state decode/diff (and, with the KVM backend,
crosscheck and fuzz). Every error a user can cause is printed as one readable line and a
non-zero exit status, never as a traceback: 2 for bad input, 130 after Ctrl-C, 70 for a bug
(``internal error: ...``; ``APICV_DEBUG=1`` shows its traceback instead).

Why this module is long: it holds every command's argument parser, its checks of the user's
input before anything runs, and the one place where errors become one-line messages; what the
commands do lives in their own modules (scenario, crosscheck, fuzz, vmm, tracediff)."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from importlib import resources

from . import uapi as U
from .errors import ApicvError
from .state import LapicState, diff, vectors_of


# ---------------------------------------------------------------- output helpers
class Out:
    """Tables and text through rich when it is installed, plain text otherwise."""

    # a plain-text column wider than this wraps onto continuation lines (the last is free)
    PLAIN_MAX_WIDTH = 48

    def __init__(self, plain: bool = False) -> None:
        self.console = None
        if not plain:
            try:
                from rich.console import Console

                self.console = Console(highlight=False)
            except ImportError:
                pass
            else:
                # rich turns a closed pipe into SystemExit(1); main() handles it as any
                # other command does (quietly, status 0)
                self.console.on_broken_pipe = _raise_broken_pipe

    def print(self, text: str = "", style: str | None = None) -> None:
        if self.console is not None:
            self.console.print(text, style=style, markup=False)
        else:
            print(text)

    def rule(self, title: str) -> None:
        if self.console is not None:
            self.console.rule(title)
        else:
            print(f"--- {title} ---")

    def table(self, headers: list[str], rows: list[list[str]], title: str | None = None) -> None:
        if self.console is not None:
            from rich.table import Table

            t = Table(title=title, show_lines=False)
            for h in headers:
                t.add_column(h, overflow="fold")  # wrap what is too long, never cut it
            for r in rows:
                t.add_row(*r)
            self.console.print(t)
            return
        if title:
            print(title)
        cap = self.PLAIN_MAX_WIDTH
        widths = [min(cap, max(len(h), *(len(r[i]) for r in rows)) if rows else len(h))
                  for i, h in enumerate(headers)]
        for line in plain_lines(headers, widths):
            print(line)
        print("  ".join("-" * w for w in widths).rstrip())
        for r in rows:
            for line in plain_lines(r, widths):
                print(line)


def _raise_broken_pipe() -> None:
    raise BrokenPipeError


def plain_lines(cells: list[str], widths: list[int], free_last: bool = True) -> list[str]:
    """One table row as text lines: each cell padded to its column's width, a longer one
    wrapped onto continuation lines (the last column is neither padded nor, if *free_last*,
    wrapped)."""
    parts = []
    last = len(cells) - 1
    for i, (c, w) in enumerate(zip(cells, widths, strict=True)):
        if (i == last and free_last) or len(c) <= w:
            parts.append([c])
        else:
            parts.append(textwrap.wrap(c, w, break_on_hyphens=False) or [""])
    lines = []
    for k in range(max(len(p) for p in parts)):
        line = "  ".join((p[k] if k < len(p) else "").ljust(w)
                         for p, w in zip(parts, widths, strict=True))
        lines.append(line.rstrip())
    return lines


class StepTable:
    """The step lines of a scenario run, printed while it runs: a scenario of a million
    steps shows its progress at once and keeps no rows in memory but a block of them. The
    columns have fixed widths (what is longer wraps; a state dump is cut, with its length):
    plain text prints a row per step; rich prints blocks of rows (up to BLOCK, or what came
    in FLUSH_S seconds) as styled text -- a rich Table per block costs ~1 ms a row."""

    HEADERS = ["#", "on", "call", "result", "", "note"]
    PLAIN_WIDTHS = (0, 7, 40, 24, 4, 0)  # 0: the step number's digits; the note is free
    BLOCK = 200
    FLUSH_S = 0.1

    def __init__(self, out: Out, title: str, nsteps: int) -> None:
        self.out = out
        digits = len(str(max(nsteps, 1)))
        self.rows: list[list[str]] = []
        self.since = 0.0
        console = out.console
        if console is None:
            self.widths = [digits, *self.PLAIN_WIDTHS[1:]]
        else:
            flex = max(30, console.width - digits - 7 - 4 - 2 * 5)
            call, result = flex * 2 // 5, flex // 4
            self.widths = [digits, 7, call, result, 4, flex - call - result]
        out.print(title, style="bold")
        head = plain_lines(["#".rjust(digits), *self.HEADERS[1:]], self.widths)
        rule = "  ".join("-" * w for w in self.widths[:-1]) + "  " + "-" * max(
            4, self.widths[-1])
        if console is None:
            print("\n".join([*head, rule]))
        else:
            out.print("\n".join(head), style="bold")
            out.print(rule.replace("-", "\u2500"), style="dim")

    def result(self, text: str) -> str:
        """A result longer than two lines of its column (a state dump) is cut."""
        most = max(2 * self.widths[3], 24)
        if len(text) <= most:
            return text
        tail = f"... ({len(text)} chars)"
        return text[:most - len(tail)] + tail

    def add(self, row: list[str]) -> None:
        row[0] = row[0].rjust(self.widths[0])
        row[3] = self.result(row[3])
        if self.out.console is None:
            print("\n".join(plain_lines(row, self.widths)))
            return
        now = time.monotonic()
        if not self.rows:
            self.since = now
        self.rows.append(row)
        if len(self.rows) >= self.BLOCK or now - self.since >= self.FLUSH_S:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        from rich.text import Text

        text = Text(end="")
        for r in self.rows:
            style = {"FAIL": "bold red", "skip": "yellow"}.get(r[4])
            text.append("\n".join(plain_lines(r, self.widths, free_last=False)) + "\n",
                        style=style)
        self.rows = []
        self.out.console.print(text, soft_wrap=True)


def _vec_list(v: int) -> str:
    vs = vectors_of(v)
    return " ".join(f"{x:#04x}" for x in vs) if vs else "-"


def vcpu_table(vm) -> tuple[list[str], list[list[str]]]:
    """The per-vCPU summary of a VM (either backend): mode, ID, TPR/PPR, IRR/ISR, mp_state."""
    headers = ["vCPU", "mode", "APIC ID", "TPR", "PPR", "IRR", "ISR", "mp_state"]
    rows = []
    for cpu in vm.vcpus:
        base = cpu.get_msr(0x1B)
        mode = ("disabled" if not base & (1 << 11)
                else "x2APIC" if base & (1 << 10) else "xAPIC")
        if getattr(cpu, "td", False):
            # KVM_GET_LAPIC fails for a TD: show the TD's own page (the TDX module's) and
            # the ID from KVM's copy
            s = LapicState(cpu.vmx.apic.state())
            apic_id = cpu.get_msr(0x802)
            mode += " TD"
        else:
            s = LapicState(cpu.get_lapic())
            apic_id = s["ID"]
        rows.append([
            str(cpu.vcpu_id), mode + (" BSP" if base & (1 << 8) else ""),
            f"{apic_id >> 24 if 'x2APIC' not in mode or apic_id >> 24 else apic_id:#x}",
            f"{s['TPR']:#04x}", f"{s['PPR']:#04x}", _vec_list(s.irr), _vec_list(s.isr),
            U.MP_STATE_NAMES.get(cpu.get_mp_state(), "?"),
        ])
    return headers, rows


# ---------------------------------------------------------------- commands
# results that are statuses or counts, printed in decimal: KVM_IRQ_LINE_STATUS (-1 coalesced,
# 0 masked, > 0 delivered) and the number of APICs that accepted an MSI
DECIMAL_RESULTS = {"irq_line", "signal_msi"}


def result_text(o) -> str:
    v = o.value
    if (o.step.op in DECIMAL_RESULTS and o.error is None and o.skipped is None
            and isinstance(v, int) and not isinstance(v, bool)):
        return str(v)
    return o.result_text()


def check_writable(path: str, option: str) -> None:
    """Refuse, before any work, an output file that could not be written: a missing
    directory, a directory, a file without write permission (nothing is left behind)."""
    if os.path.isdir(path):
        raise ApicvError(f"{option} {path}: is a directory")
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise ApicvError(f"{option} {path}: no directory {parent}")
    existed = os.path.lexists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise ApicvError(f"{option} {path}: cannot write: {e.strerror}") from None
    if not existed:
        os.unlink(path)


def _run_scenario(sc, out: Out, backend: str, trace: bool, trace_out: str | None,
                  quiet: bool = False) -> int:
    from .scenario import Runner

    vm = sc.make_vm(backend=backend)
    try:
        tracer = vm.enable_tracing() if (trace or trace_out) else None
        runner = Runner(sc, vm)
        failures = 0
        skipped = None
        steps = None if quiet else StepTable(out, f"{sc.file} ({backend})", sc.nsteps)
        from .crosscheck import HostDifferenceNamer

        namer = HostDifferenceNamer() if backend == "kvm" else None
        for o in runner.run():
            if namer is not None:
                o.failure = namer.annotate(o)  # a known host difference says so
            status = "ok" if o.failure is None else "FAIL"
            if o.skipped:
                status, skipped = "skip", o
            if o.failure:
                failures += 1
            if steps is not None:
                who = f"vcpu {o.step.args['vcpu']}" if "vcpu" in o.step.args else "vm"
                steps.add([str(o.step.index), who, o.step.describe(), result_text(o), status,
                           o.failure or o.skipped or o.step.note])
        if steps is not None:
            steps.flush()
        if tracer is not None and trace:
            out.rule("trace (tracepoint format, virtual time)")
            for line in tracer.lines():
                out.print(line)
        if tracer is not None and trace_out:
            tracer.write_chrome_trace(trace_out, [v.vcpu_id for v in vm.vcpus])
            out.print(f"wrote {trace_out} (Chrome trace-event JSON; open it in ui.perfetto.dev)")
        headers, table_rows = vcpu_table(vm)
        out.table(headers, table_rows, title="final state")
        if failures:
            out.print(f"{failures} step(s) failed", style="bold red")
            return 1
        if skipped is not None:
            out.print(f"{skipped.step.index - 1} of {sc.nsteps} steps run, all as expected; "
                      f"stopped at step {skipped.step.index}: {skipped.skipped}", style="yellow")
            return 0
        out.print(f"{sc.nsteps} steps, all as expected", style="green")
        return 0
    finally:
        vm.close()


def exit_comparison(sc) -> tuple[list[str], list[list[str]]]:
    """Run *sc* on the model with APICv on and off (TPR shadow either way) and count the VM
    exits of the same guest work, by VMX basic exit reason, over all vCPUs."""
    from collections import Counter

    from .scenario import Runner
    from .vmx.vmx import EXIT_REASONS

    totals = []
    for on in (True, False):
        vm = sc.make_vm(enable_apicv=on, flexpriority=True)
        for _ in Runner(sc, vm).run():
            pass
        c: Counter[str] = Counter()
        for cpu in vm.vcpus:
            c.update(cpu.vmx.exit_counts)
        totals.append(c)
    reasons = sorted(set(totals[0]) | set(totals[1]), key=lambda r: EXIT_REASONS.get(r, 999))
    rows = [[r, str(EXIT_REASONS.get(r, "?")), str(totals[0][r]), str(totals[1][r])]
            for r in reasons]
    rows.append(["total", "", str(sum(totals[0].values())), str(sum(totals[1].values()))])
    return ["exit reason", "#", "APICv on", "APICv off"], rows


def cmd_demo(args, out: Out) -> int:
    from .scenario import parse

    if args.trace_out:
        check_writable(args.trace_out, "--trace-out")
    text = resources.files("apicv").joinpath("data/demo.toml").read_text()
    sc = parse(text, "demo.toml")
    out.print(sc.description)
    status = _run_scenario(sc, out, args.backend, trace=True, trace_out=args.trace_out)
    headers, rows = exit_comparison(sc)
    out.table(headers, rows, title="VM exits for the same guest work (model; the agent's own "
              "OUTs back to userspace not counted)")
    return status


def cmd_run(args, out: Out) -> int:
    from .scenario_stream import stream

    if args.trace_out:
        check_writable(args.trace_out, "--trace-out")
    # every file is checked before a step runs; a big one is read again a step at a time as
    # it runs, so that memory does not grow with the steps (scenario.stream)
    scs = [stream(path) for path in args.files]
    status = 0
    for sc in scs:
        status |= _run_scenario(sc, out, args.backend, trace=args.trace, trace_out=args.trace_out)
    return status


def cmd_state_decode(args, out: Out) -> int:
    s = LapicState.load(args.file)
    rows = [[f"{d.reg.offset:#05x}", d.reg.short, d.value_text(), d.fields_text()]
            for d in s.decode()]
    out.table(["offset", "register", "value", "fields"], rows, title=args.file)
    res = s.reserved_bytes()
    if res:
        out.print("nonzero bytes outside the register dwords: "
                  + ", ".join(f"{o:#05x}={b:#04x}" for o, b in res))
    return 0


def cmd_state_diff(args, out: Out) -> int:
    a = LapicState.load(args.a)
    b = LapicState.load(args.b)
    d = diff(a, b)
    if not d:
        out.print("identical")
        return 0
    out.table(["register", "A", "B", "what changed"], [[x.name, x.a, x.b, x.detail] for x in d],
              title=f"A = {args.a}, B = {args.b}")
    return 1


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (and exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    try:
        n = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def positive_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return x


BACKEND_HELP = ("model: the apicv model (default); kvm: the real KVM through /dev/kvm, "
                "running a small guest agent")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="apicv", description="KVM local-APIC model: "
                "run scenarios, read LAPIC states, check against the real KVM.")
    p.add_argument("--plain", action="store_true", help="plain text output (no colours)")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    d = sub.add_parser("demo", help="run the built-in 4-vCPU demo and print its trace")
    d.add_argument("--trace-out", metavar="FILE.json", help="write a Perfetto/Chrome timeline")
    d.add_argument("--backend", default="model", choices=["model", "kvm"], help=BACKEND_HELP)
    d.set_defaults(func=cmd_demo)

    r = sub.add_parser("run", help="run scenario files (TOML)")
    r.add_argument("files", nargs="+", metavar="FILE.toml")
    r.add_argument("--trace", action="store_true", help="print the trace")
    r.add_argument("--trace-out", metavar="FILE.json", help="write a Perfetto/Chrome timeline")
    r.add_argument("--backend", default="model", choices=["model", "kvm"], help=BACKEND_HELP)
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("state", help="decode or diff KVM_GET_LAPIC states (1024-byte files)")
    ss = s.add_subparsers(dest="state_cmd", required=True)
    sd = ss.add_parser("decode", help="a table of decoded registers and vector lists")
    sd.add_argument("file")
    sd.set_defaults(func=cmd_state_decode)
    sf = ss.add_parser("diff", help="register-level differences between two states")
    sf.add_argument("a")
    sf.add_argument("b")
    sf.set_defaults(func=cmd_state_diff)

    c = sub.add_parser("crosscheck", help="run scenarios on the model and the real KVM, "
                       "comparing after every step")
    c.add_argument("files", nargs="+", metavar="FILE.toml")
    c.add_argument("--model-apicv", action="store_true",
                   help="run the model with APICv on (the host has none)")
    c.add_argument("--trace", action="store_true", help="also record the host's KVM "
                   "tracepoints (tracefs, root) and compare them with the model's, step by step")
    c.set_defaults(func=cmd_crosscheck)

    f = sub.add_parser("fuzz", help="random scenarios on both backends; a disagreement is "
                       "shrunk and written out as a scenario file")
    f.add_argument("--seed", type=int, default=0,
                   help="random seed: the same seed gives the same scenarios (default 0)")
    f.add_argument("--count", type=positive_int, default=None,
                   help="scenarios to try (default 200; with --duration: until the time is up)")
    f.add_argument("--steps", type=positive_int, default=20,
                   help="at most this many steps each (default 20)")
    f.add_argument("--out", default="fuzz-disagreement.toml",
                   help="where to write a shrunk disagreement")
    f.add_argument("--model-apicv", action="store_true",
                   help="run the model with APICv on (the host has none)")
    f.add_argument("--trace", action="store_true",
                   help="also compare the host's KVM trace with the model's (tracefs, root)")
    f.add_argument("--workers", type=positive_int, default=None,
                   help="worker processes, each with its own VMs (default: the cores available)")
    f.add_argument("--duration", type=positive_float, default=None, metavar="SECONDS",
                   help="stop starting cases after this long")
    f.add_argument("--campaign", metavar="DIR", default=None,
                   help="keep the campaign in DIR (cases done, counts, corpus of reproducers, "
                   "summary)")
    f.add_argument("--resume", metavar="DIR", default=None,
                   help="continue the campaign kept in DIR (its seed and options)")
    f.add_argument("--cluster", metavar="ADDRESS", default=None,
                   help="spread the cases over the nodes of this Ray cluster that have "
                   "/dev/kvm (needs apicv[cluster])")
    f.set_defaults(func=cmd_fuzz)
    t = sub.add_parser("trace", help="the host's KVM trace of a scenario, the model's, a diff")
    ts = t.add_subparsers(dest="trace_cmd", required=True, parser_class=_Parser)
    tr = ts.add_parser("record", help="run on the real KVM, record its kvm:* tracepoints")
    tr.add_argument("scenario", metavar="SCENARIO.toml")
    tr.add_argument("--out", metavar="FILE", help="write here (default: print)")
    tr.add_argument("--all-events", action="store_true",
                    help="also kvm_inj_exception, kvm_userspace_exit, kvm_msr, ...")
    tm = ts.add_parser("model", help="the model's trace of the scenario")
    tm.add_argument("scenario", metavar="SCENARIO.toml")
    tm.add_argument("--out", metavar="FILE", help="write here (default: print)")
    tm.add_argument("--this-host", action="store_true",
                    help="configure the model as this machine's KVM (as the crosscheck does)")
    td = ts.add_parser("diff", help="compare two traces event by event (step by step when "
                       "both have step marks)")
    td.add_argument("a")
    td.add_argument("b")
    td.add_argument("--context", type=int, default=3, help="events shown around a divergence")
    td.add_argument("--strict", action="store_true",
                    help="no named host differences (H1, M1): every event must match")
    t.set_defaults(func=cmd_trace)
    rc = sub.add_parser("restore-check", help="run a workload uninterrupted and through a "
                        "VMM's save and restore ioctls; report what the guest lost")
    rc.add_argument("files", nargs="+", metavar="SCENARIO.toml")
    rc.add_argument("--every-step", action="store_true",
                    help="snapshot after every workload step, not only at 'snapshot' steps")
    rc.add_argument("--kvm-version", metavar="X.Y",
                    help="KVM's restore rules of that release (model; 4.11-6.18, default 6.18)")
    rc.add_argument("--backend", default="model", choices=["model", "kvm"], help=BACKEND_HELP)
    rc.set_defaults(func=lambda args, out: __import__("apicv.restore").restore.cli(args, out))

    b = sub.add_parser("boot", help="boot a multiboot kernel on /dev/kvm with the model as its "
                       "interrupt controller (or KVM's, to compare)")
    b.add_argument("kernel", metavar="KERNEL", help="multiboot (v1) ELF32/ELF64 kernel, or a "
                   "Linux bzImage or vmlinux (x86 64-bit boot protocol, MP table)")
    b.add_argument("--smp", type=int, default=1, metavar="N", help="vCPUs (default 1)")
    b.add_argument("--memory", type=int, default=128, metavar="MB", help="RAM (default 128)")
    b.add_argument("--x2apic", action=argparse.BooleanOptionalAction, default=True,
                   help="x2APIC in CPUID.1:ECX (default on)")
    b.add_argument("--tsc-deadline", action=argparse.BooleanOptionalAction, default=True,
                   help="TSC-deadline timer in CPUID.1:ECX (default on)")
    b.add_argument("--append", default="", metavar="ARGS", help="kernel command line")
    b.add_argument("--initrd", metavar="FILE", help="multiboot module 0, or Linux's initrd")
    b.add_argument("--env", action="append", default=[], metavar="KEY=VAL",
                   help="make module 0 a kvm-unit-tests environment (KEY=VAL lines; "
                        "repeatable; not with --initrd)")
    b.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="stop after S seconds (exit status 124; default 60)")
    b.add_argument("--irqchip", default="model", choices=["model", "kernel"],
                   help="model: apicv is the LAPIC/IOAPIC/PIC (default); kernel: KVM's")
    b.add_argument("--trace-out", metavar="FILE.json",
                   help="write the model's Perfetto/Chrome timeline of the run")
    b.add_argument("--stats", action="store_true",
                   help="print exits and injections by kind at the end (stderr)")
    b.set_defaults(func=cmd_boot)
    return p


class _PipeSafe:
    """The guest's serial output stream: a reader that went away (``apicv boot ... | head``)
    ends the output, not the guest's run, whose status stays the exit status."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.closed = False

    def write(self, data: bytes) -> None:
        if not self.closed:
            try:
                self.stream.write(data)
            except BrokenPipeError:
                self._close()

    def flush(self) -> None:
        if not self.closed:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._close()

    def _close(self) -> None:
        self.closed = True
        _stdout_to_devnull()


def cmd_boot(args, out: Out) -> int:
    """Boot a kernel; the exit status is the guest's (isa-debug-exit), 124 on timeout."""
    from .vmm import STATUS_ERROR, boot

    initrd: str | bytes | None = args.initrd
    if args.env:
        if initrd is not None:
            raise ApicvError("--env makes module 0 itself: use it or --initrd, not both")
        for kv in args.env:
            if "=" not in kv or not kv.split("=", 1)[0]:
                raise ApicvError(f"--env {kv!r}: expected KEY=VAL")
        initrd = "".join(f"{kv}\n" for kv in args.env).encode()
    if args.trace_out:
        check_writable(args.trace_out, "--trace-out")
    try:
        res = boot(args.kernel, smp=args.smp, memory_mb=args.memory, x2apic=args.x2apic,
                   tsc_deadline=args.tsc_deadline, append=args.append, initrd=initrd,
                   timeout=args.timeout, irqchip=args.irqchip, trace_out=args.trace_out,
                   out=_PipeSafe(sys.stdout.buffer))
    except (ApicvError, KeyboardInterrupt):
        raise
    except OSError as e:
        if e.filename is None:  # not a file the user named (say, an ioctl): a VMM bug
            raise
        raise ApicvError(f"{e.filename}: {e.strerror}") from None
    except Exception as e:  # a VMM bug must not exit 1, which is the guest's "passed"
        print(f"apicv boot: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return STATUS_ERROR
    total = sum(res.exits.values())
    print(f"apicv boot: {res.message} (status {res.status}) after {res.elapsed:.2f} s, "
          f"{args.irqchip} irqchip, {total} exits to userspace", file=sys.stderr)
    if res.status in (124, 125) and res.rips:
        print("apicv boot: vCPU RIPs: " + ", ".join(f"{i}: {r:#x}" for i, r in
                                                   sorted(res.rips.items())), file=sys.stderr)
    if args.stats:
        for name, n in res.exits.most_common():
            print(f"  {name:28} {n}", file=sys.stderr)
        print(f"  {'KVM_INTERRUPT':28} {res.injected}\n  {'KVM_NMI':28} {res.nmis}",
              file=sys.stderr)
    if args.trace_out:
        print(f"apicv boot: wrote {args.trace_out} (Chrome trace-event JSON; open it in "
              "ui.perfetto.dev)", file=sys.stderr)
    return res.status


def _need_kvm() -> None:
    from .kvm import kvm_available

    ok, why = kvm_available()
    if not ok:
        raise ApicvError(f"the real KVM backend is not available: {why}")


def cmd_crosscheck(args, out: Out) -> int:
    from .crosscheck import crosscheck_files

    _need_kvm()
    return crosscheck_files(args.files, out=out.print, model_apicv=args.model_apicv,
                            trace=args.trace)


def cmd_fuzz(args, out: Out) -> int:
    try:
        import hypothesis  # noqa: F401
    except ImportError:
        raise ApicvError("apicv fuzz needs hypothesis: pip install 'apicv[fuzz]'") from None
    from .fuzz import fuzz

    if args.out:
        check_writable(args.out, "--out")
    if args.cluster is not None:
        from .cluster import check_ray

        check_ray()
    else:
        _need_kvm()
    return fuzz(seed=args.seed, count=args.count, max_steps=args.steps, out_path=args.out,
                out=out, quiet=out.console is None, model_apicv=args.model_apicv,
                trace=args.trace, workers=args.workers, duration=args.duration,
                campaign_dir=args.campaign, resume=args.resume, cluster=args.cluster)


def cmd_trace(args, out: Out) -> int:
    from .tracediff import cmd_trace as run

    return run(args, out)


def _stdout_to_devnull() -> None:
    """After a closed pipe: what is still buffered for stdout, and Python's flush of it at
    exit, go nowhere instead of raising BrokenPipeError again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    """The ``apicv`` command. Every way out is an exit status and at most one line on
    stderr: 2 for an error the user can fix, 130 after Ctrl-C, 0 when the reader of stdout
    went away (``apicv demo | head -1``), 70 for a bug (``APICV_DEBUG=1`` re-raises it)."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        out = Out(plain=args.plain)
        status = args.func(args, out)
        sys.stdout.flush()  # a closed pipe shows here, not at the interpreter's exit
        return status
    except ApicvError as e:
        print(f"apicv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("apicv: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _stdout_to_devnull()
        return 0
    except RecursionError as e:
        if os.environ.get("APICV_DEBUG") == "1":
            raise
        print(f"apicv: error: input nested too deeply ({e})", file=sys.stderr)
        return 2
    except OSError as e:
        if os.environ.get("APICV_DEBUG") == "1" or e.filename is None:
            return _internal_error(e)
        print(f"apicv: error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    except Exception as e:
        return _internal_error(e)


EXIT_SOFTWARE = 70  # sysexits.h EX_SOFTWARE: an internal error


def _internal_error(e: BaseException) -> int:
    if os.environ.get("APICV_DEBUG") == "1":
        raise e
    msg = " ".join(str(e).split()) or "(no message)"
    print(f"apicv: internal error: {type(e).__name__}: {msg} (please report it; "
          "APICV_DEBUG=1 shows the traceback)", file=sys.stderr)
    return EXIT_SOFTWARE


if __name__ == "__main__":
    sys.exit(main())
