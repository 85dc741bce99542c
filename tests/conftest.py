"""Shared helpers for the model tests."""

from __future__ import annotations

import pytest

import apicv
from apicv import apicdef as A


def make_vm(n: int = 2, x2apic_api: int = 0, *, runnable: bool = True, enable: bool = True,
            **kw) -> apicv.Vm:
    """A VM whose vCPUs are RUNNABLE (APs are UNINITIALIZED at creation) and software-enabled.

    Unless told otherwise it is KVM's software LAPIC (no APICv, no TPR shadow) -- the
    configuration of these hosts, where the behaviours in selftests_behaviours.md were seen.
    APICv and VMX behaviour is tested in test_apicv.py."""
    kw.setdefault("enable_apicv", False)
    kw.setdefault("flexpriority", kw["enable_apicv"])
    vm = apicv.Vm(n, x2apic_api, **kw)
    for cpu in vm.vcpus:
        if runnable:
            cpu.set_mp_state(apicv.KVM_MP_STATE_RUNNABLE)
        if enable and runnable:
            cpu.mmio_write(A.APIC_SPIV, 0x1FF)
    if vm.vcpus and not (enable and runnable):
        # the newest vCPU is not in KVM's optimized map until the map is recalculated
        # (see test_newest_vcpu_missing_from_map_until_recalculated): a KVM_SET_LAPIC does it
        vm.vcpus[-1].set_lapic(vm.vcpus[-1].get_lapic())
    return vm


def to_x2apic(cpu) -> None:
    """Guest path xAPIC -> x2APIC (one WRMSR setting EN|EXTD), keeping the BSP bit."""
    cpu.wrmsr(A.MSR_IA32_APICBASE, (cpu.get_msr(A.MSR_IA32_APICBASE) & 0x100) | 0xFEE00C00)


def msi(dest: int, vector: int, *, dm: int = 0, logical: bool = False, level: bool = False,
        rh: bool = False) -> tuple[int, int, int]:
    lo = 0xFEE00000 | ((dest & 0xFF) << 12) | (4 if logical else 0) | (8 if rh else 0)
    return lo, dest & ~0xFF, vector | (dm << 8) | (0x8000 if level else 0)


@pytest.fixture
def vm2():
    return make_vm(2)


def place(cpu, where: str, interrupts: bool) -> str:
    """Put a vCPU where a property test asks: "guest" (enter_guest), "halt" or "host"."""
    if where == "guest":
        cpu.enter_guest(interrupts)
    elif where == "halt":
        cpu.halt(interrupts)
    else:
        cpu.leave_guest()
    return cpu.location
