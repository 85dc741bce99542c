"""What a LAPIC register write returns, and the vendor hooks lapic.c calls.

The register file never calls its peers; a write returns what must happen next:

* :class:`SendIpi` - an IPI for the VM to route (lapic.c ``kvm_apic_send_ipi``),
* :class:`EoiBroadcast` - an EOI for the in-kernel IOAPIC (``kvm_ioapic_send_eoi`` ->
  ``kvm_ioapic_update_eoi``),
* :data:`REJECTED` - KVM's "ret 1" of ``kvm_lapic_reg_write``/``kvm_x2apic_msr_write``: dropped
  for MMIO, a #GP for an x2APIC MSR,
* ``None`` - nothing more.

:class:`VendorOps` is the subset of ``struct kvm_x86_ops`` that lapic.c reaches through
``kvm_x86_call(...)``: ``deliver_interrupt``, ``sync_pir_to_irr``, ``hwapic_irr_update``,
``hwapic_isr_update``, ``apicv_pre_state_restore``, ``apicv_post_state_restore``,
``refresh_apicv_exec_ctrl``, ``load_eoi_exitmap``, ``update_cr8_intercept`` and
``set_virtual_apic_mode``, as VMX behaves with APICv inactive.

All four are re-exported by :mod:`apicv.lapic`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .kvm_host import KVM_REQ_EVENT

if TYPE_CHECKING:
    from .lapic import LocalApic


class SendIpi:
    """An IPI the VM must route: kvm_apic_send_ipi(apic, icr_low, icr_high).

    ``dest_id`` is already taken from ICR2[31:24] (xAPIC) or ICR[63:32] (x2APIC).
    ``x2apic_icr`` is the 64-bit value of an x2APIC ICR write, which KVM traces only after the
    IPI has been delivered (kvm_x2apic_icr_write)."""

    __slots__ = ("source", "icr_low", "dest_id", "x2apic_icr")

    def __init__(self, source: LocalApic, icr_low: int, dest_id: int,
                 x2apic_icr: int | None = None) -> None:
        self.source = source
        self.icr_low = icr_low
        self.dest_id = dest_id
        self.x2apic_icr = x2apic_icr

    def __repr__(self) -> str:
        return f"SendIpi(icr_low={self.icr_low:#x}, dest_id={self.dest_id:#x})"


class EoiBroadcast:
    """An EOI for the in-kernel IOAPIC (kvm_ioapic_update_eoi(vcpu, vector, trigger))."""

    __slots__ = ("source", "vector", "level")

    def __init__(self, source: LocalApic, vector: int, level: bool) -> None:
        self.source = source
        self.vector = vector
        self.level = level

    def __repr__(self) -> str:
        return f"EoiBroadcast(vector={self.vector:#x}, level={self.level})"


class _Rejected:
    __slots__ = ()

    def __repr__(self) -> str:
        return "REJECTED"

    def __bool__(self) -> bool:
        return False


REJECTED = _Rejected()


class VendorOps:
    """The kvm_x86_ops hooks lapic.c calls (``kvm_x86_call(...)``), as VMX behaves with APICv
    inactive. :mod:`apicv.vmx` supplies the APICv-active behaviour."""

    def deliver_interrupt(self, apic: LocalApic, dm: int, trig: int, vector: int) -> None:
        """vmx_deliver_interrupt() when posting fails (APICv inactive): IRR, event, kick."""
        apic.kvm_lapic_set_irr(vector)
        apic.arch.requests |= KVM_REQ_EVENT
        apic.kvm_vcpu_kick()

    def sync_pir_to_irr(self, apic: LocalApic) -> int:
        return apic.apic_find_highest_irr()

    def hwapic_irr_update(self, apic: LocalApic, max_irr: int) -> None:
        pass

    def hwapic_isr_update(self, apic: LocalApic, max_isr: int) -> None:
        pass

    def apicv_pre_state_restore(self, apic: LocalApic) -> None:
        pass

    def apicv_post_state_restore(self, apic: LocalApic) -> None:
        pass

    def refresh_apicv_exec_ctrl(self, apic: LocalApic) -> None:
        pass

    def load_eoi_exitmap(self, apic: LocalApic, bitmap: int) -> None:
        pass

    def update_cr8_intercept(self, apic: LocalApic, tpr: int, max_irr: int) -> None:
        pass

    def set_virtual_apic_mode(self, apic: LocalApic) -> None:
        pass
