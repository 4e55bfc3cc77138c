"""Record torch.ao observer results into tests/golden/observers.pt (run: python tests/golden/make_observers.py).

Two lists of plain tensors / numbers / strings, replayed by tests/test_observers.py without torch.ao:

* ``observer_cases``: one of the four observers, its constructor arguments (dtype and qscheme by name),
  a sequence of batches (stored flat with their shapes) and, after every batch, torch.ao's
  ``min_val``, ``max_val`` and ``calculate_qparams()`` (stacked over the steps).
* ``qparams_cases``: adversarial per-channel min/max vectors (0, -0, denormals, eps, 3e38, inf, NaN, equal
  pairs) and a configuration, with torch.ao's ``_calculate_qparams`` result.

Deterministic (fixed seed); needs torch with torch.ao.quantization.
"""
from __future__ import annotations

import math
import pathlib
import warnings

import numpy as np
import torch

warnings.simplefilter("ignore")
import torch.ao.quantization as tq  # noqa: E402
from torch.ao.quantization.utils import calculate_qmin_qmax  # noqa: E402

OUT = pathlib.Path(__file__).with_name("observers.pt")
rng = np.random.default_rng(20240613)

DTYPES = ["uint8", "int8", "int16", "uint16", "int32"]
RANGES = {  # custom ranges worth pinning, per dtype (None: the dtype's default range)
    "uint8": [None, None, (0, 255), (0, 127), (0, 15)],
    "int8": [None, None, (-128, 127), (-127, 127), (-8, 7), (-1, 1)],
    "int16": [None, (-8, 7)],
    "uint16": [None, (0, 15)],
    "int32": [None, (-(2**15), 2**15 - 1)],
}
PER_TENSOR = ["per_tensor_affine", "per_tensor_symmetric"]
PER_CHANNEL = ["per_channel_affine", "per_channel_symmetric", "per_channel_affine_float_qparams"]
POOL = np.array([0.0, -0.0, 1e-45, 1e-40, 1e-38, 1e-7, 2.0**-23, 0.1, 1.0, 3.0, 127.5, 1e5, 1e30, 3e38, np.inf, np.nan],
                dtype=np.float32)


def config(qschemes: list[str]) -> dict:
    dtype = str(rng.choice(DTYPES, p=[0.35, 0.35, 0.1, 0.1, 0.1]))
    qscheme = str(rng.choice(qschemes))
    custom = RANGES[dtype][rng.integers(len(RANGES[dtype]))]
    reduce_range = bool(rng.random() < 0.3)
    if custom == (0, 1) or (dtype == "uint8" and "symmetric" in qscheme):
        reduce_range = False  # minqat rejects these
    quant_min, quant_max = custom if custom else (None, None)
    eps = float(rng.choice([torch.finfo(torch.float32).eps, 2.0**-12]))
    return dict(dtype=dtype, qscheme=qscheme, reduce_range=reduce_range, quant_min=quant_min, quant_max=quant_max,
                eps=eps)


def values(shape: tuple[int, ...]) -> np.ndarray:
    kind = rng.integers(7)
    normal = rng.standard_normal(shape)
    if kind == 0:  # constant
        return np.full(shape, rng.choice([3.0, -3.0, 0.0, 1e-30, -2e30]), dtype=np.float32)
    if kind == 1:  # one-signed
        return (np.abs(normal) * rng.choice([1, -1]) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32)
    if kind == 2:  # tiny
        return (normal * rng.choice([1e-40, 1e-10])).astype(np.float32)
    if kind == 3:  # huge (range overflows to inf)
        return np.clip(normal * 1e38, -3.4e38, 3.4e38).astype(np.float32)
    return (normal * 10.0 ** rng.uniform(-3, 3)).astype(np.float32)


def observer_case(cls: str) -> dict:
    per_channel = "PerChannel" in cls
    kwargs = config(PER_CHANNEL if per_channel else PER_TENSOR)
    ndim = int(rng.integers(2 if per_channel else 0, 4))  # torch.ao's per-channel observers fail on 1-d
    if per_channel:
        kwargs["ch_axis"] = int(rng.integers(-ndim, ndim))
    if cls.startswith("MovingAverage"):
        kwargs["averaging_constant"] = float(rng.choice([0.01, 0.5, 1.0]))
    channels = int(rng.integers(1, 5))
    ao_kwargs = dict(kwargs, dtype=getattr(torch, kwargs["dtype"]), qscheme=getattr(torch, kwargs["qscheme"]))
    obs = getattr(tq, cls)(**ao_kwargs)
    record = dict(cls=cls, kwargs=kwargs, shapes=[], inputs=[], min_val=[], max_val=[], scale=[], zero_point=[])
    for step in range(int(rng.integers(1, 4))):
        shape = [int(rng.integers(1 if step == 0 else 0, 4)) for _ in range(ndim)]
        if per_channel:
            shape[kwargs["ch_axis"]] = channels
        x = torch.from_numpy(np.array(values(tuple(shape)), dtype=np.float32))
        obs(x)
        scale, zero_point = obs.calculate_qparams()
        record["shapes"].append(list(shape))
        record["inputs"].append(x.flatten())
        for key, t in (("min_val", obs.min_val), ("max_val", obs.max_val), ("scale", scale), ("zero_point", zero_point)):
            record[key].append(t.clone())
    for key in ("inputs",):
        record[key] = torch.cat(record[key])
    for key in ("min_val", "max_val", "scale", "zero_point"):
        record[key] = torch.stack(record[key])
    return record


def qparams_case() -> dict:
    kwargs = config(PER_TENSOR + PER_CHANNEL)
    per_channel = kwargs["qscheme"].startswith("per_channel")
    v = np.where(rng.random((2, 8)) < 0.6, POOL[rng.integers(0, len(POOL), (2, 8))] * rng.choice([-1, 1], (2, 8)),
                 rng.standard_normal((2, 8)) * 10.0 ** rng.uniform(-8, 8, (2, 8))).astype(np.float32)
    v[1, ::3] = v[0, ::3]
    nan = np.isnan(v).any(axis=0)
    lo, hi = np.where(nan, v[0], np.fmin(v[0], v[1])), np.where(nan, v[1], np.fmax(v[0], v[1]))
    min_val, max_val = torch.from_numpy(lo.astype(np.float32)), torch.from_numpy(hi.astype(np.float32))
    if not per_channel:
        min_val, max_val = min_val[0], max_val[0]
    dtype = getattr(torch, kwargs["dtype"])
    cls = tq.PerChannelMinMaxObserver if per_channel else tq.MinMaxObserver
    obs = cls(dtype=dtype, qscheme=getattr(torch, kwargs["qscheme"]), reduce_range=kwargs["reduce_range"],
              quant_min=kwargs["quant_min"], quant_max=kwargs["quant_max"], eps=kwargs["eps"])
    scale, zero_point = obs._calculate_qparams(min_val, max_val)
    custom = kwargs["quant_min"] is not None
    assert (obs.quant_min, obs.quant_max) == calculate_qmin_qmax(kwargs["quant_min"], kwargs["quant_max"], custom,
                                                                 dtype, kwargs["reduce_range"])
    return dict(qscheme=kwargs["qscheme"], dtype=kwargs["dtype"], quant_min=obs.quant_min, quant_max=obs.quant_max,
                eps=kwargs["eps"], has_customized_qrange=custom, min_val=min_val, max_val=max_val, scale=scale,
                zero_point=zero_point)


def main() -> None:
    classes = ["MinMaxObserver", "MovingAverageMinMaxObserver", "PerChannelMinMaxObserver",
               "MovingAveragePerChannelMinMaxObserver"]
    observer_cases = [observer_case(cls) for cls in classes for _ in range(16)]
    qparams_cases = [qparams_case() for _ in range(64)]
    torch.save({"observer_cases": observer_cases, "qparams_cases": qparams_cases, "torch": str(torch.__version__)}, OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} KB): {len(observer_cases)} observer cases, "
          f"{len(qparams_cases)} qparams cases; {sum(math.prod(s) for c in observer_cases for s in c['shapes'])} "
          "observed values")


if __name__ == "__main__":
    main()
