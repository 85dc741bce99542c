"""The real-KVM backend: the public API of :mod:`apicv` on top of /dev/kvm.

``apicv.Vm(..., backend="kvm")`` returns a :class:`KvmVm`. Host-side methods are the KVM ioctls;
guest-side methods are carried out by a small long-mode guest agent (``guest/agent.S``,
assembled with binutils on first use and cached). See :mod:`apicv.kvm.vm` for the guest memory
layout and the host/guest protocol. Standard library only.
"""

from .vm import KvmClock, KvmExitError, KvmVcpu, KvmVm, kvm_available

__all__ = ["KvmClock", "KvmExitError", "KvmVcpu", "KvmVm", "kvm_available"]
