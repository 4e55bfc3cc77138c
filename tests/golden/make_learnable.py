"""Record torch's LSQ learnable fake quantization (forward and all three gradients) on adversarial inputs.

Run from the repository root with torch's learnable ops present:
    .venv/bin/python tests/golden/make_learnable.py
Writes tests/golden/learnable.pt: plain float32 tensors and Python numbers only, replayed by
tests/test_learnable.py without torch.ao. Cases cover 1..16-bit signed/unsigned ranges, scales from
1e-8 to 1e4, fractional zero points (.5 ties: half-to-even forward vs half-up backward), ties and
clamp edges of x, NaN/±inf, several grad factors, per channel along every axis of a 3-D tensor, and
an (N, 1) layout along axis 0 whose qparam gradients are per element.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.strategies import adversarial_values  # noqa: E402

OUT = Path(__file__).with_name("learnable.pt")

# (quant_min, quant_max, scale, zero_point, grad_factor)
PER_TENSOR = [
    (0, 255, 0.1, 128.0, 1.0), (0, 255, 0.1, 127.5, 1.0), (0, 255, 1 / 3, 3.5, 0.5),
    (-128, 127, 0.0173, -0.5, 1.0), (-128, 127, 0.0173, -3.0, 1.0), (-128, 127, 0.02, -2.5, 0.25),
    (-128, 127, 1e-8, 0.0, 1.0), (-128, 127, 1e4, 127.0, 1.0), (-128, 127, 7.0, -128.0, 1e-3),
    (-1, 0, 0.5, -0.5, 1.0), (0, 1, 0.5, 0.5, 1.0), (0, 1, 2.0, 0.0, 3.7),
    (-8, 7, 0.5, 2.5, 0.25), (-8, 7, 2.0**-20, -7.5, 1.0), (0, 15, 0.3, 14.5, 1.0),
    (-2048, 2047, 0.001, 100.25, 1.0), (0, 4095, 0.07, 4094.5, 0.5),
    (-32768, 32767, 1e-4, -1.5, 1.0), (0, 65535, 0.01, 32767.5, 1.0), (0, 65535, 3.0, 0.4999999, 1.0),
    (-127, 127, 0.05, 0.0, 1.0), (0, 255, 0.1, 300.0, 1.0), (0, 255, 0.1, -20.0, 1.0),
    (-128, 127, 0.0173, 0.0, None),  # None: the paper's grad factor 1/sqrt(numel * quant_max)
]
# (quant_min, quant_max, shape, axis, grad_factor)
PER_CHANNEL = [
    (0, 255, (4, 3, 10), 0, 1.0), (0, 255, (4, 3, 10), 1, 0.5), (-128, 127, (4, 3, 10), 2, 1.0),
    (-128, 127, (6, 5, 4), 1, None), (-8, 7, (3, 8, 5), 0, 1.0), (0, 15, (2, 7, 6), 2, 0.25),
    (-32768, 32767, (3, 4, 5), 1, 1.0), (0, 65535, (5, 2, 6), 0, 1.0), (-1, 0, (3, 3, 3), 2, 1.0),
    (0, 255, (160, 1), 0, 1.0), (-128, 127, (160, 1), 0, 0.3), (0, 65535, (160, 1), 0, 1.0),
]


def _grads(fn, x, scale, zero_point, dy, *args) -> dict:
    x, scale, zero_point = (t.detach().clone().requires_grad_() for t in (x, scale, zero_point))
    y = fn(x, scale, zero_point, *args)
    y.backward(dy)
    return {"y": y.detach(), "dx": x.grad, "dscale": scale.grad, "dzero_point": zero_point.grad}


def _paper_factor(numel: int, quant_max: int) -> float:
    return 1 / math.sqrt(numel * max(quant_max, 1))


def per_tensor_case(qmin, qmax, scale, zero_point, gf, seed: int) -> dict:
    zp_int = int(min(max(round(zero_point), qmin), qmax))
    x = adversarial_values(scale, zp_int, qmin, qmax, n=24, seed=seed)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    gf = _paper_factor(x.numel(), qmax) if gf is None else gf
    s, z = torch.tensor([scale]), torch.tensor([zero_point])
    out = _grads(torch._fake_quantize_learnable_per_tensor_affine, x, s, z, dy, qmin, qmax, gf)
    return {"quant_min": qmin, "quant_max": qmax, "grad_factor": gf, "x": x, "dy": dy, "scale": s,
            "zero_point": z, **out}


def per_channel_case(qmin, qmax, shape, axis, gf, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    channels = shape[axis]
    scales = torch.exp(torch.empty(channels).uniform_(-12, 6, generator=gen))  # float32 scales
    offsets = torch.tensor([0.0, 0.5, -0.5, 0.25])[torch.randint(0, 4, (channels,), generator=gen)]
    zps = (torch.randint(qmin, qmax + 1, (channels,), generator=gen) + offsets).clamp(qmin - 0.5, qmax + 0.5)
    moved = (channels,) + tuple(s for i, s in enumerate(shape) if i != axis)
    rest = math.prod(moved[1:])
    rows = [adversarial_values(float(s), int(min(max(round(float(z)), qmin), qmax)), qmin, qmax, n=rest, seed=seed + c)
            [:rest].reshape(moved[1:]) for c, (s, z) in enumerate(zip(scales, zps))]
    x = torch.stack(rows).movedim(0, axis).contiguous()
    dy = torch.randn(x.shape, generator=gen)
    gf = _paper_factor(rest, qmax) if gf is None else gf
    out = _grads(torch._fake_quantize_learnable_per_channel_affine, x, scales, zps, dy, axis, qmin, qmax, gf)
    return {"quant_min": qmin, "quant_max": qmax, "axis": axis, "grad_factor": gf, "x": x, "dy": dy,
            "scale": scales, "zero_point": zps, **out}


def main() -> None:
    data = {
        "torch_version": str(torch.__version__),
        "per_tensor": [per_tensor_case(*cfg, seed=i) for i, cfg in enumerate(PER_TENSOR)],
        "per_channel": [per_channel_case(*cfg, seed=100 + i) for i, cfg in enumerate(PER_CHANNEL)],
    }
    torch.save(data, OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
