"""Reusing a real VM: :class:`ResettableVm` (a base of :class:`~apicv.kvm.backend.KvmVm`)
records the state of a new VM (``save_fresh``) and brings the VM back to it (``reset``), so
that ``apicv fuzz`` can run its next case on it instead of creating a VM (~8 ms here: the VM,
its irqchip, a 17 MiB memslot with the agent's image, the vCPUs). tests/test_fuzz_scale.py
checks that cases on a reset VM give exactly what they give on a new one."""

from __future__ import annotations

from typing import Any

from .. import apicdef as A
from .. import uapi as MU
from ..api import default_routing
from ..errors import ApicvError, KvmError
from ..memory import SCRATCH_GPA, SCRATCH_SIZE
from . import agent as G


class ResettableVm:
    """save_fresh / reset of a KvmVm (its irqfds, IRQ lines, routing and PIT flag)."""

    def save_fresh(self) -> None:
        """Record the state of this VM as created (every vCPU's, the PIC pair's and the
        IOAPIC's): what :meth:`reset` returns to. Call it before anything runs."""
        self.check_open()
        if self.config.irqchip != "kernel":
            raise ApicvError("only a VM with the in-kernel irqchip can be reset")
        chips = tuple(self.get_irqchip(c) for c in (
            MU.KVM_IRQCHIP_PIC_SLAVE, MU.KVM_IRQCHIP_PIC_MASTER, MU.KVM_IRQCHIP_IOAPIC))
        self._fresh = chips, [(c.get_lapic(), c.get_msr(A.MSR_IA32_APICBASE),
                              c.get_vcpu_events(), c.peek_mp_state()) for c in self.vcpus]

    def reset(self) -> None:
        """Bring the VM back to the state :meth:`save_fresh` recorded, so that it can be used
        again instead of a new one (``apicv fuzz`` does, between cases): every IRQ line
        irq_line left high is lowered, irqfds are detached, KVM's default GSI routing is
        restored if it was changed, the PIC pair and the IOAPIC are loaded as they were
        (KVM_SET_IRQCHIP), the scratch RAM (apicv.memory.SCRATCH_GPA) and the agent's APIC
        window page tables are zeroed, the clock restarts at 0 and every vCPU is reset
        (_reset_vcpu). What the reset does not cover makes it raise ApicvError: an
        in-kernel PIT (it cannot be removed). Guest RAM outside the scratch area is not
        restored: a user that stores elsewhere must not reuse the VM. Host APICv inhibits
        are sticky in KVM (e.g. APIC_ID_MODIFIED): on a host with APICv a reset VM is not a
        new one, and apicv fuzz does not reuse it there."""
        self.check_open()
        if self._fresh is None:
            raise ApicvError("reset() needs save_fresh() when the VM was new")
        if self._pit:
            raise ApicvError("a VM with an in-kernel PIT cannot be reset")
        for fd, gsi, _ in list(self._irqfds):
            self.irqfd(fd, gsi, deassign=True)
        for gsi, level in list(self._lines.items()):
            if level:
                self.irq_line(gsi, 0)
        self._lines.clear()
        if self._routing != default_routing():
            self.set_gsi_routing(default_routing())
        # the slave first: loading the master while the slave still has a request pending
        # would raise the cascade input (IRQ2) in the master's IRR again (pic_update_irq)
        (slave, master, ioapic), vcpus = self._fresh
        self.set_irqchip(MU.KVM_IRQCHIP_PIC_SLAVE, slave)
        self.set_irqchip(MU.KVM_IRQCHIP_PIC_MASTER, master)
        self.set_irqchip(MU.KVM_IRQCHIP_IOAPIC, ioapic)
        assert self.mem is not None
        self.mem[SCRATCH_GPA:SCRATCH_GPA + SCRATCH_SIZE] = bytes(SCRATCH_SIZE)
        self.mem[G.PD_WIN_GPA:G.PD_WIN_GPA + 0x2000] = bytes(0x2000)
        self.clock.restart()
        for cpu, fresh in zip(self.vcpus, vcpus, strict=True):
            self._reset_vcpu(cpu, *fresh)

    @staticmethod
    def _reset_vcpu(cpu: Any, lapic: bytes, base: int, events: Any, mp: int) -> None:
        """One vCPU back to how save_fresh found it: KVM accepts pending INIT/SIPI events
        (KVM_GET_MP_STATE); TSC_DEADLINE 0, IA32_APIC_BASE, the LAPIC page (KVM_SET_LAPIC
        cancels the timer and restarts it from the page), no VAPIC word, PV EOI off, the
        guest TSC at 0; one guest operation with LVTT masked drops a timer expiry that fired
        but was never injected (KVM keeps that count outside the page); then the vCPU events
        (NMIs, exceptions) and mp_state, and the agent starts again as on a new vCPU."""
        cpu.peek_mp_state()
        cpu.set_msr(A.MSR_IA32_TSC_DEADLINE, 0)
        if not cpu.set_msr(A.MSR_IA32_APICBASE, base):
            raise KvmError(MU.EINVAL, "KVM_SET_MSRS", f"IA32_APIC_BASE {base:#x} refused")
        cpu.set_lapic(lapic)
        cpu.set_vapic_addr(0)
        cpu.set_msr(MU.MSR_KVM_PV_EOI_EN, 0)
        cpu.set_msr(A.MSR_IA32_TSC, 0)
        cpu.set_vcpu_events(events)
        cpu.set_mp_state(MU.KVM_MP_STATE_RUNNABLE)
        cpu.guest_load(SCRATCH_GPA)
        cpu.set_vcpu_events(events)
        cpu.set_mp_state(mp)
        cpu.forget_agent()
