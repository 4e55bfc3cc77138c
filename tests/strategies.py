"""Shared hypothesis strategies: quant ranges, scales, zero points, shapes, conv geometries and adversarial inputs."""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st


@st.composite
def quant_ranges(draw, min_bits: int = 1, max_bits: int = 16):
    """(quant_min, quant_max): 1..16-bit signed/unsigned ranges, plus arbitrary custom ranges."""
    kind = draw(st.sampled_from(["unsigned", "signed", "narrow", "custom"]))
    bits = draw(st.integers(min_bits, max_bits))
    if kind == "unsigned":
        return 0, 2**bits - 1
    if kind == "signed":
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1 if bits > 1 else 0
    if kind == "narrow":  # symmetric restricted range such as [-127, 127]
        half = max(2 ** (bits - 1) - 1, 1)
        return -half, half
    lo = draw(st.integers(-(2**15), 2**15))
    width = draw(st.integers(1, 2**16))
    return lo, lo + width


def float32s(min_value: float, max_value: float):
    """Positive float32 values, log-uniform-ish between the bounds."""
    return st.floats(min_value, max_value, width=32, allow_nan=False, allow_infinity=False)


scales = st.one_of(
    st.floats(float(np.float32(1e-8)), float(np.float32(1e4)), width=32),
    st.sampled_from([1e-8, 2.0**-20, 0.1, 0.5, 1.0, 1.0 / 3.0, 2.0, 1e4]),
)


@st.composite
def zero_points(draw, quant_min: int, quant_max: int):
    return draw(st.one_of(st.integers(quant_min, quant_max), st.sampled_from([quant_min, quant_max])))


@st.composite
def shapes(draw, min_dims: int = 0, max_dims: int = 4, max_side: int = 6, allow_empty: bool = True):
    ndim = draw(st.integers(min_dims, max_dims))
    lo = 0 if allow_empty else 1
    return tuple(draw(st.integers(lo, max_side)) for _ in range(ndim))


def adversarial_values(scale: float, zero_point: int, quant_min: int, quant_max: int, n: int, seed: int):
    """float32 values that hit the hard points of ``x -> rint(x / scale) + zero_point``.

    Exact half-way points (k + 0.5) * scale, their float32 neighbours, the clamp edges and one step
    beyond, values far outside, zeros of both signs, ±inf and NaN, plus ordinary random values.
    """
    rng = np.random.default_rng(seed)
    s = np.float32(scale)
    lo, hi = quant_min - zero_point, quant_max - zero_point
    k = rng.integers(lo - 3, hi + 3, size=n).astype(np.float64)
    ties = ((k + 0.5) * np.float64(s)).astype(np.float32)
    up = np.nextafter(ties, np.float32(np.inf))
    down = np.nextafter(ties, np.float32(-np.inf))
    edges = (np.array([lo, hi, lo - 1, hi + 1, lo - 0.5, hi + 0.5, lo + 0.5, hi - 0.5]) * np.float64(s)).astype(
        np.float32
    )
    rand = (rng.standard_normal(n) * (hi - lo + 1) * np.float64(s) / 2).astype(np.float32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e30, -1e30, 1e-30], dtype=np.float32)
    out = np.concatenate([ties, up, down, edges, rand, special])
    rng.shuffle(out)
    return torch.from_numpy(out)


@st.composite
def conv_geometries(draw, cin: int, size: int, max_dense_cout: int = 6) -> dict:
    """Any conv on a ``size x size`` input with at least one output: dense, grouped or depthwise.

    Returns ``dict(cout, groups, kernel, stride, padding, dilation)``; padding is at least what one output needs.
    """
    kind = draw(st.sampled_from(["dense", "dense", "grouped", "depthwise"]))
    if kind == "dense":
        groups, cout = 1, draw(st.integers(1, max_dense_cout))
    elif kind == "depthwise":
        groups, cout = cin, cin * draw(st.integers(1, 2))
    else:
        groups = draw(st.sampled_from([d for d in range(1, cin + 1) if cin % d == 0]))
        cout = groups * draw(st.integers(1, 2))
    kernel, dilation, stride = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    min_padding = max(0, -(-(dilation * (kernel - 1) + 1 - size) // 2))  # ceil((reach - size) / 2)
    padding = draw(st.integers(min_padding, max(min_padding + 1, 2)))
    return dict(cout=cout, groups=groups, kernel=kernel, stride=stride, padding=padding, dilation=dilation)
