"""Requantization (minqat.kernels.requantize): fbgemm's float32 recipe and the integer-only one.

(1) hand-worked values at the hard points (ties to even, zero point after rounding, the ReLU clamp
at z_y, the per-tensor bias FMA, int32 edges, the fixed-point multiplier and its two roundings);
(2) live parity of the edge semantics with torch's quantized linear (fbgemm);
(3) properties, and the integer-only recipe against a float64 reference (within 1 LSB, with the
measured mismatch rate). Parity over whole conv/linear layers is in test_kernels_conv_linear.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from minqat.kernels.requantize import (
    _round_add_zero_point,
    _rounding_divide_by_pot,
    _saturating_rounding_doubling_high_mul,
    quantize_bias,
    quantize_multiplier,
    requantize,
    requantize_fixed_point,
    requantize_integer_only,
)
from tests.oracle import assert_bit_exact, requires_ao
from tests.oracle import quantized_engine

I32 = torch.int32
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def acc_of(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=I32)


# ----------------------------------------------------------------------------------------------
# (1) hand-worked values: fbgemm recipe
# ----------------------------------------------------------------------------------------------
def test_ties_to_even_and_zero_point_after_rounding():
    # s_x * s_w / s_y = 0.5: v = acc / 2 = 0.5, 1.5, 2.5, -0.5, -1.5, -2.5
    # rint (ties to even): 0, 2, 2, -0, -2, -2; then + z_y = 11 -> 11, 13, 13, 11, 9, 9.
    # (Adding z_y BEFORE rounding would give rint(11.5, 12.5, 13.5, 10.5, 9.5, 8.5) = 12, 12, 14, 10, 10, 8.)
    y = requantize(acc_of(1, 3, 5, -1, -3, -5), 0.5, 1.0, 1.0, 11, axis=0)
    assert y.tolist() == [11, 13, 13, 11, 9, 9]


def test_relu_clamps_at_the_output_zero_point():
    # v = -2, -1, 0, 1 -> + z_y = 7: 5, 6, 7, 8; with ReLU the floor is z_y = 7 (the real value 0).
    acc = acc_of(-2, -1, 0, 1)
    assert requantize(acc, 1.0, 1.0, 1.0, 7, axis=0).tolist() == [5, 6, 7, 8]
    assert requantize(acc, 1.0, 1.0, 1.0, 7, axis=0, relu=True).tolist() == [7, 7, 7, 8]


def test_output_clamp_is_the_dtype_range():
    acc = acc_of(-1000, -129, 127, 128, 1000)
    assert requantize(acc, 1.0, 1.0, 1.0, 0, axis=0).tolist() == [0, 0, 127, 128, 255]
    assert requantize(acc, 1.0, 1.0, 1.0, 0, axis=0, dtype=torch.int8).tolist() == [-128, -128, 127, 127, 127]


def test_per_tensor_bias_is_a_fused_multiply_add():
    # atw = fl32(1 * fl32(0.1)) = 0.10000000149011612, s_y = 0.1 -> mult = 1; b = fl32(-0.15) = -0.15000000596.
    # per channel:  fl32(b / atw) = fl32(-1.49999998510) = -1.5 -> raw = 1 - 1.5 = -0.5 -> rint -> -0 -> y = z_y.
    # per tensor:   rcp = fl32(1 / atw) = fl32(9.99999985) = 10.0; fma32(b, 10, 1) = fl32(-0.50000005960)
    #               = -(0.5 + 2**-24), exactly a float32 -> rint -> -1 -> y = z_y - 1.
    b = torch.tensor([-0.15])
    per_channel = requantize(acc_of(1), 1.0, torch.tensor([0.1]), 0.1, 50, b, axis=0)
    per_tensor = requantize(acc_of(1), 1.0, 0.1, 0.1, 50, b, axis=0)
    assert per_channel.tolist() == [50]
    assert per_tensor.tolist() == [49]
    # Check the float32 arithmetic claimed above independently with numpy.
    atw, bias = np.float32(0.1), np.float32(-0.15)
    assert np.float32(bias / atw) == np.float32(-1.5) and np.float32(1 / np.float64(atw)) == np.float32(10.0)
    assert float(bias) * 10.0 + 1.0 == -(0.5 + 2**-24)


def test_int32_edges_follow_cvtps2dq_and_int32_wraparound():
    # mult = 2**16 (s_x = 2**8, s_w = 2**8, s_y = 1):
    #   acc = 32767   -> v = 2147418112 < 2**31: in range -> clamps to 255
    #   acc = 32768   -> v = 2**31: cvtps2dq gives -2**31 ("integer indefinite") -> + z_y -> clamps to 0
    #   acc = -32769  -> v < -2**31: -2**31 + z_y -> 0
    acc = acc_of(32767, 32768, -32769)
    assert requantize(acc, 256.0, 256.0, 1.0, 5, axis=0).tolist() == [255, 0, 0]
    # ReLU floor applies to the wrapped values as well:
    assert requantize(acc, 256.0, 256.0, 1.0, 5, axis=0, relu=True).tolist() == [255, 5, 5]
    # v = 2**31 - 128 (largest float32 below 2**31, mult = 2**7, acc = 2**24 - 1): int32(v) + z_y wraps
    # to a negative number when z_y >= 128 (-> 0) and not when z_y = 127 (-> 255).
    acc = acc_of(2**24 - 1)
    assert requantize(acc, 128.0, 1.0, 1.0, 128, axis=0).tolist() == [0]
    assert requantize(acc, 128.0, 1.0, 1.0, 127, axis=0).tolist() == [255]
    # int8 outputs with a negative zero point: -2**31 + z_y wraps to a huge positive value -> 127.
    assert requantize(acc_of(32768), 256.0, 256.0, 1.0, -1, axis=0, dtype=torch.int8).tolist() == [127]


def _int32_reference(v: float, z_y: int, low: int, high: int) -> int:
    """fbgemm's conversion written with Python integers: cvtps2dq, int32 add, saturation."""
    i = INT32_MIN if (v != v or abs(v) >= 2**31) else round(v)  # Python's round: ties to even
    s = (i + z_y - INT32_MIN) % 2**32 + INT32_MIN
    return max(low, min(high, s))


def test_rounding_edges_against_python_integers():
    values = [2.0**31 - 128, 2.0**31 - 256, 2.0**31, 2.0**32, -(2.0**31), -(2.0**31) + 128, float("nan"),
              float("inf"), -float("inf"), 0.5, 1.5, -0.5, 254.5, 255.5, -128.5, 127.5, 3e9, -3e9, 1e38]
    v = torch.tensor(values)
    for dtype, (qmin, qmax) in ((torch.uint8, (0, 255)), (torch.int8, (-128, 127))):
        for z_y in range(qmin, qmax + 1):
            for relu in (False, True):
                y = _round_add_zero_point(v, torch.tensor(z_y), relu, dtype).tolist()
                low = z_y if relu else qmin
                assert y == [_int32_reference(x, z_y, low, qmax) for x in values], (dtype, z_y, relu)


# ----------------------------------------------------------------------------------------------
# (1) hand-worked values: integer-only fixed point
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "m, m0, shift",
    [
        (0.5, 2**30, 0),  # 0.5 = 0.5 * 2**0 -> M0 = 0.5 * 2**31
        (1.0, 2**30, 1),  # 1 = 0.5 * 2**1
        (0.75, 3 * 2**29, 0),
        (1 - 2.0**-40, 2**30, 1),  # q * 2**31 rounds up to 2**31: carried into the shift
        (2.0**-32, 2**30, -31),  # smallest kept: shift = -31
        (2.0**-33, 0, 0),  # shift -32 < -31: flushed to zero
        (0.0, 0, 0),
        (0.1, 1717986918, -3),  # 0.8 * 2**31 = 1717986918.4 -> 1717986918
    ],
)
def test_quantize_multiplier_golden(m, m0, shift):
    got_m0, got_shift = quantize_multiplier(m)
    assert (int(got_m0), int(got_shift)) == (m0, shift)
    assert got_m0.dtype == torch.int32


def test_fixed_point_rounding_rules():
    # M = 0.5: SaturatingRoundingDoublingHighMul rounds half UP: 1.5 -> 2, -1.5 -> -1, 2.5 -> 3, -2.5 -> -2.
    m0, shift = quantize_multiplier(0.5)
    y = requantize_fixed_point(acc_of(3, -3, 5, -5), m0, shift, 0, axis=0, dtype=torch.int8)
    assert y.tolist() == [2, -1, 3, -2]
    # M = 0.25: the doubling high mul is exact (acc / 2), RoundingDivideByPOT(., 1) rounds half AWAY
    # from zero: 6/4 = 1.5 -> 2, -6/4 -> -2, 10/4 = 2.5 -> 3, -10/4 -> -3.  (fbgemm would give 2, -2, 2, -2.)
    m0, shift = quantize_multiplier(0.25)
    y = requantize_fixed_point(acc_of(6, -6, 10, -10), m0, shift, 0, axis=0, dtype=torch.int8)
    assert y.tolist() == [2, -2, 3, -3]
    assert requantize(acc_of(6, -6, 10, -10), 0.25, 1.0, 1.0, 0, axis=0, dtype=torch.int8).tolist() == [2, -2, 2, -2]


def test_fixed_point_helpers_golden():
    # SRDHM(a, b) = floor(a*b / 2**31 + 1/2); the only overflow saturates.
    a = torch.tensor([3, -3, INT32_MIN, INT32_MAX], dtype=torch.int64)
    b = torch.tensor([2**30, 2**30, INT32_MIN, INT32_MAX], dtype=torch.int64)
    assert _saturating_rounding_doubling_high_mul(a, b).tolist() == [2, -1, INT32_MAX, INT32_MAX - 1]
    x = torch.tensor([5, -5, 6, -6, 7, -7], dtype=torch.int64)
    e = torch.tensor([1, 1, 2, 2, 0, 0], dtype=torch.int64)
    assert _rounding_divide_by_pot(x, e).tolist() == [3, -3, 2, -2, 7, -7]  # 2.5 -> 3, -2.5 -> -3, 1.5 -> 2


def test_fixed_point_bias_and_relu_and_zero_point():
    # b_int = rint(b / (s_x * s_w)) = rint(0.3 / 0.25) = rint(1.2) = 1; a = 5 + 1 = 6; M = 0.25/1 -> 1.5 -> 2.
    b_int = quantize_bias(torch.tensor([0.3]), 0.5, 0.5)
    assert b_int.tolist() == [1]
    m0, shift = quantize_multiplier(0.25)
    assert requantize_fixed_point(acc_of(5), m0, shift, 100, b_int, axis=0).tolist() == [102]
    assert requantize_fixed_point(acc_of(-50), m0, shift, 100, b_int, axis=0, relu=True).tolist() == [100]
    assert requantize_integer_only(acc_of(5), 0.5, 0.5, 1.0, 100, torch.tensor([0.3]), axis=0).tolist() == [102]


def test_multiplier_greater_than_one_uses_the_left_shift():
    # M = 3 = 0.75 * 2**2: a * 4 then SRDHM with 0.75 * 2**31 -> exact 3 * a.
    m0, shift = quantize_multiplier(3.0)
    assert (int(m0), int(shift)) == (3 * 2**29, 2)
    assert requantize_fixed_point(acc_of(7, -7, 40), m0, shift, 0, axis=0, dtype=torch.int8).tolist() == [21, -21, 120]


# ----------------------------------------------------------------------------------------------
# (2) live parity of the edge semantics with torch (fbgemm)
# ----------------------------------------------------------------------------------------------
def _torch_linear_1x1(x_centred: list[int], w: int, s_x, s_w, s_y, z_y, bias, per_channel, relu=False):
    """torch's quantized linear with K = 1: acc = x_centred * w exactly (x = z_x + x_centred)."""
    z_x = 128
    x = torch.tensor([[z_x + v] for v in x_centred], dtype=torch.uint8)
    w_int = torch.tensor([[w]], dtype=torch.int8)
    if per_channel:
        qw = torch._make_per_channel_quantized_tensor(w_int, torch.tensor([s_w], dtype=torch.float64),
                                                      torch.tensor([0]), 0)
    else:
        qw = torch._make_per_tensor_quantized_tensor(w_int, s_w, 0)
    with quantized_engine("fbgemm"):
        packed = torch.ops.quantized.linear_prepack(qw, bias)
        qx = torch._make_per_tensor_quantized_tensor(x, s_x, z_x)
        op = torch.ops.quantized.linear_relu if relu else torch.ops.quantized.linear
        return op(qx, packed, s_y, z_y).int_repr().flatten()


@requires_ao
def test_hand_worked_points_match_torch():
    b = torch.tensor([-0.15])
    assert _torch_linear_1x1([1], 1, 1.0, 0.1, 0.1, 50, b, per_channel=True).tolist() == [50]
    assert _torch_linear_1x1([1], 1, 1.0, 0.1, 0.1, 50, b, per_channel=False).tolist() == [49]
    # ties to even + zero point after rounding (mult = 0.5), and the ReLU floor
    out = _torch_linear_1x1([1, 3, 5, -1, -3, -5], 1, 0.5, 1.0, 1.0, 11, None, per_channel=False)
    assert out.tolist() == [11, 13, 13, 11, 9, 9]
    out = _torch_linear_1x1([-2, -1, 0, 1], 1, 1.0, 1.0, 1.0, 7, None, per_channel=False, relu=True)
    assert out.tolist() == [7, 7, 7, 8]


@requires_ao
def test_huge_multipliers_match_torch():
    # |v| beyond the int32 range: torch gives 0 (cvtps2dq's -2**31), not 255.
    centred = [127, 100, 1, 0, -1, -128]
    for s_y in (1e-3, 1e-6, 1e-9, 2.0**-30):
        for relu in (False, True):
            ref = _torch_linear_1x1(centred, 127, 1.0, 1.0, s_y, 5, None, per_channel=False, relu=relu)
            acc = torch.tensor([[v * 127] for v in centred], dtype=I32)
            ours = requantize(acc, 1.0, 1.0, s_y, 5, axis=-1, relu=relu).flatten()
            assert_bit_exact(ours, ref, f"s_y={s_y} relu={relu}")


# ----------------------------------------------------------------------------------------------
# (3) properties
# ----------------------------------------------------------------------------------------------
scales = st.floats(1e-4, 1.0).map(lambda v: float(np.float32(v)))


@given(s_x=scales, s_w=scales, s_y=scales, z_y=st.integers(0, 255), seed=st.integers(0, 2**16))
def test_monotone_in_acc_and_relu_is_max(s_x, s_w, s_y, z_y, seed):
    # |acc| < 2**16 and mult <= 1e4 keep |v| < 2**31 (beyond it fbgemm's result drops to 0, see above)
    acc = torch.sort(torch.randint(-(2**16), 2**16, (200,), generator=torch.Generator().manual_seed(seed))).values
    y = requantize(acc.to(I32), s_x, s_w, s_y, z_y, axis=0)
    assert bool((y[1:] >= y[:-1]).all())
    y_relu = requantize(acc.to(I32), s_x, s_w, s_y, z_y, axis=0, relu=True)
    assert_bit_exact(y_relu, torch.clamp(y, min=z_y), "relu = max(y, z_y)")


@given(seed=st.integers(0, 2**16), s_x=scales, s_y=scales)
def test_per_channel_equals_per_tensor_per_slice_without_bias(seed, s_x, s_y):
    gen = torch.Generator().manual_seed(seed)
    acc = torch.randint(-(2**16), 2**16, (2, 3, 4), generator=gen).to(I32)
    s_w = torch.rand(3, generator=gen, dtype=torch.float64) * 0.01 + 1e-4
    y = requantize(acc, s_x, s_w, s_y, 3, axis=1)
    for c in range(3):
        assert_bit_exact(y[:, c], requantize(acc[:, c], s_x, float(s_w[c]), s_y, 3, axis=0), f"channel {c}")


def _float64_reference(acc, s_x, s_w, s_y, z_y, bias, qmin, qmax):
    """rint((acc + b / (s_x s_w)) * s_x s_w / s_y) + z_y in float64 from the float32 scales, clamped."""
    s = torch.tensor(s_x, dtype=torch.float32).double() * s_w.float().double()
    real = acc.double() + (bias.double() / s if bias is not None else 0.0)
    return (torch.round(real * s / torch.tensor(s_y, dtype=torch.float32).double()) + z_y).clamp(qmin, qmax)


def fixed_point_vs_float64(n_layers: int, seed: int, with_bias: bool, log2_magnitude: int | None = None):
    """(max |diff|, mismatches, total) of the integer-only recipe against the float64 reference, on
    layers whose accumulators have ``log2_magnitude`` bits (random in 8..24 if None) and whose
    outputs spread over 30..250 units (so M < 1)."""
    gen = torch.Generator().manual_seed(seed)
    worst, bad, total = 0, 0, 0
    for _ in range(n_layers):
        bits = log2_magnitude if log2_magnitude is not None else int(torch.randint(8, 25, (), generator=gen))
        c, magnitude = 8, 2**bits
        acc = torch.randint(-magnitude, magnitude, (64, c), generator=gen).to(I32)
        s_x = float(torch.rand(1, generator=gen)) * 0.1 + 1e-3
        s_w = torch.rand(c, generator=gen, dtype=torch.float64) * 0.01 + 1e-4
        spread = float(torch.rand(1, generator=gen)) * 220 + 30
        s_y = float(s_x * s_w.max()) * magnitude / spread
        bias = torch.randn(c, generator=gen) * s_y * 30 if with_bias else None
        y = requantize_integer_only(acc, s_x, s_w, s_y, 128, bias, axis=1, dtype=torch.uint8)
        ref = _float64_reference(acc, s_x, s_w, s_y, 128, bias, 0, 255)
        diff = (y.double() - ref).abs()
        worst, bad, total = max(worst, int(diff.max())), bad + int((diff > 0).sum()), total + diff.numel()
    return worst, bad, total


# Measured mismatch rates against the exactly rounded float64 result (50 layers x 512 outputs each,
# seed 0, no bias). The max difference is always 1 LSB. The rate falls with the accumulator's size
# because SaturatingRoundingDoublingHighMul rounds ``acc * M0 / 2**31`` to an integer before the
# final RoundingDivideByPOT: for small ``acc`` (few bits) that first rounding is coarse relative to
# the output unit (TFLite's double rounding; e.g. x = 10.3 with shift -1: round(20.6) = 21, then
# 21 / 2 = 10.5 -> 11).
MEASURED_FIXED_POINT_RATES = {8: 0.1205, 12: 0.01195, 16: 0.00082, 20: 3.9e-5, 24: 0.0}


def test_fixed_point_within_one_lsb_of_float64():
    for bits, rate in MEASURED_FIXED_POINT_RATES.items():
        for with_bias in (False, True):
            worst, bad, total = fixed_point_vs_float64(50, seed=0, with_bias=with_bias, log2_magnitude=bits)
            assert worst <= 1, (bits, with_bias, worst)
            assert bad / total <= 1.5 * rate + 2e-4, (bits, with_bias, bad, total)
    # The fbgemm float32 recipe on a similar layer (|acc| < 2**12) differs from float64 only where the
    # exact value sits within float32 rounding of a tie (measured: 5 of 32,768, e.g. -512 * M =
    # -12.5000006 -> -13 in float64, -12 with mult rounded to float32).
    gen = torch.Generator().manual_seed(1)
    acc = torch.randint(-(2**12), 2**12, (4096, 8), generator=gen).to(I32)
    s_w = torch.rand(8, generator=gen, dtype=torch.float64) * 0.01 + 1e-4
    s_y = float(0.05 * s_w.max()) * 2**12 / 100
    y = requantize(acc, 0.05, s_w, s_y, 128, axis=1)
    differ = y.double() != _float64_reference(acc, 0.05, s_w, s_y, 128, None, 0, 255)
    m = torch.tensor(0.05).double() * s_w.float().double() / torch.tensor(s_y).float().double()
    exact = acc.double() * m
    assert int(differ.sum()) <= 8
    assert bool(((exact[differ] - exact[differ].floor() - 0.5).abs() < 1e-5).all())


@given(seed=st.integers(0, 2**16), with_bias=st.booleans())
def test_fixed_point_within_one_lsb_property(seed, with_bias):
    worst, _, _ = fixed_point_vs_float64(2, seed=seed, with_bias=with_bias)
    assert worst <= 1


@given(m=st.floats(2.0**-31, 2.0**20))
def test_quantize_multiplier_relative_error(m):
    m0, shift = quantize_multiplier(m)
    assert 2**30 <= int(m0) < 2**31
    approx = int(m0) * 2.0 ** (int(shift) - 31)
    assert abs(approx - m) <= m * 2.0**-31


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
def test_bad_inputs():
    acc = acc_of(1, 2)
    with pytest.raises(ValueError, match="acc must be a torch.int32 tensor"):
        requantize(torch.tensor([1.0]), 1.0, 1.0, 1.0, 0)
    with pytest.raises(ValueError, match="acc must be a torch.int32 tensor"):
        requantize_fixed_point(acc.long(), 1, 0, 0)
    with pytest.raises(ValueError, match="acc must be a torch.int32 tensor with at least one dimension"):
        requantize(torch.tensor(1, dtype=I32), 1.0, 1.0, 1.0, 0)
    with pytest.raises(ValueError, match="dtype must be torch.uint8 or torch.int8"):
        requantize(acc, 1.0, 1.0, 1.0, 0, axis=0, dtype=torch.int32)
    with pytest.raises(ValueError, match="axis must be a dimension of acc"):
        requantize(acc, 1.0, 1.0, 1.0, 0, axis=1)
    with pytest.raises(ValueError, match="y_zero_point must lie in"):
        requantize(acc, 1.0, 1.0, 1.0, 256, axis=0)
    with pytest.raises(ValueError, match="x_scale must be positive and finite"):
        requantize(acc, 0.0, 1.0, 1.0, 0, axis=0)
    with pytest.raises(ValueError, match="y_scale must be positive and finite"):
        requantize(acc, 1.0, 1.0, -1.0, 0, axis=0)
    with pytest.raises(ValueError, match=r"w_scale must be a 1-D tensor with one entry per channel \(2\)"):
        requantize(acc, 1.0, torch.ones(3), 1.0, 0, axis=0)
    with pytest.raises(ValueError, match="bias must be None or a 1-D float tensor"):
        requantize(acc, 1.0, 1.0, 1.0, 0, torch.ones(3), axis=0)
    with pytest.raises(ValueError, match="bias must be None or a 1-D float tensor"):
        requantize(acc, 1.0, 1.0, 1.0, 0, torch.ones(2, dtype=torch.int32), axis=0)
    with pytest.raises(ValueError, match="real_multiplier must be non-negative and finite"):
        quantize_multiplier(-0.5)
    with pytest.raises(ValueError, match="multiplier must be an integer"):
        requantize_fixed_point(acc, 0.5, 0, 0, axis=0)
    with pytest.raises(ValueError, match=r"shift must lie in \[-31, 31\]"):
        requantize_fixed_point(acc, 2**30, 40, 0, axis=0)
    with pytest.raises(ValueError, match=r"multiplier must be 0-d or 1-D with one entry per channel \(2\)"):
        requantize_fixed_point(acc, torch.ones(3, dtype=I32), 0, 0, axis=0)
    with pytest.raises(ValueError, match="bias_int must be None or an int32 tensor"):
        requantize_fixed_point(acc, 2**30, 0, 0, torch.ones(2), axis=0)
    with pytest.raises(ValueError, match="bias must be a 1-D float tensor"):
        quantize_bias(torch.ones(2, dtype=torch.int32), 1.0, 1.0)
