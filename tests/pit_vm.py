"""A model VM with the i8254 PIT wired in, for the PIT tests.

``apicv.vm.Vm`` mixes in :class:`apicv.i8254.PitIoctlsMixin` and provides ``pit_port()``; until it
does, :class:`PitVm` is that wiring (a reference for it): the :class:`apicv.i8254.PitPort` over
the VM's public KVM functions. Once ``apicv.vm.Vm`` has ``create_pit2``, :func:`model_vm` returns
a plain model VM.
"""

from __future__ import annotations

from apicv import apicdef as A
from apicv.i8254 import PitIoctlsMixin
from apicv.kvm_host import ApicvInhibit
from apicv.vm import Vm as ModelVm


class VmPitPort:
    """The PitPort of a model VM (what ``Vm.pit_port()`` returns)."""

    def __init__(self, vm: ModelVm) -> None:
        self.clock = vm.clock
        self.ioapic_in_kernel = vm.kvm.ioapic_in_kernel
        self.min_timer_period_us = vm.kvm.min_timer_period_us
        self.set_irq = vm.kvm_set_irq
        self.request_irq_source_id = vm.kvm_request_irq_source_id
        self.register_ack_notifier = vm.kvm_register_irq_ack_notifier
        self.unregister_ack_notifier = vm.kvm_unregister_irq_ack_notifier
        self.register_mask_notifier = vm.kvm_register_irq_mask_notifier
        self.unregister_mask_notifier = vm.kvm_unregister_irq_mask_notifier
        self._vm = vm

    def set_apicv_inhibit(self, reason_name: str, set_: bool) -> None:
        self._vm.kvm_set_or_clear_apicv_inhibit(ApicvInhibit[reason_name], set_)

    def vapics_in_nmi_mode(self) -> int:
        return self._vm.kvm.vapics_in_nmi_mode

    def nmi_watchdog_deliver(self) -> None:
        for v in self._vm.vcpus:  # kvm_apic_nmi_wd_deliver
            v.apic.kvm_apic_local_deliver(A.APIC_LVT0)


class PitVm(PitIoctlsMixin, ModelVm):
    pit = None

    def pit_port(self) -> VmPitPort:
        return VmPitPort(self)

    def close(self) -> None:
        if self.pit is not None and not self.closed:
            self.pit.kvm_free_pit()
        super().close()


def model_vm(*args, **kw) -> ModelVm:
    """A model VM that has the PIT ioctls."""
    if hasattr(ModelVm, "create_pit2"):
        return ModelVm(*args, **kw)
    return PitVm(*args, **kw)
