"""``Tally``: one component's comparison between minqat and torch.ao -- values compared, identical, largest gaps."""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Tally"]


@dataclass
class Tally:
    """One component's comparison: values compared, values identical, largest differences.

    >>> t = Tally("demo")
    >>> t.add(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.5, 3.0]), scale=0.5)
    >>> t.cases += 1
    >>> t.exact, t.compared, t.max_abs, t.max_lsb
    (2, 3, 0.5, 1.0)
    """

    component: str
    cases: int = 0
    compared: int = 0
    exact: int = 0
    max_abs: float = 0.0
    max_lsb: float | None = None
    note: str = ""
    skipped: bool = False

    def add(self, ours: torch.Tensor, theirs: torch.Tensor, scale=None) -> None:
        """Compare two tensors bit for bit (NaN equals NaN; -0.0 differs from +0.0); ``scale`` (a number
        or a tensor broadcasting to them) turns differences into LSBs."""
        ours, theirs = ours.detach().cpu(), theirs.detach().cpu()
        if ours.shape != theirs.shape or ours.dtype != theirs.dtype:
            self.compared += max(theirs.numel(), 1)
            self.max_abs = float("inf")
            self.note = self.note or (f"shape/dtype {tuple(ours.shape)} {ours.dtype} "
                                      f"vs {tuple(theirs.shape)} {theirs.dtype}")
            return
        if ours.is_floating_point():
            nan = ours.isnan() & theirs.isnan()
            same = ((ours == theirs) & (ours.signbit() == theirs.signbit())) | nan
            diff = torch.where(nan, 0.0, (ours.double() - theirs.double()).abs())
        else:
            same = ours == theirs
            diff = (ours.long() - theirs.long()).abs().double()
        self.compared += same.numel()
        self.exact += int(same.sum())
        if diff.numel():
            diff = torch.nan_to_num(diff, nan=float("inf"))
            self.max_abs = max(self.max_abs, float(diff.max()))
            if scale is not None:
                lsb = float((diff / torch.as_tensor(scale, dtype=torch.float64)).max())
                self.max_lsb = max(self.max_lsb or 0.0, lsb)

    @property
    def ok(self) -> bool:
        return self.compared > 0 and self.exact == self.compared
