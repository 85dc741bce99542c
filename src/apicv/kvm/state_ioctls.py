"""The real backend's restore-side ioctls: KVM_GET/SET_SREGS reduced to the APIC part
(:class:`apicv.api.Sregs`), KVM_GET/SET_TSC_KHZ and KVM_GET/SET_CLOCK.

``set_sregs`` is what a VMM does: KVM_GET_SREGS, change ``apic_base`` and ``cr8``, KVM_SET_SREGS
with everything else as KVM returned it (so the guest agent's segments and control registers are
untouched). KVM_SET_SREGS writes TPR = cr8 << 4 on this KVM as upstream.

KVM_SET_TSC_KHZ on this host: there is no TSC scaling (no VMX), so ``kvm_set_tsc_khz`` accepts
only rates within 250 ppm of the host's (or above it, in catch-up mode) and fails lower ones
with EINVAL. Timers here run on wall time.
"""

from __future__ import annotations

from ..api import Sregs
from . import uapi as K


class KvmVcpuStateMixin:
    """Part of :class:`apicv.kvm.vcpu.KvmVcpu` (which gives ``_ioctl`` and
    ``get_kvm_sregs``)."""

    def get_sregs(self) -> Sregs:
        """KVM_GET_SREGS: its ``apic_base`` and ``cr8``."""
        s = self.get_kvm_sregs()
        return Sregs(apic_base=s.apic_base, cr8=s.cr8)

    def set_sregs(self, sregs: Sregs) -> None:
        """KVM_GET_SREGS, ``apic_base`` and ``cr8`` replaced, KVM_SET_SREGS (KvmError(EINVAL)
        where ``kvm_apic_set_base`` refuses the base)."""
        if not isinstance(sregs, Sregs):
            raise ValueError(f"set_sregs takes an apicv.api.Sregs, not {sregs!r}")
        s = self.get_kvm_sregs()
        s.apic_base = sregs.apic_base
        s.cr8 = sregs.cr8
        self._ioctl(K.KVM_SET_SREGS, s)

    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ."""
        return self._ioctl(K.KVM_GET_TSC_KHZ, 0)

    def set_tsc_khz(self, khz: int) -> None:
        """KVM_SET_TSC_KHZ (the argument is the value)."""
        if isinstance(khz, bool) or not isinstance(khz, int) or not 0 <= khz <= 0xFFFFFFFF:
            raise ValueError(f"KVM_SET_TSC_KHZ takes a u32 kHz value, not {khz!r}")
        self._ioctl(K.KVM_SET_TSC_KHZ, khz)


class KvmVmClockMixin:
    """Part of :class:`apicv.kvm.backend.KvmVm` (which gives ``_vm_fd`` and
    ``check_open``)."""

    def get_clock(self) -> int:
        """KVM_GET_CLOCK: kvmclock in ns."""
        from .sys import ioctl

        self.check_open()
        data = K.kvm_clock_data()
        ioctl(self._vm_fd, K.KVM_GET_CLOCK, data, "KVM_GET_CLOCK")
        return data.clock

    def set_clock(self, ns: int, flags: int = 0) -> None:
        """KVM_SET_CLOCK (EINVAL for flags other than KVM_CLOCK_REALTIME)."""
        from .sys import ioctl

        if not 0 <= ns <= (1 << 64) - 1:
            raise ValueError(f"kvmclock {ns:#x} does not fit in 64 bits")
        self.check_open()
        data = K.kvm_clock_data(clock=ns, flags=flags)
        ioctl(self._vm_fd, K.KVM_SET_CLOCK, data, "KVM_SET_CLOCK")
