"""``apicv restore-check``: does a VMM's save and restore sequence lose anything the guest would
have seen?

A restore scenario is a TOML file::

    description = "..."
    [vm]                        # as in scenarios; kvm_version = "6.5" picks older KVM rules
    [[workload]]                # scenario steps (apicv.scenario ops) ...
    do = "advance"
    ns = 1000
    [[workload]]
    do = "snapshot"             # ... and the point(s) at which the VMM snapshots
    [[save]]                    # the VMM's save ioctls, in order
    do = "get_lapic"            # no vcpu: every vCPU, in vCPU order
    save = "lapic"              # the value's name
    [[restore]]                 # the VMM's restore ioctls into a fresh VM, in order
    do = "set_lapic"
    state = "$lapic"            # "$name" is a saved value, "$name.field" one of its fields
    expect = "lost"             # optional: the verdict the file is meant to get

The engine runs the workload uninterrupted on one VM, and again on a second VM that stops at
the snapshot point, runs ``save``, creates a fresh VM, runs ``restore`` on it, puts every vCPU
back where it was resting (in HLT, in guest mode: the VMM's next KVM_RUN) and runs the rest of
the workload there. It compares what the guest sees after the point -- every interrupt taken
(by vCPU, vector and step), what every step returned, which halted vCPUs woke, APICv -- and,
on the model, the state each vCPU was restored to against the state it was saved in, step by
restore step, to name the ioctl that left a field wrong and the KVM rule behind it.

Verdicts: ``same`` (exit 0); ``lost`` (an interrupt, a timer or an NMI the uninterrupted guest
took never arrives, or a halted vCPU never wakes; exit 1); ``differs`` (something arrives
late, early or twice, a read returns another value, state differs; exit 1).

Why this module is long: running the workload twice, carrying out the save and restore ioctls,
and comparing both what the guest saw and the state each restore step left (with the KVM rule
that explains a wrong field) is one engine; the file format is in :mod:`apicv.restore_format`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import apicdef as A
from . import uapi as U
from .api import Sregs, VcpuEvents
from .errors import ApicvError, ScenarioError, VcpuNotRunnable
from .restore_format import (
    KVM_VERSION_RULES,
    MODEL_KVM_VERSION,
    RESTORE_OPS,
    SAVE_OPS,
    IoctlStep,
    RestoreScenario,
    load,
    parse,
    parse_version,
)

__all__ = ["KVM_VERSION_RULES", "CheckResult", "IoctlStep", "RestoreScenario", "check",
           "check_point", "cli", "load", "parse", "parse_version", "report"]
from .scenario import Scenario
from .scenario_ops import MODEL_ONLY_OPS
from .state import LapicState, vectors_of


@dataclass
class Observation:
    """What the guest saw at one workload step."""

    index: int
    text: str  # the step
    result: str  # what it returned (or the error)
    taken: dict[int, list[int]]  # vCPU id -> vectors the guest took during the step
    halted: frozenset[int]  # vCPUs resting in HLT after it (model)
    clock: int
    stuck: frozenset[int] = frozenset()  # vCPUs KVM_RUN would not run (VcpuNotRunnable)


def _result_text(step, value: Any, error: Exception | None) -> str:
    if error is not None:
        return f"error: {error}"
    if step.op == "get_lapic":
        return "(state)"
    if isinstance(value, list):
        return "[" + ", ".join(f"{x:#x}" for x in value) + "]"
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:#x}"
    return str(value)


def _run_steps(vm, sc: Scenario, steps, start: int) -> list[Observation]:
    from .scenario import Runner

    runner = Runner(sc, vm)
    obs = []
    try:
        for k, st in enumerate(steps, start + 1):
            if vm.backend != "model" and st.op in MODEL_ONLY_OPS:
                raise ApicvError(f"workload step {k} ({st.op}) is model-only: the real backend "
                                 "never leaves a vCPU resting in KVM_RUN")
            before = {c.vcpu_id: len(c.taken) for c in vm.vcpus}
            value, error = None, None
            try:
                value = runner.call(st)
            except ScenarioError:
                raise
            except ApicvError as e:
                error = e
            except ValueError as e:
                raise ScenarioError(sc.file, st.index, None, str(e)) from None
            taken = {}
            for c in vm.vcpus:
                if st.op in ("take_interrupts", "run") and st.args.get("vcpu") == c.vcpu_id \
                        and isinstance(value, list):
                    new = value[before[c.vcpu_id]:]
                else:
                    new = list(c.taken[before[c.vcpu_id]:])
                if new:
                    taken[c.vcpu_id] = new
            halted = frozenset(c.vcpu_id for c in vm.vcpus
                               if getattr(c, "location", "host") == "halted")
            stuck = frozenset([error.vcpu_id]) if isinstance(error, VcpuNotRunnable) else (
                frozenset())
            obs.append(Observation(k, st.describe(), _result_text(st, value, error), taken,
                                   halted, vm.clock.now, stuck))
    finally:
        runner.close()
    return obs


# ---------------------------------------------------------------- the state a guest resumes in
_SKIP_REGS = {A.APIC_PROCPRI, A.APIC_TMCCT, A.APIC_ARBPRI}
_TIMER_SLACK_NS = 1000


def _reg_name(off: int) -> str:
    from .regs import BY_OFFSET

    r = BY_OFFSET.get(off)
    return r.short if r is not None else f"{off:#x}"


def vcpu_state(vm, cpu) -> dict[str, Any]:
    """The model vCPU's restorable state, normalized: registers (IRR with the PIR), the timer
    as time to expiry, the TSC-deadline relative to the guest TSC, apic_base, mp_state, NMIs."""
    apic = cpu.apic
    page = LapicState(cpu.lapic_view())
    st: dict[str, Any] = {}
    for off in range(0x20, 0x400, 0x10):
        if off in _SKIP_REGS or A.APIC_IRR <= off < A.APIC_IRR + 0x80 \
                or A.APIC_ISR <= off < A.APIC_ISR + 0x80 or A.APIC_TMR <= off < A.APIC_TMR + 0x80:
            continue
        st[_reg_name(off)] = page[off]
    irr = page.get_vectors("IRR")
    if apic.timer_pending and not page["LVTT"] & A.APIC_LVT_MASKED:
        irr |= 1 << (page["LVTT"] & 0xFF)  # injected at the next entry (kvm_inject_apic_timer_irqs)
    st["IRR"] = tuple(vectors_of(irr))
    st["ISR"] = tuple(vectors_of(page.get_vectors("ISR")))
    st["TMR"] = tuple(vectors_of(page.get_vectors("TMR")))
    t = apic.timer
    st["timer expires in (ns)"] = (t.expires - vm.clock.now) if t.active else None
    tsc = apic.guest_tsc()
    st["guest TSC"] = tsc
    st["TSC deadline (cycles from now)"] = (
        (apic.tscdeadline - tsc) if apic.tscdeadline and apic.apic_lvtt_tscdeadline() else 0)
    st["IA32_APIC_BASE"] = cpu.arch.apic_base
    st["mp_state"] = cpu.arch.mp_state
    st["NMIs pending"] = cpu.nmi_pending + cpu.arch.nmi_queued
    st["TSC kHz"] = cpu.arch.virtual_tsc_khz
    return st


def _same(field_: str, a: Any, b: Any) -> bool:
    if field_ == "timer expires in (ns)" and a is not None and b is not None:
        return abs(a - b) <= _TIMER_SLACK_NS
    if field_ == "TSC deadline (cycles from now)" and a and b:
        return abs(a - b) <= _TIMER_SLACK_NS * 10
    return a == b


def _fmt(field_: str, v: Any) -> str:
    if v is None:
        return "not armed"
    if isinstance(v, tuple):
        return "[" + ", ".join(f"{x:#x}" for x in v) + "]"
    if field_ == "mp_state":
        return U.MP_STATE_NAMES.get(v, str(v))
    if field_ == "IA32_APIC_BASE":
        from .vcpu_state import describe_apic_base

        return describe_apic_base(v)
    if isinstance(v, int) and ("ns" in field_ or "cycles" in field_ or field_ == "guest TSC"
                               or "kHz" in field_ or "pending" in field_):
        return f"{v:,}"
    return f"{v:#x}" if isinstance(v, int) else str(v)


# ---------------------------------------------------------------- running save and restore
class _Env:
    """Saved values: (vcpu id or None, name) -> value."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.values: dict[tuple[int | None, str], Any] = {}

    def get(self, ref: str, vcpu: int | None, step: IoctlStep) -> Any:
        name, _, attr = ref[1:].partition(".")
        for key in ((vcpu, name), (None, name)):
            if key in self.values:
                v = self.values[key]
                break
        else:
            raise ScenarioError(self.file, None, f"{step.section}[{step.index}]",
                                f"{ref}: nothing was saved as {name!r}"
                                + (f" for vCPU {vcpu}" if vcpu is not None else ""))
        if attr:
            if not hasattr(v, attr):
                raise ScenarioError(self.file, None, f"{step.section}[{step.index}]",
                                    f"{ref}: the saved {name!r} has no field {attr!r}")
            v = getattr(v, attr)
        return v


def _call(vm, step: IoctlStep, vcpu_id: int | None, env: _Env) -> Any:
    a = {k: (env.get(v, vcpu_id, step) if isinstance(v, str) and v.startswith("$") else v)
         for k, v in step.args.items()}
    op = step.op
    cpu = vm.vcpu(vcpu_id) if vcpu_id is not None else None
    if op == "get_lapic":
        return cpu.get_lapic()
    if op == "get_sregs":
        return cpu.get_sregs()
    if op == "get_msr":
        return cpu.get_msr(a["index"])
    if op == "get_mp_state":
        return cpu.get_mp_state()
    if op == "get_vcpu_events":
        return cpu.get_vcpu_events()
    if op == "get_tsc_khz":
        return cpu.get_tsc_khz()
    if op == "get_clock":
        return vm.get_clock()
    if op == "get_irqchip":
        return vm.get_irqchip(a["chip"])
    if op == "get_pit2":
        return vm.get_pit2()
    if op == "set_lapic":
        return cpu.set_lapic(_bytes(a["state"], step))
    if op == "set_sregs":
        base = a.get("sregs", cpu.get_sregs() if "sregs" not in a else None)
        if not isinstance(base, Sregs):
            raise ApicvError(f"{step.describe(vcpu_id)}: sregs must be a saved get_sregs value")
        return cpu.set_sregs(base.replace(**{k: a[k] for k in ("apic_base", "cr8") if k in a}))
    if op == "set_msr":
        return cpu.set_msr(a["index"], a["value"])
    if op == "set_mp_state":
        return cpu.set_mp_state(a["state"])
    if op == "set_vcpu_events":
        ev = a["events"]
        if not isinstance(ev, VcpuEvents):
            raise ApicvError(f"{step.describe(vcpu_id)}: events must be a saved get_vcpu_events")
        return cpu.set_vcpu_events(ev)
    if op == "set_tsc_khz":
        return cpu.set_tsc_khz(a["khz"])
    if op == "resend_irr":
        return resend_irr(vm, cpu, _bytes(a["state"], step))
    if op == "set_clock":
        return vm.set_clock(a["ns"])
    if op == "set_irqchip":
        return vm.set_irqchip(a["chip"], _bytes(a["state"], step))
    if op == "create_pit2":
        return vm.create_pit2(a.get("flags", 0))
    if op == "set_pit2":
        return vm.set_pit2(_bytes(a["state"], step))
    raise AssertionError(op)


def _bytes(v: Any, step: IoctlStep) -> bytes:
    if not isinstance(v, bytes | bytearray):
        raise ApicvError(f"{step.describe()}: expected a saved state, got {v!r}")
    return bytes(v)


def resend_irr(vm, cpu, page: bytes) -> int:
    """crosvm's ``set_lapic_and_restore_irr`` after KVM_SET_LAPIC, as the field notes describe
    it: every vector of the saved page's IRR is sent again with KVM_SIGNAL_MSI (fixed,
    physical destination: the vCPU's APIC ID in the page, edge). A vector still in IRR is
    simply set again. Returns how many were sent."""
    s = LapicState(page)
    x2apic = bool(cpu.get_sregs().apic_base & A.X2APIC_ENABLE)
    dest = s["ID"] if x2apic else s["ID"] >> 24
    n = 0
    for vec in vectors_of(s.get_vectors("IRR")):
        vm.signal_msi(0xFEE00000 | (dest & 0xFF) << 12, (dest >> 8) << 8 if x2apic else 0,
                      vec)
        n += 1
    return n


@dataclass
class Attribution:
    vcpu: int
    field: str
    saved: Any
    restored: Any
    culprit: str  # the ioctl, or what never happened
    why: list[str] = field(default_factory=list)


def _each(step: IoctlStep, vm) -> list[int | None]:
    target = (SAVE_OPS if step.section == "save" else RESTORE_OPS)[step.op][0]
    if target == "vm":  # a VM ioctl: once
        return [None]
    return [step.vcpu] if step.vcpu is not None else [c.vcpu_id for c in vm.vcpus]


def run_save(vm, rs: RestoreScenario, env: _Env) -> None:
    for st in rs.save:
        for vid in _each(st, vm):
            env.values[(vid, st.save)] = _call(vm, st, vid, env)


def _notes(vm, st: IoctlStep, vid: int | None, before: dict, after: dict, target: dict,
           env: _Env, lapic_done: set, inhibits: tuple[int, int]) -> list[str]:
    """What KVM did with this step that a VMM author should know (model only)."""
    notes = []
    if inhibits[0] != inhibits[1]:
        from .kvm_host import ApicvInhibit

        set_ = [r.name for r in ApicvInhibit if inhibits[1] >> r & 1 and not inhibits[0] >> r & 1]
        if set_:
            notes.append(f"set the APICv inhibit {', '.join(set_)} (sticky: APICv stays off for "
                         "the whole VM)")
    if vid is None:
        return notes
    b, a, t = before[vid], after[vid], target[vid]
    cpu = vm.vcpu(vid)
    op = st.op
    index = st.args.get("index")
    deadline_saved = (t["LVTT"] & cpu.apic.timer_mode_mask) == A.APIC_LVT_TIMER_TSCDEADLINE
    if op == "set_msr" and index == A.MSR_IA32_TSC_DEADLINE and deadline_saved:
        if (b["LVTT"] & cpu.apic.timer_mode_mask) != A.APIC_LVT_TIMER_TSCDEADLINE \
                or not b["IA32_APIC_BASE"] & A.MSR_IA32_APICBASE_ENABLE:
            notes.append("ignored: LVTT is not in TSC-deadline mode yet "
                         "(kvm_set_lapic_tscdeadline_msr returns without effect; "
                         "KVM_SET_MSRS still reports success)")
        elif b["guest TSC"] != t["guest TSC"]:
            delta = t["guest TSC"] - b["guest TSC"]
            ns = abs(delta) * 1_000_000 // max(cpu.arch.virtual_tsc_khz, 1)
            notes.append(f"armed against guest TSC {b['guest TSC']:,} before IA32_TSC was "
                         f"restored to {t['guest TSC']:,}: the hrtimer expires {ns:,} ns "
                         f"{'late' if delta > 0 else 'early'} (start_sw_tscdeadline)")
    if op == "set_msr" and index == A.MSR_IA32_TSC:
        if b["timer expires in (ns)"] is not None and (
                (b["LVTT"] & cpu.apic.timer_mode_mask) == A.APIC_LVT_TIMER_TSCDEADLINE):
            notes.append("the TSC-deadline hrtimer armed earlier keeps its expiry: "
                         "kvm_synchronize_tsc does not re-arm the LAPIC timer")
        if a["guest TSC"] != st.args.get("value") and isinstance(st.args.get("value"), int):
            notes.append("taken as a TSC synchronization (kvm_synchronize_tsc): the vCPU got "
                         "the VM's current offset, not this value")
    if op == "set_lapic":
        lapic_done.add(vid)
        if b["TSC deadline (cycles from now)"] and not a["TSC deadline (cycles from now)"]:
            notes.append("zeroed the TSC deadline set before it (apic_update_lvtt: the LVTT "
                         "timer mode changed)")
        saved = LapicState(_bytes(env.get(st.args["state"], vid, st), st)) \
            if isinstance(st.args.get("state"), str) else None
        ver = vm.kvm.kvm_version
        if saved is not None:
            lvtt = saved["LVTT"]
            expired_oneshot = ((lvtt & cpu.apic.timer_mode_mask) == A.APIC_LVT_TIMER_ONESHOT
                               and saved["TMICT"] and not saved["TMCCT"])
            if expired_oneshot and ver < (6, 3):
                notes.append("the saved one-shot timer had expired (TMCCT 0): this KVM "
                             "restarts it with a whole period (before 8e6ed96cdd50, 6.3)")
            elif expired_oneshot and ver < (6, 6) and cpu.apicv_active:
                notes.append("the saved one-shot timer had expired (TMCCT 0): it fired inside "
                             "KVM_SET_LAPIC into the PIR, which vmx_apicv_post_state_restore "
                             "then cleared -- its interrupt is lost (fixed by 9cfec6d097c6, "
                             "6.6)")
            if (b["IA32_APIC_BASE"] ^ t["IA32_APIC_BASE"]) & (
                    A.X2APIC_ENABLE | A.MSR_IA32_APICBASE_ENABLE):
                notes.append(f"loaded while IA32_APIC_BASE is still "
                             f"{_fmt('IA32_APIC_BASE', b['IA32_APIC_BASE'])}, not the saved "
                             f"{_fmt('IA32_APIC_BASE', t['IA32_APIC_BASE'])}: "
                             "kvm_apic_set_state reads the page in the current mode "
                             "(restore the APIC base first)")
    if op == "set_sregs" or (op == "set_msr" and index == A.MSR_IA32_APICBASE):
        if b["IA32_APIC_BASE"] == a["IA32_APIC_BASE"] and op == "set_msr":
            notes.append("no-op: IA32_APIC_BASE already has this value (kvm_apic_set_base "
                         "returns at once)")
        elif b["IA32_APIC_BASE"] != a["IA32_APIC_BASE"] and vid in lapic_done:
            notes.append("changed the APIC mode after KVM_SET_LAPIC: __kvm_apic_set_base "
                         "rewrote the APIC ID and LDR for the new mode")
        if op == "set_sregs" and b["TPR"] != a["TPR"] and vid in lapic_done:
            notes.append(f"KVM_SET_SREGS wrote TPR = cr8 << 4 = {a['TPR']:#x} after "
                         f"KVM_SET_LAPIC had restored {b['TPR']:#x} (kvm_set_cr8: TPR[3:0] "
                         "are not in CR8)")
    if op == "set_tsc_khz" and b["guest TSC"] != a["guest TSC"]:
        notes.append("the guest TSC jumped (the offset is kept at the new rate): restore "
                     "IA32_TSC after KVM_SET_TSC_KHZ")
    return notes


@dataclass
class RestoreTrace:
    """The restore as it went: each step with KVM's notes, and the fields left wrong."""

    steps: list[tuple[str, list[str]]] = field(default_factory=list)
    wrong: list[Attribution] = field(default_factory=list)


def run_restore(vm, rs: RestoreScenario, env: _Env, target: dict | None) -> RestoreTrace:
    """The restore steps on the fresh *vm*; with *target* (the model's saved states) each step
    is checked and the fields left wrong are attributed."""
    tr = RestoreTrace()
    model = target is not None
    history: dict[tuple[int, str], list[tuple[str, Any, list[str]]]] = {}
    later: dict[tuple[int, str], list[str]] = {}  # notes of steps that left a field as it was
    lapic_done: set[int] = set()
    states = {c.vcpu_id: vcpu_state(vm, c) for c in vm.vcpus} if model else {}
    for st in rs.restore:
        for vid in _each(st, vm):
            inh0 = vm.apicv_inhibits if model else 0
            err = None
            try:
                _call(vm, st, vid, env)
            except ScenarioError:
                raise
            except ApicvError as e:
                err = e
            desc = st.describe(vid)
            notes = [f"failed: {err}"] if err is not None else []
            if model:
                after = {c.vcpu_id: vcpu_state(vm, c) for c in vm.vcpus}
                notes += _notes(vm, st, vid, states, after, target, env, lapic_done,
                                (inh0, vm.apicv_inhibits))
                for c in vm.vcpus:
                    for f, v in after[c.vcpu_id].items():
                        if not _same(f, states[c.vcpu_id][f], v):
                            history.setdefault((c.vcpu_id, f), []).append((desc, v, notes))
                        elif vid == c.vcpu_id and notes and f in _AFFECTS.get(st.op, ()):
                            later.setdefault((c.vcpu_id, f), []).extend(notes)
                states = after
            tr.steps.append((desc, notes))
    if model:
        for vid, want in target.items():
            for f, saved in want.items():
                got = states[vid][f]
                if _same(f, saved, got):
                    continue
                hist = history.get((vid, f), [])
                if hist:
                    culprit, _, why = hist[-1]
                    why = list(why) + [n for n in later.get((vid, f), []) if n not in why]
                    right_before = any(_same(f, saved, v) for _, v, _ in hist[:-1])
                    if right_before:
                        culprit += " undid it"
                else:
                    culprit = "no restore step set it (the fresh VM's value)"
                    why = []
                    for desc, n in tr.steps:
                        if any(k in desc for k in _RESTORERS.get(f, ())) and n:
                            culprit = f"{desc} had no effect"
                            why = n
                tr.wrong.append(Attribution(vid, f, saved, got, culprit, list(why)))
    return tr


# the fields each restore ioctl is meant to set (for "had no effect")
_RESTORERS = {
    "TSC deadline (cycles from now)": ("IA32_TSC_DEADLINE",),
    "timer expires in (ns)": ("IA32_TSC_DEADLINE", "set_lapic"),
    "guest TSC": ("IA32_TSC",),
    "IA32_APIC_BASE": ("set_sregs", "IA32_APICBASE"),
    "mp_state": ("set_mp_state",),
}
_AFFECTS = {"set_msr": ("TSC deadline (cycles from now)", "timer expires in (ns)", "guest TSC"),
            "set_lapic": ("TSC deadline (cycles from now)", "timer expires in (ns)", "IRR")}


# ---------------------------------------------------------------- comparing the two runs
@dataclass
class Finding:
    kind: str  # lost, never-wakes, late, early, duplicated, differs, state
    text: str


@dataclass
class PointResult:
    point: int  # workload steps done before the snapshot
    findings: list[Finding]
    restore: RestoreTrace
    rows: list[tuple[str, str, str]]  # (step, uninterrupted, restored) where they differ

    @property
    def verdict(self) -> str:
        if any(f.kind in ("lost", "never-wakes") for f in self.findings):
            return "lost"
        return "differs" if self.findings else "same"


def _timer_vectors(vm) -> dict[int, int]:
    out = {}
    for c in vm.vcpus:
        try:
            lvtt = LapicState(c.lapic_view() if vm.backend == "model" else c.get_lapic())["LVTT"]
        except ApicvError:
            continue
        out[c.vcpu_id] = lvtt & 0xFF
    return out


def _what(vec: int, vid: int, timers: dict[int, int]) -> str:
    if vec == 2:
        return f"NMI on vCPU {vid}"
    if timers.get(vid) == vec:
        return f"the LAPIC timer's vector {vec:#x} on vCPU {vid}"
    return f"vector {vec:#x} on vCPU {vid}"


def compare(base: list[Observation], rest: list[Observation], timers: dict[int, int],
            t0: tuple[int, int] = (0, 0)) -> tuple[list[Finding], list[tuple[str, str, str]]]:
    """*t0*: each run's clock at the snapshot point (lateness is measured from there)."""
    findings: list[Finding] = []
    rows = []

    def deliveries(obs: list[Observation]) -> dict[tuple[int, int], list[Observation]]:
        d: dict[tuple[int, int], list[Observation]] = {}
        for o in obs:
            for vid, vecs in o.taken.items():
                for v in vecs:
                    d.setdefault((vid, v), []).append(o)
        return d

    db, dr = deliveries(base), deliveries(rest)
    for key in sorted(set(db) | set(dr)):
        vid, vec = key
        what = _what(vec, vid, timers)
        b, r = db.get(key, []), dr.get(key, [])
        for ob, orr in zip(b, r, strict=False):
            if orr.index > ob.index:
                findings.append(Finding("late", f"{what}: taken at step {orr.index} after the "
                                        f"restore, at step {ob.index} uninterrupted "
                                        f"({(orr.clock - t0[1]) - (ob.clock - t0[0]):,} ns "
                                        "later)"))
            elif orr.index < ob.index:
                findings.append(Finding("early", f"{what}: taken at step {orr.index} after the "
                                        f"restore, at step {ob.index} uninterrupted"))
        for ob in b[len(r):]:
            kind = "timer never fires" if timers.get(vid) == vec else "lost"
            findings.append(Finding("lost", f"{what}: taken at step {ob.index} uninterrupted, "
                                    f"never after the restore ({kind})"))
        for orr in r[len(b):]:
            findings.append(Finding("duplicated", f"{what}: taken at step {orr.index} after "
                                    "the restore, not (again) uninterrupted"))
    for ob, orr in zip(base, rest, strict=True):
        took = ob.text.startswith(("take_interrupts", "run("))
        if (ob.result != orr.result and not took) or ob.taken != orr.taken:
            rows.append((f"{ob.index}: {ob.text}", _obs_text(ob), _obs_text(orr)))
        if ob.result != orr.result and not ob.text.startswith(("take_interrupts", "run(")):
            findings.append(Finding("differs", f"step {ob.index} {ob.text} returned "
                                    f"{orr.result} after the restore, {ob.result} "
                                    "uninterrupted"))
    asleep = set()  # halted (or not runnable) from some step to the end after the restore
    for o in reversed(rest):
        now = o.halted | o.stuck
        asleep = now if o is rest[-1] else asleep & now
    for vid in sorted(asleep):
        woke = next((o.index for o in base if vid not in o.halted | o.stuck), None)
        if woke is not None and all(vid not in o.halted | o.stuck for o in base[-1:]):
            findings.append(Finding("never-wakes", f"vCPU {vid} never wakes after the restore; "
                                    f"uninterrupted it was awake from step {woke}"))
    return findings, rows


def _obs_text(o: Observation) -> str:
    t = o.result
    if o.taken:
        t += "  took " + "; ".join(f"cpu{v}: " + ", ".join(f"{x:#x}" for x in xs)
                                   for v, xs in sorted(o.taken.items()))
    if o.halted:
        t += "  halted: " + ",".join(map(str, sorted(o.halted)))
    return t


def _make_vm(rs: RestoreScenario, backend: str):
    vm = rs.workload.make_vm(backend)
    if backend == "model":
        vm.kvm.kvm_version = rs.kvm_version
    return vm


def check_point(rs: RestoreScenario, point: int, backend: str = "model",
                baseline: list[Observation] | None = None) -> PointResult:
    """Save at *point* (workload steps done), restore into a fresh VM, finish the workload
    there, compare with the uninterrupted run."""
    steps = rs.workload.steps
    model = backend == "model"
    if baseline is None:
        vm = _make_vm(rs, backend)
        try:
            baseline = _run_steps(vm, rs.workload, steps, 0)
        finally:
            vm.close()
    src = _make_vm(rs, backend)
    dst = None
    try:
        _run_steps(src, rs.workload, steps[:point], 0)
        resting = {c.vcpu_id: (c.location, c.rflags_if) for c in src.vcpus
                   if getattr(c, "location", "host") != "host"}
        timers = _timer_vectors(src)
        t_src = src.clock.now
        pending_notes = _pending_at_save(src) if model else []
        env = _Env(rs.file)
        run_save(src, rs, env)
        target = {c.vcpu_id: vcpu_state(src, c) for c in src.vcpus} if model else None
        dst = _make_vm(rs, backend)
        trace = run_restore(dst, rs, env, target)
        if model:
            inh_src, inh_dst = src.apicv_inhibits, dst.apicv_inhibits
        for vid, (where, if_) in resting.items():  # the VMM's KVM_RUN after the restore
            cpu = dst.vcpu(vid)
            if where == "halted":
                # KVM_RUN of a vCPU restored HALTED blocks in vcpu_block until an event, as
                # the guest's HLT did: the model re-runs that HLT from RUNNABLE
                if cpu.mp_state == U.KVM_MP_STATE_HALTED:
                    cpu.arch.mp_state = U.KVM_MP_STATE_RUNNABLE
                cpu.halt(if_)
            else:
                cpu.enter_guest(if_)
        t_dst = dst.clock.now
        rest = _run_steps(dst, rs.workload, steps[point:], point)
        timers.update({k: v for k, v in _timer_vectors(dst).items() if k not in timers})
        findings, rows = compare(baseline[point:], rest, timers, (t_src, t_dst))
        trace.steps.insert(0, ("[save] (the state KVM_GET_* cannot see)", pending_notes)) \
            if pending_notes else None
        if model and inh_src != inh_dst:
            findings.append(Finding("differs", f"APICv inhibits {inh_dst:#x} after the "
                                    f"restore, {inh_src:#x} when saved"))
        for w in trace.wrong:
            findings.append(Finding("state", f"vCPU {w.vcpu} {w.field}: saved "
                                    f"{_fmt(w.field, w.saved)}, restored "
                                    f"{_fmt(w.field, w.restored)} -- {w.culprit}"))
        return PointResult(point, findings, trace, rows)
    finally:
        src.close()
        if dst is not None:
            dst.close()


def _pending_at_save(vm) -> list[str]:
    """Timer expiries KVM holds in ``lapic_timer.pending`` when the VMM saves: no KVM_GET_*
    ioctl reports them."""
    out = []
    for c in vm.vcpus:
        apic = c.apic
        if not apic.timer_pending:
            continue
        if apic.apic_lvtt_period():
            out.append(f"vCPU {c.vcpu_id}: a periodic timer expiry was pending "
                       "(lapic_timer.pending) when saved; KVM_GET_LAPIC does not carry it and "
                       "KVM_SET_LAPIC restarts the period from TMCCT, so that tick is lost in "
                       "any restore order (a vCPU paused outside KVM_RUN when its timer fires)")
        elif apic.apic_lvtt_oneshot():
            out.append(f"vCPU {c.vcpu_id}: a one-shot expiry was pending when saved; the page "
                       "shows TMCCT 0, which KVM_SET_LAPIC fires again (8e6ed96cdd50, 6.3)")
        else:
            out.append(f"vCPU {c.vcpu_id}: a TSC-deadline expiry was pending when saved; "
                       "IA32_TSC_DEADLINE still reads the passed deadline, which fires again "
                       "when restored after IA32_TSC")
    return out


@dataclass
class CheckResult:
    scenario: RestoreScenario
    backend: str
    points: list[PointResult]

    @property
    def verdict(self) -> str:
        v = [p.verdict for p in self.points]
        return "lost" if "lost" in v else "differs" if "differs" in v else "same"


def check(rs: RestoreScenario, *, every_step: bool = False, backend: str = "model",
          kvm_version: tuple[int, int] | None = None) -> CheckResult:
    """Run the scenario's restore check at its snapshot points (every point between two
    workload steps with *every_step*)."""
    if kvm_version is not None:
        rs.kvm_version = kvm_version
    if backend != "model" and rs.kvm_version != MODEL_KVM_VERSION:
        raise ApicvError("kvm_version selects the model's rules; the real backend is this "
                         "host's KVM")
    n = len(rs.workload.steps)
    points = sorted(set(rs.snapshots) | (set(range(1, n)) if every_step else set()))
    if not points:
        raise ScenarioError(rs.file, None, "workload",
                            "no snapshot point: add a step with do = \"snapshot\" (or use "
                            "--every-step)")
    vm = _make_vm(rs, backend)
    try:
        baseline = _run_steps(vm, rs.workload, rs.workload.steps, 0)
    finally:
        vm.close()
    return CheckResult(rs, backend, [check_point(rs, p, backend, baseline) for p in points])


def report(res: CheckResult, width: int = 100) -> str:
    """The verdict, and for every snapshot point that differs: the restore as KVM took it,
    the fields left wrong with the ioctl that did it, and the steps side by side."""
    rs = res.scenario
    lines = [f"{rs.file}: {rs.description}".rstrip(": ")]
    ver = ".".join(map(str, rs.kvm_version))
    lines.append(f"backend {res.backend}" + (f", KVM {ver} rules" if res.backend == "model"
                                              else " (timers run on wall time here)"))
    for p in res.points:
        head = f"snapshot after workload step {p.point}: {p.verdict.upper()}"
        lines.append("")
        lines.append(head)
        if p.verdict == "same" and len(res.points) > 1:
            continue
        lines.append("  restore:")
        for desc, notes in p.restore.steps:
            lines.append(f"    {desc}")
            for n in notes:
                lines.append(f"      ! {n}")
        for f in p.findings:
            lines.append(f"  {f.kind.upper()}: {f.text}")
        for w in p.restore.wrong:
            for n in w.why:
                lines.append(f"      because: {n}")
        if p.rows:
            half = (width - 6) // 2
            lines.append(f"  steps that differ     {'uninterrupted':<{half}} | saved and restored")
            for step, a, b in p.rows:
                lines.append(f"  {step}")
                lines.append(f"    {'':<18}{a[:half]:<{half}} | {b[:half]}")
    lines.append("")
    lines.append(f"verdict: {res.verdict}" + (f" (the file expects {rs.expect})"
                                               if rs.expect and rs.expect != res.verdict
                                               else ""))
    return "\n".join(lines)


def cli(args, out) -> int:
    """``apicv restore-check FILE.toml... [--every-step] [--kvm-version X.Y] [--backend kvm]``:
    the report of each file; exit status 1 when any file's verdict is not ``same``."""
    version = parse_version(args.kvm_version, "--kvm-version") if args.kvm_version else None
    status = 0
    for path in args.files:
        rs = load(path)
        res = check(rs, every_step=args.every_step, backend=args.backend, kvm_version=version)
        print(report(res), end="\n\n")  # plain: the side-by-side columns must not wrap
        status |= res.verdict != "same"
    return status
