"""What a host is, for a fuzz report: :func:`host_fingerprint` (kernel release, CPU model, the
KVM module parameters that decide interrupt virtualization, KVM_CAP answers). Two hosts with
the same fingerprint run KVM's interrupt code the same way; the report groups by it."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from typing import Any

from .. import uapi as MU
from . import uapi as K
from .sys import host_module_parameters, ioctl_raw

# module parameters worth naming (read where the module has them; absent ones are left out)
PARAMETERS = {
    "kvm": ("enable_pmu", "halt_poll_ns", "lapic_timer_advance", "lapic_timer_advance_ns",
            "min_timer_period_us", "pi_inject_timer", "vector_hashing", "tdp_mmu"),
    "kvm_intel": ("enable_apicv", "enable_ipiv", "flexpriority", "nested", "ept",
                  "preemption_timer", "posted_intr", "enable_shadow_vmcs"),
    "kvm_amd": ("avic", "x2avic", "nested", "npt", "vgif", "vnmi", "force_avic"),
}
CAPS = {
    "IRQCHIP": MU.KVM_CAP_IRQCHIP, "IRQ_ROUTING": MU.KVM_CAP_IRQ_ROUTING,
    "IRQFD": MU.KVM_CAP_IRQFD, "IRQFD_RESAMPLE": MU.KVM_CAP_IRQFD_RESAMPLE,
    "PIT2": MU.KVM_CAP_PIT2, "VCPU_EVENTS": MU.KVM_CAP_VCPU_EVENTS,
    "X86_SMM": MU.KVM_CAP_X86_SMM, "SPLIT_IRQCHIP": MU.KVM_CAP_SPLIT_IRQCHIP,
    "X2APIC_API": MU.KVM_CAP_X2APIC_API, "DISABLE_QUIRKS2": MU.KVM_CAP_DISABLE_QUIRKS2,
    "X86_APIC_BUS_CYCLES_NS": MU.KVM_CAP_X86_APIC_BUS_CYCLES_NS,
    "SIGNAL_MSI": K.KVM_CAP_SIGNAL_MSI, "TSC_DEADLINE_TIMER": K.KVM_CAP_TSC_DEADLINE_TIMER,
    "TSC_CONTROL": K.KVM_CAP_TSC_CONTROL,
}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _parameters() -> dict[str, str]:
    out = {}
    for module, names in PARAMETERS.items():
        for name in names:
            try:
                with open(f"/sys/module/{module}/parameters/{name}", encoding="ascii") as f:
                    out[f"{module}.{name}"] = f.read().strip()
            except OSError:
                continue
    for module in os.listdir("/sys/module") if os.path.isdir("/sys/module") else ():
        if module.startswith("kvm_") and module not in PARAMETERS:
            out[f"{module}.loaded"] = "Y"  # another KVM vendor module (e.g. kvm_pvm)
    return out


def _caps() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return out
    try:
        for name, cap in sorted(CAPS.items()):
            out[name] = ioctl_raw(fd, K.KVM_CHECK_EXTENSION, cap)[0]
    finally:
        os.close(fd)
    return out


def host_fingerprint(differences: dict[str, bool] | None = None) -> dict[str, Any]:
    """This host as a dict: ``kernel`` (release), ``cpu`` (model name), ``parameters`` (KVM
    module parameters as sysfs shows them), ``resolved`` (the module parameters the model
    takes, :func:`apicv.kvm.sys.host_module_parameters`), ``caps`` (KVM_CHECK_EXTENSION on
    /dev/kvm), ``differences`` (the known host differences probed, when given) and ``id``, a
    short hash of everything else."""
    fp: dict[str, Any] = {
        "kernel": platform.release(),
        "cpu": _cpu_model(),
        "parameters": _parameters(),
        "resolved": host_module_parameters(),
        "caps": _caps(),
    }
    if differences is not None:
        fp["differences"] = sorted(k for k, v in differences.items() if v)
    fp["id"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:12]
    return fp


def fingerprint_text(fp: dict[str, Any]) -> str:
    """One line: kernel, CPU, the interrupt-virtualization parameters, the id."""
    p = fp.get("parameters", {})
    virt = [f"{k.split('.', 1)[1]}={p[k]}" for k in (
        "kvm_intel.enable_apicv", "kvm_intel.enable_ipiv", "kvm_amd.avic", "kvm_amd.x2avic")
        if k in p]
    other = [k.split(".", 1)[0] for k in p if k.endswith(".loaded")]
    virt += other
    return (f"{fp['id']}: Linux {fp['kernel']}, {fp['cpu']}"
            + (f", {' '.join(virt)}" if virt else ", no kvm_intel/kvm_amd")
            + (f"; host differences {' '.join(fp['differences'])}"
               if fp.get("differences") else ""))
