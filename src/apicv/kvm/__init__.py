"""The real-KVM backend: the public API of :mod:`apicv` on top of /dev/kvm.

``apicv.Vm(..., backend="kvm")`` returns a :class:`KvmVm`. Host-side methods are the KVM ioctls;
guest-side methods are carried out by a small long-mode guest agent (``guest/agent.S``,
assembled with binutils on first use and cached). Modules: :mod:`apicv.kvm.backend` (the VM and
its clock), :mod:`apicv.kvm.vcpu` (the vCPU and the host/guest protocol),
:mod:`apicv.kvm.agent` (guest memory layout, mailbox, KVM_RUN watchdog), :mod:`apicv.kvm.sys`
(ioctl and CPUID plumbing, also used by :mod:`apicv.vmm`) and :mod:`apicv.kvm.uapi` (the ABI).
Standard library only.
"""

from .backend import KvmClock, KvmVm
from .hostconfig import host_config
from .sys import KvmExitError, kvm_available
from .vcpu import KvmVcpu

__all__ = ["KvmClock", "KvmExitError", "KvmVcpu", "KvmVm", "host_config", "kvm_available"]
