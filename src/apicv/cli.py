"""The ``apicv`` command line: demo, run, state decode/diff (and, with the KVM backend,
crosscheck and fuzz). Every error a user can cause is printed as one readable line and a
non-zero exit status, never as a traceback."""

from __future__ import annotations

import argparse
import sys
from importlib import resources

from . import uapi as U
from .errors import ApicvError
from .state import LapicState, diff, vectors_of


# ---------------------------------------------------------------- output helpers
class Out:
    """Tables and text through rich when it is installed, plain text otherwise."""

    def __init__(self, plain: bool = False) -> None:
        self.console = None
        if not plain:
            try:
                from rich.console import Console

                self.console = Console(highlight=False)
            except ImportError:
                pass

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
                t.add_column(h)
            for r in rows:
                t.add_row(*r)
            self.console.print(t)
            return
        if title:
            print(title)
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
                  for i, h in enumerate(headers)]
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
        print("  ".join("-" * w for w in widths))
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


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
def _run_scenario(sc, out: Out, backend: str, trace: bool, trace_out: str | None,
                  quiet: bool = False) -> int:
    from .scenario import Runner

    vm = sc.make_vm(backend=backend)
    try:
        tracer = vm.enable_tracing() if (trace or trace_out) else None
        runner = Runner(sc, vm)
        failures = 0
        rows = []
        skipped = None
        for o in runner.run():
            status = "ok" if o.failure is None else "FAIL"
            if o.skipped:
                status, skipped = "skip", o
            if o.failure:
                failures += 1
            if not quiet:
                who = f"vcpu {o.step.args['vcpu']}" if "vcpu" in o.step.args else "vm"
                rows.append([str(o.step.index), who, o.step.describe(), o.result_text(), status,
                             o.failure or o.skipped or o.step.note])
        if not quiet:
            out.table(["#", "on", "call", "result", "", "note"], rows,
                      title=f"{sc.file} ({backend})")
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
            out.print(f"{skipped.step.index - 1} of {len(sc.steps)} steps run, all as expected; "
                      f"stopped at step {skipped.step.index}: {skipped.skipped}", style="yellow")
            return 0
        out.print(f"{len(sc.steps)} steps, all as expected", style="green")
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

    text = resources.files("apicv").joinpath("data/demo.toml").read_text()
    sc = parse(text, "demo.toml")
    out.print(sc.description)
    status = _run_scenario(sc, out, args.backend, trace=True, trace_out=args.trace_out)
    headers, rows = exit_comparison(sc)
    out.table(headers, rows, title="VM exits for the same guest work (model; the agent's own "
              "OUTs back to userspace not counted)")
    return status


def cmd_run(args, out: Out) -> int:
    from .scenario import load

    status = 0
    for path in args.files:
        sc = load(path)
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="apicv", description="KVM local-APIC model: "
                                "run scenarios, read LAPIC states, check against the real KVM.")
    p.add_argument("--plain", action="store_true", help="plain text output (no colours)")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="run the built-in 4-vCPU demo and print its trace")
    d.add_argument("--trace-out", metavar="FILE.json", help="write a Perfetto/Chrome timeline")
    d.add_argument("--backend", default="model", choices=["model", "kvm"])
    d.set_defaults(func=cmd_demo)

    r = sub.add_parser("run", help="run scenario files (TOML)")
    r.add_argument("files", nargs="+", metavar="FILE.toml")
    r.add_argument("--trace", action="store_true", help="print the trace")
    r.add_argument("--trace-out", metavar="FILE.json", help="write a Perfetto/Chrome timeline")
    r.add_argument("--backend", default="model", choices=["model", "kvm"])
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
    c.set_defaults(func=cmd_crosscheck)

    f = sub.add_parser("fuzz", help="random scenarios on both backends; a disagreement is "
                       "shrunk and written out as a scenario file")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--count", type=int, default=200, help="scenarios to try")
    f.add_argument("--steps", type=int, default=20, help="at most this many steps each")
    f.add_argument("--out", default="fuzz-disagreement.toml",
                   help="where to write a shrunk disagreement")
    f.add_argument("--model-apicv", action="store_true",
                   help="run the model with APICv on (the host has none)")
    f.set_defaults(func=cmd_fuzz)
    b = sub.add_parser("boot", help="boot a multiboot kernel on /dev/kvm with the model as its "
                       "interrupt controller (or KVM's, to compare)")
    b.add_argument("kernel", metavar="KERNEL", help="multiboot (v1) ELF32/ELF64 kernel")
    b.add_argument("--smp", type=int, default=1, metavar="N", help="vCPUs (default 1)")
    b.add_argument("--memory", type=int, default=128, metavar="MB", help="RAM (default 128)")
    b.add_argument("--x2apic", action=argparse.BooleanOptionalAction, default=True,
                   help="x2APIC in CPUID.1:ECX (default on)")
    b.add_argument("--tsc-deadline", action=argparse.BooleanOptionalAction, default=True,
                   help="TSC-deadline timer in CPUID.1:ECX (default on)")
    b.add_argument("--append", default="", metavar="ARGS", help="kernel command line")
    b.add_argument("--initrd", metavar="FILE", help="multiboot module 0")
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
    try:
        res = boot(args.kernel, smp=args.smp, memory_mb=args.memory, x2apic=args.x2apic,
                   tsc_deadline=args.tsc_deadline, append=args.append, initrd=initrd,
                   timeout=args.timeout, irqchip=args.irqchip, trace_out=args.trace_out,
                   out=sys.stdout.buffer)
    except (ApicvError, KeyboardInterrupt):
        raise
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
    return crosscheck_files(args.files, out=out.print, model_apicv=args.model_apicv)


def cmd_fuzz(args, out: Out) -> int:
    from .fuzz import fuzz

    _need_kvm()
    return fuzz(seed=args.seed, count=args.count, max_steps=args.steps, out_path=args.out,
                out=out, model_apicv=args.model_apicv)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Out(plain=args.plain)
    try:
        return args.func(args, out)
    except ApicvError as e:
        print(f"apicv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("apicv: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
