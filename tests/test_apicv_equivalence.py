"""Proof, not hope: APICv is invisible to the guest.

For random sequences of host operations, guest operations, IPIs, MSIs, INITs, save/restore,
vCPU locations (host, guest mode, HLT), timer expiries and APICv inhibit toggles, the
guest-visible outcome -- the vectors each interrupt window takes and their order, every
KVM_GET_LAPIC page, mp_state, register reads, faults -- is identical with APICv off (KVM's
software LAPIC), on, and toggled on and off at random points. Nothing is lost, nothing is
delivered twice.

What APICv does make visible, and the generator therefore leaves out (each is tested in
test_apicv.py and listed in the README as V1-V7): partial-width MMIO writes (virtualized,
replayed by KVM), ESR and TSC-deadline-mode TMICT writes (the raw value stays in the
virtual-APIC page), x2APIC TPR/EOI/SELF-IPI writes with reserved bits (#GP under
virtualization), self-IPIs to a software-disabled APIC (self-IPI virtualization does not look
at SVR), TPR-access reporting, restoring an ISR that differs from the current one (KVM's
stale-PPR quirk exists only without APICv), the SELF_IPI word an x2APIC self-IPI leaves in the
page and reads of EOI (virtualized; rejected by the emulation). The PPR word of KVM_GET_LAPIC
is compared as the guest would read PPR (see guest_ppr()).

``APICV_EQUIV_CASES`` sets the number of cases (default 10000; e.g. 200000 for a long run).
"""

from __future__ import annotations

import os

from conftest import place
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import apicv
from apicv import apicdef as A
from apicv.crosscheck import guest_ppr  # KVM_GET_LAPIC's PPR word is a cache (see there)
from apicv.state import LapicState

CASES = int(os.environ.get("APICV_EQUIV_CASES", "10000"))
CONFIGS = {
    "off": {"enable_apicv": False, "flexpriority": False},
    "on": {"enable_apicv": True},
    "toggled": {"enable_apicv": True},
}

vectors = st.integers(0x20, 0xFF)


@st.composite
def cases(draw):
    nr = draw(st.integers(1, 3))
    x2 = [draw(st.booleans()) for _ in range(nr)]
    ops = []
    for _ in range(draw(st.integers(1, 14))):
        c = draw(st.integers(0, nr - 1))
        k = draw(st.sampled_from(["msi", "msi", "ipi", "ipi", "take", "take", "take", "tpr",
                                  "eoi", "save", "where", "where", "timer", "advance", "read",
                                  "nmi", "init", "inhibit"]))
        if k == "msi":
            ops.append(("msi", draw(st.sampled_from(list(range(nr)) + [0xFF])), draw(vectors),
                        draw(st.sampled_from([0, 0, 1, 4])), draw(st.booleans())))
        elif k == "ipi":
            ops.append(("ipi", c, draw(st.integers(0, nr - 1)), draw(vectors),
                        draw(st.sampled_from([0, 0, 1, 4])),
                        draw(st.sampled_from([0, 0, 1, 2, 3]))))
        elif k == "take":
            ops.append(("take", c, draw(st.one_of(st.none(), st.integers(1, 2))),
                        draw(st.sampled_from([True, True, True, False]))))
        elif k == "tpr":
            ops.append(("tpr", c, draw(st.sampled_from([0, 0x10, 0x2F, 0x50, 0x7F, 0xF0])),
                        draw(st.sampled_from(["reg", "cr8"]))))
        elif k == "eoi":
            ops.append(("eoi", c))
        elif k == "save":
            ops.append(("save", c, draw(st.lists(vectors, max_size=2)),
                        draw(st.sampled_from([None, 0, 0x30]))))
        elif k == "where":
            ops.append(("where", c, draw(st.sampled_from(["guest", "halt", "host"])),
                        draw(st.booleans())))
        elif k == "timer":
            ops.append(("timer", c, draw(st.sampled_from([0xEF, 0x200EF, 0x100EF])),
                        draw(st.sampled_from([0, 1, 500, 3000, 250_000]))))
        elif k == "advance":
            ops.append(("advance", draw(st.sampled_from([1, 1000, 100_000, 300_000]))))
        elif k == "read":
            ops.append(("read", c, draw(st.sampled_from([A.APIC_TASKPRI, A.APIC_PROCPRI,
                                                         A.APIC_IRR + 0x30, A.APIC_ISR + 0x30,
                                                         A.APIC_LVTT, A.APIC_ID]))))
        elif k == "nmi":
            ops.append(("nmi", c))
        elif k == "init":
            ops.append(("init", c, draw(st.integers(0, nr - 1)), draw(st.integers(0, 0xFF))))
        else:
            ops.append(("inhibit", draw(st.booleans())))
    return nr, x2, ops


def _run(config: str, nr: int, x2: list[bool], ops) -> list:
    vm = apicv.Vm(nr, **CONFIGS[config])
    for cpu, x in zip(vm.vcpus, x2, strict=True):
        cpu.set_mp_state(apicv.KVM_MP_STATE_RUNNABLE)
        if x:
            cpu.wrmsr(0x1B, (cpu.get_msr(0x1B) & 0x100) | 0xFEE00C00)
            cpu.wrmsr(0x80F, 0x1FF)
        else:
            cpu.mmio_write(A.APIC_SPIV, 0x1FF)
    log: list = []

    def reg_write(cpu, off, val):
        if cpu.apic.x2apic:
            cpu.wrmsr(0x800 + (off >> 4), val)
        else:
            cpu.mmio_write(off, val)

    def reg_read(cpu, off):
        return cpu.rdmsr(0x800 + (off >> 4)) if cpu.apic.x2apic else cpu.mmio_read(off)

    for op in ops:
        kind = op[0]
        try:
            if kind == "msi":
                _, dest, vec, dm, logical = op
                lo = 0xFEE00000 | (dest << 12) | (4 if logical else 0)
                r = vm.signal_msi(lo, 0, vec | (dm << 8))
            elif kind == "ipi":
                _, src, dst, vec, dm, sh = op
                cpu = vm.vcpus[src]
                low = vec | (dm << 8) | 0x4000 | (sh << 18)
                if cpu.apic.x2apic:
                    cpu.wrmsr(0x830, (vm.vcpus[dst].vcpu_id << 32) | low)
                else:
                    cpu.mmio_write(A.APIC_ICR2, vm.vcpus[dst].vcpu_id << 24)
                    cpu.mmio_write(A.APIC_ICR, low)
                r = None
            elif kind == "take":
                r = vm.vcpus[op[1]].take_interrupts(op[2], op[3])
            elif kind == "tpr":
                _, c, val, how = op
                if how == "cr8":
                    vm.vcpus[c].write_cr8(val >> 4)
                else:
                    reg_write(vm.vcpus[c], A.APIC_TASKPRI, val)
                r = None
            elif kind == "eoi":
                reg_write(vm.vcpus[op[1]], A.APIC_EOI, 0)
                r = None
            elif kind == "save":
                _, c, irr, tpr = op
                cpu = vm.vcpus[c]
                s = LapicState(cpu.get_lapic())
                if (s["LVTT"] >> 17) & 3 == 0 and s["TMICT"] and s["TMCCT"] == 0:
                    # V9: restoring an expired one-shot fires it inside KVM_SET_LAPIC
                    # (start_sw_period: the expiry is already past); with APICv that is
                    # kvm_apic_inject_pending_timer_irqs at once -- dropped if LVTT is masked
                    # -- without APICv it waits in lapic_timer.pending and is delivered at an
                    # entry with LVTT unmasked. A named APICv difference: stop comparing here.
                    log.append(("V9", c))
                    break
                s.irr = s.irr | sum(1 << v for v in irr)
                if tpr is not None:
                    s["TPR"] = tpr
                cpu.set_lapic(bytes(s))
                r = None
            elif kind == "where":
                _, c, where, iflag = op
                r = place(vm.vcpus[c], where, iflag)
            elif kind == "timer":
                _, c, lvtt, tmict = op
                reg_write(vm.vcpus[c], A.APIC_LVTT, lvtt)
                reg_write(vm.vcpus[c], A.APIC_TMICT, tmict)
                r = None
            elif kind == "advance":
                vm.clock.advance(op[1])
                r = None
            elif kind == "read":
                r = reg_read(vm.vcpus[op[1]], op[2])
            elif kind == "nmi":
                vm.vcpus[op[1]].nmi()
                r = None
            elif kind == "init":
                _, src, dst, vec = op
                vm.signal_msi(0xFEE00000 | (vm.vcpus[dst].vcpu_id << 12), 0, 0x500)
                vm.signal_msi(0xFEE00000 | (vm.vcpus[dst].vcpu_id << 12), 0, 0x600 | vec)
                r = vm.vcpus[dst].get_mp_state()
                # the guest software-enables its APIC again (self-IPIs to a software-disabled
                # APIC are accepted by self-IPI virtualization: a documented APICv difference)
                reg_write(vm.vcpus[dst], A.APIC_SPIV, 0x1FF)
            elif kind == "inhibit":
                if config == "toggled":
                    vm.set_or_clear_apicv_inhibit("HYPERV", op[1])
                r = None
        except (apicv.GuestFault, apicv.KvmError, apicv.VcpuNotRunnable) as e:
            r = (type(e).__name__, getattr(e, "vector", None), getattr(e, "errno", None))
        state = []
        for cpu in vm.vcpus:
            # observe without disturbing: a vCPU resting in guest mode or HLT stays there
            page = LapicState(cpu.lapic_view())
            page["TMCCT"] = 0  # the live count: same clock, but compared via interrupts
            page["PPR"] = guest_ppr(page)
            state.append((bytes(page), cpu.mp_state, cpu.location))
        log.append((op, r, state))
    for cpu in vm.vcpus:
        cpu.leave_guest()
        try:
            log.append(("final", cpu.take_interrupts()))
        except apicv.VcpuNotRunnable:
            log.append(("final", "not runnable"))
    return log


@settings(max_examples=CASES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(cases())
def test_apicv_invisible_to_the_guest(case):
    nr, x2, ops = case
    off = _run("off", nr, x2, ops)
    for config in ("on", "toggled"):
        got = _run(config, nr, x2, ops)
        for i, (a, b) in enumerate(zip(off, got, strict=True)):
            assert a == b, (f"APICv {config} differs from APICv off after step {i}: {a[0]}\n"
                            f"off: {a[1:]}\n{config}: {b[1:]}")
