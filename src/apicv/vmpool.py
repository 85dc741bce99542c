"""Real VMs kept for reuse between crosscheck runs: creating a VM costs ~8 ms here (the VM,
its irqchip, a 17 MiB memslot with the agent's image, the vCPUs), a reset (KvmVm.reset) a
fraction of that. Only where the reset is complete for what a scenario does
(:func:`reusable`), and only on a host without APICv (KVM's APICv inhibits are sticky per VM:
a reused VM would not be a new one there)."""

from __future__ import annotations

from typing import Any

from .errors import ApicvError, KvmError
from .memory import SCRATCH_GPA, SCRATCH_SIZE, in_ram

# what KvmVm.reset undoes (the operations apicv fuzz generates, and their kin)
RESETTABLE_OPS = frozenset({
    "signal_msi", "take_interrupts", "run", "mmio_write", "mmio_read", "wrmsr", "rdmsr",
    "set_msr", "get_msr", "write_cr8", "read_cr8", "get_lapic", "set_lapic", "get_mp_state",
    "set_mp_state", "nmi", "set_or_clear_apicv_inhibit", "irq_line", "set_irqchip",
    "get_irqchip", "ioapic_write", "ioapic_read", "outb", "inb", "set_vapic_addr",
    "guest_store", "guest_load", "advance", "get_vcpu_events",
})
PV_EOI_EN = 0x4B564D04
MAX_IDLE = 16


def _in_scratch(gpa: int, size: int = 4) -> bool:
    return gpa >= SCRATCH_GPA and gpa + size <= SCRATCH_GPA + SCRATCH_SIZE


def reusable(scenario: Any) -> bool:
    """Whether a VM reset after *scenario* is as good as a new one: its operations are ones
    KvmVm.reset undoes, and whatever guest RAM it makes the guest or KVM write (guest
    stores, the VAPIC word, the PV-EOI byte) lies in the scratch area, which the reset
    zeroes."""
    if getattr(scenario.vm, "irqchip", "kernel") != "kernel":
        return False
    for st in scenario.steps:
        if st.op not in RESETTABLE_OPS:
            return False
        a = st.args
        if st.op in ("guest_store", "guest_load") and not _in_scratch(a["gpa"],
                                                                      a.get("size", 4)):
            return False
        if st.op == "set_vapic_addr" and a["gpa"] and not _in_scratch(a["gpa"]):
            return False
        if st.op in ("wrmsr", "set_msr") and a.get("index") == PV_EOI_EN:
            v = a["value"]
            if v & 1 and in_ram(v & ~3, 4) and not _in_scratch(v & ~3):
                return False
    return True


class VmPool:
    """Idle real VMs by configuration: :meth:`acquire` gives a reset one or a new one,
    :meth:`release` keeps it for the next scenario with that configuration (or closes it)."""

    def __init__(self) -> None:
        self._idle: dict[Any, Any] = {}
        self.created = 0
        self.reused = 0

    @staticmethod
    def _key(cfg: Any) -> Any:
        try:
            hash(cfg)
        except TypeError:
            return None
        return cfg

    def acquire(self, scenario: Any) -> Any:
        from .kvm import KvmVm

        key = self._key(scenario.vm) if reusable(scenario) else None
        vm = self._idle.pop(key, None) if key is not None else None
        if vm is not None:
            try:
                vm.reset()
                self.reused += 1
                vm.pool_key = key
                return vm
            except (ApicvError, KvmError, OSError):
                vm.close()
        vm = KvmVm(scenario.vm)
        self.created += 1
        vm.pool_key = None
        if key is not None and not vm.host_parameters.get("enable_apicv"):
            try:
                vm.save_fresh()
                vm.pool_key = key
            except (ApicvError, KvmError):
                vm.pool_key = None
        return vm

    def release(self, vm: Any) -> None:
        key = getattr(vm, "pool_key", None)
        if key is None or key in self._idle or len(self._idle) >= MAX_IDLE:
            vm.close()
            return
        self._idle[key] = vm

    def close(self) -> None:
        for vm in self._idle.values():
            vm.close()
        self._idle.clear()

    def __enter__(self) -> VmPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
