"""Issue 18: the minimal Linux guest (`make linux`) on the model as irqchip vs KVM's in-kernel
irqchip -- seconds to `Run /init`, the workload's cross-CPU pipe round trips per second, the
interrupts per second the guest counted in /proc/interrupts during the workload (LOC, RES,
CAL, TLB, ttyS0) and, on the model, exits to userspace and KVM_INTERRUPTs per guest interrupt.

Usage: ``python benchmarks/linux_boot.py [--smp N] [--rounds N] [--irqchip model|kernel]``
(minutes per boot on this host: its KVM emulates the guest kernel; see the README)."""

from __future__ import annotations

import argparse
import io
import os
import re
import sys
import time

from apicv.vmm import boot

LINUX_DIR = os.environ.get("APICV_LINUX_DIR", "/var/cache/apicv/linux")
KINDS = ("LOC", "RES", "CAL", "TLB", "ttyS0")


def _counts(line_rest: str) -> int:
    total = 0
    for tok in line_rest.split():
        if not tok.isdigit():
            break
        total += int(tok)
    return total


def tables(out: str) -> list[dict[str, int]]:
    found = []
    for block in re.findall(r"^ +CPU0[^\n]*\n((?:[ \w]+:[^\n]*\n)+)", out, re.M):
        t = {}
        for line in block.splitlines():
            name, rest = line.split(":", 1)
            t["ttyS0" if "ttyS0" in rest else name.strip()] = _counts(rest)
        found.append(t)
    return found


def run(irqchip: str, smp: int, rounds: int) -> dict[str, float]:
    buf = io.BytesIO()
    t0 = time.monotonic()
    res = boot(f"{LINUX_DIR}/vmlinux", initrd=f"{LINUX_DIR}/initramfs.cpio", smp=smp,
               irqchip=irqchip, timeout=1500, out=buf,
               append=f"console=ttyS0 reboot=k panic=-1 tsc=reliable apicv.rounds={rounds}")
    out = buf.getvalue().decode(errors="replace")
    m = re.search(r"\[ *([\d.]+)\] Run /init", out)
    w = re.search(r"apicv-workload: (\d+) x (\d+) pipe round trips in ([\d.]+) s", out)
    r = {"status": res.status, "elapsed_s": round(time.monotonic() - t0, 1),
         "to_init_s": float(m.group(1)) if m else float("nan")}
    tb = tables(out)
    if w and len(tb) >= 2:
        secs = float(w.group(3))
        r["workload_s"] = secs
        r["round_trips_per_s"] = round(int(w.group(1)) * int(w.group(2)) / secs, 2)
        irqs = sum(tb[-1].get(k, 0) - tb[-2].get(k, 0) for k in KINDS)
        r["interrupts_per_s"] = round(irqs / secs, 1)
    total_irqs = sum(tb[-1].get(k, 0) for k in KINDS) if tb else 0
    exits = sum(res.exits.values())
    r["exits"] = exits
    if total_irqs:
        r["exits_per_interrupt"] = round(exits / total_irqs, 2)
        if irqchip == "model":
            r["kvm_interrupt_per_interrupt"] = round(res.injected / total_irqs, 2)
    return r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smp", type=int, default=2)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--irqchip", choices=["model", "kernel"], action="append")
    a = p.parse_args()
    if not os.path.isfile(f"{LINUX_DIR}/vmlinux"):
        print(f"linux boot: skipped ({LINUX_DIR}/vmlinux not built: make linux)")
        return 0
    for chip in a.irqchip or ["model", "kernel"]:
        r = run(chip, a.smp, a.rounds)
        print(f"linux boot --smp {a.smp} --irqchip {chip}: "
              + ", ".join(f"{k} {v}" for k, v in r.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
