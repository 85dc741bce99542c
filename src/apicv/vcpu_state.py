"""The restore-side ioctls around the LAPIC: KVM_GET/SET_SREGS (the APIC part), the guest TSC
(host-initiated IA32_TSC writes, KVM_SET_TSC_KHZ) and kvmclock (KVM_GET/SET_CLOCK).

:class:`VcpuStateMixin` is part of :class:`apicv.vcpu.Vcpu`, :class:`VmClockMixin` of
:class:`apicv.vm.Vm`. Each method is the x86.c function named in its docstring, reduced to what
the APIC and its timer depend on:

* ``KVM_SET_SREGS`` restores ``apic_base`` through ``kvm_apic_set_base`` (host-initiated: any
  mode change is allowed) and ``cr8`` through ``kvm_set_cr8``, which writes TPR = cr8 << 4 --
  TPR[3:0] is not in CR8, so a KVM_SET_SREGS after KVM_SET_LAPIC loses them;
* a host-initiated ``IA32_TSC`` write is ``kvm_synchronize_tsc``: the value becomes the guest
  TSC unless KVM takes it for an attempt to synchronize with the previous write (0, or within
  one second of where the previous write's TSC is now), when the vCPU gets the VM's current
  offset instead. The LAPIC timer is not touched: a TSC-deadline hrtimer armed before the write
  keeps the expiry it was given against the old TSC;
* ``KVM_SET_TSC_KHZ`` changes the guest TSC rate (``kvm_set_tsc_khz``; the model is a host with
  TSC scaling). The offset is not recomputed, so the guest TSC jumps: in KVM by the whole
  host TSC times the rate change, in the model (whose host TSC starts with the VM) by the VM's
  lifetime times it -- restore IA32_TSC after it;
* ``KVM_SET_CLOCK`` moves kvmclock only (``kvmclock_offset``): the LAPIC timer is an hrtimer on
  the host's CLOCK_MONOTONIC and the TSC deadline is compared with the guest TSC, so neither
  depends on it.

The model's host TSC is the VM clock scaled to the vCPU's rate (``kvm_scale_tsc`` of a host TSC
that starts with the VM), and its TSC is stable (``kvm_check_tsc_unstable`` is false).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import apicdef as A
from .api import Sregs
from .errors import KvmError
from .kvm_host import KVM_REQ_EVENT
from .uapi import EINVAL, EIO

if TYPE_CHECKING:
    from .arch import VcpuArch
    from .clock import Clock
    from .lapic import LocalApic

_U64 = (1 << 64) - 1
# kvm_caps.max_guest_tsc_khz on a VMX host with TSC scaling: capped at U32_MAX
MAX_GUEST_TSC_KHZ = 0xFFFFFFFF
CR8_RESERVED_BITS = ~0xF & _U64
KVM_CLOCK_REALTIME = 1 << 2  # the only flag KVM_SET_CLOCK accepts


class VmClockMixin:
    """The VM-wide TSC synchronization state (``kvm->arch.last_tsc_*``, ``cur_tsc_*``,
    ``user_set_tsc``) and kvmclock (``kvmclock_offset``): KVM_GET_CLOCK / KVM_SET_CLOCK."""

    clock: Clock
    tsc_khz: int

    def _tsc_sync_init(self) -> None:
        """Called by Vm.__init__. kvm_arch_init_vm(): kvmclock starts at 0; the first vCPU's
        kvm_synchronize_tsc(NULL) at creation (time 0 in the model) leaves offset 0 at the
        VM's default rate."""
        self.kvmclock_offset = -self.clock.now
        self.last_tsc_nsec = self.clock.now
        self.last_tsc_write = 0
        self.last_tsc_khz = self.tsc_khz
        self.cur_tsc_offset = 0
        self.cur_tsc_generation = 0
        self.user_set_tsc = False

    def get_clock(self) -> int:
        """KVM_GET_CLOCK: kvmclock in ns (``get_kvmclock_ns``: host time + kvmclock_offset)."""
        return self.clock.now + self.kvmclock_offset

    def set_clock(self, ns: int, flags: int = 0) -> None:
        """KVM_SET_CLOCK (``kvm_vm_ioctl_set_clock``): kvmclock reads *ns* from now on. Flags
        other than KVM_CLOCK_REALTIME are EINVAL; KVM_CLOCK_REALTIME (adjust for the wall time
        that passed since KVM_GET_CLOCK) has no wall time to add in the model and is accepted
        as a no-op. Neither the LAPIC timer nor the guest TSC changes."""
        if not 0 <= ns <= _U64:
            raise ValueError(f"kvmclock {ns:#x} does not fit in 64 bits")
        if flags & ~KVM_CLOCK_REALTIME:
            raise KvmError(EINVAL, "KVM_SET_CLOCK", f"flags {flags:#x}")
        self.kvmclock_offset = ns - self.clock.now


class VcpuStateMixin:
    """KVM_GET/SET_SREGS (apic_base, cr8), KVM_GET/SET_TSC_KHZ and the host-initiated IA32_TSC
    write of one vCPU."""

    arch: VcpuArch
    apic: LocalApic
    td: bool

    # -- KVM_GET_SREGS / KVM_SET_SREGS --
    def get_sregs(self) -> Sregs:
        """KVM_GET_SREGS, the APIC part (``__get_sregs_common``): ``apic_base`` is
        ``vcpu->arch.apic_base``, ``cr8`` is ``kvm_get_cr8`` = TPR[7:4]. A TD's state is
        protected: EINVAL."""
        with self.vm.vcpu_ioctl(self):
            if self.td:
                raise KvmError(EINVAL, "KVM_GET_SREGS", "the guest state is protected")
            return Sregs(apic_base=self.arch.apic_base, cr8=self.apic.kvm_lapic_get_cr8())

    def set_sregs(self, sregs: Sregs) -> None:
        """KVM_SET_SREGS, the APIC part (``__set_sregs_common``): ``kvm_apic_set_base(...,
        host_initiated=true)`` first -- a value it refuses (reserved bits, the invalid mode
        EXTD without EN, x2APIC without CPUID.x2APIC) fails the ioctl with EINVAL before
        anything else changes; an unchanged value is a no-op -- then ``kvm_set_cr8``: TPR =
        (cr8 & 0xf) << 4 (TPR[3:0] become 0), or nothing if cr8 has reserved bits (its error
        is ignored), then KVM_REQ_EVENT. A TD: EINVAL."""
        if not isinstance(sregs, Sregs):
            raise ValueError(f"set_sregs takes an apicv.api.Sregs, not {sregs!r}")
        with self.vm.vcpu_ioctl(self):
            if self.td:
                raise KvmError(EINVAL, "KVM_SET_SREGS", "the guest state is protected")
            if self.apic.kvm_apic_set_base(sregs.apic_base, True):
                raise KvmError(EINVAL, "KVM_SET_SREGS",
                               f"kvm_apic_set_base refuses apic_base {sregs.apic_base:#x}")
            self.vm.settle()  # kvm_recalculate_apic_map
            if not sregs.cr8 & CR8_RESERVED_BITS:  # kvm_set_cr8 -> kvm_lapic_set_tpr
                self.apic.kvm_lapic_set_tpr(sregs.cr8)
            self.apic.kvm_lapic_update_cr8_intercept()
            self.arch.requests |= KVM_REQ_EVENT

    # -- the guest TSC --
    def kvm_synchronize_tsc(self, data: int) -> None:
        """``kvm_synchronize_tsc(vcpu, &data)`` for a host-initiated IA32_TSC write (stable
        TSC): the offset that makes the guest TSC read *data* now -- unless the write is taken
        for synchronization (``data == 0``, or after an earlier user write, within one second
        of cycles of ``last_tsc_write`` advanced by the time since) at the rate of the last
        write, when the vCPU is given the VM's ``cur_tsc_offset`` instead. Then
        ``__kvm_synchronize_tsc``: the VM remembers this write; an unmatched one starts a new
        generation."""
        vm = self.vm
        arch = self.arch
        khz = arch.virtual_tsc_khz
        ns = vm.clock.now
        offset = (data - ns * khz // 1_000_000) & _U64  # kvm_compute_l1_tsc_offset
        elapsed = ns - vm.last_tsc_nsec
        synchronizing = False
        if khz:
            if data == 0:
                synchronizing = True  # "userspace explicitly writes a zero value"
            elif vm.user_set_tsc:
                tsc_exp = vm.last_tsc_write + elapsed * khz // 1_000_000
                tsc_hz = khz * 1000
                synchronizing = data < tsc_exp + tsc_hz and data + tsc_hz > tsc_exp
        vm.user_set_tsc = True
        matched = synchronizing and khz == vm.last_tsc_khz
        if matched:
            offset = vm.cur_tsc_offset
        arch.tsc_offset = offset
        vm.last_tsc_nsec = ns
        vm.last_tsc_write = data
        vm.last_tsc_khz = khz
        if not matched:
            vm.cur_tsc_generation += 1
            vm.cur_tsc_offset = offset

    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ: ``vcpu->arch.virtual_tsc_khz`` (EIO if it is 0)."""
        with self.vm.vcpu_ioctl(self):
            if not self.arch.virtual_tsc_khz:
                raise KvmError(EIO, "KVM_GET_TSC_KHZ", "no TSC frequency")
            return self.arch.virtual_tsc_khz

    def set_tsc_khz(self, khz: int) -> None:
        """KVM_SET_TSC_KHZ (``kvm_set_tsc_khz`` on a host with TSC scaling): the guest TSC runs
        at *khz* from now on (0: the host's rate, here the VM's ``tsc_khz``); *khz* >=
        ``kvm_caps.max_guest_tsc_khz`` is EINVAL. The offset stays, so the guest TSC value
        jumps (restore IA32_TSC afterwards); an armed TSC-deadline hrtimer keeps its expiry."""
        if isinstance(khz, bool) or not isinstance(khz, int) or not 0 <= khz <= 0xFFFFFFFF:
            raise ValueError(f"KVM_SET_TSC_KHZ takes a u32 kHz value, not {khz!r}")
        with self.vm.vcpu_ioctl(self):
            if khz >= MAX_GUEST_TSC_KHZ:
                raise KvmError(EINVAL, "KVM_SET_TSC_KHZ", f"{khz} kHz is above the maximum")
            self.arch.virtual_tsc_khz = khz or self.vm.tsc_khz

    @property
    def tsc_deadline_armed(self) -> int | None:
        """Model view (not an ioctl): the VM-clock time at which this vCPU's armed LAPIC timer
        hrtimer expires, or None."""
        t = self.apic.timer
        return t.expires if t.active else None


def describe_apic_base(value: int) -> str:
    """IA32_APIC_BASE as words: the base, EN, EXTD (x2APIC) and BSP."""
    mode = ("disabled" if not value & A.MSR_IA32_APICBASE_ENABLE
            else "x2APIC" if value & A.X2APIC_ENABLE else "xAPIC")
    bsp = ", BSP" if value & A.MSR_IA32_APICBASE_BSP else ""
    return f"{value:#x} ({mode}{bsp})"
