"""Float fused containers: the sequences that fusion groups and ``prepare_qat`` swaps as one unit.

Each is an ``nn.Sequential`` of the float modules it fuses, computing exactly what the sequence
computes; its only job is to mark the group (e.g. ``conv -> bn -> relu``) so ``prepare_qat`` can
replace it with the QAT module that folds BN (``minqat.nn.intrinsic.qat``). Mirrors
``torch.ao.nn.intrinsic``; the parts are validated by exact type, like torch does.

>>> m = ConvBnReLU2d(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU())
>>> [type(p).__name__ for p in m]
['Conv2d', 'BatchNorm2d', 'ReLU']
"""
from __future__ import annotations

from torch import nn

__all__ = [
    "FusedModule",
    "ConvReLU1d", "ConvReLU2d", "ConvReLU3d",
    "ConvBn1d", "ConvBn2d", "ConvBn3d",
    "ConvBnReLU1d", "ConvBnReLU2d", "ConvBnReLU3d",
    "LinearReLU", "LinearBn1d", "BNReLU2d", "BNReLU3d",
]


class FusedModule(nn.Sequential):
    """A sequence of float modules of fixed types (``parts``) that fuses into one QAT module."""

    parts: tuple[type[nn.Module], ...] = ()

    def __init__(self, *modules: nn.Module):
        types = tuple(type(m) for m in modules)
        if types != self.parts:
            want = ", ".join(t.__name__ for t in self.parts)
            got = ", ".join(t.__name__ for t in types)
            raise ValueError(f"{type(self).__name__} fuses ({want}), got ({got})")
        super().__init__(*modules)

    @classmethod
    def matches(cls, mod: nn.Module) -> bool:
        """Whether ``mod`` is a sequence of exactly ``parts`` -- this class, or a twin such as
        torch.ao.nn.intrinsic's container of the same name (recognised without importing torch.ao)."""
        return isinstance(mod, nn.Sequential) and tuple(type(m) for m in mod) == cls.parts


class ConvReLU1d(FusedModule):
    parts = (nn.Conv1d, nn.ReLU)


class ConvReLU2d(FusedModule):
    parts = (nn.Conv2d, nn.ReLU)


class ConvReLU3d(FusedModule):
    parts = (nn.Conv3d, nn.ReLU)


class ConvBn1d(FusedModule):
    parts = (nn.Conv1d, nn.BatchNorm1d)


class ConvBn2d(FusedModule):
    parts = (nn.Conv2d, nn.BatchNorm2d)


class ConvBn3d(FusedModule):
    parts = (nn.Conv3d, nn.BatchNorm3d)


class ConvBnReLU1d(FusedModule):
    parts = (nn.Conv1d, nn.BatchNorm1d, nn.ReLU)


class ConvBnReLU2d(FusedModule):
    parts = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU)


class ConvBnReLU3d(FusedModule):
    parts = (nn.Conv3d, nn.BatchNorm3d, nn.ReLU)


class LinearReLU(FusedModule):
    parts = (nn.Linear, nn.ReLU)


class LinearBn1d(FusedModule):
    parts = (nn.Linear, nn.BatchNorm1d)


class BNReLU2d(FusedModule):
    parts = (nn.BatchNorm2d, nn.ReLU)


class BNReLU3d(FusedModule):
    parts = (nn.BatchNorm3d, nn.ReLU)
