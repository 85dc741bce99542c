"""`apicv fuzz`: random scenarios run on the model and the real KVM, compared after every step
(:mod:`apicv.crosscheck`); a disagreement is shrunk by hypothesis to a minimal scenario and
written out as a TOML file that ``apicv crosscheck`` replays. Campaigns (many cases, worker
processes, a campaign directory, Ray clusters) are :mod:`apicv.campaign`.

The generator mixes host operations (MSIs, KVM_SET_LAPIC with patches, mp_state, APIC base,
NMIs) and guest operations (xAPIC MMIO, x2APIC MSRs, IPIs through the ICR, TPR/CR8, timers,
interrupt windows). Timers are either immediate or far away, so wall time cannot decide an
outcome; interrupt windows always EOI (host difference H1: with vectors left in service the
host cannot be compared).

Case *i* of seed *s* is drawn from ``random.Random("apicv-fuzz:s:i")`` alone, so the same seed
gives the same cases in any order, on any number of processes or hosts, and drawing one costs
~0.1 ms (hypothesis' own draws cost ~7 ms a case). Every draw is one integer in a range, and
the integers drawn are exactly the choice sequence hypothesis records when the same
:func:`build` runs on its strategies (:func:`scenarios`): that is how a case found here is
handed to hypothesis' shrinker (:func:`shrink`).

Needs hypothesis to shrink (the ``fuzz`` extra, also in ``test``); the model itself does not.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from typing import Any

from .memory import SCRATCH_GPA

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
VECTORS = [0x10, 0x2F, 0x30, 0xEF, 0xFF]


class RandomDraw:
    """Draws from a :class:`random.Random`, recording each integer drawn (``choices``)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.choices: list[int] = []

    def int(self, lo: int, hi: int) -> int:
        v = self.rng.randint(lo, hi)
        self.choices.append(v)
        return v

    def pick(self, seq: list) -> Any:
        return seq[self.int(0, len(seq) - 1)]

    def bool(self) -> bool:
        return bool(self.int(0, 1))

    def either(self, *alternatives: Callable[[], Any]) -> Any:
        return alternatives[self.int(0, len(alternatives) - 1)]()

    def group(self, fn: Callable[[Any], Any]) -> Any:
        return fn(self)


class HypothesisDraw(RandomDraw):
    """The same draws through hypothesis (``draw`` of a composite strategy): each integer is
    one ``st.integers(lo, hi)`` choice; a group is a nested composite, a span the shrinker can
    delete whole (one scenario step)."""

    def __init__(self, draw: Callable[[Any], Any]) -> None:
        self.draw = draw

    def int(self, lo: int, hi: int) -> int:
        return self.draw(_integers(lo, hi))

    def group(self, fn: Callable[[Any], Any]) -> Any:
        return self.draw(_group(fn))


@functools.cache
def _integers(lo: int, hi: int):
    from hypothesis import strategies as st

    return st.integers(lo, hi)


def _group(fn):
    from hypothesis import strategies as st

    return st.composite(lambda draw: fn(HypothesisDraw(draw)))()


def build(d: RandomDraw, max_steps: int) -> dict[str, Any]:
    """One scenario table (a dict as TOML would give it), drawn through *d*."""
    nr = d.int(1, 3)
    flags = d.pick([0, 0, 1, 3])
    ids = list(range(nr))

    def vec(d) -> int:
        return d.either(lambda: d.int(0x20, 0xFF), lambda: d.pick(VECTORS))

    def pick_dest(d) -> int:
        return d.either(lambda: d.pick(ids + [0xFF]), lambda: d.int(0, 0xFF))

    def icr_low(d) -> int:
        dm = d.pick([0, 0, 0, 1, 4, 5, 6, 2, 3, 7])
        low = vec(d) | (dm << 8)
        low |= d.pick([0, 0x800]) | d.pick([0x4000, 0x4000, 0])
        low |= d.pick([0, 0, 0x8000])
        low |= d.pick([0, 0, 0, 0x40000, 0x80000, 0xC0000])
        return low

    def step(d) -> dict[str, Any]:
        kind = d.pick([
            "msi", "msi", "msi", "take", "take", "take", "ipi_x", "ipi_x", "ipi_x2",
            "spiv", "tpr", "reg_write", "reg_read", "reg_read", "ldr_dfr", "base",
            "x2apic", "eoi", "set_lapic", "get_lapic", "mp_state", "nmi", "timer",
            "cr8", "self_ipi", "msr_read", "id", "inhibit",
            # the rest of the irqchip: IOAPIC, PIC, VAPIC, PV EOI
            "irq", "irq", "irq", "rte", "rte", "ioapic_read", "pic", "irqchip",
            "vapic", "pv_eoi",
            # what VMMs configure: GSI routing and irqfds, vCPU events, the PIT's ports
            "route", "irqfd", "irqfd", "events", "pit",
        ])
        c = d.pick(ids)
        if kind == "msi":
            dest = pick_dest(d)
            logical = d.bool()
            dm = d.pick([0, 0, 0, 1, 4, 2, 5, 7])
            lo = 0xFEE00000 | (dest << 12) | (4 if logical else 0)
            lo |= d.pick([0, 0, 0, 8])  # redirection hint
            data = vec(d) | (dm << 8) | d.pick([0, 0, 0x8000, 0xC000])
            s: dict[str, Any] = {"do": "signal_msi", "address_lo": lo, "data": data}
            if flags & 1 and d.bool():
                s["address_hi"] = d.pick([0x100, 0x200, 0xFFFFFF00])
            return s
        if kind == "take":
            s = {"do": "take_interrupts", "vcpu": c}
            if d.int(0, 4) == 0:
                s["limit"] = d.int(0, 2)
            return s
        if kind == "ipi_x":
            return {"do": "mmio_write", "vcpu": c, "offset": "ICR", "value": icr_low(d)}
        if kind == "ipi_x2":
            dest = d.either(lambda: pick_dest(d), lambda: 0xFFFFFFFF)
            return {"do": "wrmsr", "vcpu": c, "index": "X2APIC_ICR",
                    "value": (dest << 32) | icr_low(d)}
        if kind == "spiv":
            return {"do": "mmio_write", "vcpu": c, "offset": "SPIV",
                    "value": d.pick([0x1FF, 0x1FF, 0xFF, 0x10FF, 0x3FF, 0x1F0])}
        if kind == "tpr":
            return {"do": "mmio_write", "vcpu": c, "offset": "TPR",
                    "value": d.pick([0, 0, 0x10, 0x20, 0x2F, 0x50, 0xF0, 0x1FF])}
        if kind == "cr8":
            if d.bool():
                return {"do": "write_cr8", "vcpu": c, "value": d.int(0, 15)}
            return {"do": "read_cr8", "vcpu": c}
        if kind == "reg_write":
            reg = d.pick(["ICR2", "LVT0", "LVT1", "LVTERR", "LVTPC", "LVTTHMR",
                                     "ESR", "LVR", "PPR", "ISR", "0x3f0", "0x400", "0xb0",
                                     "TDCR", "LVTCMCI"])
            val = d.either(lambda: d.pick([0, 0xFFFFFFFF, 0x700, 0x10400, 0x1F7FF]),
                           lambda: d.int(0, 0xFFFFFFFF))
            size = d.pick([4, 4, 4, 1, 2])
            return {"do": "mmio_write", "vcpu": c, "offset": reg,
                    "value": val & ((1 << (8 * size)) - 1), "size": size}
        if kind == "reg_read":
            off = d.either(
                lambda: d.pick([0x20, 0x30, 0x80, 0x90, 0xA0, 0xD0, 0xE0, 0xF0, 0x100,
                                0x180, 0x200, 0x210, 0x280, 0x300, 0x310, 0x320, 0x350,
                                0x380, 0x3E0]),
                lambda: d.int(0, 0x3FF))
            size = d.pick([4, 4, 4, 1, 2, 8])
            off = min(off, 0x1000 - size)
            return {"do": "mmio_read", "vcpu": c, "offset": off, "size": size}
        if kind == "ldr_dfr":
            if d.bool():
                return {"do": "mmio_write", "vcpu": c, "offset": "LDR",
                        "value": d.pick([1, 2, 4, 0x11, 0x12, 0x21, 3, 0xFF]) << 24}
            return {"do": "mmio_write", "vcpu": c, "offset": "DFR",
                    "value": d.pick([0xFFFFFFFF, 0x0FFFFFFF, 0x7FFFFFFF])}
        if kind == "id":
            return {"do": "mmio_write", "vcpu": c, "offset": "ID",
                    "value": d.pick(ids + [5, 0xFF]) << 24}
        if kind == "base":
            val = d.pick([0xFEE00800, 0xFEE00C00, 0, 0xFEE00900, 0xFEE00D00,
                                     0xFEC00800, 0x400, 0xFEE00801])
            if d.bool():
                return {"do": "set_msr", "vcpu": c, "index": "IA32_APICBASE", "value": val}
            return {"do": "wrmsr", "vcpu": c, "index": "IA32_APICBASE", "value": val}
        if kind == "x2apic":
            reg = d.pick(["TPR", "SPIV", "EOI", "LDR", "ID", "ESR", "LVT0",
                                     "TMICT", "DFR", "ICR2", "PPR", "0x83f", "0x840"])
            index = int(reg, 0) if reg.startswith("0x") else None
            val = d.pick([0, 0x1FF, 0x20, 0x1_0000_0000, 0x44, 0xFFFFFFFF])
            s = {"do": d.pick(["wrmsr", "rdmsr"]), "vcpu": c,
                 "index": index if index is not None else f"X2APIC_{reg}"}
            if s["do"] == "wrmsr":
                s["value"] = val
            return s
        if kind == "self_ipi":
            return {"do": "wrmsr", "vcpu": c, "index": "X2APIC_SELF_IPI",
                    "value": d.pick([0x40, 0x51, 0x140])}
        if kind == "msr_read":
            return {"do": d.pick(["get_msr", "rdmsr"]), "vcpu": c,
                    "index": d.pick(["IA32_APICBASE", "X2APIC_TPR",
                                                "X2APIC_ICR", "TSC_DEADLINE"])}
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
                if d.int(0, 3) == 0:
                    patch[reg] = d.pick(vals)
            if d.bool():
                patch["IRR"] = [vec(d) for _ in range(d.int(0, 3))]
            if d.int(0, 5) == 0:
                patch["TMR"] = [vec(d) for _ in range(d.int(0, 2))]
            return {"do": "set_lapic", "vcpu": c, "from": f"cur{c}", "patch": patch,
                    "_save_first": True}
        if kind == "mp_state":
            if d.bool():
                return {"do": "get_mp_state", "vcpu": c}
            return {"do": "set_mp_state", "vcpu": c, "state": d.pick(
                ["RUNNABLE", "RUNNABLE", "INIT_RECEIVED", "SIPI_RECEIVED", "UNINITIALIZED",
                 "HALTED", "STOPPED"])}
        if kind == "nmi":
            return {"do": "nmi", "vcpu": c}
        if kind == "inhibit":
            # a no-op on a host without APICv; with --model-apicv the model's APICv is
            # toggled and must stay invisible to the guest
            return {"do": "set_or_clear_apicv_inhibit", "reason": "HYPERV",
                    "set": d.bool()}
        if kind == "timer":
            which = d.pick(["tmict_now", "tmict_far", "lvtt", "tdcr", "deadline"])
            if which == "tmict_now":
                return {"do": "mmio_write", "vcpu": c, "offset": "TMICT",
                        "value": d.int(1, 20)}
            if which == "tmict_far":
                return {"do": "mmio_write", "vcpu": c, "offset": "TMICT",
                        "value": d.pick([0, 0x40000000, 0xFFFFFFFF])}
            if which == "lvtt":
                return {"do": "mmio_write", "vcpu": c, "offset": "LVTT",
                        "value": d.pick([0xEF, 0x100EF, 0x400EF, 0x600EF,
                                                    0x200EF])}
            if which == "tdcr":
                return {"do": "mmio_write", "vcpu": c, "offset": "TDCR",
                        "value": d.pick([0xB, 0x0, 0xA])}
            return {"do": "wrmsr", "vcpu": c, "index": "TSC_DEADLINE",
                    "value": d.pick([0, 1, 0xFFFFFFFFFFFF])}
        if kind == "irq":
            return {"do": "irq_line", "irq": d.pick(
                [16, 17, 18, 19, 20, 21, 22, 23, 8, 1, 4, 9, 14, 24]),
                "level": d.pick([1, 1, 0])}
        if kind == "rte":
            pin = d.pick([16, 17, 18, 19, 20, 21, 22, 23, 8, 1, 4, 9, 14])
            e = (vec(d) | d.pick([0, 0, 0, 1, 2, 4, 5, 7]) << 8
                 | d.pick([0, 0x800]) | d.pick([0, 0x8000])
                 | d.pick([0, 0, 0x10000]) | pick_dest(d) << 56)
            if d.bool():
                return {"do": "set_irqchip", "chip": "IOAPIC", "patch": {f"rte{pin}": e}}
            half = d.pick([0, 0, 1])  # low dword (most changes) or high
            sel = 0x10 + 2 * pin + half
            return [{"do": "ioapic_write", "vcpu": c, "offset": 0, "value": sel},
                    {"do": "ioapic_write", "vcpu": c, "offset": 0x10,
                     "value": (e >> (32 * half)) & 0xFFFFFFFF}]
        if kind == "ioapic_read":
            sel = d.pick([0, 1, 2, 0x10, 0x21, 0x30, 0x3F, 0x40, 0xFF])
            return [{"do": "ioapic_write", "vcpu": c, "offset": 0, "value": sel},
                    {"do": "ioapic_read", "vcpu": c, "offset": d.pick(
                        [0x10, 0x10, 0, 0x20]), "size": d.pick([4, 4, 1, 8])}]
        if kind == "pic":
            which = d.pick(["imr", "eoi", "ocw3", "read", "elcr"])
            if which == "imr":
                return {"do": "outb", "vcpu": c, "port": d.pick([0x21, 0xA1]),
                        "value": d.pick([0, 0xFF, 0xFB, 0xEF, 0x12])}
            if which == "eoi":
                return {"do": "outb", "vcpu": c, "port": d.pick([0x20, 0xA0]),
                        "value": d.pick([0x20, 0x60, 0x61, 0xA0])}
            if which == "ocw3":
                return {"do": "outb", "vcpu": c, "port": d.pick([0x20, 0xA0]),
                        "value": d.pick([0x0A, 0x0B, 0x0C, 0x68, 0x48])}
            if which == "elcr":
                return {"do": "outb", "vcpu": c, "port": d.pick([0x4D0, 0x4D1]),
                        "value": d.pick([0, 0x10, 0xFF])}
            return {"do": "inb", "vcpu": c, "port": d.pick(
                [0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1])}
        if kind == "irqchip":
            chip = d.pick(["IOAPIC", "PIC_MASTER", "PIC_SLAVE"])
            if d.bool():
                return {"do": "get_irqchip", "chip": chip}
            if chip == "IOAPIC":
                return {"do": "set_irqchip", "chip": chip, "patch": {
                    "irr": d.pick([0, 1 << 16, 1 << 17 | 1 << 8, 0xFFFFFF]),
                    "id": d.pick([0, 3, 0xFFFFFFFF])}}
            return {"do": "set_irqchip", "chip": chip, "patch": {
                "imr": d.pick([0, 0xFF, 0xFB]),
                "irq_base": d.pick([0x20, 0x28, 0x70]),
                "irr": d.pick([0, 0x10, 0x3])}}
        if kind == "vapic":
            which = d.pick(["addr", "store", "load"])
            word = SCRATCH_GPA + 4 * d.int(0, 3)
            if which == "addr":
                return {"do": "set_vapic_addr", "vcpu": c, "gpa": d.pick(
                    [word, word, 0, 0xFEE00000])}
            if which == "store":
                return {"do": "guest_store", "vcpu": c, "gpa": word, "size": 1,
                        "value": d.pick([0, 0x20, 0x5F, 0xF0])}
            return {"do": "guest_load", "vcpu": c, "gpa": word}
        if kind == "pv_eoi":
            flag = SCRATCH_GPA + 0x100 + 4 * c
            which = d.pick(["enable", "enable", "off", "bad", "clear"])
            if which == "clear":
                return {"do": "guest_store", "vcpu": c, "gpa": flag, "value": 0, "size": 1}
            value = {"enable": flag | 1, "off": 0,
                     "bad": d.pick([flag | 3, 0xFEE00001, flag + 2])}[which]
            return {"do": "wrmsr", "vcpu": c, "index": "KVM_PV_EOI_EN", "value": value}
        if kind == "route":
            # the default routing plus MSI-X-like routes on GSIs 24-25 (edge or level)
            routes = [{"gsi": g, "address_lo": 0xFEE00000 | pick_dest(d) << 12
                       | d.pick([0, 0, 4]), "data": vec(d) | d.pick([0, 0, 0x8000])}
                      for g in (24, 25)[:d.int(1, 2)]]
            return {"do": "set_gsi_routing", "default": True, "routes": routes}
        if kind == "irqfd":
            # MSI routes only: KVM injects those from the eventfd's wakeup itself; an
            # irqchip route's injection runs later in a kernel worker (irqfd_inject), too late
            # to compare deterministically on a loaded host
            gsi = d.pick([24, 24, 25])
            if d.bool():
                return {"do": "eventfd_write", "eventfd": f"e{gsi}"}
            return {"do": "irqfd", "eventfd": f"e{gsi}", "gsi": gsi,
                    "deassign": d.pick([False, False, True])}
        if kind == "events":
            if d.bool():
                return {"do": "get_vcpu_events", "vcpu": c}
            return {"do": "set_vcpu_events", "vcpu": c,
                    "patch": {"flags": d.pick([1, 1, 0, 2]), "nmi_pending": d.int(0, 3),
                              "nmi_masked": d.int(0, 1)}}
        if kind == "pit":
            which = d.pick(["create", "mode", "count", "speaker", "read", "get"])
            if which == "create":
                return {"do": "create_pit2", "flags": d.pick([0, 1])}
            if which == "mode":  # channel 2 (the speaker's: no IRQ), any mode and access
                return {"do": "outb", "vcpu": c, "port": 0x43,
                        "value": 0x80 | d.pick([0x10, 0x20, 0x30]) | d.int(0, 5) << 1}
            if which == "count":
                return {"do": "outb", "vcpu": c, "port": 0x42, "value": d.int(0, 0xFF)}
            if which == "speaker":
                return {"do": "outb", "vcpu": c, "port": 0x61, "value": d.pick([0, 1, 3])}
            if which == "read":
                return {"do": "inb", "vcpu": c, "port": d.pick([0x42, 0x61])}
            return {"do": "get_pit2"}
        raise AssertionError(kind)

    # start like a guest would: APs runnable, every APIC software-enabled
    steps: list[dict[str, Any]] = []
    for i in ids[1:]:
        steps.append({"do": "set_mp_state", "vcpu": i, "state": "RUNNABLE"})
    for i in ids:
        steps.append({"do": "mmio_write", "vcpu": i, "offset": "SPIV", "value": 0x1FF})
    # the BSP's LVT0 accepts ExtINT at reset: give the PIC vectors >= 0x20 the way an OS
    # does (ICW1-ICW4), or mask it
    if d.bool():
        for port, val in ((0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01),
                          (0xA0, 0x11), (0xA1, 0x28), (0xA1, 0x02), (0xA1, 0x01),
                          (0x21, d.pick([0, 0xFB, 0xEE]))):
            steps.append({"do": "outb", "vcpu": 0, "port": port, "value": val})
    else:
        steps.append({"do": "set_irqchip", "chip": "PIC_MASTER",
                      "patch": {"imr": 0xFF, "irq_base": 0x20}})
        steps.append({"do": "set_irqchip", "chip": "PIC_SLAVE",
                      "patch": {"imr": 0xFF, "irq_base": 0x28}})
    n = d.int(1, max_steps)
    for _ in range(n):
        s = d.group(step)
        for one in (s if isinstance(s, list) else [s]):
            if one.pop("_save_first", False):
                steps.append({"do": "get_lapic", "vcpu": one["vcpu"], "save": one["from"]})
            steps.append(one)
    doc: dict[str, Any] = {"vm": {"vcpus": nr}, "step": steps}
    if flags:
        doc["vm"]["x2apic_api"] = flags
    return doc



def case(seed: int, index: int, max_steps: int = 20) -> tuple[dict[str, Any], list[int]]:
    """Case *index* of *seed*: (the scenario table, the integers drawn for it)."""
    d = RandomDraw(random.Random(f"apicv-fuzz:{seed}:{index}"))
    return build(d, max_steps), d.choices


def scenarios(max_steps: int):
    """A hypothesis strategy of the same scenario tables (for shrinking, and for tests that
    want hypothesis to explore)."""
    from hypothesis import strategies as st

    return st.composite(lambda draw: build(HypothesisDraw(draw), max_steps))()


SHRINK_EXAMPLES = 2000  # how many candidate scenarios hypothesis' shrinker may try


def shrink(choices: list[int], max_steps: int,
           disagrees: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    """Shrink the case drawn as *choices* with hypothesis (``find``), keeping *disagrees*
    true. The case goes in through an in-memory example database, in its secondary corpus
    (which the reuse phase replays; an entry of the primary one would count as shrunk
    already). The shrinker's random generator has a fixed seed, set the way pytest's
    ``--hypothesis-seed`` sets it (find's own ``random`` would turn the database off): the
    same input shrinks the same way everywhere. None if the case does not disagree when
    replayed. *disagrees* is asked once per distinct scenario."""
    from hypothesis import HealthCheck, Phase, Verbosity, core, find, settings
    from hypothesis.database import InMemoryExampleDatabase, choices_to_bytes
    from hypothesis.errors import NoSuchExample

    key = b"apicv-fuzz"
    db = InMemoryExampleDatabase()
    db.save(key + b".secondary", choices_to_bytes(choices))
    seen: dict[str, bool] = {}

    def cond(doc: dict[str, Any]) -> bool:
        k = repr(doc)
        if k not in seen:
            seen[k] = bool(disagrees(doc))
        return seen[k]

    cfg = settings(database=db, max_examples=SHRINK_EXAMPLES, deadline=None,
                   phases=[Phase.reuse, Phase.shrink], suppress_health_check=list(HealthCheck),
                   verbosity=Verbosity.quiet)
    forced = core.global_force_seed
    core.global_force_seed = 0
    try:
        return find(scenarios(max_steps), cond, settings=cfg, database_key=key)
    except NoSuchExample:
        return None
    finally:
        core.global_force_seed = forced


def fuzz(*, seed: int = 0, count: int = 200, max_steps: int = 20,
         out_path: str | None = "fuzz-disagreement.toml", out=None, quiet: bool = False,
         model_apicv: bool = False, trace: bool = False, **campaign: Any) -> int:
    """Run *count* random scenarios (:func:`apicv.campaign.run`: also ``workers``,
    ``duration``, ``campaign_dir``, ``resume``, ``cluster``); 0 if none disagrees, 1 (and
    the shrunk scenarios written out, the first to *out_path*) if one does."""
    from .campaign import run

    return run(seed=seed, count=count, max_steps=max_steps, out_path=out_path, out=out,
               quiet=quiet, model_apicv=model_apicv, trace=trace, **campaign)


__all__ = ["build", "case", "fuzz", "scenarios", "shrink", "to_toml"]
