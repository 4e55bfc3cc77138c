"""Record torch.ao's HistogramObserver on batch sequences: buffers after the last batch and qparams.

Run from the repository root with torch.ao present:  .venv/bin/python tests/golden/make_histogram.py
Writes tests/golden/histogram.pt (plain tensors, numbers and strings), replayed by
tests/test_histogram.py without torch.ao.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

OUT = Path(__file__).with_name("histogram.pt")

# (bins, dtype, qscheme, reduce_range, quant_min, quant_max, distribution)
CONFIGS = [
    (2048, "quint8", "per_tensor_affine", False, None, None, "normal"),
    (2048, "qint8", "per_tensor_symmetric", False, None, None, "outlier"),
    (256, "quint8", "per_tensor_affine", True, None, None, "growing"),
    (256, "quint8", "per_tensor_symmetric", False, 0, 255, "relu"),
    (64, "qint8", "per_tensor_affine", False, -8, 7, "lognormal"),
    (128, "qint8", "per_tensor_affine", True, None, None, "constant_then_spread"),
    (16, "quint8", "per_tensor_affine", False, None, None, "tiny"),
    (512, "qint32", "per_tensor_affine", False, None, None, "uniform"),
]


def batches(kind: str, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = 300
    if kind == "normal":
        return [torch.randn(n, generator=g) for _ in range(3)]
    if kind == "outlier":
        return [torch.cat([torch.randn(n, generator=g), torch.tensor([40.0 * (i + 1)])]) for i in range(3)]
    if kind == "growing":
        return [torch.randn(n, generator=g) * (i + 1) + i for i in range(4)]
    if kind == "relu":
        return [torch.relu(torch.randn(n, generator=g)) for _ in range(3)]
    if kind == "lognormal":
        return [torch.randn(n, generator=g).exp() - 1 for _ in range(3)]
    if kind == "constant_then_spread":
        return [torch.full((50,), 2.0), torch.randn(n, generator=g), torch.full((10,), -5.0)]
    if kind == "tiny":
        return [torch.randn(n, generator=g) * 1e-6 for _ in range(2)]
    return [torch.rand(n, generator=g) * 10 - 3 for _ in range(2)]  # uniform


def record(config: tuple, seed: int) -> dict:
    import torch.ao.quantization as tq

    bins, dtype, qscheme, reduce_range, quant_min, quant_max, kind = config
    obs = tq.HistogramObserver(bins=bins, dtype=getattr(torch, dtype), qscheme=getattr(torch, qscheme),
                               reduce_range=reduce_range, quant_min=quant_min, quant_max=quant_max)
    xs = batches(kind, seed)
    for x in xs:
        obs(x)
    scale, zero_point = obs.calculate_qparams()
    return {"bins": bins, "dtype": dtype, "qscheme": qscheme, "reduce_range": reduce_range,
            "quant_min": -1 if quant_min is None else quant_min, "quant_max": -1 if quant_max is None else quant_max,
            "custom_range": quant_min is not None, "batches": xs, "histogram": obs.histogram.clone(),
            "min_val": obs.min_val.clone(), "max_val": obs.max_val.clone(), "scale": scale,
            "zero_point": zero_point}


def main() -> None:
    warnings.simplefilter("ignore")  # reduce_range / deprecation notices
    data = {"torch_version": str(torch.__version__),
            "cases": [record(config, seed=i) for i, config in enumerate(CONFIGS)]}
    torch.save(data, OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
