"""Differential checking: run a scenario on the model and on the real KVM, step by step, and
compare after every step.

Compared after each step, for every vCPU: the full KVM_GET_LAPIC page, IA32_APIC_BASE and the
mp_state; and the step's own outcome (return value, #GP, errno, the vectors a take_interrupts
returned). The model's clock is set to the real VM's clock before each step, so timers run on
(almost) the same timeline; TMCCT is compared with a tolerance because wall time decides it.

Where this host's KVM differs from upstream KVM (which the model follows), the difference is
named (:data:`HOST_DIFFERENCES`), probed on the real KVM rather than assumed, and applied
openly: a comparison that a known difference makes meaningless is skipped or the scenario is
stopped, with the reason printed and counted -- never silently masked. With ``trace=True``
the host's KVM tracepoints of each step are compared with the model's as well
(:mod:`apicv.hosttrace`, :mod:`apicv.tracediff`).

Why this module is long: every skip a named difference (:mod:`apicv.differences`) calls for
is applied here, next to the comparison it qualifies, so that what is not compared, and why,
can be read in one place.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import apicdef as A
from . import uapi as U
from .differences import (
    APICV_DIFFERENCES,
    HOST_DIFFERENCES,
    TMCCT_SLACK_NS,
    HostDifference,
    HostDifferenceNamer,
    apicv_visible,
    probe_host,
)
from .errors import ApicvError, GuestFault, KvmError
from .memory import SCRATCH_GPA
from .scenario import Outcome, Runner, Scenario, Step
from .scenario_ops import GUEST_OPS, MODEL_ONLY_OPS, decode_irqchip, model_only_reason
from .state import LapicState, diff, vectors_of

__all__ = ["APICV_DIFFERENCES", "HOST_DIFFERENCES", "Crosscheck", "CrosscheckResult",
           "HostDifference", "HostDifferenceNamer", "Mismatch", "StepReport", "apicv_visible",
           "crosscheck_files", "format_report", "guest_ppr", "probe_host"]

# guest RAM compared after every step: the scratch area's first page (VAPIC words, PV-EOI
# bytes live there in the examples and the fuzzer)
COMPARED_RAM = (SCRATCH_GPA, 0x1000)


@dataclass
class Mismatch:
    what: str
    model: str
    kvm: str
    detail: str = ""


@dataclass
class StepReport:
    step: Step
    model: Outcome
    kvm: Outcome
    mismatches: list[Mismatch] = field(default_factory=list)
    state_diffs: list[tuple[int, list]] = field(default_factory=list)  # (vcpu_id, diff rows)
    pages: dict[int, tuple[LapicState, LapicState]] = field(default_factory=dict)  # differing
    trace: list[str] = field(default_factory=list)  # the trace divergence, both streams


@dataclass
class CrosscheckResult:
    scenario: Scenario
    steps_compared: int = 0
    disagreement: StepReport | None = None
    stopped: str | None = None  # a host difference ended the comparison (reason)
    skipped: list[str] = field(default_factory=list)  # comparisons left out, with reasons
    error: str | None = None  # the scenario could not run at all (e.g. option not on host)
    traced: bool = False  # the host's trace was compared step by step
    trace_events: int = 0  # model events compared
    trace_named: dict[str, int] = field(default_factory=dict)  # named trace differences

    @property
    def ok(self) -> bool:
        return self.disagreement is None and self.error is None


# host operations that cannot reach the PIC or IOAPIC state (KVM_GET_IRQCHIP): they act on one
# vCPU, or send an MSI (to the LAPICs; an ExtINT MSI is dropped by kvm_apic_set_irq)
NO_IRQCHIP_OPS = frozenset({"get_lapic", "set_lapic", "get_mp_state", "set_mp_state",
                            "get_msr", "set_msr", "nmi", "set_vapic_addr", "get_vcpu_events",
                            "signal_msi", "get_irqchip", "set_or_clear_apicv_inhibit"})

# steps whose host-side work may run in a kernel worker (irqfd_inject), outside the traced pid
IRQFD_OPS = frozenset({"irqfd", "eventfd_write", "eventfd_read"})


# ---------------------------------------------------------------- comparing
def _outcome_key(o: Outcome) -> Any:
    e = o.error
    if e is None:
        return ("ok",)
    if isinstance(e, GuestFault):
        return ("fault", e.vector)
    if isinstance(e, KvmError):
        return ("errno", e.errno)
    return ("error", type(e).__name__)


def _pit_state_key(data: bytes) -> tuple:
    """struct kvm_pit_state2 without what wall time decides: count_load_time (the host's
    ktime) and latched_count (the counter when a latch command came; kept after it is read)."""
    from .i8254 import unpack_pit_state2

    st = unpack_pit_state2(data)
    chans = tuple(tuple((f, v) for f, v in ch.items()
                        if f not in ("count_load_time", "latched_count"))
                  for ch in st["channels"])
    return chans, st["flags"]


def _pit_text(data: bytes) -> str:
    chans, flags = _pit_state_key(data)
    return "; ".join(f"ch{i} " + " ".join(f"{f}={v:#x}" for f, v in ch)
                     for i, ch in enumerate(chans)) + f"; flags={flags:#x}"


def _tmcct_close(model: int, kvm: int, page: LapicState, bus_ns: int, min_period_ns: int) -> bool:
    tdcr = page["TDCR"] & 0xF
    div = 1 << ((((tdcr & 3) | ((tdcr & 8) >> 1)) + 1) & 7)
    tick = bus_ns * div
    slack = TMCCT_SLACK_NS // tick + 2
    d = abs(model - kvm)
    if (page["LVTT"] >> 17) & 3 == 1:  # periodic: counts wrap at the (clamped) period
        period = max(page["TMICT"], -(-min_period_ns // tick))
        d = min(d, abs(period - d))
    return d <= slack


class Crosscheck:
    """Runs one scenario on both backends."""

    def __init__(self, scenario: Scenario, differences: dict[str, bool] | None = None,
                 model_apicv: bool = False, trace: bool = False, vms=None) -> None:
        """*trace*: also record the host's KVM tracepoints during each step (tracefs, root)
        and compare them with the model's, event by event (:mod:`apicv.tracediff`).
        *vms*: a :class:`apicv.vmpool.VmPool` to take the real VM from (reset, when this
        scenario allows it) and give it back to; else a new VM, closed at the end."""
        self.sc = scenario
        self.vms = vms
        self.diffs = probe_host() if differences is None else differences
        self.model_apicv = model_apicv
        self.trace = trace
        if trace:
            if model_apicv:
                raise ApicvError("the host's trace is compared with the model of this host "
                                 "only (not with --model-apicv: with APICv most accesses "
                                 "never reach KVM's tracepoints)")
            from .hosttrace import check_available

            check_available()  # TraceUnavailable: not root, no tracefs

    def run(self, on_step: Callable[[StepReport], None] | None = None) -> CrosscheckResult:
        from .kvm import KvmVm

        res = CrosscheckResult(self.sc)
        if self.trace:
            from .hosttrace import HostTrace

            with HostTrace() as ht:
                self._host_trace = ht
                try:
                    return self._run_vm(res, KvmVm, on_step)
                finally:
                    self._host_trace = None
        return self._run_vm(res, KvmVm, on_step)

    def _run_vm(self, res: CrosscheckResult, KvmVm, on_step) -> CrosscheckResult:  # noqa: N803
        try:
            kvm_vm = KvmVm(self.sc.vm) if self.vms is None else self.vms.acquire(self.sc)
        except (ApicvError, ValueError, NotImplementedError) as e:
            res.error = f"the real KVM cannot run this scenario's VM: {e}"
            return res
        try:
            # the real VM's resolved config is the model of this host (its module
            # parameters, TSC, MCE and SMM support), with the scenario's own options in it
            cfg = kvm_vm.config
            if self.model_apicv:
                cfg = cfg.replace(enable_apicv=True, flexpriority=True)
            from .vm import Vm

            model_vm = Vm(cfg, trace=self.trace)
            # the model's time follows the real VM's clock, also while a guest op runs
            model_vm.clock.follow(lambda: kvm_vm.clock.now)
            self._run(model_vm, kvm_vm, res, on_step)
        finally:
            if self.vms is None:
                kvm_vm.close()
            else:
                self.vms.release(kvm_vm)
        return res

    def _run(self, mvm, kvm_vm, res: CrosscheckResult, on_step) -> None:
        mrun = Runner(self.sc, mvm)
        krun = Runner(self.sc, kvm_vm)
        h1 = self.diffs.get("H1", False)
        tracing = self.trace and getattr(self, "_host_trace", None) is not None
        if tracing:
            from .tracediff import TraceComparer, parse_lines

            res.traced = True
            comparer = TraceComparer()
            ht = self._host_trace
            ht.take()  # VM creation
            seen = len(mvm.trace.events)
        min_period = mvm.kvm.min_timer_period_us * 1000
        bus = mvm.kvm.apic_bus_cycle_ns
        known: dict = {}  # what the real KVM showed so far (_compare_state)
        for st in self.sc.steps:
            if st.op in MODEL_ONLY_OPS:
                res.stopped = (f"step {st.index}: {st.op} is model-only "
                               f"({model_only_reason(st.op)})")
                return
            if self.model_apicv:
                key = apicv_visible(st, mvm, mrun)
                if key is not None:
                    res.stopped = (f"step {st.index}: APICv-visible difference {key}: "
                                   f"{APICV_DIFFERENCES[key]}")
                    return
            isr_before = {c.vcpu_id: c.apic.isr for c in mvm.vcpus}
            eois_before = len(mvm.eoi_broadcasts)
            # H2: a timer expiry pending while it cannot be injected (LVTT masked, APIC off)
            held_timer = {c.vcpu_id for c in mvm.vcpus
                          if c.apic.timer_pending and not c.apic.apic_has_pending_timer()}
            unannounced = (self.diffs.get("H8") and st.op == "take_interrupts"
                           and _unannounced_irr(mvm.vcpu(st.args["vcpu"])))
            ko = krun.step(st)
            mvm.clock.sync()
            if st.op == "advance":
                # the model's clock follows the real VM's: the real backend's sleep was the
                # advance (stepping the model as well would count the time twice)
                mo = Outcome(st)
                mo.failure = Runner.check(st, mo)
            else:
                mo = mrun.step(st)
            rep = StepReport(st, mo, ko)
            # H1: once an interrupt is injected while something is (or stays) in service, the
            # host's ISR/PPR and every later delivery on that vCPU diverge from upstream
            if h1 and st.op == "take_interrupts" and mo.error is None:
                irqs = [v for v in (mo.value or []) if v != 2]
                vid = st.args["vcpu"]
                if irqs and (not st.args.get("eoi", True) or isr_before.get(vid)):
                    res.stopped = (f"step {st.index}: {HOST_DIFFERENCES['H1'].title} (H1): "
                                   f"vCPU {vid} took {[hex(v) for v in irqs]} with "
                                   + ("no EOI" if not st.args.get("eoi", True)
                                      else "vectors in service"))
                    return
                if irqs and len(mvm.eoi_broadcasts) > eois_before:
                    vec = mvm.eoi_broadcasts[eois_before][1]
                    res.stopped = (f"step {st.index}: {HOST_DIFFERENCES['H1'].title} (H1): "
                                   f"vCPU {vid}'s EOI of {vec:#x} reached the IOAPIC in the "
                                   "model; with nothing in ISR this host's EOI is not "
                                   "broadcast (remote IRR / RTC tracking stay as they were)")
                    return
            self._compare_outcome(rep, mvm, res)
            if tracing:
                # the events since the previous step on each side (a timer firing between
                # steps counts to the next one on both)
                mev = [_ev(e) for e in mvm.trace.events[seen:]]
                seen = len(mvm.trace.events)
                td = comparer.compare(mev, parse_lines(ht.take()), _timer_vectors(mvm))
                res.trace_events += len(td.model)
                if not td.ok and st.op in IRQFD_OPS:
                    res.skipped.append(
                        f"step {st.index}: its trace (R1: an irqfd's injection may run in a "
                        "kernel worker (irqfd_inject), not in this process: the host's trace "
                        f"of it is not recorded; model {len(td.model)} events, host "
                        f"{len(td.host)})")
                elif not td.ok and mvm.pit is not None:
                    res.skipped.append(
                        f"step {st.index}: its trace (R2: the PIT's ticks are injected by the "
                        "kvm-pit kernel thread (pit_do_work), not by this process: the host's "
                        f"trace of them is not recorded; model {len(td.model)} events, host "
                        f"{len(td.host)})")
                elif not td.ok:
                    rep.mismatches.append(Mismatch("trace", td.why, ""))
                    rep.trace = td.report()
                res.trace_named = dict(comparer.named)
            self._compare_state(rep, mvm, kvm_vm, bus, min_period, known)
            if rep.mismatches or rep.state_diffs:
                vid = st.args.get("vcpu")
                if (self.diffs.get("H2") and vid in held_timer and st.op in GUEST_OPS
                        and not mvm.vcpu(vid).apic.timer_pending):
                    res.stopped = (f"step {st.index}: {HOST_DIFFERENCES['H2'].title} (H2): "
                                   f"vCPU {vid} had a timer expiry pending while LVTT was "
                                   "masked; upstream injects it after this step")
                    return
                if unannounced:
                    res.stopped = (f"step {st.index}: {HOST_DIFFERENCES['H8'].title} (H8): "
                                   f"vCPU {vid} had {unannounced:#x} in IRR with no "
                                   "KVM_REQ_EVENT or interrupt window pending")
                    return
                if self.model_apicv and _vapic_word_only(rep, mvm):
                    res.stopped = (f"step {st.index}: APICv-visible difference V8: "
                                   f"{APICV_DIFFERENCES['V8']}")
                    return
                fast = _periodic_race(rep, mvm)
                if fast is not None:
                    res.stopped = (f"step {st.index}: {HOST_DIFFERENCES['H4'].title} (H4): "
                                   f"vCPU {fast[0]}'s periodic timer (period {fast[1]} ns) "
                                   "fired a different number of times during the step")
                    return
            res.steps_compared += 1
            if on_step is not None:
                on_step(rep)
            if rep.mismatches or rep.state_diffs:
                res.disagreement = rep
                return

    def _compare_outcome(self, rep: StepReport, mvm, res: CrosscheckResult) -> None:
        mo, ko, st = rep.model, rep.kvm, rep.step
        if _outcome_key(mo) != _outcome_key(ko):
            rep.mismatches.append(Mismatch("outcome", mo.result_text(), ko.result_text()))
            return
        if mo.error is not None:
            return
        mv, kv = mo.value, ko.value
        if st.op == "inb" and st.args["port"] in (0x40, 0x41, 0x42, 0x43):
            res.skipped.append(f"step {st.index}: a PIT port read ("
                               + ("H9" if st.args["port"] == 0x43 else "a count on wall time, H4")
                               + ")")
            return
        if st.op == "get_vcpu_events" and self.model_apicv:
            mv, kv = mv.replace(interrupt_nr=0), kv.replace(interrupt_nr=0)  # V10
        if st.op == "get_pit2":
            if _pit_state_key(mv) != _pit_state_key(kv):
                rep.mismatches.append(Mismatch("return value", _pit_text(mv), _pit_text(kv)))
            return
        if st.op == "ioapic_read" and mvm.vcpu(st.args["vcpu"]).last_read_undefined:
            res.skipped.append(f"step {st.index}: value of a rejected read (H3; the APIC base "
                               "was moved onto the IOAPIC window)")
            return
        if st.op == "mmio_read":
            cpu = mvm.vcpu(st.args["vcpu"])
            if cpu.last_read_undefined:
                res.skipped.append(f"step {st.index}: value of a rejected read (H3)")
                return
            if self.model_apicv and _sw_rejects_read(cpu.apic, st.args["offset"],
                                                     st.args.get("size", 4)):
                # V7: virtualized by APIC-register virtualization, rejected by the emulation
                res.skipped.append(f"step {st.index}: read the software LAPIC rejects (H3) and "
                                   "APICv virtualizes (V7)")
                return
            if st.args["offset"] == A.APIC_TMCCT:
                page = LapicState(cpu.get_lapic())
                if _tmcct_close(mv, kv, page, mvm.kvm.apic_bus_cycle_ns,
                                mvm.kvm.min_timer_period_us * 1000):
                    return
        if st.op == "rdmsr" and st.args["index"] in (A.MSR_IA32_TSC,):
            return  # the guest TSC: wall time
        if st.op == "get_lapic":
            return  # compared as state below
        if mv != kv:
            rep.mismatches.append(Mismatch("return value", mo.result_text(), ko.result_text()))

    def _compare_state(self, rep: StepReport, mvm, kvm_vm, bus: int, min_period: int,
                       known: dict | None = None) -> None:
        """*known*: KVM's answers at earlier steps. IA32_APIC_BASE is read for the step's vCPU
        only (an INIT keeps it), the PIC/IOAPIC only after steps that can reach them
        (NO_IRQCHIP_OPS); else the model is compared with KVM's last answer, asked again only
        if they differ (a PIT tick on wall time)."""
        st = rep.step
        if known is None:
            known = {}
        vid = st.args.get("vcpu")
        bases = known.setdefault("base", {})
        kvm_side = []
        for kc in kvm_vm.vcpus:
            if kc.vcpu_id == vid or kc.vcpu_id not in bases:
                bases[kc.vcpu_id] = kc.get_msr(A.MSR_IA32_APICBASE)
            kvm_side.append((bases[kc.vcpu_id], kc.peek_mp_state(), kc.get_lapic()))
        # read the model at (about) the same wall time: TMCCT is remaining time mod period
        mvm.clock.sync()
        for kc, mc, (kbase, kst, kraw) in zip(kvm_vm.vcpus, mvm.vcpus, kvm_side, strict=True):
            mbase = mc.get_msr(A.MSR_IA32_APICBASE)
            if mbase != kbase and kc.vcpu_id != vid:  # not read this step: read it now
                kbase = bases[kc.vcpu_id] = kc.get_msr(A.MSR_IA32_APICBASE)
            if mbase != kbase:
                rep.mismatches.append(Mismatch(f"vCPU {mc.vcpu_id} IA32_APIC_BASE",
                                               f"{mbase:#x}", f"{kbase:#x}"))
            mst = mc.get_mp_state()
            if mst != kst:
                rep.mismatches.append(Mismatch(f"vCPU {mc.vcpu_id} mp_state",
                                               U.MP_STATE_NAMES.get(mst, str(mst)),
                                               U.MP_STATE_NAMES.get(kst, str(kst))))
            mraw = mc.get_lapic()
            if mraw == kraw:
                continue  # byte for byte: nothing to decode
            mp, kp = LapicState(mraw), LapicState(kraw)
            if _tmcct_close(mp["TMCCT"], kp["TMCCT"], mp, bus, min_period):
                kp["TMCCT"] = mp["TMCCT"]
            if self.model_apicv:
                # with a TPR shadow the PPR word is a cache KVM refreshes when it looks; compare
                # it as the guest reads it
                mp["PPR"], kp["PPR"] = guest_ppr(mp), guest_ppr(kp)
                mp["SELF_IPI"] = kp["SELF_IPI"]  # V6
            rows = diff(mp, kp)
            if rows:
                rep.state_diffs.append((mc.vcpu_id, rows))
                rep.pages[mc.vcpu_id] = (mp, kp)
        if mvm.ioapic is not None:
            # the in-kernel PIC pair and IOAPIC (KVM_GET_IRQCHIP), field by field
            chips = known.setdefault("irqchip", {})
            for chip, name in ((U.KVM_IRQCHIP_PIC_MASTER, "PIC master"),
                               (U.KVM_IRQCHIP_PIC_SLAVE, "PIC slave"),
                               (U.KVM_IRQCHIP_IOAPIC, "IOAPIC")):
                fresh = st.op not in NO_IRQCHIP_OPS or chip not in chips
                if fresh:
                    chips[chip] = kvm_vm.get_irqchip(chip)
                mb, kb = mvm.get_irqchip(chip), chips[chip]
                if mb != kb and not fresh:  # e.g. a PIT tick since: read it now
                    kb = chips[chip] = kvm_vm.get_irqchip(chip)
                if mb != kb:
                    mf, kf = decode_irqchip(chip, mb), decode_irqchip(chip, kb)
                    for f in mf:
                        if mf[f] != kf[f]:
                            rep.mismatches.append(Mismatch(f"{name} {f}", f"{mf[f]:#x}",
                                                           f"{kf[f]:#x}"))
        gpa, size = COMPARED_RAM
        mm, km = mvm.read_guest(gpa, size), kvm_vm.read_guest(gpa, size)
        if mm != km:
            at = next(i for i in range(size) if mm[i] != km[i])
            rep.mismatches.append(Mismatch(f"guest RAM at {gpa + at:#x}",
                                           mm[at & ~3:(at & ~3) + 4].hex(),
                                           km[at & ~3:(at & ~3) + 4].hex()))


# ---------------------------------------------------------------- reporting
def format_report(res: CrosscheckResult) -> list[str]:
    lines: list[str] = []
    sc = res.scenario
    if res.error:
        return [f"{sc.file}: not run: {res.error}"]
    if res.disagreement is None:
        text = f"{sc.file}: {res.steps_compared} steps agree"
        if res.traced:
            text += f", {res.trace_events} trace events"
            if res.trace_named:
                from .tracediff import named_text

                text += f" ({named_text(res.trace_named)} named)"
        if res.stopped:
            text += f"; stopped at {res.stopped}"
        lines.append(text)
        for s in res.skipped:
            lines.append(f"  not compared: {s}")
        return lines
    rep = res.disagreement
    st = rep.step
    who = f"vCPU {st.args['vcpu']}" if "vcpu" in st.args else "VM"
    lines.append(f"{sc.file}: DISAGREEMENT at step {st.index} ({who}: {st.describe()})")
    if st.note:
        lines.append(f"  note: {st.note}")
    lines.append(f"  model: {rep.model.result_text()}")
    lines.append(f"  kvm:   {rep.kvm.result_text()}")
    for m in rep.mismatches:
        if m.what == "trace":
            continue
        lines.append(f"  {m.what}: model {m.model}, kvm {m.kvm}" + (f" ({m.detail})"
                                                                     if m.detail else ""))
    for line in rep.trace:
        lines.append("  " + line)
    for vid, rows in rep.state_diffs:
        lines.append(f"  vCPU {vid} KVM_GET_LAPIC differs (A = model, B = kvm):")
        for r in rows:
            lines.append(f"    {r.name:10} model {r.a:>12}  kvm {r.b:>12}  {r.detail}")
    return lines


def _periodic_race(rep: StepReport, mvm) -> tuple[int, int] | None:
    """H4: with a periodic timer faster than the TMCCT slack, how many times it fires during a
    guest operation is decided by wall time. (vcpu_id, period) if every difference of this step
    is about that timer's vector (taken vectors, IRR/ISR bits, PPR, TMCCT), else None."""
    fast: dict[int, tuple[int, int]] = {}
    for c in mvm.vcpus:
        a = c.apic
        if a.apic_lvtt_period() and 0 < a.period <= TMCCT_SLACK_NS:
            fast[c.vcpu_id] = (a.kvm_lapic_get_reg(A.APIC_LVTT) & 0xFF, a.period)
    if not fast:
        return None
    hit = None
    if rep.mismatches:
        vid = rep.step.args.get("vcpu")
        mv, kv = rep.model.value, rep.kvm.value
        if (vid not in fast or any(m.what != "return value" for m in rep.mismatches)
                or not isinstance(mv, list) or not isinstance(kv, list)):
            return None
        vec = fast[vid][0]
        if [v for v in mv if v != vec] != [v for v in kv if v != vec]:
            return None
        hit = vid
    for vid, (mp, kp) in rep.pages.items():
        if vid not in fast:
            return None
        bit = 1 << fast[vid][0]
        if (mp.irr ^ kp.irr) & ~bit or (mp.isr ^ kp.isr) & ~bit:
            return None
        rows = {r.name for _, rows in rep.state_diffs if _ == vid for r in rows}
        if rows - {"IRR", "ISR", "PPR", "TMCCT"}:
            return None
        hit = vid
    return None if hit is None else (hit, fast[hit][1])


def _vapic_word_only(rep: StepReport, mvm) -> bool:
    """V8: every difference of this step is in some APICv vCPU's VAPIC word -- or in the TPR
    (and so PPR) of such a vCPU, which kvm_lapic_sync_from_vapic reads back from the word after
    each exit (a posted interrupt raises no KVM_REQ_EVENT, so no entry rewrites the word)."""
    if not rep.mismatches:
        return False
    # (APICv may have been deactivated since -- an inhibit -- while the word still shows it)
    vapic_ids = {c.vcpu_id for c in mvm.vcpus if c.apic.vapic_addr}
    for vid, rows in rep.state_diffs:
        if vid not in vapic_ids or any(r.name not in ("TPR", "PPR") for r in rows):
            return False
    words = [c.apic.vapic_addr for c in mvm.vcpus if c.apic.vapic_addr]
    for m in rep.mismatches:
        if not m.what.startswith("guest RAM at "):
            return False
        at = int(m.what.removeprefix("guest RAM at "), 16)
        if not any(w <= at < w + 4 for w in words):
            return False
    return True


def _unannounced_irr(cpu) -> int:
    """H8: the vector an entry would inject on this host although upstream has no request
    (KVM_REQ_EVENT) or interrupt window that would make it look; 0 if none. Reads the model
    without changing it (kvm_apic_has_interrupt would refresh PPR)."""
    from .kvm_host import KVM_REQ_EVENT

    apic = cpu.apic
    if (cpu.arch.requests & KVM_REQ_EVENT or cpu.irq_window_requested or not apic.hw_enabled
            or apic.apicv_active or not apic.irr):
        return 0
    vec = apic.irr.bit_length() - 1
    tpr = apic.kvm_lapic_get_reg(A.APIC_TASKPRI) & 0xFF
    isr = apic.isr.bit_length() - 1 if apic.isr else 0
    ppr = tpr if (tpr & 0xF0) >= (isr & 0xF0) else isr & 0xF0
    return vec if (vec & 0xF0) > (ppr & 0xF0) else 0


def _ev(e):
    from .tracediff import Ev

    return Ev(e.name, e.text, e.line())


def _timer_vectors(mvm) -> frozenset[tuple[str, int]]:
    """(apicid as the trace prints it, LVTT vector) of every vCPU whose APIC timer is armed
    or has an expiry pending: its interrupt may come at another step on the host (H4)."""
    out = set()
    for c in mvm.vcpus:
        a = c.apic
        lvtt = a.kvm_lapic_get_reg(A.APIC_LVTT)
        if a.timer_pending or a.kvm_lapic_get_reg(A.APIC_TMICT) or a.apic_lvtt_tscdeadline():
            out.add((f"{c.vcpu_id:x}", lvtt & 0xFF))
    return frozenset(out)


def _sw_rejects_read(apic, offset: int, size: int) -> bool:
    """Would KVM's kvm_lapic_reg_read reject this xAPIC read (no APICv)?"""
    return apic.hw_enabled and not apic.x2apic and apic.kvm_lapic_reg_read_rejected(offset, size)


def guest_ppr(page: LapicState) -> int:
    """PPR as a guest read would return it (TPR and the highest ISR vector). KVM_GET_LAPIC's
    PPR word is a cache KVM refreshes when it looks (a PPR read, an EOI, an injection); with a
    TPR shadow the guest changes TPR without KVM seeing it, so the word can lag -- not
    guest-visible."""
    tpr = page["TPR"] & 0xFF
    isr = page.isr
    isrv = isr.bit_length() - 1 if isr else 0
    return tpr if (tpr & 0xF0) >= (isrv & 0xF0) else isrv & 0xF0


def vector_text(v: int) -> str:
    return "[" + ", ".join(f"{x:#04x}" for x in vectors_of(v)) + "]"


def crosscheck_files(paths: list[str], out=print, model_apicv: bool = False,
                     trace: bool = False) -> int:
    """`apicv crosscheck`: 0 when every scenario agrees (or stops at an explained host
    difference), 1 on a disagreement, 2 when a scenario cannot run."""
    from .scenario import load

    if trace:
        if model_apicv:
            raise ApicvError("--trace compares the host's trace with the model of this host: "
                             "not with --model-apicv (with APICv most accesses never reach "
                             "KVM's tracepoints)")
        from .hosttrace import check_available

        check_available()
    diffs = probe_host()
    active = [k for k, v in diffs.items() if v]
    out("host differences in effect: " + ", ".join(
        f"{k} ({HOST_DIFFERENCES[k].title})" for k in active))
    status = 0
    t0 = time.perf_counter()
    total = 0
    for path in paths:
        sc = load(path)
        res = Crosscheck(sc, diffs, model_apicv=model_apicv, trace=trace).run()
        total += res.steps_compared
        for line in format_report(res):
            out(line)
        if res.error:
            status = max(status, 2)
        elif res.disagreement is not None:
            status = 1
    dt = time.perf_counter() - t0
    out(f"{len(paths)} scenario(s), {total} steps compared in {dt:.2f} s "
        f"({total / dt if dt else 0:.0f} steps/s)")
    return status
