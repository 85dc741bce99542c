"""ioctl(2) and host-capability plumbing for /dev/kvm, shared by the real backend and the VMM.

Everything here is a thin wrapper around one KVM system, VM or vCPU ioctl (through libc, with
ctypes structures from :mod:`apicv.kvm.uapi`) or around the host's module parameters in
/sys/module. :func:`ioctl` raises :class:`~apicv.errors.KvmError` with the errno;
:func:`ioctl_raw` returns it. The CPUID helpers build what KVM_SET_CPUID2 takes from
KVM_GET_SUPPORTED_CPUID. :func:`kvm_available` says whether the backend can run here.

Standard library only.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
from typing import Any

from ..errors import ApicvError, KvmError
from . import uapi as K

__all__ = [
    "KvmExitError", "cpuid_maxphyaddr", "describe_exit", "enable_vm_cap", "flat_segment",
    "get_supported_cpuid", "host_module_parameters", "host_supported_mce_cap", "host_tsc_khz",
    "ioctl", "ioctl_raw", "kvm_available", "U64_MAX", "vcpu_cpuid",
]

U64_MAX = (1 << 64) - 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.restype = ctypes.c_int
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


class KvmExitError(ApicvError):
    """KVM_RUN ended in a way the guest agent never asks for (internal error, shutdown, failed
    entry, an unexpected exception in the guest or an unexpected exit). The agent is
    re-established before the next guest operation."""

    def __init__(self, vcpu_id: int, message: str) -> None:
        self.vcpu_id = vcpu_id
        super().__init__(f"vCPU {vcpu_id}: {message}")


# ---------------------------------------------------------------- ioctl
def _arg(arg: Any) -> int:
    """The ioctl argument as an integer: the address of a ctypes object (structure, array,
    union or simple value), else the value itself."""
    try:
        return ctypes.addressof(arg)
    except TypeError:
        return int(arg)


def ioctl_raw(fd: int, req: int, arg: Any = 0) -> tuple[int, int]:
    """ioctl(2) through libc: (return value, errno), errno 0 when it succeeded."""
    r = _libc.ioctl(fd, req, _arg(arg))
    return r, (ctypes.get_errno() if r < 0 else 0)


def ioctl(fd: int, req: int, arg: Any = 0, name: str | None = None) -> int:
    """ioctl(2): its return value, or KvmError with the errno, named *name* (default: the
    ioctl's name in kvm.h)."""
    r, e = ioctl_raw(fd, req, arg)
    if r < 0:
        raise KvmError(e, name or K.IOCTL_NAMES.get(req, f"ioctl {req:#x}"))
    return r


def enable_vm_cap(vm_fd: int, cap: int, *args: int) -> None:
    """KVM_ENABLE_CAP on a VM fd (up to 4 arguments)."""
    if len(args) > 4:
        raise ValueError("KVM_ENABLE_CAP takes at most 4 arguments")
    ec = K.kvm_enable_cap(cap=cap, flags=0)
    for i, a in enumerate(args):
        ec.args[i] = a & U64_MAX
    ioctl(vm_fd, K.KVM_ENABLE_CAP, ec)


def flat_segment(seg: K.kvm_segment, selector: int, *, type_: int, db: int, long: int) -> None:
    """Make *seg* a present, flat (base 0, 4 GiB limit, G=1) code or data segment, DPL 0."""
    seg.base, seg.limit, seg.selector, seg.type = 0, 0xFFFFFFFF, selector, type_
    seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g, seg.avl, seg.unusable = (
        1, 0, db, 1, long, 1, 0, 0)


# ---------------------------------------------------------------- CPUID
def get_supported_cpuid(kvm_fd: int) -> list[K.kvm_cpuid_entry2]:
    """KVM_GET_SUPPORTED_CPUID on /dev/kvm (growing the buffer while KVM says E2BIG)."""
    n = 128
    while True:
        buf = K.kvm_cpuid2_with(n)()
        buf.nent = n
        r, e = ioctl_raw(kvm_fd, K.KVM_GET_SUPPORTED_CPUID, buf)
        if r >= 0:
            return [K.kvm_cpuid_entry2.from_buffer_copy(buf.entries[i]) for i in range(buf.nent)]
        if e != _errno.E2BIG or n >= 4096:
            raise KvmError(e, "KVM_GET_SUPPORTED_CPUID")
        n *= 2


def cpuid_maxphyaddr(entries: list[K.kvm_cpuid_entry2]) -> int:
    """MAXPHYADDR: CPUID 0x80000008 EAX[7:0] (36 without the leaf)."""
    for ent in entries:
        if ent.function == 0x80000008:
            return ent.eax & 0xFF
    return 36


def vcpu_cpuid(entries: list[K.kvm_cpuid_entry2], vcpu_id: int, *, x2apic: bool,
               tsc_deadline: bool, maxphyaddr: int | None = None) -> ctypes.Structure:
    """The struct kvm_cpuid2 for KVM_SET_CPUID2: *entries* with this vCPU's APIC IDs (leaf 1
    EBX[31:24], leaves 0xB/0x1F EDX), CPUID.1:ECX x2APIC (bit 21) and TSC-deadline (bit 24)
    as asked, and MAXPHYADDR if given."""
    buf = K.kvm_cpuid2_with(len(entries))()
    buf.nent = len(entries)
    for i, src in enumerate(entries):
        e = K.kvm_cpuid_entry2.from_buffer_copy(src)
        if e.function == 1:
            e.ebx = (e.ebx & 0x00FFFFFF) | (vcpu_id & 0xFF) << 24
            e.ecx = (e.ecx & ~(1 << 21)) | (bool(x2apic) << 21)
            e.ecx = (e.ecx & ~(1 << 24)) | (bool(tsc_deadline) << 24)
        elif e.function in (0xB, 0x1F):
            e.edx = vcpu_id & 0xFFFFFFFF
        elif e.function == 0x80000008 and maxphyaddr is not None:
            e.eax = (e.eax & ~0xFF) | maxphyaddr
        buf.entries[i] = e
    return buf


# ---------------------------------------------------------------- host facts
def _read_param(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def _param_bool(v: str | None) -> bool | None:
    if v is None:
        return None
    if v in ("Y", "y", "1"):
        return True
    if v in ("N", "n", "0"):
        return False
    try:
        return int(v) != 0
    except ValueError:
        return None


def host_module_parameters() -> dict[str, Any]:
    """The kvm (and kvm_intel/kvm_amd) module parameters the model takes as VM options.

    Without kvm_intel or kvm_amd (e.g. the PVM backend), enable_apicv is False: there is no
    hardware APIC virtualization."""
    p = "/sys/module/kvm/parameters/"
    apicv = _param_bool(_read_param("/sys/module/kvm_intel/parameters/enable_apicv"))
    if apicv is None:
        apicv = _param_bool(_read_param("/sys/module/kvm_amd/parameters/avic"))
    vh = _param_bool(_read_param(p + "vector_hashing"))
    if vh is None:
        vh = _param_bool(_read_param("/sys/module/kvm_intel/parameters/vector_hashing"))
    mtp = _read_param(p + "min_timer_period_us")
    lta = _param_bool(_read_param(p + "lapic_timer_advance"))
    if lta is None:
        ns = _read_param(p + "lapic_timer_advance_ns")
        lta = None if ns is None else int(ns) != 0
    fp = _param_bool(_read_param("/sys/module/kvm_intel/parameters/flexpriority"))
    return {
        "enable_apicv": bool(apicv),
        "flexpriority": bool(fp),
        "vector_hashing": True if vh is None else vh,
        "min_timer_period_us": 200 if mtp is None else int(mtp),
        "lapic_timer_advance": True if lta is None else lta,
    }


def host_tsc_khz(kvm_fd: int, vm_fd: int) -> int:
    """The guest TSC frequency KVM uses without scaling: KVM_GET_TSC_KHZ on the VM fd, or
    (older kernels: per vCPU only) on a vCPU of a throwaway VM."""
    r, _ = ioctl_raw(vm_fd, K.KVM_GET_TSC_KHZ)
    if r > 0:
        return r
    fd = ioctl(kvm_fd, K.KVM_CREATE_VM, 0)
    try:
        vfd = ioctl(fd, K.KVM_CREATE_VCPU, 0)
        try:
            return ioctl(vfd, K.KVM_GET_TSC_KHZ)
        finally:
            os.close(vfd)
    finally:
        os.close(fd)


def host_supported_mce_cap(kvm_fd: int) -> int:
    """KVM_X86_GET_MCE_CAP_SUPPORTED on /dev/kvm: the MCG_CAP bits KVM_X86_SETUP_MCE takes."""
    v = ctypes.c_uint64(0)
    ioctl(kvm_fd, K.KVM_X86_GET_MCE_CAP_SUPPORTED, v)
    return v.value


def describe_exit(run: K.kvm_run, reason: int) -> str:
    """A readable account of a KVM_RUN exit the backend did not expect."""
    name = K.EXIT_REASON_NAMES.get(reason, f"exit reason {reason}")
    if reason == K.KVM_EXIT_INTERNAL_ERROR:
        i = run.u.internal
        data = ", ".join(f"{i.data[k]:#x}" for k in range(min(i.ndata, 16)))
        sub = {1: "emulation failure", 2: "simultaneous exceptions",
               3: "event delivery", 4: "unexpected exit reason"}.get(i.suberror, "")
        return f"{name}: suberror {i.suberror} {sub} [{data}]"
    if reason == K.KVM_EXIT_FAIL_ENTRY:
        f = run.u.fail_entry
        return (f"{name}: hardware_entry_failure_reason "
                f"{f.hardware_entry_failure_reason:#x} on cpu {f.cpu}")
    if reason == K.KVM_EXIT_SHUTDOWN:
        return f"{name}: the guest triple-faulted"
    if reason == K.KVM_EXIT_SYSTEM_EVENT:
        return f"{name}: type {run.u.system_event.type}"
    return f"unexpected {name}"


# ---------------------------------------------------------------- availability
def kvm_available() -> tuple[bool, str]:
    """(True, "") when /dev/kvm can run the backend, else (False, why not)."""
    path = "/dev/kvm"
    if not os.path.exists(path):
        return False, f"{path} does not exist (no KVM on this machine)"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return False, f"cannot open {path}: {e.strerror}"
    try:
        r, e = ioctl_raw(fd, K.KVM_GET_API_VERSION)
        if r != K.KVM_API_VERSION:
            return False, f"KVM_GET_API_VERSION returned {r} (errno {e}), expected 12"
        for cap, name in ((K.KVM_CAP_IRQCHIP, "KVM_CAP_IRQCHIP"),
                          (K.KVM_CAP_SIGNAL_MSI, "KVM_CAP_SIGNAL_MSI")):
            if ioctl_raw(fd, K.KVM_CHECK_EXTENSION, cap)[0] <= 0:
                return False, f"KVM lacks {name}"
    finally:
        os.close(fd)
    from .agent import load_agent  # the layer above this one (it builds on flat_segment)
    from .guest import build as agent_build

    try:
        load_agent()
    except agent_build.AgentBuildError as e:
        return False, f"cannot build the guest agent: {e}"
    except OSError as e:
        return False, f"cannot build the guest agent: {e}"
    return True, ""
