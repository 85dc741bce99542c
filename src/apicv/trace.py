"""Tracing: KVM's tracepoints, one line each in the tracepoint's own TP_printk format, stamped
with the model's virtual time; and the same run as Chrome trace-event JSON for the Perfetto UI.

Tracing is off unless a :class:`Tracer` is attached (``vm.trace = Tracer(vm.clock)`` or
``apicv.Vm(..., trace=True)``). Every trace site in the model is guarded by one
``if tracer is not None`` test, so a VM without a tracer does no formatting and allocates
nothing for tracing.

Line format (as ``trace-cmd report`` prints it)::

    <task>-<pid> [<cpu>] <seconds>: <event>: <fields>

with task ``vcpu`` and pid/cpu the vCPU id for work done on a vCPU, and ``vm-0 [000]`` for
VM-level work (an MSI from userspace, an IOAPIC line). The ``<fields>`` text follows
arch/x86/kvm/trace.h and include/trace/events/kvm.h exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from . import apicdef as A
from .regs import trace_symbol

_DM = A.DELIVERY_MODE_NAMES
_SH = A.SHORTHAND_NAMES
VM_CONTEXT = -1


@dataclass(slots=True)
class TraceEvent:
    ts: int  # virtual ns
    cpu: int  # vCPU id, or -1 for VM context
    name: str
    text: str

    def line(self) -> str:
        secs = f"{self.ts // 1_000_000_000}.{(self.ts // 1000) % 1_000_000:06d}"
        task = "vm-0 [000]" if self.cpu < 0 else f"vcpu-{self.cpu} [{self.cpu:03d}]"
        return f"{task} {secs}: {self.name}: {self.text}"


class Tracer:
    """Collects trace events; also tracks what the Perfetto timeline needs."""

    def __init__(self, clock, *, limit: int | None = None) -> None:
        self.clock = clock
        self.events: list[TraceEvent] = []
        self.context = VM_CONTEXT
        self.limit = limit
        self.dropped = 0
        # timeline: (ts, cpu, kind, payload)
        self.timeline: list[tuple[int, int, str, object]] = []

    # -- plumbing --
    def _emit(self, name: str, text: str, cpu: int | None = None) -> None:
        if self.limit is not None and len(self.events) >= self.limit:
            self.dropped += 1
            return
        self.events.append(TraceEvent(self.clock.now, self.context if cpu is None else cpu,
                                      name, text))

    def lines(self) -> list[str]:
        return [e.line() for e in self.events]

    # -- tracepoints (arch/x86/kvm/trace.h, include/trace/events/kvm.h) --
    def kvm_apic(self, rw: int, reg: int, val: int) -> None:
        self._emit("kvm_apic", f"apic_{'write' if rw else 'read'} {trace_symbol(reg)} = {val:#x}")

    def kvm_apic_ipi(self, icr_low: int, dest_id: int) -> None:
        self._emit(
            "kvm_apic_ipi",
            f"dst {dest_id:x} vec {icr_low & 0xFF} ({_DM[(icr_low >> 8) & 7]}|"
            f"{'logical' if icr_low & (1 << 11) else 'physical'}|"
            f"{'assert' if icr_low & (1 << 14) else 'de-assert'}|"
            f"{'level' if icr_low & (1 << 15) else 'edge'}|{_SH[(icr_low >> 18) & 3]})",
        )

    def kvm_apic_accept_irq(self, apicid: int, dm: int, tm: int, vec: int,
                            name: str = "kvm_apic_accept_irq") -> None:
        self._emit(name, f"apicid {apicid:x} vec {vec & 0xFF} ({_DM[(dm >> 8) & 7]}|"
                         f"{'level' if tm else 'edge'})")

    def kvm_apicv_accept_irq(self, apicid: int, dm: int, tm: int, vec: int) -> None:
        self.kvm_apic_accept_irq(apicid, dm, tm, vec, name="kvm_apicv_accept_irq")

    def kvm_eoi(self, apicid: int, vector: int, name: str = "kvm_eoi") -> None:
        self._emit(name, f"apicid {apicid:x} vector {vector}")

    def kvm_pv_eoi(self, apicid: int, vector: int) -> None:
        self.kvm_eoi(apicid, vector, name="kvm_pv_eoi")

    def kvm_msi_set_irq(self, address: int, data: int) -> None:
        dst = ((address >> 12) & 0xFF) | ((address >> 32) & 0xFFFFFF00)
        self._emit(
            "kvm_msi_set_irq",
            f"dst {dst:x} vec {data & 0xFF} ({_DM[(data >> 8) & 7]}|"
            f"{'logical' if address & (1 << 2) else 'physical'}|"
            f"{'level' if data & (1 << 15) else 'edge'}{'|rh' if address & (1 << 3) else ''})",
        )

    def kvm_inj_virq(self, vector: int, soft: bool = False, reinjected: bool = False) -> None:
        self._emit("kvm_inj_virq", f"{'Soft/INTn' if soft else 'IRQ'} {vector:#x}"
                                   f"{' [reinjected]' if reinjected else ''}")

    def kvm_inj_nmi(self) -> None:
        """Not a kernel tracepoint (trace.h has none for NMI injection): model-only."""
        self._emit("kvm_inj_nmi", "")

    def kvm_userspace_exit(self, name: str, reason: int) -> None:
        """kvm_userspace_exit: ``reason KVM_EXIT_<name> (<number>)``. The model writes it only
        for the exits a split-irqchip VMM must handle; the kernel writes one at every return
        of KVM_RUN."""
        self._emit("kvm_userspace_exit", f"reason KVM_EXIT_{name} ({reason})")

    def kvm_apicv_inhibit_changed(self, reason: int, set_: bool, inhibits: int) -> None:
        from .kvm_host import inhibit_names

        names = "|".join(inhibit_names(inhibits))
        self._emit("kvm_apicv_inhibit_changed",
                   f"{'set' if set_ else 'cleared'} reason={reason}, inhibits={inhibits:#x}"
                   f"{' ' if inhibits else ''}{names}")

    def kvm_set_irq(self, gsi: int, level: int, irq_source_id: int) -> None:
        self._emit("kvm_set_irq", f"gsi {gsi} level {level} source {irq_source_id}")

    def kvm_ack_irq(self, irqchip: int, pin: int) -> None:
        """trace_kvm_ack_irq (kvm_notify_acked_irq): __print_symbolic(irqchip, kvm_irqchips)."""
        chip = ("PIC master", "PIC slave", "IOAPIC")[irqchip] if 0 <= irqchip < 3 else irqchip
        self._emit("kvm_ack_irq", f"irqchip {chip} pin {pin}")

    def kvm_ioapic_set_irq(self, e: int, pin: int, coalesced: bool) -> None:
        self._emit(
            "kvm_ioapic_set_irq",
            f"pin {pin} dst {(e >> 56) & 0xFF:x} vec {e & 0xFF} ({_DM[(e >> 8) & 7]}|"
            f"{'logical' if e & (1 << 11) else 'physical'}|"
            f"{'level' if e & (1 << 15) else 'edge'}{'|masked' if e & (1 << 16) else ''})"
            f"{' (coalesced)' if coalesced else ''}",
        )

    def kvm_ioapic_delayed_eoi_inj(self, e: int) -> None:
        self._emit(
            "kvm_ioapic_delayed_eoi_inj",
            f"dst {(e >> 56) & 0xFF:x} vec {e & 0xFF} ({_DM[(e >> 8) & 7]}|"
            f"{'logical' if e & (1 << 11) else 'physical'}|"
            f"{'level' if e & (1 << 15) else 'edge'}{'|masked' if e & (1 << 16) else ''})",
        )

    def kvm_pic_set_irq(self, chip: int, pin: int, elcr: int, imr: int,
                        coalesced: bool) -> None:
        self._emit("kvm_pic_set_irq",
                   f"chip {chip} pin {pin} ({'level' if elcr >> pin & 1 else 'edge'}"
                   f"{'|masked' if imr >> pin & 1 else ''}){' (coalesced)' if coalesced else ''}")

    # -- nested VMX (arch/x86/kvm/trace.h; KVM_ISA_VMX; reason names as VMX_EXIT_REASONS) --
    def kvm_nested_vmenter(self, rip: int, vmcs: int, nested_rip: int, int_ctl: int,
                           event_inj: int, tdp_enabled: bool, guest_pgd: int) -> None:
        """trace_kvm_nested_vmenter (nested_vmx_enter_non_root_mode): int_ctl is
        vmcs12->guest_intr_status, event_inj vmcs12->vm_entry_intr_info_field."""
        self._emit("kvm_nested_vmenter",
                   f"rip: 0x{rip:016x} vmcs: 0x{vmcs:016x} nested_rip: 0x{nested_rip:016x} "
                   f"int_ctl: 0x{int_ctl:08x} event_inj: 0x{event_inj:08x} "
                   f"nested_ept={'y' if tdp_enabled else 'n'} "
                   f"{'nested_eptp' if tdp_enabled else 'guest_cr3'}: 0x{guest_pgd:016x}")

    def kvm_nested_vmexit(self, vcpu_id: int, reason: str, rip: int, info1: int, info2: int,
                          intr_info: int, error_code: int) -> None:
        """trace_kvm_nested_vmexit (TRACE_EVENT_KVM_EXIT; nested_vmx_reflect_vmexit): an exit
        from L2 that KVM looks at before deciding whether L1 wants it."""
        self._emit("kvm_nested_vmexit",
                   f"vcpu {vcpu_id} reason {reason} rip 0x{rip:x} info1 0x{info1:016x} "
                   f"info2 0x{info2:016x} intr_info 0x{intr_info:08x} "
                   f"error_code 0x{error_code:08x}")

    def kvm_nested_vmexit_inject(self, reason: str, info1: int, info2: int, exit_int: int,
                                 exit_int_err: int) -> None:
        """trace_kvm_nested_vmexit_inject (nested_vmx_vmexit): the exit L1 is given."""
        self._emit("kvm_nested_vmexit_inject",
                   f"reason: {reason} ext_inf1: 0x{info1:016x} ext_inf2: 0x{info2:016x} "
                   f"ext_int: 0x{exit_int:08x} ext_int_err: 0x{exit_int_err:08x}")

    def kvm_nested_intr_vmexit(self, rip: int) -> None:
        """trace_kvm_nested_intr_vmexit: ``rip: 0x%016llx``. Only SVM's nested_svm_intr()
        fires it; KVM's VMX code never does, so a VMX trace (the model's) never shows it."""
        self._emit("kvm_nested_intr_vmexit", f"rip: 0x{rip:016x}")

    def kvm_timer_expired(self, apicid: int, mode: str) -> None:
        """Not a KVM tracepoint: the model marks hrtimer expiry (apic_timer_fn) on the timeline."""
        self.timeline.append((self.clock.now, apicid, "timer", mode))

    # -- timeline-only records --
    def priority(self, cpu: int, tpr: int, ppr: int) -> None:
        self.timeline.append((self.clock.now, cpu, "prio", (tpr, ppr)))

    def apic_state(self, apic) -> None:
        """A sample of one vCPU's interrupt state for the timeline counters: highest IRR and
        ISR vectors, TPR, PPR, and with APICv RVI, SVI and the number of vectors in PIR."""
        vmx = apic.vmx
        sample = {
            "IRR": apic.irr.bit_length() - 1, "ISR": apic.isr.bit_length() - 1,
            "TPR": apic.r[0x80 >> 2] & 0xFF, "PPR": apic.r[0xA0 >> 2] & 0xFF,
        }
        if vmx is not None:
            sample.update(RVI=vmx.rvi, SVI=vmx.svi, PIR=vmx.pi_desc.pir.bit_count())
        self.timeline.append((self.clock.now, apic.vcpu_id, "state", sample))

    def in_service(self, cpu: int, vector: int, begin: bool) -> None:
        self.timeline.append((self.clock.now, cpu, "isr+" if begin else "isr-", vector))

    def mp_state(self, cpu: int, state: str) -> None:
        self.timeline.append((self.clock.now, cpu, "mp_state", state))

    # -- output --
    def chrome_trace(self, vcpu_ids: list[int]) -> dict:
        """Chrome trace-event JSON (the Perfetto UI opens it): one thread track per vCPU plus
        one for VM-level work; instants for every tracepoint, async slices for vectors in
        service, counters for TPR/PPR."""
        pid = 1
        vm_tid = 100000
        ev: list[dict] = [
            {"name": "process_name", "ph": "M", "pid": pid, "args": {"name": "apicv VM"}},
            {"name": "thread_name", "ph": "M", "pid": pid, "tid": vm_tid,
             "args": {"name": "VM (ioctls, MSIs)"}},
        ]
        for v in vcpu_ids:
            ev.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": v,
                       "args": {"name": f"vCPU {v}"}})
        for e in self.events:
            ev.append({"name": e.name, "ph": "i", "s": "t", "ts": e.ts / 1000.0, "pid": pid,
                       "tid": vm_tid if e.cpu < 0 else e.cpu, "cat": "kvm",
                       "args": {"fields": e.text}})
        for ts, cpu, kind, payload in self.timeline:
            t = ts / 1000.0
            if kind == "prio":
                tpr, ppr = payload  # type: ignore[misc]
                ev.append({"name": f"vCPU {cpu} priority", "ph": "C", "ts": t, "pid": pid,
                           "args": {"TPR": tpr, "PPR": ppr}})
            elif kind == "state":
                ev.append({"name": f"vCPU {cpu} APIC", "ph": "C", "ts": t, "pid": pid,
                           "args": payload})
            elif kind == "vid":
                rvi, svi = payload  # type: ignore[misc]
                ev.append({"name": f"vCPU {cpu} GUEST_INTR_STATUS", "ph": "C", "ts": t,
                           "pid": pid, "args": {"RVI": rvi, "SVI": svi}})
            elif kind == "pir":
                ev.append({"name": f"posted vector {payload:#x}", "ph": "i", "s": "t", "ts": t,
                           "pid": pid, "tid": cpu, "cat": "posted"})
            elif kind == "apicv":
                ev.append({"name": f"APICv {'activated' if payload else 'deactivated'}",
                           "ph": "i", "s": "t", "ts": t, "pid": pid, "tid": cpu,
                           "cat": "apicv"})
            elif kind in ("isr+", "isr-"):
                ev.append({"name": f"vector {payload:#x} in service", "cat": "isr",
                           "ph": "b" if kind == "isr+" else "e", "ts": t, "pid": pid,
                           "tid": cpu, "id": f"{cpu}:{payload}"})
            elif kind == "mp_state":
                ev.append({"name": f"mp_state {payload}", "ph": "i", "s": "t", "ts": t,
                           "pid": pid, "tid": cpu, "cat": "mp_state"})
            elif kind == "timer":
                ev.append({"name": f"APIC timer expired ({payload})", "ph": "i", "s": "t",
                           "ts": t, "pid": pid, "tid": cpu, "cat": "timer"})
        return {"traceEvents": ev, "displayTimeUnit": "ns"}

    def write_chrome_trace(self, path: str, vcpu_ids: list[int]) -> None:
        with open(path, "w") as f:
            json.dump(self.chrome_trace(vcpu_ids), f)
