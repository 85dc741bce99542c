"""Intel VMX APIC virtualization (APICv): the posted-interrupt descriptor, KVM's vmx.c hooks and
the processor's virtual-APIC behaviour."""

from .pi_desc import PiDesc
from .vmx import EXIT_REASONS, VmxOps, VmxVcpu

__all__ = ["EXIT_REASONS", "PiDesc", "VmxOps", "VmxVcpu"]
