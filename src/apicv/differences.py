"""The named differences of the crosscheck: where this host's KVM differs from upstream KVM
(H1..., probed on the host by :func:`probe_host`), and where the model's APICv is visible
against a host without it (V1...), with the function that recognises a step running into one.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import apicdef as A
from .errors import ScenarioError
from .scenario import Outcome, Runner, Step
from .state import LapicState

TMCCT_SLACK_NS = 20_000_000  # TMCCT: how far the two counts may drift (wall time)


@dataclass(frozen=True)
class HostDifference:
    key: str
    title: str
    evidence: str


HOST_DIFFERENCES = {
    "H1": HostDifference(
        "H1", "injected interrupts never enter ISR",
        "an interrupt the guest takes leaves IRR but ISR stays empty and PPR does not rise "
        "(upstream: kvm_apic_ack_interrupt -> apic_set_isr). Probe: MSI 0x41, guest takes it "
        "without EOI, KVM_GET_LAPIC shows ISR = [] on this host. The injection itself acts as "
        "the EOI: an IOAPIC-handled vector's EOI is broadcast when it is injected (a level "
        "pin's remote IRR clears before the guest EOIs; a still-high line re-fires at once), "
        "and the guest's own EOI finds nothing to broadcast."),
    "H2": HostDifference(
        "H2", "no event work after exits handled in the kernel",
        "after an in-kernel exit (APIC access, MSR, PIO to the in-kernel PIC) this host "
        "re-enters the guest without injecting and without vcpu_run's tail (pending timer -> "
        "IRR); one event per KVM_RUN from userspace. The guest agent exits to userspace "
        "between injections (OUT to a kick port), which makes interrupt delivery match "
        "upstream. What cannot be matched: a timer expiry that was pending while LVTT was "
        "masked (or the APIC disabled) is injected by upstream right after the guest op that "
        "unmasks it; this host leaves it pending (seen: masked one-shot expiry, unmask, "
        "take_interrupts -> [] here, [vector] upstream). Such a step stops the comparison."),
    "H3": HostDifference(
        "H3", "a rejected xAPIC read returns stale emulator data",
        "kvm_lapic_reg_read() rejects the access and leaves the buffer untouched; the guest "
        "then sees leftover bytes (seen: 8-byte read of LVR -> 0x8). The model returns 0 and "
        "flags the read; its value is not compared."),
    "H4": HostDifference(
        "H4", "timers run on wall time",
        "TMCCT and timer expiry follow CLOCK_MONOTONIC; TMCCT is compared within "
        f"{TMCCT_SLACK_NS // 1_000_000} ms of counts."),
    "H8": HostDifference(
        "H8", "pending interrupts are evaluated at every entry from userspace",
        "upstream injects only after KVM_REQ_EVENT (kvm_check_and_inject_events); this host "
        "also injects an IRR vector that no request announced. Seen: a fixed MSI in IRR while "
        "the host has the APIC disabled (KVM_SET_MSRS APIC_BASE), the guest re-enables it "
        "(WRMSR; __kvm_apic_set_base raises only KVM_REQ_APF_READY) and opens an IF=1 window: "
        "the host's trace shows the injection right after a kvm_userspace_exit with nothing "
        "in between that would raise a request ('kvm_userspace_exit: reason KVM_EXIT_IO (2)', "
        "'kvm_apic: apic_write APIC_EOI = 0x0', 'kvm_eoi: apicid 0 vector 65'); upstream "
        "leaves the vector in IRR. Such a step stops the comparison."),
    "H9": HostDifference(
        "H9", "a read of the PIT's command port 0x43 returns 0xFF",
        "pit_ioport_read() handles port 3 without writing the data (the command register is "
        "write-only): the guest keeps what its AL held (the agent zeroes it, upstream reads 0 "
        "there); this host returns 0xFF. The value of such a read is not compared. (The "
        "PIT's counters run on wall time here too: live counts, latched counts and "
        "count_load_time are compared by range or not at all -- H4.)"),
}


class HostDifferenceNamer:
    """For runs on the real backend alone (``apicv run/demo --backend kvm``): names the known
    host difference behind a failed expectation, from what the run did so far. H1: ISR or PPR
    (a KVM_GET_LAPIC expectation, or a read of PPR/ISR) on a vCPU that has taken an interrupt
    -- this host never puts an injected vector into ISR. H4: a TMCCT read -- the count follows
    wall time."""

    def __init__(self) -> None:
        self.took: set[int] = set()  # vCPUs that have taken an interrupt (or got such a state)
        self.saved: set[str] = set()  # states saved from them (KVM_GET_LAPIC, save = ...)

    def key(self, o: Outcome) -> str | None:
        st, a = o.step, o.step.args
        if o.failure is None or o.error is not None:
            return None
        vid = a.get("vcpu")
        if st.op == "mmio_read" and a["offset"] == A.APIC_TMCCT or (
                st.op == "rdmsr" and a["index"] == 0x839):
            return "H4"
        if vid in self.took:
            if st.op == "get_lapic" and isinstance(st.expect, dict) and \
                    set(st.expect) & {"ISR", "PPR"} and ("ISR" in o.failure or "PPR" in o.failure):
                return "H1"
            if st.op == "mmio_read" and (a["offset"] == A.APIC_PROCPRI
                                         or A.APIC_ISR <= a["offset"] < A.APIC_ISR + 0x80):
                return "H1"
            if st.op == "rdmsr" and (a["index"] == 0x80A or 0x810 <= a["index"] <= 0x817):
                return "H1"
        return None

    def annotate(self, o: Outcome) -> str | None:
        """*o*'s failure text, naming a known host difference when one explains it; call
        for every outcome in order."""
        key = self.key(o)
        st, a = o.step, o.step.args
        if st.op == "take_interrupts" and o.error is None and o.value:
            self.took.add(a["vcpu"])
        elif st.op == "get_lapic" and a.get("save") and a["vcpu"] in self.took:
            self.saved.add(a["save"])
        elif st.op == "set_lapic" and o.error is None and a.get("from") in self.saved:
            self.took.add(a["vcpu"])
        if key is None:
            return o.failure
        return (f"{o.failure} -- known host difference {key} "
                f"({HOST_DIFFERENCES[key].title}; upstream KVM, and the model, do as expected)")


# With ``model_apicv`` the model runs with APICv on against a host that has none. Where the
# processor's APIC virtualization itself is visible to the guest (see the README), the step is
# not comparable; these are the cases, recognised from the step and the model's state.
APICV_DIFFERENCES = {
    "V1": "partial-width xAPIC writes are virtualized and replayed by KVM (APIC-write exit); "
          "the software LAPIC drops them",
    "V2": "an ESR write, or a TMICT write in TSC-deadline mode, leaves the raw value in the "
          "virtual-APIC page (KVM stores nothing), so it reads back",
    "V3": "x2APIC WRMSR of TPR with bits 31:8 set, or of EOI with a nonzero value: #GP under "
          "x2APIC virtualization, accepted by the software LAPIC",
    "V4": "self-IPI virtualization does not look at the software-enable bit (SVR)",
    "V5": "KVM_SET_LAPIC that changes ISR: the software LAPIC's stale-PPR quirk does not exist "
          "with APICv (isr_count pinned to 1)",
    "V6": "x2APIC WRMSR of SELF_IPI under virtual-interrupt delivery: the processor's special "
          "processing stores the value at offset 0x3F0 of the virtual-APIC page (KVM_GET_LAPIC "
          "shows it); the software LAPIC stores nothing there. Not a stop: the SELF_IPI word "
          "is left out of the state comparison",
    "V7": "xAPIC reads APIC-register virtualization serves from the page (EOI at 0xB0 reads "
          "0) that KVM's emulation rejects (H3: undefined data). Not a stop: the value is not "
          "compared",
    "V8": "the VAPIC word (kvm_lapic_sync_to_vapic) is written only at entries that handle "
          "KVM_REQ_EVENT, and before the entry moves posted vectors from PIR to IRR: with APICv "
          "it can lag the software LAPIC's (and the TPR read back from it differs)",
    "V10": "KVM_GET_VCPU_EVENTS' interrupt.nr is the last vector KVM injected; under "
           "virtual-interrupt delivery the processor delivers and interrupt.nr does not move. "
           "Not a stop: with the model's APICv that field is not compared",
    "V9": "KVM_SET_LAPIC restoring an expired one-shot (TMCCT 0) fires it inside the ioctl "
          "(start_sw_period); with APICv apic_timer_expired injects it at once -- into IRR, "
          "or dropped if LVTT is masked -- without APICv it waits in lapic_timer.pending for "
          "the next entry and is delivered if LVTT is unmasked by then",
}


def apicv_visible(step: Step, mvm, runner: Runner | None = None) -> str | None:
    """Which APICv-visible difference (APICV_DIFFERENCES) a step runs into, if any;
    *runner* (the model's) resolves the page a set_lapic step loads."""
    a = step.args
    op = step.op
    cpu = mvm.vcpu(a["vcpu"]) if "vcpu" in a else None
    if cpu is None:
        return None
    apic = cpu.apic
    xapic = apic.hw_enabled and not apic.x2apic
    if op == "mmio_write" and xapic:
        off = a["offset"]
        if a.get("size", 4) != 4 and (off & 0xFF0) in (0x20, 0x80, 0xB0, 0xD0, 0xE0, 0xF0,
                                                      0x280, 0x300, 0x310, 0x380, 0x3E0) \
                or a.get("size", 4) != 4 and 0x320 <= (off & 0xFF0) <= 0x370:
            return "V1"
        if off == A.APIC_ESR or (off == A.APIC_TMICT and apic.apic_lvtt_tscdeadline()):
            return "V2"
        if off == A.APIC_ICR and not apic.sw_enabled and (a["value"] >> 18) & 3 == 1:
            return "V4"
    if op == "wrmsr" and apic.x2apic:
        idx, val = a["index"], a["value"]
        if (idx == 0x808 and val >> 8 and not val >> 32) or (idx == 0x80B and val
                                                             and not val >> 32):
            return "V3"
        if idx == 0x80B and val >> 32:
            return None
        if idx == 0x83F and not apic.sw_enabled:
            return "V4"
        if idx == 0x830 and not apic.sw_enabled and (val >> 18) & 3 == 1:
            return "V4"
    if op == "set_lapic":
        if runner is None:
            return "V5"
        try:
            page = LapicState(runner.lapic_page(step.args))
        except (ScenarioError, ValueError, OSError):
            return None  # the step fails the same way on both sides
        if page.isr != apic.isr:
            return "V5"
        if (page["LVTT"] >> 17) & 3 == 0 and page["TMICT"] and page["TMCCT"] == 0:
            return "V9"
        return None
    return None


# ---------------------------------------------------------------- probing the host
_PROBED: dict[str, bool] | None = None


def probe_host() -> dict[str, bool]:
    """Which known differences this host's KVM has (run once per process)."""
    global _PROBED
    if _PROBED is not None:
        return _PROBED
    from .kvm import KvmVm

    found = {"H2": True, "H3": True, "H4": True}
    with KvmVm(1) as vm:
        cpu = vm.vcpus[0]
        cpu.mmio_write(A.APIC_SPIV, 0x1FF)
        vm.signal_msi(0xFEE00000, 0, 0x41)
        cpu.take_interrupts(eoi=False)
        found["H1"] = LapicState(cpu.get_lapic()).isr == 0
    with KvmVm(1) as vm:
        # H8: a vector in IRR that no request announces (the APIC was disabled when it came
        # in, the guest re-enables it) is injected anyway
        cpu = vm.vcpus[0]
        cpu.mmio_write(A.APIC_SPIV, 0x1FF)
        vm.signal_msi(0xFEE00000, 0, 0x41)
        cpu.set_msr(A.MSR_IA32_APICBASE, 0xFEE00100)
        cpu.wrmsr(A.MSR_IA32_APICBASE, 0xFEE00900)
        found["H8"] = cpu.take_interrupts() == [0x41]
    _PROBED = found
    return found
