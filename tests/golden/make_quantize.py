"""Record torch's quantize_per_tensor / quantize_per_channel / dequantize on adversarial inputs.

Run from the repository root with torch.ao present:  .venv/bin/python tests/golden/make_quantize.py
Writes tests/golden/quantize.pt: plain tensors and numbers only (integer results via int_repr()),
replayed by tests/test_quantize.py without torch.ao.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.strategies import adversarial_values  # noqa: E402

OUT = Path(__file__).with_name("quantize.pt")
LEGACY = {"uint8": "quint8", "int8": "qint8", "int32": "qint32"}
RANGES = {"uint8": (0, 255), "int8": (-128, 127), "int32": (-(2**31), 2**31 - 1)}

# (dtype, scale, zero_point): FMA ties, tiny and huge scales, zero points at the dtype edges.
PER_TENSOR = [
    ("uint8", 0.1, 5), ("uint8", 1 / 3, 128), ("uint8", 2.0**-20, 0), ("uint8", 1e4, 255),
    ("int8", 0.1, 5), ("int8", 0.0173, -128), ("int8", 1e-8, 127), ("int8", 7.0, 0),
    ("int32", 0.1, 5), ("int32", 1 / 3, 2**24 + 1), ("int32", 1e-3, -(2**31)), ("int32", 2.5, 2**31 - 1),
]
# (dtype, shape, axis): float64 scales that are not float32 values, so dequantize's double product shows.
PER_CHANNEL = [("uint8", (4, 3, 20), 1), ("int8", (5, 40), 0), ("int32", (3, 2, 30), -1)]


def per_tensor_case(dtype: str, scale: float, zero_point: int, seed: int) -> dict:
    qmin, qmax = RANGES[dtype]
    x = adversarial_values(scale, zero_point, qmin, qmax, n=120, seed=seed)
    q = torch.quantize_per_tensor(x, scale, zero_point, getattr(torch, LEGACY[dtype]))
    return {"dtype": dtype, "scale": scale, "zero_point": zero_point, "x": x, "q": q.int_repr(), "x_hat": q.dequantize()}


def per_channel_case(dtype: str, shape: tuple, axis: int, seed: int) -> dict:
    qmin, qmax = RANGES[dtype]
    gen = torch.Generator().manual_seed(seed)
    channels = shape[axis]
    scales = torch.exp(torch.empty(channels, dtype=torch.float64).uniform_(-12, 6, generator=gen))
    zps = torch.randint(max(qmin, -1000), min(qmax, 1000) + 1, (channels,), generator=gen)
    zps[0] = qmin
    moved = (channels,) + tuple(s for i, s in enumerate(shape) if i != axis % len(shape))
    rest = torch.Size(moved[1:]).numel()
    rows = [adversarial_values(float(s), int(z), qmin, qmax, n=rest, seed=seed + c)[:rest].reshape(moved[1:])
            for c, (s, z) in enumerate(zip(scales, zps))]
    x = torch.stack(rows).movedim(0, axis)
    q = torch.quantize_per_channel(x, scales, zps, axis % len(shape), getattr(torch, LEGACY[dtype]))
    return {"dtype": dtype, "scales": scales, "zero_points": zps, "axis": axis, "x": x,
            "q": q.int_repr(), "x_hat": q.dequantize()}


def main() -> None:
    warnings.simplefilter("ignore")  # the quantized-dtype deprecation notice
    data = {
        "torch_version": str(torch.__version__),
        "per_tensor": [per_tensor_case(*cfg, seed=i) for i, cfg in enumerate(PER_TENSOR)],
        "per_channel": [per_channel_case(*cfg, seed=100 + i) for i, cfg in enumerate(PER_CHANNEL)],
    }
    torch.save(data, OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
