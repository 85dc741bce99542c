"""``apicv.Vm``: one constructor for both backends.

``apicv.Vm(2, backend="model")`` makes the model (:class:`apicv.vm.Vm`), ``backend="kvm"`` the
real KVM backend (:class:`apicv.kvm.KvmVm`); both take a :class:`~apicv.api.VmConfig` or its
fields as keyword arguments, and both are :class:`~apicv.api.VmAPI`: ``isinstance(vm,
apicv.Vm)`` holds for either. This module is a face: the model never imports it, so the model
stays free of the real backend.
"""

from __future__ import annotations

from typing import Any

from .api import VmAPI, VmConfig

BACKENDS = ("model", "kvm")


class _DeclaredVm(type):
    def __instancecheck__(cls, obj: object) -> bool:
        return isinstance(obj, VmAPI)


class Vm(metaclass=_DeclaredVm):
    """``apicv.Vm(nr_vcpus=1, x2apic_api=0, *, backend="model", **options)``: a VM on the
    chosen backend (see :mod:`apicv.backends`). *options* are :class:`~apicv.api.VmConfig`
    fields; a VmConfig may be passed instead of *nr_vcpus*."""

    def __new__(cls, nr_vcpus: int | VmConfig = 1, x2apic_api: int = 0, *,
                backend: str = "model", **options: Any) -> Any:
        if backend == "model":
            from .vm import Vm as ModelVm

            return ModelVm(nr_vcpus, x2apic_api, **options)
        if backend == "kvm":
            from .kvm import KvmVm

            return KvmVm(nr_vcpus, x2apic_api, **options)
        raise ValueError(f"unknown backend {backend!r} (use {' or '.join(map(repr, BACKENDS))})")
