"""apicv: an executable, register-accurate model of x86 local-APIC virtualization as Linux KVM
implements it (arch/x86/kvm/lapic.c and friends).

    import apicv
    vm = apicv.Vm(nr_vcpus=2)                   # or apicv.Vm(apicv.VmConfig(...), backend="kvm")
    cpu = vm.vcpus[0]
    cpu.mmio_write(0xF0, 0x1FF)                 # guest: software-enable the APIC
    vm.signal_msi(0xFEE00000, 0, 0x41)          # KVM_SIGNAL_MSI, vector 0x41 to APIC 0
    cpu.take_interrupts()                       # -> [0x41]

The core imports with the standard library alone.
"""

from . import state
from .api import IrqchipRoute, MsiRoute, Sregs, VcpuAPI, VcpuEvents, VmAPI, VmConfig
from .backends import Vm
from .errors import (
    ApicvError,
    GuestFault,
    IoExit,
    KvmError,
    MmioExit,
    MsrRejected,
    ScenarioError,
    StateError,
    VcpuNotRunnable,
)
from .kvm_host import ApicvInhibit
from .uapi import *  # noqa: F403  (KVM_MP_STATE_*, KVM_X2APIC_API_*, KVM_CAP_*, quirks)
from .vcpu import Vcpu
from .vm import Vm as ModelVm

__version__ = "0.1.0"

__all__ = [
    "ApicvError",
    "ApicvInhibit",
    "GuestFault",
    "IrqchipRoute",
    "IoExit",
    "KvmError",
    "MmioExit",
    "MsiRoute",
    "MsrRejected",
    "ModelVm",
    "ScenarioError",
    "Sregs",
    "StateError",
    "Vcpu",
    "VcpuAPI",
    "VcpuEvents",
    "VcpuNotRunnable",
    "Vm",
    "VmAPI",
    "VmConfig",
    "state",
]
