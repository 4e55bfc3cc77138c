"""Real quantize/dequantize on plain integer tensors (minqat.functional.quantize).

(1) hand-worked golden values at the hard points (FMA ties, clamp edges, NaN, int32 wrap-around),
(2) live parity with torch.quantize_per_tensor / quantize_per_channel(...).int_repr() and
.dequantize() over adversarial inputs, (3) oracle-free properties, plus the recorded golden vectors
(replayed without torch.ao) and every error message.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from minqat.dtypes import dtype_range
from minqat.functional.quantize import dequantize, quantize_per_channel, quantize_per_tensor
from tests.oracle import assert_bit_exact, requires_ao
from tests.strategies import adversarial_values, shapes

DTYPES = [torch.uint8, torch.int8, torch.int32]
LEGACY_NAME = {torch.uint8: "quint8", torch.int8: "qint8", torch.int32: "qint32"}
NAN, INF = float("nan"), float("inf")
GOLDEN_FILE = Path(__file__).parent / "golden" / "quantize.pt"

# float32 scales in [1e-8, 1e4] (tests.strategies.scales passes 1e-8 with width=32, which hypothesis
# rejects because 1e-8 is not a float32, so it is re-stated here).
scales = st.one_of(
    st.floats(1e-8, 1e4).map(lambda v: float(np.float32(v))),
    st.sampled_from([1e-8, 2.0**-20, 0.1, 0.5, 1.0, 1.0 / 3.0, 2.0, 1e4]),
)


def legacy(dtype: torch.dtype) -> torch.dtype:
    return getattr(torch, LEGACY_NAME[dtype])


def u8(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8)


# ----------------------------------------------------------------------------------------------
# (1) hand-worked golden values
# ----------------------------------------------------------------------------------------------
# scale 0.1: s32 = 0.100000001490116..., 1/s32 = 9.99999985..., within half an ulp (4.8e-7) of 10,
# so inv = 10.0 exactly. fl32(0.45) = 0.449999988079071, and x * inv = 4.49999988079071 exactly.


def test_zero_point_before_rounding_vs_fake_quant():
    # quantize: fma32(0.44999999, 10, 5) = fl32(9.49999988) = 9.5 (ulp 9.5e-7) -> rint -> 10 (even).
    # fake quant adds the zero point AFTER rounding: rint(fl32(4.49999988)) = rint(4.5) = 4 -> 9.
    x = torch.tensor([0.45])
    assert quantize_per_tensor(x, 0.1, 5, torch.uint8).tolist() == [10]
    fake_quant_int = 4 + 5
    assert fake_quant_int == 9


def test_fma_single_rounding_vs_two_roundings():
    # x = -0.45: x * inv = -4.49999988079071 exactly.
    # uint8/int8 (one FMA rounding): -4.49999988079071 + 5 = 0.50000011920929 = 0.5 + 2**-23, a
    #   float32 -> rint -> 1.
    # int32 and per-channel (two roundings): fl32(-4.49999988) = -4.5 (1.2e-7 < half ulp 2.4e-7),
    #   -4.5 + 5 = 0.5 -> rint -> 0 (even).
    x = torch.tensor([-0.45])
    assert quantize_per_tensor(x, 0.1, 5, torch.uint8).tolist() == [1]
    assert quantize_per_tensor(x, 0.1, 5, torch.int8).tolist() == [1]
    assert quantize_per_tensor(x, 0.1, 5, torch.int32).tolist() == [0]
    assert quantize_per_channel(x, torch.tensor([0.1]), torch.tensor([5]), 0, torch.uint8).tolist() == [0]


def test_ties_to_even_and_clamp_edges():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 126.5, 127.5, -128.5, -129.0])
    expected = [0, 2, 2, 0, -2, 126, 127, -128, -128]  # 127.5 -> 128 -> clamp 127; -128.5 -> -128
    assert quantize_per_tensor(x, 1.0, 0, torch.int8).tolist() == expected
    assert quantize_per_tensor(torch.tensor([254.5, 255.5, -0.5]), 1.0, 0, torch.uint8).tolist() == [254, 255, 0]


def test_special_values():
    x = torch.tensor([NAN, INF, -INF, 1e30, -1e30])
    assert quantize_per_tensor(x, 1.0, 0, torch.uint8).tolist() == [255, 255, 0, 255, 0]
    assert quantize_per_tensor(x, 1.0, 0, torch.int8).tolist() == [127, 127, -128, 127, -128]
    i32min, i32max = -(2**31), 2**31 - 1
    assert quantize_per_tensor(x, 1.0, 0, torch.int32).tolist() == [i32min, i32max, i32min, i32max, i32min]
    ones, zeros = torch.ones(5), torch.zeros(5, dtype=torch.long)
    assert quantize_per_channel(x, ones, zeros, 0, torch.uint8).tolist() == [0, 255, 0, 255, 0]
    # per channel NaN -> int32 0x80000000 -> low 8 bits 0, also for int8 (not qmin = -128)
    assert quantize_per_channel(x, ones, zeros, 0, torch.int8).tolist() == [0, 127, -128, 127, -128]
    assert quantize_per_channel(x, ones, zeros, 0, torch.int32).tolist() == [i32min, i32max, i32min, i32max, i32min]


def test_large_int32_zero_point_is_rounded_to_float32():
    # fl32(2**24 + 1) = 2**24 (ties to even), so x = 0 quantizes to 2**24, not 2**24 + 1.
    assert quantize_per_tensor(torch.tensor([0.0]), 1.0, 2**24 + 1, torch.int32).tolist() == [2**24]


def test_dequantize_golden():
    assert dequantize(u8(0, 3, 255), 0.5, 3).tolist() == [-1.5, 0.0, 126.0]
    # int32 per tensor: torch subtracts in int32; -2**31 - 3 wraps to 2**31 - 3, fl32 -> 2**31.
    assert dequantize(torch.tensor([-(2**31)], dtype=torch.int32), 1.0, 3).tolist() == [2.0**31]
    # per channel the product is in float64 with the double scale: 5 * (1/3) = 1.6666666666666667
    # -> fl32 = 1.6666666269302368; the float32 product fl32(5 * fl32(1/3)) = 1.6666667461395264.
    third = torch.tensor([1 / 3], dtype=torch.float64)
    assert dequantize(u8(5), third, torch.tensor([0]), axis=0).tolist() == [1.6666666269302368]
    assert dequantize(u8(5), 1 / 3, 0).tolist() == [1.6666667461395264]


def test_legacy_dtype_names_give_plain_results():
    x = torch.tensor([1.0, -1.0])
    for dtype in DTYPES:
        q = quantize_per_tensor(x, 1.0, 0, legacy(dtype))
        assert q.dtype == dtype
        assert quantize_per_channel(x, torch.ones(2), torch.zeros(2, dtype=torch.long), 0, legacy(dtype)).dtype == dtype


def test_empty_and_zero_dim():
    q = quantize_per_tensor(torch.empty(0, 3), 0.1, 0, torch.uint8)
    assert q.shape == (0, 3) and q.dtype == torch.uint8
    assert dequantize(q, 0.1, 0).shape == (0, 3)
    q = quantize_per_channel(torch.empty(0, 3), torch.ones(0), torch.zeros(0, dtype=torch.long), 0, torch.int8)
    assert q.shape == (0, 3)
    assert dequantize(q, torch.ones(0), torch.zeros(0, dtype=torch.long), axis=0).shape == (0, 3)
    q0 = quantize_per_tensor(torch.tensor(2.5), 1.0, 0, torch.uint8)
    assert q0.shape == () and q0.item() == 2
    assert dequantize(q0, 1.0, 0).shape == ()


def test_tensor_qparams_equal_python_numbers():
    x = torch.linspace(-3, 3, 101)
    ref = quantize_per_tensor(x, 0.05, 7, torch.int8)
    assert_bit_exact(quantize_per_tensor(x, torch.tensor([0.05]), torch.tensor(7, dtype=torch.int32), torch.int8), ref)
    assert_bit_exact(quantize_per_tensor(x, torch.tensor(0.05, dtype=torch.float64), torch.tensor([7]), torch.int8), ref)
    # a float zero-point tensor is truncated toward zero, like torch's tensor overload: 2.7 -> 2
    assert quantize_per_tensor(torch.tensor([0.0, 1.0, -1.0]), 1.0, torch.tensor(2.7), torch.int8).tolist() == [2, 3, 1]


# ----------------------------------------------------------------------------------------------
# (2) parity with torch's quantized tensors
# ----------------------------------------------------------------------------------------------
def _zero_point(dtype):
    qmin, qmax = dtype_range(dtype)
    if dtype == torch.int32:
        return st.one_of(st.integers(-1000, 1000), st.sampled_from([qmin, qmax, 2**24 + 1, -(2**30) + 7]))
    return st.one_of(st.integers(qmin, qmax), st.sampled_from([qmin, qmax]))


def _fill(values: torch.Tensor, shape) -> torch.Tensor:
    """A tensor of ``shape`` filled with ``values`` (repeated as needed)."""
    numel = math.prod(shape)
    reps = -(-numel // max(values.numel(), 1))
    return values.repeat(max(reps, 1))[:numel].reshape(shape)


@st.composite
def per_tensor_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(scales)
    zp = draw(_zero_point(dtype))
    qmin, qmax = dtype_range(dtype)
    values = adversarial_values(scale, zp, qmin, qmax, n=48, seed=draw(st.integers(0, 2**16)))
    return dtype, scale, zp, values, draw(shapes())


@requires_ao
@given(case=per_tensor_cases(), as_tensor=st.booleans())
def test_per_tensor_matches_torch(case, as_tensor):
    dtype, scale, zp, values, shape = case
    for x in (values, _fill(values, shape)):
        q_ref = torch.quantize_per_tensor(x, scale, zp, legacy(dtype))
        s, z = (torch.tensor(scale, dtype=torch.float64), torch.tensor(zp)) if as_tensor else (scale, zp)
        q = quantize_per_tensor(x, s, z, legacy(dtype))
        assert_bit_exact(q, q_ref.int_repr(), "quantize_per_tensor")
        assert_bit_exact(dequantize(q, s, z), q_ref.dequantize(), "dequantize per tensor")


@st.composite
def per_channel_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(shapes(min_dims=1, max_dims=4, max_side=5))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    channels = shape[axis]
    any_double = st.floats(1e-8, 1e4)  # float64 scales, narrowed by quantize, kept by dequantize
    scale = draw(st.lists(st.one_of(scales, any_double), min_size=channels, max_size=channels))
    zp = draw(st.lists(_zero_point(dtype), min_size=channels, max_size=channels))
    seed = draw(st.integers(0, 2**16))
    qmin, qmax = dtype_range(dtype)
    moved = list(shape)
    moved.insert(0, moved.pop(axis % len(shape)))  # (C, rest...)
    rows = [_fill(adversarial_values(s, z, qmin, qmax, n=24, seed=seed + c), moved[1:]) for c, (s, z) in
            enumerate(zip(scale, zp))]
    x = torch.stack(rows) if rows else torch.empty(moved)
    x = x.movedim(0, axis)
    return dtype, torch.tensor(scale, dtype=torch.float64), torch.tensor(zp, dtype=torch.long), axis, x


@requires_ao
@given(case=per_channel_cases())
def test_per_channel_matches_torch(case):
    dtype, scale, zp, axis, x = case
    q_ref = torch.quantize_per_channel(x, scale, zp, axis % x.dim(), legacy(dtype))
    q = quantize_per_channel(x, scale, zp, axis, legacy(dtype))
    assert_bit_exact(q, q_ref.int_repr(), "quantize_per_channel")
    assert_bit_exact(dequantize(q, scale, zp, axis=axis), q_ref.dequantize(), "dequantize per channel")


@requires_ao
@given(dtype=st.sampled_from(DTYPES), scale=scales, data=st.data())
def test_dequantize_of_any_integers_matches_torch(dtype, scale, data):
    # Every integer of the dtype is reachable via _make_per_tensor_quantized_tensor, including the
    # int32 extremes where torch's int32 subtraction wraps around.
    qmin, qmax = dtype_range(dtype)
    zp = data.draw(_zero_point(dtype))
    ints = torch.tensor(data.draw(st.lists(st.one_of(st.integers(qmin, qmax), st.sampled_from([qmin, qmax])),
                                           min_size=1, max_size=40)), dtype=dtype)
    ref = torch._make_per_tensor_quantized_tensor(ints, scale, zp).dequantize()
    assert_bit_exact(dequantize(ints, scale, zp), ref, "dequantize")


# ----------------------------------------------------------------------------------------------
# (3) oracle-free properties
# ----------------------------------------------------------------------------------------------
@given(case=per_tensor_cases())
def test_output_in_range_and_monotone(case):
    dtype, scale, zp, values, _ = case
    x = values[~torch.isnan(values)].sort().values
    q = quantize_per_tensor(x, scale, zp, dtype)
    assert q.dtype == dtype and q.shape == x.shape
    assert bool((q[1:].long() >= q[:-1].long()).all())  # rounding and clamping never reorder


@given(case=per_tensor_cases())
def test_requantizing_the_dequantized_grid_is_identity(case):
    dtype, scale, zp, values, _ = case
    if dtype == torch.int32:  # beyond 2**24 the float32 grid is coarser than the integers
        return
    q = quantize_per_tensor(values, scale, zp, dtype)
    assert_bit_exact(quantize_per_tensor(dequantize(q, scale, zp), scale, zp, dtype), q, "requantize")


@given(case=per_tensor_cases())
def test_error_is_at_most_half_a_step_inside_the_range(case):
    dtype, scale, zp, values, _ = case
    if abs(zp) > 2**24:  # fl32(zp) != zp: the zero point itself moves (see the golden test above)
        return
    qmin, qmax = dtype_range(dtype)
    s = float(np.float32(scale))
    inside = (values >= (qmin - zp) * s) & (values <= (qmax - zp) * s) & (values.abs() < 2.0**20 * s)
    x = values[inside]
    x_hat = dequantize(quantize_per_tensor(x, scale, zp, dtype), scale, zp)
    # half a step, plus float32 rounding of inv, of x * inv and of x_hat (each <= 2**-24 relative)
    bound = 0.5 * s + x.abs().double() * 2.0**-21
    assert bool(((x_hat.double() - x.double()).abs() <= bound).all())


@given(case=per_channel_cases())
def test_per_channel_equals_int32_per_tensor_per_slice(case):
    # Both use the two-rounding formula, so each channel's slice must match per-tensor int32.
    _, scale, zp, axis, x = case
    zp = zp.clamp(-1000, 1000)
    q = quantize_per_channel(x, scale, zp, axis, torch.int32)
    for c in range(x.size(axis)):
        ref = quantize_per_tensor(x.select(axis, c), float(scale[c]), int(zp[c]), torch.int32)
        assert_bit_exact(q.select(axis, c), ref, f"channel {c}")


# ----------------------------------------------------------------------------------------------
# golden vectors recorded from torch 2.13 (tests/golden/make_quantize.py), replayed without torch.ao
# ----------------------------------------------------------------------------------------------
def _golden():
    return torch.load(GOLDEN_FILE, weights_only=True)


def test_golden_vectors_per_tensor():
    cases = _golden()["per_tensor"]
    assert len(cases) >= 9
    for case in cases:
        dtype = getattr(torch, case["dtype"])
        q = quantize_per_tensor(case["x"], case["scale"], case["zero_point"], dtype)
        assert_bit_exact(q, case["q"], f"golden per tensor {case['dtype']} s={case['scale']}")
        assert_bit_exact(dequantize(case["q"], case["scale"], case["zero_point"]), case["x_hat"], "golden dequant")


def test_golden_vectors_per_channel():
    cases = _golden()["per_channel"]
    assert len(cases) >= 3
    for case in cases:
        dtype = getattr(torch, case["dtype"])
        args = case["scales"], case["zero_points"], case["axis"]
        assert_bit_exact(quantize_per_channel(case["x"], *args, dtype), case["q"], f"golden per channel {case['dtype']}")
        assert_bit_exact(dequantize(case["q"], *args), case["x_hat"], "golden per-channel dequant")


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
X = torch.zeros(2, 3)
ONES3, ZEROS3 = torch.ones(3), torch.zeros(3, dtype=torch.long)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: quantize_per_tensor(X, 0.0, 0, torch.uint8), "scale must be positive and finite"),
        (lambda: quantize_per_tensor(X, -1.0, 0, torch.uint8), "scale must be positive and finite"),
        (lambda: quantize_per_tensor(X, NAN, 0, torch.uint8), "scale must be positive and finite"),
        (lambda: quantize_per_tensor(X, INF, 0, torch.uint8), "scale must be positive and finite"),
        (lambda: quantize_per_tensor(X, 1e-50, 0, torch.uint8), r"scale must be positive and finite \(as float32\)"),
        (lambda: quantize_per_tensor(X, torch.tensor([0.0]), 0, torch.uint8), "scale must be positive"),
        (lambda: quantize_per_tensor(X, torch.ones(2), 0, torch.uint8), "scale must hold exactly one element"),
        (lambda: quantize_per_tensor(X, torch.tensor(1), 0, torch.uint8), "scale must be a floating-point tensor"),
        (lambda: quantize_per_tensor(X, "1", 0, torch.uint8), "scale must be a positive float"),
        (lambda: quantize_per_tensor(X, 1.0, 256, torch.uint8), r"zero_point must lie in .*\[0, 255\]"),
        (lambda: quantize_per_tensor(X, 1.0, -129, torch.int8), r"zero_point must lie in .*\[-128, 127\]"),
        (lambda: quantize_per_tensor(X, 1.0, torch.tensor([300]), torch.uint8), "zero_point must lie in"),
        (lambda: quantize_per_tensor(X, 1.0, 0.5, torch.uint8), "zero_point must be an integer"),
        (lambda: quantize_per_tensor(X, 1.0, 0, torch.float32), "dtype must be one of torch.uint8"),
        (lambda: quantize_per_tensor(X, 1.0, 0, torch.int16), "dtype must be one of torch.uint8"),
        (lambda: quantize_per_tensor(X.long(), 1.0, 0, torch.uint8), "x must be a floating-point tensor"),
        (lambda: quantize_per_tensor([0.0], 1.0, 0, torch.uint8), "x must be a floating-point tensor"),
        (lambda: quantize_per_channel(X, ONES3, ZEROS3, 2, torch.uint8), r"axis must lie in \[-2, 1\]"),
        (lambda: quantize_per_channel(torch.tensor(1.0), ONES3, ZEROS3, 0, torch.uint8), "axis must lie in none"),
        (lambda: quantize_per_channel(X, ONES3, ZEROS3, 0, torch.uint8), "scales must be a 1-D tensor with one entry per channel"),
        (lambda: quantize_per_channel(X, ONES3, ZEROS3[:2], 1, torch.uint8), "zero_points must be a 1-D tensor"),
        (lambda: quantize_per_channel(X, ONES3.long(), ZEROS3, 1, torch.uint8), "scales must be a floating-point tensor"),
        (lambda: quantize_per_channel(X, -ONES3, ZEROS3, 1, torch.uint8), "scales must be positive and finite"),
        (lambda: quantize_per_channel(X, ONES3, ZEROS3.float(), 1, torch.uint8), "zero_points must be an integer tensor"),
        (lambda: quantize_per_channel(X, ONES3, ZEROS3 - 1, 1, torch.uint8), r"zero_points must lie in .*\[0, 255\]"),
        (lambda: dequantize(X, 1.0, 0), "x_int must be a torch.uint8, torch.int8 or torch.int32 tensor"),
        (lambda: dequantize(X.long(), 1.0, 0), "x_int must be a torch.uint8"),
        (lambda: dequantize(u8(1), 0.0, 0), "scale must be positive and finite"),
        (lambda: dequantize(u8(1), 1.0, 256), "zero_point must lie in"),
        (lambda: dequantize(u8(1, 2), ONES3, ZEROS3, axis=0), "scale must be a 1-D tensor with one entry per channel"),
        (lambda: dequantize(u8(1, 2, 3), ONES3, ZEROS3.float(), axis=0), "zero_point must be an integer tensor"),
        (lambda: dequantize(u8(1, 2, 3), ONES3, ZEROS3, axis=1), r"axis must lie in \[-1, 0\]"),
    ],
)
def test_error_messages(call, match):
    with pytest.raises(ValueError, match=match):
        call()
