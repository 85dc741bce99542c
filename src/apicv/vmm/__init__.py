"""``apicv boot``: a VMM on /dev/kvm whose interrupt controller is the apicv model (or, for
comparison, KVM's in-kernel one). See :mod:`apicv.vmm.machine`."""

from .machine import STATUS_ERROR, STATUS_TIMEOUT, BootError, BootResult, Machine, boot
from .multiboot import BootImageError

__all__ = ["BootError", "BootImageError", "BootResult", "Machine", "STATUS_ERROR",
           "STATUS_TIMEOUT", "boot"]
