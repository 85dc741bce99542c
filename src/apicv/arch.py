"""The VM-wide and per-vCPU data KVM keeps outside ``struct kvm_lapic`` but that lapic.c reads or
writes: the parts of ``struct kvm_arch`` (:class:`KvmArch`) and ``struct kvm_vcpu_arch``
(:class:`VcpuArch`) the model needs.

They are plain data. The LocalApic writes fields here exactly where lapic.c writes them
(``kvm_make_request`` sets a bit in ``requests``; marking the APIC map dirty sets
``apic_map_dirty``), and never calls the VM or another vCPU: the VM acts on them after the
operation (see :mod:`apicv.vm`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .uapi import KVM_MP_STATE_RUNNABLE

# enum kvm_suppress_eoi_broadcast_mode
SEB_QUIRKED = 0  # legacy: advertise directed EOI (split irqchip) but broadcast anyway
SEB_ENABLED = 1  # KVM_X2APIC_ENABLE_SUPPRESS_EOI_BROADCAST
SEB_DISABLED = 2  # KVM_X2APIC_DISABLE_SUPPRESS_EOI_BROADCAST


@dataclass(slots=True)
class KvmArch:
    """struct kvm_arch (the APIC-related subset) plus the KVM module parameters that matter."""

    x2apic_format: bool = False  # KVM_X2APIC_API_USE_32BIT_IDS
    x2apic_broadcast_quirk_disabled: bool = False  # KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK
    suppress_eoi_broadcast_mode: int = SEB_QUIRKED
    apic_bus_cycle_ns: int = 1  # KVM_CAP_X86_APIC_BUS_CYCLES_NS (APIC_BUS_CYCLE_NS_DEFAULT)
    disabled_quirks: int = 0  # KVM_CAP_DISABLE_QUIRKS2
    bsp_vcpu_id: int = 0  # KVM_SET_BOOT_CPU_ID
    irqchip_mode: str = "kernel"  # "kernel" (KVM_CREATE_IRQCHIP) | "split"
    apic_map_dirty: bool = False
    vapics_in_nmi_mode: int = 0
    disabled_lapic_found: bool = False
    # APICv: kvm->arch.apicv_inhibit_reasons, and inhibits the LAPIC asks the VM to set
    apicv_inhibit_reasons: int = 0
    inhibit_requests: int = 0
    # vCPUs kicked or notified while resting in guest mode / HLT, served after the operation
    kicked: list = field(default_factory=list)
    # module parameters (kvm.ko / kvm-intel.ko)
    enable_apicv: bool = True
    vector_hashing: bool = True
    min_timer_period_us: int = 200
    flexpriority: bool = True  # kvm_intel.flexpriority (TPR shadow, virtualized APIC accesses)
    lapic_timer_advance: bool = True
    smm: bool = True  # CONFIG_KVM_SMM (KVM_CAP_X86_SMM)
    # KVM_CREATE_VM type; a TD (KVM_X86_TDX_VM) has protected state and protected EOIs
    vm_type: int = 0
    has_protected_state: bool = False
    has_protected_eoi: bool = False
    vm_bugged: bool = False  # KVM_BUG_ON fired: every later ioctl fails with -EIO
    # the KVM release whose restore rules apply (kvm_apic_set_state, the timer restart):
    # (6, 18) by default; see apicv.restore.KVM_VERSION_RULES for what older ones change
    kvm_version: tuple = (6, 18)

    def has_quirk(self, quirk: int) -> bool:
        """kvm_check_has_quirk()."""
        return not (self.disabled_quirks & quirk)

    @property
    def is_td(self) -> bool:
        return self.vm_type == 5  # KVM_X86_TDX_VM

    @property
    def ioapic_in_kernel(self) -> bool:
        return self.irqchip_mode == "kernel"

    @property
    def irqchip_split(self) -> bool:
        return self.irqchip_mode == "split"


@dataclass(slots=True)
class VcpuArch:
    """struct kvm_vcpu / kvm_vcpu_arch: the fields lapic.c and the injection code touch."""

    vcpu_id: int
    vcpu_idx: int = 0
    requests: int = 0  # KVM_REQ_* bits
    mp_state: int = KVM_MP_STATE_RUNNABLE
    apic_base: int = 0
    apic_arb_prio: int = 0
    apic_attention: int = 0
    nmi_queued: int = 0
    pv_unhalted: bool = False
    pv_eoi_msr: int = 0  # vcpu->arch.pv_eoi.msr_val
    tpr_access_reporting: bool = False
    ioapic_handled_vectors: int = 0  # 256-bit bitmap
    pending_ioapic_eoi: int = -1
    highest_stale_pending_ioapic_eoi: int = -1  # 6.16+: an EOI owed from an older routing
    pending_external_vector: int = -1  # KVM_INTERRUPT with a split irqchip
    wants_to_run: bool = False  # inside KVM_RUN
    in_guest_mode: bool = False  # vcpu->mode == IN_GUEST_MODE
    blocked: bool = False  # in kvm_vcpu_block() (HLT)
    kick_pending: bool = False  # a kick IPI will force a VM exit
    pi_notification: bool = False  # a posted-interrupt notification is on its way
    guest_debug_blockirq: bool = False  # KVM_GUESTDBG_BLOCKIRQ
    # guest TSC (kvm_read_l1_tsc): tsc_offset + now * virtual_tsc_khz / 10^6
    tsc_offset: int = 0
    virtual_tsc_khz: int = 1_000_000
    # guest CPUID bits the LAPIC reads
    cpuid_x2apic: bool = True
    cpuid_tsc_deadline: bool = True
    cpuid_set: bool = True  # KVM_SET_CPUID2 done (timer_mode_mask is 0 before it)
    maxphyaddr: int = 48
    intel_compatible: bool = True
    mcg_cap: int = 0
