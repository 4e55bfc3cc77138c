"""The FakeQuantize module (observer + fake quant) vs its bare function and vs torch.ao's module.

For each case, in one loop (one thread, round-robin, medians; see ``_timing.py``):

* ``minqat``: ``minqat.fake_quantize.FakeQuantize`` with its observer on (the training default);
* ``torch``:  ``torch.ao.quantization.FakeQuantize`` built from the same default qconfig entry;
* ``bare``:   the minqat function alone, with the module's qparams frozen (what the module costs
  on top of the math: the observer's min/max pass, the qparams, the buffer copies);
* ``copy``:   ``out.copy_(x)`` of the same tensor.

Cases: activations per tensor (torch's ``default_fake_quant``: moving-average min/max, uint8 [0, 255]),
and conv weights per channel (``default_per_channel_weight_fake_quant``: moving-average per-channel
min/max, int8 [-128, 127], symmetric, axis 0), forward and forward + backward.
Target (the foundation issue): the module <= 1.3x its bare function (``vs_bare``).

Run: ``python -m bench.fake_quantize_module [--quick] [--json]``.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as ``python bench/fake_quantize_module.py``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench._timing import interleaved_medians, ratio_row
from minqat.fake_quantize import FakeQuantize
from minqat.functional.fake_quantize import fake_quantize_per_channel_affine, fake_quantize_per_tensor_affine
from minqat.observers import MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver

TARGETS = {"vs_bare": 1.3}

# (name, shape): activations (N, C, H, W) and conv weights (C_out, C_in, kH, kW)
ACTIVATIONS = [("activation per-tensor", (64, 64, 16, 16)), ("activation per-tensor", (64, 64, 44, 44))]
WEIGHTS = [("weight per-channel", (256, 256, 3, 3)), ("weight per-channel", (512, 512, 3, 3))]


def modules(per_channel: bool):
    """``(minqat_module, torch_ao_module)`` configured alike (torch.ao's default QAT entries)."""
    with warnings.catch_warnings():  # torch.ao's deprecation notices; its default qconfig's reduce_range notice
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="Please use quant_min and quant_max", category=UserWarning)
        import torch.ao.quantization as tq

        theirs = tq.default_per_channel_weight_fake_quant() if per_channel else tq.default_fake_quant()
    if per_channel:
        return (FakeQuantize(MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127,
                             dtype=torch.int8, qscheme=torch.per_channel_symmetric, ch_axis=0), theirs)
    return (FakeQuantize(MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.uint8,
                         qscheme=torch.per_tensor_affine, reduce_range=True), theirs)


def bare(module: FakeQuantize):
    """The module's fake quant with its current qparams frozen: ``x -> x_hat``."""
    scale, zero_point = module.scale.clone(), module.zero_point.clone()
    quant_min, quant_max = module.activation_post_process.quant_min, module.activation_post_process.quant_max
    if module.is_per_channel:
        return lambda x: fake_quantize_per_channel_affine(x, scale, zero_point, module.ch_axis, quant_min, quant_max)
    return lambda x: fake_quantize_per_tensor_affine(x, scale, zero_point, quant_min, quant_max)


def _forward_and_backward(fn, x: torch.Tensor, grad: torch.Tensor):
    def step() -> None:
        x.grad = None
        fn(x).backward(grad)
    return step


def _case_rows(name: str, shape: tuple[int, ...], per_channel: bool, reps: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    grad = torch.randn(shape, generator=gen)
    out = torch.empty_like(x)
    ours, theirs = modules(per_channel)
    exact = torch.equal(ours(x), theirs(x))  # first call: both observers start from the same state
    bare_fn = bare(ours)
    rows = []
    for mode, wrap, arg in (("fwd", None, x), ("fwd+bwd", _forward_and_backward, x.clone().requires_grad_())):
        calls = {"minqat": ours, "torch": theirs, "bare": bare_fn}
        fns = {key: (wrap(fn, arg, grad) if wrap else (lambda fn=fn: fn(arg))) for key, fn in calls.items()}
        ms = interleaved_medians({**fns, "copy": lambda: out.copy_(x)}, reps)
        rows.append(ratio_row("fake_quantize_module", f"{name} {list(shape)} {mode}", x.numel(), ms, exact=exact,
                              bare_ms=ms["bare"], vs_bare=ms["minqat"] / ms["bare"], targets=TARGETS))
    return rows


def run(quick: bool = False) -> list[dict]:
    """Rows for activations (per tensor) and conv weights (per channel), fwd and fwd+bwd."""
    rows = []
    for per_channel, cases in ((False, ACTIVATIONS), (True, WEIGHTS)):
        for name, shape in cases[:1] if quick else cases:
            numel = torch.Size(shape).numel()
            reps = 10 if quick else (100 if numel <= 2**20 else 30)
            rows += _case_rows(name, shape, per_channel, reps)
    return rows


if __name__ == "__main__":
    from bench.run import main

    sys.exit(main(modules=[sys.modules[__name__]]))
