"""KVM-internal enumerations the model keeps, named as in arch/x86/include/asm/kvm_host.h and
arch/x86/kvm/lapic.h: vCPU requests, INIT/SIPI pending-event bits, APIC-attention bits, APICv
inhibit reasons and the optimized-map logical modes."""

from __future__ import annotations

from enum import IntEnum

# --- vcpu->requests (KVM_REQ_*): bit numbers are the model's own; names are KVM's ---
KVM_REQ_EVENT = 1 << 0
KVM_REQ_NMI = 1 << 1
KVM_REQ_SMI = 1 << 2
KVM_REQ_UNBLOCK = 1 << 3
KVM_REQ_APICV_UPDATE = 1 << 4
KVM_REQ_SCAN_IOAPIC = 1 << 5
KVM_REQ_APF_READY = 1 << 6
KVM_REQ_REPORT_TPR_ACCESS = 1 << 7
KVM_REQ_LOAD_EOI_EXITMAP = 1 << 8
KVM_REQ_IOAPIC_EOI_EXIT = 1 << 9

REQUEST_NAMES = {
    KVM_REQ_EVENT: "EVENT",
    KVM_REQ_NMI: "NMI",
    KVM_REQ_SMI: "SMI",
    KVM_REQ_UNBLOCK: "UNBLOCK",
    KVM_REQ_APICV_UPDATE: "APICV_UPDATE",
    KVM_REQ_SCAN_IOAPIC: "SCAN_IOAPIC",
    KVM_REQ_APF_READY: "APF_READY",
    KVM_REQ_REPORT_TPR_ACCESS: "REPORT_TPR_ACCESS",
    KVM_REQ_LOAD_EOI_EXITMAP: "LOAD_EOI_EXITMAP",
    KVM_REQ_IOAPIC_EOI_EXIT: "IOAPIC_EOI_EXIT",
}


def request_names(mask: int) -> list[str]:
    return [n for b, n in REQUEST_NAMES.items() if mask & b]


# --- apic->pending_events (lapic.h) ---
KVM_APIC_INIT = 0
KVM_APIC_SIPI = 1

# --- vcpu->arch.apic_attention (lapic.h) ---
KVM_APIC_CHECK_VAPIC = 0
KVM_APIC_PV_EOI_PENDING = 1


class ApicvInhibit(IntEnum):
    """enum kvm_apicv_inhibit, in bit order; the names drop the APICV_INHIBIT_REASON_ prefix."""

    DISABLED = 0
    HYPERV = 1
    ABSENT = 2
    BLOCKIRQ = 3
    PHYSICAL_ID_ALIASED = 4
    APIC_ID_MODIFIED = 5
    APIC_BASE_MODIFIED = 6
    NESTED = 7
    IRQWIN = 8
    PIT_REINJ = 9
    SEV = 10
    LOGICAL_ID_ALIASED = 11
    PHYSICAL_ID_TOO_BIG = 12

    @classmethod
    def parse(cls, reason: object) -> ApicvInhibit:
        """A reason by name (with or without the APICV_INHIBIT_REASON_ prefix, any case) or
        number; ValueError naming the known reasons otherwise."""
        if isinstance(reason, str):
            key = reason.strip().upper().removeprefix("APICV_INHIBIT_REASON_")
            if key in cls.__members__:
                return cls[key]
        elif isinstance(reason, int) and not isinstance(reason, bool) and any(
                reason == m for m in cls):
            return cls(reason)
        raise ValueError(f"unknown APICv inhibit reason {reason!r} (known: "
                         f"{', '.join(cls.__members__)})")


# vmx/main.c VMX_REQUIRED_APICV_INHIBITS: reasons VMX honours (others are ignored, untraced)
VMX_REQUIRED_APICV_INHIBITS = (
    (1 << ApicvInhibit.DISABLED)
    | (1 << ApicvInhibit.ABSENT)
    | (1 << ApicvInhibit.HYPERV)
    | (1 << ApicvInhibit.BLOCKIRQ)
    | (1 << ApicvInhibit.PHYSICAL_ID_ALIASED)
    | (1 << ApicvInhibit.APIC_ID_MODIFIED)
    | (1 << ApicvInhibit.APIC_BASE_MODIFIED)
)


def inhibit_names(mask: int) -> list[str]:
    return [r.name for r in ApicvInhibit if mask & (1 << r)]


class LogicalMode(IntEnum):
    """enum kvm_apic_logical_mode (lapic.h)."""

    SW_DISABLED = 0
    XAPIC_FLAT = 1
    XAPIC_CLUSTER = 2
    X2APIC = 3
    MAP_DISABLED = 4


class LapicMode(IntEnum):
    """enum lapic_mode: the EN/EXTD bits of IA32_APIC_BASE."""

    DISABLED = 0
    INVALID = 1 << 10  # X2APIC_ENABLE without ENABLE
    XAPIC = 1 << 11
    X2APIC = (1 << 11) | (1 << 10)
