"""Errors are values users can read: each one says what KVM (or the guest) would have seen."""

from __future__ import annotations

import errno as _errno
import os


class ApicvError(Exception):
    """Base class of every error apicv raises on purpose."""


class GuestFault(ApicvError):
    """The guest instruction faulted (a #GP from WRMSR/RDMSR, as KVM injects it).

    ``vector`` is the exception vector (13 for #GP); ``detail`` says which access faulted.
    """

    def __init__(self, vector: int = 13, detail: str = "") -> None:
        self.vector = vector
        self.detail = detail
        name = {13: "#GP", 6: "#UD"}.get(vector, f"vector {vector}")
        super().__init__(f"guest {name}" + (f": {detail}" if detail else ""))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GuestFault) and other.vector == self.vector

    def __hash__(self) -> int:
        return hash(("GuestFault", self.vector))


class KvmError(ApicvError):
    """An ioctl-level rejection, carrying the errno KVM returns (``err.errno``)."""

    def __init__(self, errno: int | None, ioctl: str, detail: str = "") -> None:
        self.errno = errno
        self.ioctl = ioctl
        self.detail = detail
        ename = _errno.errorcode.get(errno, str(errno)) if errno is not None else "rejected"
        text = f"{ioctl}: {ename}"
        if errno is not None:
            text += f" ({os.strerror(errno)})"
        if detail:
            text += f": {detail}"
        super().__init__(text)

    @property
    def errno_name(self) -> str:
        return _errno.errorcode.get(self.errno, str(self.errno)) if self.errno else "rejected"


class MsrRejected(KvmError):
    """KVM_GET_MSRS / KVM_SET_MSRS processed 0 of 1 MSRs (the ioctl itself succeeds)."""

    def __init__(self, ioctl: str, index: int, detail: str = "") -> None:
        self.index = index
        super().__init__(None, ioctl, detail or f"MSR {index:#x} not processed (returned 0)")


class MmioExit(ApicvError):
    """The access was not claimed by the in-kernel APIC and would exit to userspace
    (KVM_EXIT_MMIO), e.g. the xAPIC window while the LAPIC_MMIO_HOLE quirk is disabled."""

    def __init__(self, gpa: int, size: int, is_write: bool) -> None:
        self.gpa = gpa
        self.size = size
        self.is_write = is_write
        kind = "write" if is_write else "read"
        super().__init__(f"KVM_EXIT_MMIO: {size}-byte {kind} at {gpa:#x} left the in-kernel APIC")


class IoExit(ApicvError):
    """A port access no in-kernel device claims: it exits to userspace (KVM_EXIT_IO)."""

    def __init__(self, port: int, size: int, is_write: bool) -> None:
        self.port = port
        self.size = size
        self.is_write = is_write
        kind = "OUT" if is_write else "IN"
        super().__init__(f"KVM_EXIT_IO: {size}-byte {kind} at port {port:#x} (no in-kernel "
                         "device claims it)")


class VcpuNotRunnable(ApicvError):
    """KVM_RUN would not run guest code: the vCPU is in ``mp_state`` and nothing wakes it.

    On the real KVM the ioctl blocks (or returns -EAGAIN for UNINITIALIZED after handling
    INIT/SIPI); the model says so instead of hanging."""

    def __init__(self, vcpu_id: int, mp_state: int, detail: str = "") -> None:
        from .uapi import MP_STATE_NAMES

        self.vcpu_id = vcpu_id
        self.mp_state = mp_state
        name = MP_STATE_NAMES.get(mp_state, str(mp_state))
        super().__init__(
            f"vCPU {vcpu_id} is {name}: KVM_RUN would not run guest code"
            + (f" ({detail})" if detail else "")
        )


class ScenarioError(ApicvError):
    """A scenario file is wrong: names the file, the step and the field."""

    def __init__(self, file: str, step: int | None, field: str | None, message: str) -> None:
        self.file = file
        self.step = step
        self.field = field
        self.message = message
        where = file
        if step is not None:
            where += f": step {step}"
        if field:
            where += f": field '{field}'"
        super().__init__(f"{where}: {message}")


class StateError(ApicvError):
    """A file given as a KVM_GET_LAPIC state is not one (wrong size, unreadable)."""


class BootError(ApicvError):
    """``apicv boot``: the VM could not be built or run (the message says which step and why)."""
