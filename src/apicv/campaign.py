"""Fuzz campaigns: `apicv fuzz` at scale.

A campaign is the cases ``0 .. count-1`` of a seed (:func:`apicv.fuzz.case`), cut into chunks
of :data:`CHUNK` cases and run by worker processes (``workers``, default: the cores this
process may use), each with its own real VMs (:class:`apicv.vmpool.VmPool`: a VM is reset
and reused between cases where that is as good as a new one) -- or by the nodes of a Ray
cluster (:mod:`apicv.cluster`). Every case gives one record; records are merged by case
index, so the counts do not depend on how many processes ran them or in which order.

Disagreements are grouped by the host they came from (its fingerprint,
:func:`apicv.kvm.fingerprint.host_fingerprint`) and by the first field that differed; the
first case of each group (the lowest index) is shrunk by hypothesis (:func:`apicv.fuzz.shrink`)
on a host with that fingerprint, after the cases have run, so the same campaign shrinks the
same case whatever the number of workers.

A campaign directory (``campaign_dir``; ``resume`` continues one) holds ``campaign.json``
(the seed and options, the case ranges done, the records of disagreements, the counts),
``corpus/`` (the shrunk reproducers, TOML) and ``summary.txt`` (the final summary).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from dataclasses import dataclass, field
from typing import Any

CHUNK = 8  # cases per task
PROGRESS_EVERY_S = 0.5


# ---------------------------------------------------------------- one process's worker
@dataclass(frozen=True)
class Spec:
    """What every worker needs to run a case."""

    seed: int
    max_steps: int
    model_apicv: bool = False
    trace: bool = False


_WORKER: dict[str, Any] = {}


def _worker() -> dict[str, Any]:
    """This process's probed host differences, fingerprint and VM pool (made once)."""
    if not _WORKER:
        from .crosscheck import probe_host
        from .kvm.fingerprint import host_fingerprint
        from .vmpool import VmPool

        diffs = probe_host()
        _WORKER.update(diffs=diffs, fingerprint=host_fingerprint(diffs), pool=VmPool())
    return _WORKER


def first_field(res: Any) -> str:
    """The first thing that differed in a disagreement, without the vCPU number or address
    (so that one kind of difference is one group)."""
    rep = res.disagreement
    if rep.mismatches:
        what = rep.mismatches[0].what
    else:
        what = f"KVM_GET_LAPIC {rep.state_diffs[0][1][0].name}"
    what = re.sub(r"^vCPU \d+ ", "", what)
    return re.sub(r" at 0x[0-9a-f]+$", "", what)


def _crosscheck(spec: Spec, doc: dict[str, Any], w: dict[str, Any]):
    from .crosscheck import Crosscheck
    from .scenario import parse_doc

    sc = parse_doc(doc, "<fuzz>")
    return Crosscheck(sc, w["diffs"], model_apicv=spec.model_apicv, trace=spec.trace,
                      vms=w["pool"]).run()


def run_case(spec: Spec, index: int) -> dict[str, Any]:
    """Case *index* on this host: a record with its steps compared, the named difference it
    stopped at, whether it could not run, and for a disagreement the first differing field,
    the report and the integers the case was drawn from."""
    from .crosscheck import format_report
    from .fuzz import case

    w = _worker()
    doc, choices = case(spec.seed, index, spec.max_steps)
    res = _crosscheck(spec, doc, w)
    rec: dict[str, Any] = {"index": index, "steps": res.steps_compared,
                           "fingerprint": w["fingerprint"]["id"]}
    if res.stopped is not None:
        m = re.search(r"\b([HV]\d+)\b", res.stopped)
        rec["stopped"] = m.group(1) if m else "other"
    if res.error is not None:
        rec["not_run"] = True
    if res.disagreement is not None:
        rec["disagreement"] = {"field": first_field(res), "report": format_report(res),
                               "choices": choices}
    return rec


def run_chunk(spec: Spec, start: int, end: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Cases [start, end): (this host's fingerprint, their records)."""
    recs = [run_case(spec, i) for i in range(start, end)]
    return _worker()["fingerprint"], recs


def shrink_case(spec: Spec, index: int, choices: list[int]) -> dict[str, Any]:
    """Shrink case *index* on this host: the shrunk scenario table and its report (the
    unshrunk ones if the case no longer disagrees)."""
    from .crosscheck import format_report
    from .fuzz import case, shrink

    w = _worker()
    last: dict[str, Any] = {}

    def disagrees(doc: dict[str, Any]) -> bool:
        res = _crosscheck(spec, doc, w)
        if res.disagreement is not None:
            last[repr(doc)] = res
        return res.disagreement is not None

    doc = shrink(choices, spec.max_steps, disagrees)
    shrunk = doc is not None
    if doc is None:
        doc = case(spec.seed, index, spec.max_steps)[0]
        res = _crosscheck(spec, doc, w)
    else:
        res = last.get(repr(doc)) or _crosscheck(spec, doc, w)
    return {"index": index, "doc": doc, "shrunk": shrunk, "report": format_report(res),
            "fingerprint": w["fingerprint"]["id"]}


def worker_state() -> dict[str, Any]:
    """This process's worker state (empty before the first case): diffs, fingerprint, pool."""
    return _WORKER


def _init_worker() -> None:
    # Ctrl-C is the parent's to handle: it stops the workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ---------------------------------------------------------------- the merged result
@dataclass
class Summary:
    """The merged counts of a campaign (what does not depend on time or on the workers)."""

    seed: int
    max_steps: int
    model_apicv: bool
    cases: int = 0
    steps: int = 0
    stopped: int = 0
    stop_reasons: dict[str, int] = field(default_factory=dict)
    not_run: int = 0
    disagreements: int = 0
    done: list[list[int]] = field(default_factory=list)  # case ranges [start, end)
    # (fingerprint id, first field) -> {"count", "first", "choices", "report", ...}
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    hosts: dict[str, dict[str, Any]] = field(default_factory=dict)  # fingerprint id -> it

    def add(self, rec: dict[str, Any]) -> None:
        self.cases += 1
        self.steps += rec["steps"]
        if "stopped" in rec:
            self.stopped += 1
            self.stop_reasons[rec["stopped"]] = self.stop_reasons.get(rec["stopped"], 0) + 1
        self.not_run += bool(rec.get("not_run"))
        d = rec.get("disagreement")
        if d is not None:
            self.disagreements += 1
            key = f"{rec['fingerprint']} {d['field']}"
            g = self.groups.get(key)
            if g is None:
                g = self.groups[key] = {"fingerprint": rec["fingerprint"], "field": d["field"],
                                        "count": 0, "first": rec["index"]}
            g["count"] += 1
            if rec["index"] <= g["first"]:
                g.update(first=rec["index"], choices=d["choices"], report=d["report"])

    def mark_done(self, start: int, end: int) -> None:
        rs = sorted([*self.done, [start, end]])
        merged: list[list[int]] = []
        for s, e in rs:
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        self.done = merged

    def is_done(self, i: int) -> bool:
        return any(s <= i < e for s, e in self.done)

    def counts_line(self) -> str:
        reasons = ""
        if self.stop_reasons:
            reasons = " (" + ", ".join(f"{k} {n}" for k, n in
                                       sorted(self.stop_reasons.items())) + ")"
        return (f"{self.stopped} stopped at a named difference{reasons}; {self.not_run} not "
                f"runnable; {self.disagreements} disagreement(s)")

    def report_lines(self) -> list[str]:
        """The disagreements, by host and by first differing field (deterministic)."""
        from .kvm.fingerprint import fingerprint_text

        out: list[str] = []
        by_host: dict[str, list[dict[str, Any]]] = {}
        for g in self.groups.values():
            by_host.setdefault(g["fingerprint"], []).append(g)
        for fid in sorted(by_host):
            fp = self.hosts.get(fid)
            out.append(f"on host {fingerprint_text(fp) if fp else fid}:")
            for g in sorted(by_host[fid], key=lambda g: (g["first"], g["field"])):
                where = f" -> {g['file']}" if g.get("file") else ""
                out.append(f"  {g['field']}: {g['count']} case(s), first case {g['first']}"
                           f"{' (shrunk)' if g.get('shrunk') else ''}{where}")
        return out

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Summary:
        return cls(**d)


# ---------------------------------------------------------------- the campaign directory
class CampaignDir:
    """campaign.json, corpus/*.toml and summary.txt in *path*."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.state = os.path.join(path, "campaign.json")
        self.corpus = os.path.join(path, "corpus")

    def load(self) -> dict[str, Any]:
        from .errors import ApicvError

        try:
            with open(self.state, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            raise ApicvError(f"{self.path}: not a campaign directory (no campaign.json)") from None
        except (OSError, ValueError) as e:
            raise ApicvError(f"{self.state}: cannot read: {e}") from None

    def save(self, spec: Spec, count: int | None, summary: Summary) -> None:
        os.makedirs(self.path, exist_ok=True)
        tmp = self.state + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"seed": spec.seed, "max_steps": spec.max_steps,
                       "model_apicv": spec.model_apicv, "count": count,
                       "summary": summary.to_json()}, f, indent=1)
        os.replace(tmp, self.state)

    def write_reproducer(self, name: str, text: str) -> str:
        os.makedirs(self.corpus, exist_ok=True)
        path = os.path.join(self.corpus, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def write_summary(self, lines: list[str]) -> None:
        with open(os.path.join(self.path, "summary.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


# ---------------------------------------------------------------- executors
def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class LocalExecutor:
    """Chunks on this host: in this process (one worker) or a pool of spawned processes."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pool = None
        if workers > 1:
            import multiprocessing

            ctx = multiprocessing.get_context("spawn")
            self.pool = ctx.Pool(workers, initializer=_init_worker)
        self.nodes = workers

    def warm_up(self) -> None:
        """Start every worker (imports, probing the host) before the clock starts."""
        if self.pool is not None:
            self.pool.map(_warm, range(self.workers), chunksize=1)
        else:
            _worker()

    def hosts(self) -> dict[str, dict[str, Any]]:
        if self.pool is None:
            fp = _worker()["fingerprint"]
        else:
            fp = self.pool.apply(worker_fingerprint)
        return {fp["id"]: fp}

    def submit_chunk(self, spec: Spec, start: int, end: int):
        if self.pool is None:
            return _Done(run_chunk(spec, start, end))
        return self.pool.apply_async(run_chunk, (spec, start, end))

    def submit_shrink(self, spec: Spec, fingerprint: str, index: int, choices: list[int]):
        if self.pool is None:
            return _Done(shrink_case(spec, index, choices))
        return self.pool.apply_async(shrink_case, (spec, index, choices))

    def close(self, abort: bool = False) -> None:
        if self.pool is not None:
            if abort:
                self.pool.terminate()
            else:
                self.pool.close()
            self.pool.join()
            self.pool = None
        elif _WORKER:
            _WORKER["pool"].close()
            _WORKER.clear()


def _warm(_: int) -> None:
    _worker()
    time.sleep(0.05)  # so that each worker takes one


def worker_fingerprint() -> dict[str, Any]:
    return _worker()["fingerprint"]


class _Done:
    """An already finished task (the in-process executor)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def ready(self) -> bool:
        return True

    def get(self, timeout: float | None = None) -> Any:
        return self.value


# ---------------------------------------------------------------- progress and the summary
class Progress:
    """The live line: cases, cases/s, steps/s, disagreements (a rich status line on a
    terminal, nothing otherwise)."""

    def __init__(self, enabled: bool, total: int | None) -> None:
        self.live = None
        self.last = 0.0
        if not enabled:
            return
        try:
            from rich.console import Console
            from rich.live import Live
        except ImportError:
            return
        self.total = total
        self.live = Live("", console=Console(stderr=True), transient=True,
                         refresh_per_second=4)
        self.live.start()

    def update(self, s: Summary, cases: int, steps: int, dt: float,
               force: bool = False) -> None:
        if self.live is None or (not force and time.monotonic() - self.last < PROGRESS_EVERY_S):
            return
        self.last = time.monotonic()
        of = f"/{self.total}" if self.total else ""
        self.live.update(f"fuzz: {s.cases}{of} cases, {cases / dt if dt else 0:,.1f} cases/s, "
                         f"{steps / dt if dt else 0:,.0f} steps/s, {s.stopped} stopped, "
                         f"{s.disagreements} disagreement(s)")

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


def summary_lines(s: Summary, spec: Spec, *, new_cases: int, new_steps: int, dt: float,
                  workers: int, where: str, interrupted: bool,
                  hosts: dict[str, dict[str, Any]], shrink_s: float = 0.0) -> list[str]:
    """The first line as `apicv fuzz` always printed it, then what a bug report needs."""
    from .kvm.fingerprint import fingerprint_text

    rate = new_steps / dt if dt else 0
    timing = (f"in {dt:.1f} s ({rate:.0f} steps/s)" if new_cases == s.cases else
              f"({new_steps} in {dt:.1f} s this run, {rate:.0f} steps/s)")
    lines = [f"fuzz: seed {spec.seed}: {s.cases} cases, {s.steps} steps compared {timing}; "
             f"{s.counts_line()}" + ("; interrupted" if interrupted else "")]
    lines.append(f"  command: apicv fuzz --seed {spec.seed} --steps {spec.max_steps}"
                 + (" --model-apicv" if spec.model_apicv else "")
                 + (" --trace" if spec.trace else "") + f" ({where}, {workers} worker(s))")
    lines.append(f"  this run: {new_cases} cases, {new_steps} steps in {dt:.1f} s = "
                 f"{new_cases / dt if dt else 0:.1f} cases/s, {rate:.0f} compared steps/s"
                 + (f"; shrinking {shrink_s:.1f} s" if shrink_s >= 0.05 else ""))
    for fid in sorted(hosts):
        lines.append(f"  host {fingerprint_text(hosts[fid])}")
    lines += ["  " + ln for ln in s.report_lines()]
    return lines


# ---------------------------------------------------------------- running a campaign
def run(*, seed: int = 0, count: int | None = 200, max_steps: int = 20,
        out_path: str | None = "fuzz-disagreement.toml", out=None, quiet: bool = False,
        model_apicv: bool = False, trace: bool = False, workers: int | None = None,
        duration: float | None = None, campaign_dir: str | None = None,
        resume: str | None = None, cluster: str | None = None) -> int:
    """Run a campaign; 0 if no case disagrees, 1 if one does (each group's shrunk scenario
    written to the corpus, the first also to *out_path*). *count* None: until *duration*
    seconds have passed. Ctrl-C prints what ran and raises KeyboardInterrupt."""
    from .errors import ApicvError

    printer = out.print if out is not None else print
    cdir = None
    summary = None
    if resume is not None:
        cdir = CampaignDir(resume)
        st = cdir.load()
        seed, max_steps, model_apicv = st["seed"], st["max_steps"], st["model_apicv"]
        if count is None and duration is None:
            count = st["count"]
        summary = Summary.from_json(st["summary"])
    elif campaign_dir is not None:
        cdir = CampaignDir(campaign_dir)
        if os.path.exists(cdir.state):
            raise ApicvError(f"{campaign_dir} holds a campaign already: continue it with "
                             f"--resume {campaign_dir}")
    if count is None and duration is None:
        count = 200
    if trace:
        if model_apicv:
            raise ApicvError("--trace compares the host's trace with the model of this host: "
                             "not with --model-apicv")
        from .hosttrace import check_available

        check_available()
    spec = Spec(seed, max_steps, model_apicv, trace)
    if summary is None:
        summary = Summary(seed, max_steps, model_apicv)
    nworkers = workers or default_workers()
    if cluster is not None:
        from .cluster import RayExecutor

        ex: Any = RayExecutor(cluster, nworkers)
        where = (f"Ray cluster {cluster}: {len(ex.kvm_nodes)} node(s) with KVM, "
                 f"{ex.nodes} CPU(s)")
        nworkers = ex.nodes
    else:
        ex = LocalExecutor(nworkers)
        where = "this host"
    progress = Progress(not quiet and out is not None, count)
    t0 = time.perf_counter()
    new_cases = new_steps = 0
    interrupted = False
    aborted = False
    t_run: float | None = None
    shrink_s = 0.0
    hosts: dict[str, dict[str, Any]] = {}
    try:
        hosts = ex.hosts()
        summary.hosts.update(hosts)
        ex.warm_up()
        t0 = time.perf_counter()  # the rates count the cases, not starting the workers
        pending: list[tuple[int, int, Any]] = []
        nxt = 0
        window = 2 * max(1, ex.nodes)
        last_save = time.monotonic()
        while True:
            out_of_time = duration is not None and time.perf_counter() - t0 >= duration
            while not out_of_time and len(pending) < window and (count is None or nxt < count):
                while count is None or nxt < count:
                    if not summary.is_done(nxt):
                        break
                    nxt += 1
                if count is not None and nxt >= count:
                    break
                end = nxt + CHUNK if count is None else min(nxt + CHUNK, count)
                end = next((i for i in range(nxt, end) if summary.is_done(i)), end)
                pending.append((nxt, end, ex.submit_chunk(spec, nxt, end)))
                nxt = end
            if not pending:
                break
            # the first task done, else wait for the oldest
            i = next((i for i, p in enumerate(pending) if p[2].ready()), 0)
            start, end, task = pending.pop(i)
            fp, recs = task.get()
            hosts.setdefault(fp["id"], fp)
            summary.hosts.setdefault(fp["id"], fp)
            for rec in recs:
                summary.add(rec)
                new_cases += 1
                new_steps += rec["steps"]
            summary.mark_done(start, end)
            dt = time.perf_counter() - t0
            progress.update(summary, new_cases, new_steps, dt)
            if cdir is not None and time.monotonic() - last_save >= 1.0:
                cdir.save(spec, count, summary)
                last_save = time.monotonic()
        t_run = time.perf_counter() - t0
        progress.close()
        _shrink_groups(ex, spec, summary, cdir)
        shrink_s = time.perf_counter() - t0 - t_run
    except KeyboardInterrupt:
        interrupted = aborted = True
    finally:
        progress.close()
        ex.close(abort=aborted)
    dt = time.perf_counter() - t0
    if t_run is None:
        t_run = dt
    lines = summary_lines(summary, spec, new_cases=new_cases, new_steps=new_steps, dt=t_run,
                          workers=nworkers, where=where, interrupted=interrupted,
                          hosts=summary.hosts, shrink_s=shrink_s)
    printer(lines[0])
    found = bool(summary.groups)
    if found:
        print_groups(summary, spec, out_path, cdir, printer, interrupted)
    for line in lines[1:]:
        printer(line)
    if cdir is not None:
        cdir.save(spec, count, summary)
        cdir.write_summary(lines)
    if interrupted:
        raise KeyboardInterrupt
    return 1 if found else 0


def _shrink_groups(ex: Any, spec: Spec, summary: Summary, cdir: CampaignDir | None) -> None:
    """Shrink the first case of every group not shrunk yet (on a host of its fingerprint)."""
    tasks = []
    for key in sorted(summary.groups, key=lambda k: summary.groups[k]["first"]):
        g = summary.groups[key]
        if "doc" in g:
            continue
        tasks.append((key, ex.submit_shrink(spec, g["fingerprint"], g["first"], g["choices"])))
    for key, task in tasks:
        r = task.get()
        g = summary.groups[key]
        g.update(doc=r["doc"], shrunk=r["shrunk"], report=r["report"])


def reproducer_text(g: dict[str, Any], spec: Spec, interrupted: bool) -> str:
    from .fuzz import to_toml

    doc = dict(g["doc"])
    how = "shrunk" if g.get("shrunk") else ("unshrunk (interrupted)" if interrupted
                                             else "unshrunk")
    doc["description"] = (f"apicv fuzz --seed {spec.seed}"
                          f"{' --model-apicv' if spec.model_apicv else ''}: case {g['first']}, "
                          f"{how} disagreement ({g['field']}) between the model and the real "
                          f"KVM on host {g['fingerprint']}")
    return to_toml(doc)


def print_groups(summary: Summary, spec: Spec, out_path: str | None,
                  cdir: CampaignDir | None, printer, interrupted: bool) -> None:
    """Each group's report, then its reproducer file (the first also at *out_path*)."""
    from .fuzz import case

    ordered = sorted(summary.groups.values(), key=lambda g: (g["first"], g["field"]))
    for n, g in enumerate(ordered):
        if "doc" not in g:
            g["doc"] = case(spec.seed, g["first"], spec.max_steps)[0]
        for line in g["report"]:
            printer(line)
        text = reproducer_text(g, spec, interrupted)
        paths = []
        if cdir is not None:
            slug = re.sub(r"[^A-Za-z0-9]+", "-", g["field"]).strip("-").lower()
            paths.append(cdir.write_reproducer(f"{g['fingerprint']}-{g['first']}-{slug}.toml",
                                               text))
            g["file"] = paths[-1]
        if n == 0 and out_path:
            try:
                with open(out_path, "w", encoding="utf-8") as f:
                    f.write(text)
                paths.append(out_path)
                g.setdefault("file", out_path)
            except OSError as e:
                printer(f"could not write the scenario to {out_path}: {e.strerror}; "
                        "here it is:")
                for line in text.splitlines():
                    printer(line)
        how = "shrunk scenario" if g.get("shrunk") else "scenario (not shrunk)"
        for p in paths:
            printer(f"wrote the {how} to {p} (replay: apicv crosscheck {p})")
