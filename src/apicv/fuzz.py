"""`apicv fuzz`: random scenarios run on the model and the real KVM, compared after every step
(:mod:`apicv.crosscheck`). Scenarios come from a hypothesis strategy; the first disagreement is
shrunk by hypothesis to a minimal scenario and written out as a TOML file that
``apicv crosscheck`` replays.

The generator mixes host operations (MSIs, KVM_SET_LAPIC with patches, mp_state, APIC base,
NMIs) and guest operations (xAPIC MMIO, x2APIC MSRs, IPIs through the ICR, TPR/CR8, timers,
interrupt windows). Timers are either immediate or far away, so wall time cannot decide an
outcome; interrupt windows always EOI (host difference H1: with vectors left in service the
host cannot be compared).

Needs hypothesis (the ``fuzz`` extra, also in ``test``); the model itself does not.
"""

from __future__ import annotations

import random
import re
import time
from typing import Any

from .memory import SCRATCH_GPA
from .scenario import parse_doc

# ---------------------------------------------------------------- TOML output
_BARE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return f"{v:#x}" if v > 9 else str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(type(v))


def to_toml(doc: dict[str, Any]) -> str:
    """A scenario table as TOML (description, [vm], [[step]]...)."""
    out = []
    if doc.get("description"):
        out.append(f"description = {_toml_value(doc['description'])}")
        out.append("")
    if doc.get("vm"):
        out.append("[vm]")
        for k, v in doc["vm"].items():
            out.append(f"{k} = {_toml_value(v)}")
        out.append("")
    for st in doc.get("step", []):
        out.append("[[step]]")
        for k, v in st.items():
            out.append(f"{k} = {_toml_value(v)}")
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------- the generator
def scenarios(max_steps: int):
    """A hypothesis strategy of scenario tables (dicts TOML would produce)."""
    from hypothesis import strategies as st

    vectors = st.one_of(st.integers(0x20, 0xFF), st.sampled_from([0x10, 0x2F, 0x30, 0xEF, 0xFF]))

    @st.composite
    def build(draw):
        nr = draw(st.integers(1, 3))
        flags = draw(st.sampled_from([0, 0, 1, 3]))
        ids = list(range(nr))
        cpu = st.sampled_from(ids)
        dests = st.one_of(st.sampled_from(ids + [0xFF]), st.integers(0, 0xFF))

        def icr_low(d) -> int:
            dm = d(st.sampled_from([0, 0, 0, 1, 4, 5, 6, 2, 3, 7]))
            low = d(vectors) | (dm << 8)
            low |= d(st.sampled_from([0, 0x800])) | d(st.sampled_from([0x4000, 0x4000, 0]))
            low |= d(st.sampled_from([0, 0, 0x8000]))
            low |= d(st.sampled_from([0, 0, 0, 0x40000, 0x80000, 0xC0000]))
            return low

        def step(d) -> dict[str, Any]:
            kind = d(st.sampled_from([
                "msi", "msi", "msi", "take", "take", "take", "ipi_x", "ipi_x", "ipi_x2",
                "spiv", "tpr", "reg_write", "reg_read", "reg_read", "ldr_dfr", "base",
                "x2apic", "eoi", "set_lapic", "get_lapic", "mp_state", "nmi", "timer",
                "cr8", "self_ipi", "msr_read", "id", "inhibit",
                # the rest of the irqchip: IOAPIC, PIC, VAPIC, PV EOI
                "irq", "irq", "irq", "rte", "rte", "ioapic_read", "pic", "irqchip",
                "vapic", "pv_eoi",
            ]))
            c = d(cpu)
            if kind == "msi":
                dest = d(dests)
                logical = d(st.booleans())
                dm = d(st.sampled_from([0, 0, 0, 1, 4, 2, 5, 7]))
                lo = 0xFEE00000 | (dest << 12) | (4 if logical else 0)
                lo |= d(st.sampled_from([0, 0, 0, 8]))  # redirection hint
                data = d(vectors) | (dm << 8) | d(st.sampled_from([0, 0, 0x8000, 0xC000]))
                s: dict[str, Any] = {"do": "signal_msi", "address_lo": lo, "data": data}
                if flags & 1 and d(st.booleans()):
                    s["address_hi"] = d(st.sampled_from([0x100, 0x200, 0xFFFFFF00]))
                return s
            if kind == "take":
                s = {"do": "take_interrupts", "vcpu": c}
                if d(st.integers(0, 4)) == 0:
                    s["limit"] = d(st.integers(0, 2))
                return s
            if kind == "ipi_x":
                return {"do": "mmio_write", "vcpu": c, "offset": "ICR", "value": icr_low(d)}
            if kind == "ipi_x2":
                dest = d(st.one_of(dests, st.just(0xFFFFFFFF)))
                return {"do": "wrmsr", "vcpu": c, "index": "X2APIC_ICR",
                        "value": (dest << 32) | icr_low(d)}
            if kind == "spiv":
                return {"do": "mmio_write", "vcpu": c, "offset": "SPIV",
                        "value": d(st.sampled_from([0x1FF, 0x1FF, 0xFF, 0x10FF, 0x3FF, 0x1F0]))}
            if kind == "tpr":
                return {"do": "mmio_write", "vcpu": c, "offset": "TPR",
                        "value": d(st.sampled_from([0, 0, 0x10, 0x20, 0x2F, 0x50, 0xF0, 0x1FF]))}
            if kind == "cr8":
                if d(st.booleans()):
                    return {"do": "write_cr8", "vcpu": c, "value": d(st.integers(0, 15))}
                return {"do": "read_cr8", "vcpu": c}
            if kind == "reg_write":
                reg = d(st.sampled_from(["ICR2", "LVT0", "LVT1", "LVTERR", "LVTPC", "LVTTHMR",
                                         "ESR", "LVR", "PPR", "ISR", "0x3f0", "0x400", "0xb0",
                                         "TDCR", "LVTCMCI"]))
                val = d(st.one_of(st.sampled_from([0, 0xFFFFFFFF, 0x700, 0x10400, 0x1F7FF]),
                                  st.integers(0, 0xFFFFFFFF)))
                size = d(st.sampled_from([4, 4, 4, 1, 2]))
                return {"do": "mmio_write", "vcpu": c, "offset": reg,
                        "value": val & ((1 << (8 * size)) - 1), "size": size}
            if kind == "reg_read":
                off = d(st.one_of(
                    st.sampled_from([0x20, 0x30, 0x80, 0x90, 0xA0, 0xD0, 0xE0, 0xF0, 0x100,
                                     0x180, 0x200, 0x210, 0x280, 0x300, 0x310, 0x320, 0x350,
                                     0x380, 0x3E0]),
                    st.integers(0, 0x3FF)))
                size = d(st.sampled_from([4, 4, 4, 1, 2, 8]))
                off = min(off, 0x1000 - size)
                return {"do": "mmio_read", "vcpu": c, "offset": off, "size": size}
            if kind == "ldr_dfr":
                if d(st.booleans()):
                    return {"do": "mmio_write", "vcpu": c, "offset": "LDR",
                            "value": d(st.sampled_from([1, 2, 4, 0x11, 0x12, 0x21, 3, 0xFF])) << 24}
                return {"do": "mmio_write", "vcpu": c, "offset": "DFR",
                        "value": d(st.sampled_from([0xFFFFFFFF, 0x0FFFFFFF, 0x7FFFFFFF]))}
            if kind == "id":
                return {"do": "mmio_write", "vcpu": c, "offset": "ID",
                        "value": d(st.sampled_from(ids + [5, 0xFF])) << 24}
            if kind == "base":
                val = d(st.sampled_from([0xFEE00800, 0xFEE00C00, 0, 0xFEE00900, 0xFEE00D00,
                                         0xFEC00800, 0x400, 0xFEE00801]))
                if d(st.booleans()):
                    return {"do": "set_msr", "vcpu": c, "index": "IA32_APICBASE", "value": val}
                return {"do": "wrmsr", "vcpu": c, "index": "IA32_APICBASE", "value": val}
            if kind == "x2apic":
                reg = d(st.sampled_from(["TPR", "SPIV", "EOI", "LDR", "ID", "ESR", "LVT0",
                                         "TMICT", "DFR", "ICR2", "PPR", "0x83f", "0x840"]))
                index = int(reg, 0) if reg.startswith("0x") else None
                val = d(st.sampled_from([0, 0x1FF, 0x20, 0x1_0000_0000, 0x44, 0xFFFFFFFF]))
                s = {"do": d(st.sampled_from(["wrmsr", "rdmsr"])), "vcpu": c,
                     "index": index if index is not None else f"X2APIC_{reg}"}
                if s["do"] == "wrmsr":
                    s["value"] = val
                return s
            if kind == "self_ipi":
                return {"do": "wrmsr", "vcpu": c, "index": "X2APIC_SELF_IPI",
                        "value": d(st.sampled_from([0x40, 0x51, 0x140]))}
            if kind == "msr_read":
                return {"do": d(st.sampled_from(["get_msr", "rdmsr"])), "vcpu": c,
                        "index": d(st.sampled_from(["IA32_APICBASE", "X2APIC_TPR",
                                                    "X2APIC_ICR", "TSC_DEADLINE"]))}
            if kind == "eoi":
                return {"do": "mmio_write", "vcpu": c, "offset": "EOI", "value": 0}
            if kind == "get_lapic":
                return {"do": "get_lapic", "vcpu": c}
            if kind == "set_lapic":
                patch: dict[str, Any] = {}
                for reg, vals in (("TPR", [0, 0x20, 0x5F]), ("SPIV", [0x1FF, 0xFF, 0x11FF]),
                                  ("LDR", [0, 1 << 24, 0x12 << 24]),
                                  ("ID", [c << 24, 0x7 << 24, c]),
                                  ("LVTT", [0x10000, 0xEF]), ("TDCR", [0xB, 0xFF])):
                    if d(st.integers(0, 3)) == 0:
                        patch[reg] = d(st.sampled_from(vals))
                if d(st.booleans()):
                    patch["IRR"] = d(st.lists(vectors, max_size=3))
                if d(st.integers(0, 5)) == 0:
                    patch["TMR"] = d(st.lists(vectors, max_size=2))
                return {"do": "set_lapic", "vcpu": c, "from": f"cur{c}", "patch": patch,
                        "_save_first": True}
            if kind == "mp_state":
                if d(st.booleans()):
                    return {"do": "get_mp_state", "vcpu": c}
                return {"do": "set_mp_state", "vcpu": c, "state": d(st.sampled_from(
                    ["RUNNABLE", "RUNNABLE", "INIT_RECEIVED", "SIPI_RECEIVED", "UNINITIALIZED",
                     "HALTED", "STOPPED"]))}
            if kind == "nmi":
                return {"do": "nmi", "vcpu": c}
            if kind == "inhibit":
                # a no-op on a host without APICv; with --model-apicv the model's APICv is
                # toggled and must stay invisible to the guest
                return {"do": "set_or_clear_apicv_inhibit", "reason": "HYPERV",
                        "set": d(st.booleans())}
            if kind == "timer":
                which = d(st.sampled_from(["tmict_now", "tmict_far", "lvtt", "tdcr", "deadline"]))
                if which == "tmict_now":
                    return {"do": "mmio_write", "vcpu": c, "offset": "TMICT",
                            "value": d(st.integers(1, 20))}
                if which == "tmict_far":
                    return {"do": "mmio_write", "vcpu": c, "offset": "TMICT",
                            "value": d(st.sampled_from([0, 0x40000000, 0xFFFFFFFF]))}
                if which == "lvtt":
                    return {"do": "mmio_write", "vcpu": c, "offset": "LVTT",
                            "value": d(st.sampled_from([0xEF, 0x100EF, 0x400EF, 0x600EF,
                                                        0x200EF]))}
                if which == "tdcr":
                    return {"do": "mmio_write", "vcpu": c, "offset": "TDCR",
                            "value": d(st.sampled_from([0xB, 0x0, 0xA]))}
                return {"do": "wrmsr", "vcpu": c, "index": "TSC_DEADLINE",
                        "value": d(st.sampled_from([0, 1, 0xFFFFFFFFFFFF]))}
            if kind == "irq":
                return {"do": "irq_line", "irq": d(st.sampled_from(
                    [16, 17, 18, 19, 20, 21, 22, 23, 8, 1, 4, 9, 14, 24])),
                    "level": d(st.sampled_from([1, 1, 0]))}
            if kind == "rte":
                pin = d(st.sampled_from([16, 17, 18, 19, 20, 21, 22, 23, 8, 1, 4, 9, 14]))
                e = (d(vectors) | d(st.sampled_from([0, 0, 0, 1, 2, 4, 5, 7])) << 8
                     | d(st.sampled_from([0, 0x800])) | d(st.sampled_from([0, 0x8000]))
                     | d(st.sampled_from([0, 0, 0x10000])) | d(dests) << 56)
                if d(st.booleans()):
                    return {"do": "set_irqchip", "chip": "IOAPIC", "patch": {f"rte{pin}": e}}
                half = d(st.sampled_from([0, 0, 1]))  # low dword (most changes) or high
                sel = 0x10 + 2 * pin + half
                return [{"do": "ioapic_write", "vcpu": c, "offset": 0, "value": sel},
                        {"do": "ioapic_write", "vcpu": c, "offset": 0x10,
                         "value": (e >> (32 * half)) & 0xFFFFFFFF}]
            if kind == "ioapic_read":
                sel = d(st.sampled_from([0, 1, 2, 0x10, 0x21, 0x30, 0x3F, 0x40, 0xFF]))
                return [{"do": "ioapic_write", "vcpu": c, "offset": 0, "value": sel},
                        {"do": "ioapic_read", "vcpu": c, "offset": d(st.sampled_from(
                            [0x10, 0x10, 0, 0x20])), "size": d(st.sampled_from([4, 4, 1, 8]))}]
            if kind == "pic":
                which = d(st.sampled_from(["imr", "eoi", "ocw3", "read", "elcr"]))
                if which == "imr":
                    return {"do": "outb", "vcpu": c, "port": d(st.sampled_from([0x21, 0xA1])),
                            "value": d(st.sampled_from([0, 0xFF, 0xFB, 0xEF, 0x12]))}
                if which == "eoi":
                    return {"do": "outb", "vcpu": c, "port": d(st.sampled_from([0x20, 0xA0])),
                            "value": d(st.sampled_from([0x20, 0x60, 0x61, 0xA0]))}
                if which == "ocw3":
                    return {"do": "outb", "vcpu": c, "port": d(st.sampled_from([0x20, 0xA0])),
                            "value": d(st.sampled_from([0x0A, 0x0B, 0x0C, 0x68, 0x48]))}
                if which == "elcr":
                    return {"do": "outb", "vcpu": c, "port": d(st.sampled_from([0x4D0, 0x4D1])),
                            "value": d(st.sampled_from([0, 0x10, 0xFF]))}
                return {"do": "inb", "vcpu": c, "port": d(st.sampled_from(
                    [0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1]))}
            if kind == "irqchip":
                chip = d(st.sampled_from(["IOAPIC", "PIC_MASTER", "PIC_SLAVE"]))
                if d(st.booleans()):
                    return {"do": "get_irqchip", "chip": chip}
                if chip == "IOAPIC":
                    return {"do": "set_irqchip", "chip": chip, "patch": {
                        "irr": d(st.sampled_from([0, 1 << 16, 1 << 17 | 1 << 8, 0xFFFFFF])),
                        "id": d(st.sampled_from([0, 3, 0xFFFFFFFF]))}}
                return {"do": "set_irqchip", "chip": chip, "patch": {
                    "imr": d(st.sampled_from([0, 0xFF, 0xFB])),
                    "irq_base": d(st.sampled_from([0x20, 0x28, 0x70])),
                    "irr": d(st.sampled_from([0, 0x10, 0x3]))}}
            if kind == "vapic":
                which = d(st.sampled_from(["addr", "store", "load"]))
                word = SCRATCH_GPA + 4 * d(st.integers(0, 3))
                if which == "addr":
                    return {"do": "set_vapic_addr", "vcpu": c, "gpa": d(st.sampled_from(
                        [word, word, 0, 0xFEE00000]))}
                if which == "store":
                    return {"do": "guest_store", "vcpu": c, "gpa": word, "size": 1,
                            "value": d(st.sampled_from([0, 0x20, 0x5F, 0xF0]))}
                return {"do": "guest_load", "vcpu": c, "gpa": word}
            if kind == "pv_eoi":
                flag = SCRATCH_GPA + 0x100 + 4 * c
                which = d(st.sampled_from(["enable", "enable", "off", "bad", "clear"]))
                if which == "clear":
                    return {"do": "guest_store", "vcpu": c, "gpa": flag, "value": 0, "size": 1}
                value = {"enable": flag | 1, "off": 0,
                         "bad": d(st.sampled_from([flag | 3, 0xFEE00001, flag + 2]))}[which]
                return {"do": "wrmsr", "vcpu": c, "index": "KVM_PV_EOI_EN", "value": value}
            raise AssertionError(kind)

        # start like a guest would: APs runnable, every APIC software-enabled
        steps: list[dict[str, Any]] = []
        for i in ids[1:]:
            steps.append({"do": "set_mp_state", "vcpu": i, "state": "RUNNABLE"})
        for i in ids:
            steps.append({"do": "mmio_write", "vcpu": i, "offset": "SPIV", "value": 0x1FF})
        # the BSP's LVT0 accepts ExtINT at reset: give the PIC vectors >= 0x20 the way an OS
        # does (ICW1-ICW4), or mask it
        if draw(st.booleans()):
            for port, val in ((0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01),
                              (0xA0, 0x11), (0xA1, 0x28), (0xA1, 0x02), (0xA1, 0x01),
                              (0x21, draw(st.sampled_from([0, 0xFB, 0xEE])))):
                steps.append({"do": "outb", "vcpu": 0, "port": port, "value": val})
        else:
            steps.append({"do": "set_irqchip", "chip": "PIC_MASTER",
                          "patch": {"imr": 0xFF, "irq_base": 0x20}})
            steps.append({"do": "set_irqchip", "chip": "PIC_SLAVE",
                          "patch": {"imr": 0xFF, "irq_base": 0x28}})
        n = draw(st.integers(1, max_steps))
        for _ in range(n):
            s = step(draw)
            for one in (s if isinstance(s, list) else [s]):
                if one.pop("_save_first", False):
                    steps.append({"do": "get_lapic", "vcpu": one["vcpu"], "save": one["from"]})
                steps.append(one)
        doc: dict[str, Any] = {"vm": {"vcpus": nr}, "step": steps}
        if flags:
            doc["vm"]["x2apic_api"] = flags
        return doc

    return build()


# ---------------------------------------------------------------- driving it
class _Stats:
    def __init__(self) -> None:
        self.cases = 0
        self.steps = 0
        self.stopped = 0
        self.stop_reasons: dict[str, int] = {}
        self.not_run = 0
        self.disagreements = 0


def _reasons(stats: _Stats) -> str:
    if not stats.stop_reasons:
        return ""
    return " (" + ", ".join(f"{k} {n}" for k, n in sorted(stats.stop_reasons.items())) + ")"


def fuzz(*, seed: int = 0, count: int = 200, max_steps: int = 20,
         out_path: str | None = "fuzz-disagreement.toml", out=None, quiet: bool = False,
         model_apicv: bool = False, trace: bool = False) -> int:
    """Run up to *count* random scenarios; 0 if none disagrees, 1 (and the shrunk scenario
    written to *out_path*) if one does."""
    from hypothesis import HealthCheck, Phase, find, settings
    from hypothesis.errors import NoSuchExample

    from .crosscheck import Crosscheck, probe_host

    printer = out.print if out is not None else print
    diffs = probe_host()
    stats = _Stats()
    shrinking = [False]
    last: dict[str, Any] = {}
    progress = _Progress(count, quiet=quiet or out is None)

    def disagrees(doc: dict[str, Any]) -> bool:
        sc = parse_doc(doc, "<fuzz>")
        res = Crosscheck(sc, diffs, model_apicv=model_apicv, trace=trace).run()
        if not shrinking[0]:
            stats.cases += 1
            stats.steps += res.steps_compared
            if res.stopped is not None:
                stats.stopped += 1
                m = re.search(r"\b([HV]\d+)\b", res.stopped)
                key = m.group(1) if m else "other"
                stats.stop_reasons[key] = stats.stop_reasons.get(key, 0) + 1
            stats.not_run += res.error is not None
            progress.update(stats)
        if res.disagreement is not None:
            if not shrinking[0]:
                stats.disagreements += 1
                shrinking[0] = True
            last["doc"], last["res"] = doc, res
            return True
        return False

    cfg = settings(max_examples=count, database=None, deadline=None,
                   phases=[Phase.generate, Phase.shrink],
                   suppress_health_check=list(HealthCheck))
    t0 = time.perf_counter()
    interrupted = False
    try:
        find(scenarios(max_steps), disagrees, settings=cfg, random=random.Random(seed))
        found = True
    except NoSuchExample:
        found = False
    except KeyboardInterrupt:
        # Ctrl-C: the summary of what ran, and a disagreement found (shrunk as far as it
        # got), are still printed; the caller then exits as interrupted
        interrupted = True
        found = "doc" in last
    finally:
        progress.close()
    dt = time.perf_counter() - t0
    printer(f"fuzz: seed {seed}: {stats.cases} cases, {stats.steps} steps compared in "
            f"{dt:.1f} s ({stats.steps / dt if dt else 0:.0f} steps/s); "
            f"{stats.stopped} stopped at a named difference{_reasons(stats)}; "
            f"{stats.not_run} not runnable; {stats.disagreements} disagreement(s)"
            + ("; interrupted" if interrupted else ""))
    if found:
        _report(last, seed, model_apicv, out_path, printer,
                shrunk="" if not interrupted else " (shrinking was interrupted)")
    if interrupted:
        raise KeyboardInterrupt
    return 1 if found else 0


def _report(last: dict[str, Any], seed: int, model_apicv: bool, out_path: str | None,
            printer, shrunk: str) -> None:
    """The disagreement first (it must be seen even if the file cannot be written), then the
    scenario file that replays it."""
    from .crosscheck import format_report

    for line in format_report(last["res"]):
        printer(line)
    doc = dict(last["doc"])
    doc["description"] = (f"apicv fuzz --seed {seed}{' --model-apicv' if model_apicv else ''}: "
                          f"shrunk{shrunk} disagreement between the model and the real KVM")
    text = to_toml(doc)
    if out_path:
        try:
            with open(out_path, "w") as f:
                f.write(text)
        except OSError as e:
            printer(f"could not write the scenario to {out_path}: {e.strerror}; here it is:")
            for line in text.splitlines():
                printer(line)
            return
        printer(f"wrote the shrunk scenario{shrunk} to {out_path} "
                f"(replay: apicv crosscheck {out_path})")


class _Progress:
    def __init__(self, total: int, quiet: bool) -> None:
        self.bar = None
        if quiet:
            return
        try:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
        except ImportError:
            return
        self.bar = Progress(TextColumn("fuzz"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), transient=True)
        self.bar.start()
        self.task = self.bar.add_task("fuzz", total=total, info="")

    def update(self, stats: _Stats) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=stats.cases,
                            info=f"{stats.steps} steps, {stats.stopped} stopped")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


__all__ = ["fuzz", "scenarios", "to_toml"]
