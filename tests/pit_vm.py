"""The model VM the PIT tests use: ``apicv.vm.Vm`` mixes in the PIT's ioctls
(:class:`apicv.i8254.PitIoctlsMixin`) and hands the PIT its port (:class:`apicv.i8254.VmPitPort`).
"""

from __future__ import annotations

from apicv.vm import Vm as ModelVm


def model_vm(*args, **kw) -> ModelVm:
    """A model VM (it has the PIT ioctls)."""
    return ModelVm(*args, **kw)
