"""A model of this host, in one call: :func:`host_config`."""

from __future__ import annotations

from typing import Any

from ..api import VmConfig
from .backend import KvmVm


def host_config(nr_vcpus: int = 1, *, config: VmConfig | None = None,
                **options: Any) -> VmConfig:
    """This machine's KVM as a resolved :class:`~apicv.api.VmConfig`: the host's module
    parameters (``enable_apicv``, ``flexpriority``, ``vector_hashing``,
    ``min_timer_period_us``, ``lapic_timer_advance``), TSC frequency, MAXPHYADDR, SMM support
    and MCE capabilities in place of every None, with *options* (or *config*) for the rest.
    ``apicv.Vm(host_config(2))`` is the model of this host. Creates and closes a throwaway VM
    on /dev/kvm (ValueError for an option this host cannot honour, KvmError if KVM refuses)."""
    cfg = config if config is not None else VmConfig.from_options(nr_vcpus, **options)
    with KvmVm(cfg) as vm:
        return vm.config
