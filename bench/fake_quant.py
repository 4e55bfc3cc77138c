"""Fake quantization, per tensor and per channel: minqat's functions vs torch's native kernels.

For each case, in one loop (one thread, round-robin, medians; see ``_timing.py``):

* ``minqat``: ``minqat.functional.fake_quantize_per_{tensor,channel}_affine``;
* ``torch``:  ``torch.fake_quantize_per_{tensor,channel}_affine`` (ATen's C++ kernels);
* ``copy``:   ``out.copy_(x)`` of the same tensor, the floor any elementwise op stands on.

"fwd" times the forward alone, "fwd+bwd" the forward and the backward of an upstream gradient.
Before timing, both sides are checked to give the same bits (output and input gradient), and the
bytes each keeps for backward are counted (``saved_B_per_el``: 1 = a bool mask; 4 = a float copy).

Targets (the foundation issue): fwd <= 0.25x torch; fwd+bwd <= 0.5x torch and <= 4x copy_;
backward state <= 1 byte per element.

Run: ``python -m bench.fake_quant [--quick] [--json]`` (or ``python -m bench.run`` for all benchmarks).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as ``python bench/fake_quant.py``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench._timing import interleaved_medians, ratio_row, saved_bytes_per_element
from minqat.functional.fake_quantize import fake_quantize_per_channel_affine, fake_quantize_per_tensor_affine

ONE_M = (64, 64, 16, 16)  # 1,048,576 elements, 4 MiB of float32
NEAR_8M = (64, 64, 44, 44)  # 7,929,856 elements, 31.7 MiB: just under glibc's 32 MiB fresh-mapping size

ACT_SCALE, ACT_ZERO_POINT, ACT_MIN, ACT_MAX = 0.025, 128, 0, 255  # uint8 activation, about 1 % clipped
W_MIN, W_MAX = -128, 127  # int8 weights, symmetric (zero points 0)

TARGETS = {"fwd": {"ratio": 0.25}, "fwd+bwd": {"ratio": 0.5, "vs_copy": 4.0, "saved_B_per_el": 1.0}}


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]
    axis: int | None  # None: per tensor


def cases(quick: bool) -> list[Case]:
    one_m = [Case("per-tensor", ONE_M, None), Case("per-channel ax0", (256, 4096), 0),
             Case("per-channel ax1", ONE_M, 1)]
    if quick:
        return one_m
    return one_m + [Case("per-tensor", NEAR_8M, None), Case("per-channel ax0", (1936, 4096), 0),
                    Case("per-channel ax1", NEAR_8M, 1)]


def contenders(case: Case):
    """``(minqat_fn, torch_fn)`` for one case, each ``x -> x_hat``, with the same qparams."""
    if case.axis is None:
        return (lambda x: fake_quantize_per_tensor_affine(x, ACT_SCALE, ACT_ZERO_POINT, ACT_MIN, ACT_MAX),
                lambda x: torch.fake_quantize_per_tensor_affine(x, ACT_SCALE, ACT_ZERO_POINT, ACT_MIN, ACT_MAX))
    channels = case.shape[case.axis]
    scale = torch.rand(channels, generator=torch.Generator().manual_seed(1)) * 0.02 + 0.01  # clips |w| > 1.3-3.8
    zero_point = torch.zeros(channels, dtype=torch.int32)  # torch's kernel wants int32
    return (lambda x: fake_quantize_per_channel_affine(x, scale, zero_point, case.axis, W_MIN, W_MAX),
            lambda x: torch.fake_quantize_per_channel_affine(x, scale, zero_point, case.axis, W_MIN, W_MAX))


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


def _exact(minqat_fn, torch_fn, x: torch.Tensor, grad: torch.Tensor) -> bool:
    """Same output and same input gradient, bit for bit."""
    xm, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    ym, yt = minqat_fn(xm), torch_fn(xt)
    ym.backward(grad)
    yt.backward(grad)
    return _same_bits(ym.detach(), yt.detach()) and _same_bits(xm.grad, xt.grad)


def _forward_and_backward(fn, x: torch.Tensor, grad: torch.Tensor):
    def step() -> None:
        x.grad = None
        fn(x).backward(grad)
    return step


def run(quick: bool = False) -> list[dict]:
    """One row per case and mode (fwd, fwd+bwd); see the module docstring."""
    rows = []
    for case in cases(quick):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(case.shape, generator=gen)
        grad = torch.randn(case.shape, generator=gen)
        out = torch.empty_like(x)
        numel = x.numel()
        reps = 10 if quick else (100 if numel <= 2**20 else 30)
        minqat_fn, torch_fn = contenders(case)
        exact = _exact(minqat_fn, torch_fn, x, grad)
        label = f"{case.name} {list(case.shape)}"
        ms = interleaved_medians({"minqat": lambda: minqat_fn(x), "torch": lambda: torch_fn(x),
                                  "copy": lambda: out.copy_(x)}, reps)
        rows.append(ratio_row("fake_quant", f"{label} fwd", numel, ms, exact=exact, targets=TARGETS["fwd"]))
        xg = x.clone().requires_grad_()
        ms = interleaved_medians({"minqat": _forward_and_backward(minqat_fn, xg, grad),
                                  "torch": _forward_and_backward(torch_fn, xg, grad),
                                  "copy": lambda: out.copy_(x)}, reps)
        rows.append(ratio_row("fake_quant", f"{label} fwd+bwd", numel, ms, exact=exact,
                              saved_B_per_el=saved_bytes_per_element(minqat_fn, x),
                              torch_saved_B_per_el=saved_bytes_per_element(torch_fn, x),
                              targets=TARGETS["fwd+bwd"]))
    return rows


if __name__ == "__main__":
    from bench.run import main

    sys.exit(main(modules=[sys.modules[__name__]]))
