"""minqat.qparams: the integer range and the observers' (scale, zero_point) rule (numerics.md §3.1, §3.3).

Three kinds of test: hand-worked values (expected numbers computed here with numpy float32, never with
the code under test), live parity with torch.ao (atol=0, dtype included), and oracle-free properties.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from minqat.dtypes import dtype_range, plain_dtype
from minqat.qparams import (
    FLOAT32_EPS,
    PER_CHANNEL_QSCHEMES,
    PER_TENSOR_QSCHEMES,
    SYMMETRIC_QSCHEMES,
    calculate_qmin_qmax,
    calculate_qparams,
)
from tests.oracle import ao, assert_bit_exact, requires_ao

F32 = np.float32
EPS = 2.0**-23
LEGACY = [d for d in (getattr(torch, n, None) for n in ("quint8", "qint8", "qint32")) if d is not None]
DTYPES = [torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32, *LEGACY]


def qp(min_val, max_val, quant_min=0, quant_max=255, qscheme=torch.per_tensor_affine, dtype=torch.uint8,
       eps=FLOAT32_EPS, custom=False):
    """calculate_qparams on Python numbers / lists."""
    return calculate_qparams(torch.tensor(min_val, dtype=torch.float32), torch.tensor(max_val, dtype=torch.float32),
                             quant_min, quant_max, qscheme, dtype, eps, custom)


def f32(v) -> torch.Tensor:
    return torch.tensor(np.atleast_1d(np.asarray(v, dtype=F32)))


# ---------------------------------------------------------------------------------------------------
# hand-worked values
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "quant_min, quant_max, custom, dtype, reduce_range, expected",
    [
        (None, None, False, torch.uint8, False, (0, 255)),
        (None, None, False, torch.uint8, True, (0, 127)),
        (None, None, False, torch.int8, False, (-128, 127)),
        (None, None, False, torch.int8, True, (-64, 63)),
        (None, None, False, torch.int16, True, (-32768, 32767)),  # reduce_range only touches 8-bit
        (None, None, False, torch.uint16, False, (0, 65535)),
        (None, None, False, torch.int32, True, (-(2**31), 2**31 - 1)),
        (0, 255, True, torch.uint8, True, (0, 127)),  # floor halving of a custom range
        (-128, 127, True, torch.int8, True, (-64, 63)),
        (-127, 127, True, torch.int8, True, (-64, 63)),  # -127 // 2 == -64
        (-8, 7, True, torch.int8, True, (-4, 3)),
        (0, 15, True, torch.uint8, False, (0, 15)),
        (-1, 0, True, torch.int8, True, (-1, 0)),
        (3, 4, False, torch.uint8, False, (0, 255)),  # no custom range: the given values are ignored
    ],
)
def test_qmin_qmax_table(quant_min, quant_max, custom, dtype, reduce_range, expected):
    assert calculate_qmin_qmax(quant_min, quant_max, custom, dtype, reduce_range) == expected


def test_all_zero_gives_eps_scale():
    """numerics §3.3 edge case: all-zero input -> scale 2^-23 (eps), zp 0 affine / 128 symmetric uint8."""
    scale, zp = qp(0.0, 0.0)
    assert_bit_exact(scale, f32(EPS), "affine scale")
    assert_bit_exact(zp, torch.tensor([0], dtype=torch.int32), "affine zp")
    scale, zp = qp(0.0, 0.0, qscheme=torch.per_tensor_symmetric)
    assert_bit_exact(scale, f32(EPS), "symmetric scale")
    assert_bit_exact(zp, torch.tensor([128]), "symmetric zp (int64)")


def test_constant_three():
    """Constant 3.0: affine scale fl32(3/255), zp 0; symmetric fl32(3/127.5), zp 128 (127 custom range)."""
    scale, zp = qp(3.0, 3.0)
    assert_bit_exact(scale, f32(F32(3) / F32(255)), "affine scale")
    assert_bit_exact(zp, torch.tensor([0], dtype=torch.int32), "affine zp")
    scale, zp = qp(3.0, 3.0, qscheme=torch.per_tensor_symmetric)
    assert_bit_exact(scale, f32(F32(3) / F32(127.5)), "symmetric scale")
    assert_bit_exact(zp, torch.tensor([128]), "default-range zp")
    _, zp = qp(3.0, 3.0, qscheme=torch.per_tensor_symmetric, custom=True)
    assert_bit_exact(zp, torch.tensor([127]), "custom-range zp: (0 + 255) // 2")
    _, zp = qp(3.0, 3.0, 0, 15, qscheme=torch.per_tensor_symmetric, custom=True)
    assert_bit_exact(zp, torch.tensor([7]), "custom [0, 15] zp")


def test_constant_minus_three_zero_point_at_top():
    scale, zp = qp(-3.0, -3.0)
    s = F32(3) / F32(255)
    assert_bit_exact(scale, f32(s), "scale")
    assert np.rint(F32(-3) / s) == -255  # hand check of the division
    assert_bit_exact(zp, torch.tensor([255], dtype=torch.int32), "zp = 0 - (-255)")


@pytest.mark.parametrize("mn, expected_zp", [(-2.5, 2), (-3.5, 4), (-0.5, 0), (-1.5, 2)])
def test_affine_zero_point_ties_to_even(mn, expected_zp):
    """scale = 15.9375 / 255 = 1/16 exactly; mn / scale = mn * 16 ... chosen so mn/scale = mn_k.5:
    rint rounds half to even (floor(x + 0.5) or half-away would give another zero point)."""
    mn_val = mn / 16
    mx_val = 15.9375 + mn_val
    scale, zp = qp(mn_val, mx_val)
    assert_bit_exact(scale, f32(0.0625), "scale")
    assert_bit_exact(zp, torch.tensor([expected_zp], dtype=torch.int32), "zp")


def test_affine_zero_point_is_clamped():
    """All data negative beyond the grid's reach cannot happen (0 is included), but a tiny range with
    eps-clamped scale can push mn / scale below -(qmax - qmin): zp is clamped to quant_max."""
    scale, zp = qp(-1e-5, 0.0, 0, 15, custom=True)  # (0 - -1e-5) / 15 > eps: no clamp
    assert_bit_exact(scale, f32(F32(1e-5) / F32(15)), "scale")
    assert_bit_exact(zp, torch.tensor([15], dtype=torch.int32), "zp at the top")
    scale, zp = qp(-1e-7, 0.0, 0, 255)  # 1e-7/255 < eps -> scale = eps, mn/eps = -0.84 -> zp 1
    assert_bit_exact(scale, f32(EPS), "eps scale")
    assert_bit_exact(zp, torch.tensor([int(-np.rint(F32(-1e-7) / F32(EPS)))], dtype=torch.int32), "zp")


@pytest.mark.parametrize(
    "quant_min, quant_max, dtype, custom, divisor, zp",
    [
        (-128, 127, torch.int8, False, 127.5, 0),
        (-127, 127, torch.int8, True, 127.0, 0),  # narrow range: divisor 127
        (-64, 63, torch.int8, False, 63.5, 0),
        (0, 255, torch.uint8, False, 127.5, 128),
        (0, 65535, torch.uint16, True, 32767.5, 32768),  # uint16: 2^15 even with a custom range
        (-8, 7, torch.int8, True, 7.5, 0),
    ],
)
def test_symmetric_divisor(quant_min, quant_max, dtype, custom, divisor, zp):
    scale, zero_point = qp(-1.0, 0.25, quant_min, quant_max, torch.per_tensor_symmetric, dtype, custom=custom)
    assert_bit_exact(scale, f32(F32(1) / F32(divisor)), "scale = max(|mn|, mx) / divisor")
    assert_bit_exact(zero_point, torch.tensor([zp]), "zp")


def test_symmetric_tiny_range_is_clamped_to_eps():
    scale, _ = qp([-1e-10, 0.0], [0.0, 2e-10], -128, 127, torch.per_channel_symmetric, torch.int8)
    assert_bit_exact(scale, f32([EPS, EPS]), "scale")
    scale, _ = qp([-1e-10], [0.0], -128, 127, torch.per_channel_symmetric, torch.int8, eps=2.0**-12)
    assert_bit_exact(scale, f32([2.0**-12]), "custom eps")


def test_float_qparams():
    """No zero inclusion; scale 1.0 where <= eps; zero point = -min / scale, a float."""
    scale, zp = qp([-1.0, 2.0, 5.0], [3.0, 2.0, 6.0], 0, 255, torch.per_channel_affine_float_qparams)
    s0, s2 = F32(4) / F32(255), F32(1) / F32(255)
    assert_bit_exact(scale, f32([s0, 1.0, s2]), "scale")
    assert_bit_exact(zp, f32([F32(1) / s0, F32(-2) / F32(1), F32(-5) / s2]), "zero point")


def test_per_tensor_results_have_shape_one_and_torch_dtypes():
    for qscheme, dtype in ((torch.per_tensor_affine, torch.int32), (torch.per_tensor_symmetric, torch.int64)):
        scale, zp = qp(-1.0, 1.0, qscheme=qscheme)
        assert scale.shape == (1,) and scale.dtype == torch.float32
        assert zp.shape == (1,) and zp.dtype == dtype


def test_non_finite_propagates():
    scale, _ = qp([0.0, float("nan")], [float("inf"), 1.0], 0, 255, torch.per_channel_affine)
    assert scale[0] == float("inf") and torch.isnan(scale[1])


# ---------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, match",
    [
        ((1, 255, True, torch.uint8, False), r"must contain 0 \(quant_min <= 0 <= quant_max\), got quant_min=1"),
        ((-5, -1, True, torch.int8, False), r"must contain 0"),
        ((0, 0, True, torch.uint8, False), r"quant_min must be less than quant_max, got quant_min=0, quant_max=0"),
        ((-128, 128, True, torch.int8, False), r"the custom range \[-128, 128\] has 257 levels, more than torch.int8 holds \(256\)"),
        ((0, 256, True, torch.uint8, False), r"has 257 levels, more than torch.uint8 holds \(256\)"),
        ((0, 1, True, torch.uint8, True), r"reduce_range halves the custom range \[0, 1\] to \[0, 0\]"),
        ((0.0, 255, True, torch.uint8, False), r"quant_min must be an integer, got 0.0"),
        ((0, 2**31, True, torch.int32, False), r"quant_max must lie in the int32 range"),
        ((None, None, False, torch.float32, False), r"dtype must be one of .*, got torch.float32"),
    ],
)
def test_qmin_qmax_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        calculate_qmin_qmax(*args)


def test_calculate_qparams_bad_input():
    with pytest.raises(ValueError, match=r"qscheme must be one of torch.per_tensor_affine, .*, got 'affine'"):
        qp(0.0, 1.0, qscheme="affine")
    with pytest.raises(ValueError, match=r"dtype must be one of"):
        qp(0.0, 1.0, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"min_val and max_val must have the same shape, got \(2,\) and \(3,\)"):
        qp([0.0, 0.0], [1.0, 1.0, 1.0], qscheme=torch.per_channel_affine)
    with pytest.raises(ValueError, match=r"per_channel_affine_float_qparams needs 1-d \(per-channel\)"):
        qp(0.0, 1.0, qscheme=torch.per_channel_affine_float_qparams)


# ---------------------------------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------------------------------


@st.composite
def custom_ranges(draw, dtype):
    """Valid custom ranges for ``dtype``: the named ones of numerics.md and random ones containing 0."""
    lo, hi = dtype_range(dtype)
    named = [(lo, hi), (-127, 127), (-8, 7), (0, 15), (-1, 1), (0, 1), (-64, 63), (0, 127), (-(2**15), 2**15 - 1)]
    named = [(a, b) for a, b in named if b - a <= hi - lo]
    if draw(st.booleans()):
        return draw(st.sampled_from(named))
    levels = min(hi - lo, 2**16)
    quant_max = draw(st.integers(0, min(hi, levels)))
    quant_min = -draw(st.integers(0 if quant_max > 0 else 1, levels - quant_max))
    return quant_min, quant_max


@st.composite
def qconfigs(draw, qschemes=PER_TENSOR_QSCHEMES + PER_CHANNEL_QSCHEMES):
    """(dtype, qscheme, reduce_range, quant_min, quant_max) that both torch.ao and minqat accept."""
    dtype = draw(st.sampled_from(DTYPES))
    qscheme = draw(st.sampled_from(qschemes))
    reduce_range = draw(st.booleans())
    quant_min, quant_max = draw(st.one_of(st.just((None, None)), custom_ranges(plain_dtype(dtype))))
    collapses = (quant_min, quant_max) == (0, 1)
    if collapses or (plain_dtype(dtype) == torch.uint8 and qscheme in SYMMETRIC_QSCHEMES):
        reduce_range = False  # minqat rejects these (a collapsed range / zp 128 outside [0, 127])
    return dtype, qscheme, reduce_range, quant_min, quant_max


_POOL = np.array([0.0, -0.0, 1e-45, 1e-40, 1e-38, 1e-7, 2.0**-23, 0.1, 1.0, 3.0, 127.5, 1e5, 1e30, 3.0e38,
                  3.4028235e38, np.inf, np.nan], dtype=np.float32)


@st.composite
def min_max_pairs(draw, channels):
    """float32 (min, max) vectors with min <= max (or a NaN), from adversarial magnitudes."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pick = rng.random((2, channels)) < 0.6
    pool = _POOL[rng.integers(0, len(_POOL), (2, channels))] * rng.choice([-1, 1], (2, channels))
    normal = (rng.standard_normal((2, channels)) * 10.0 ** rng.uniform(-8, 8, (2, channels))).astype(F32)
    v = np.where(pick, pool, normal).astype(F32)
    if draw(st.booleans()):  # some equal pairs (constant channels)
        v[1, ::2] = v[0, ::2]
    lo, hi = np.fmin(v[0], v[1]), np.fmax(v[0], v[1])
    nan = np.isnan(v[0]) | np.isnan(v[1])
    lo, hi = np.where(nan, v[0], lo), np.where(nan, v[1], hi)
    return torch.from_numpy(lo.astype(F32)), torch.from_numpy(hi.astype(F32))


# ---------------------------------------------------------------------------------------------------
# parity with torch.ao
# ---------------------------------------------------------------------------------------------------


def _ao_observer(dtype, qscheme, reduce_range, quant_min, quant_max, eps=FLOAT32_EPS):
    tq = ao()
    cls = tq.PerChannelMinMaxObserver if qscheme in PER_CHANNEL_QSCHEMES else tq.MinMaxObserver
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(dtype=dtype, qscheme=qscheme, reduce_range=reduce_range, quant_min=quant_min,
                   quant_max=quant_max, eps=eps)


@requires_ao
@given(config=qconfigs())
def test_qmin_qmax_parity(config):
    dtype, qscheme, reduce_range, quant_min, quant_max = config
    from torch.ao.quantization.utils import calculate_qmin_qmax as ao_calculate_qmin_qmax

    custom = quant_min is not None
    expected = ao_calculate_qmin_qmax(quant_min, quant_max, custom, dtype, reduce_range)
    assert calculate_qmin_qmax(quant_min, quant_max, custom, dtype, reduce_range) == expected
    obs = _ao_observer(dtype, qscheme, reduce_range, quant_min, quant_max)
    assert (obs.quant_min, obs.quant_max) == expected


@requires_ao
@given(config=qconfigs(), data=st.data(), eps=st.sampled_from([FLOAT32_EPS, 2.0**-12, 1e-3]))
def test_calculate_qparams_parity(config, data, eps):
    dtype, qscheme, reduce_range, quant_min, quant_max = config
    per_channel = qscheme in PER_CHANNEL_QSCHEMES
    min_val, max_val = data.draw(min_max_pairs(data.draw(st.integers(1, 12))))
    if not per_channel:
        min_val, max_val = min_val[0], max_val[0]  # 0-d, like a per-tensor observer's buffers
    obs = _ao_observer(dtype, qscheme, reduce_range, quant_min, quant_max, eps)
    expected = obs._calculate_qparams(min_val, max_val)
    custom = quant_min is not None
    for eps_arg in (eps, obs.eps):  # a Python float or the observer's buffer
        actual = calculate_qparams(min_val, max_val, obs.quant_min, obs.quant_max, qscheme, dtype, eps_arg, custom)
        assert_bit_exact(actual[0], expected[0], "scale")
        assert_bit_exact(actual[1], expected[1], "zero_point")


# ---------------------------------------------------------------------------------------------------
# properties (no oracle)
# ---------------------------------------------------------------------------------------------------


@given(config=qconfigs(), data=st.data())
def test_per_channel_equals_per_tensor_per_slice(config, data):
    dtype, qscheme, reduce_range, quant_min, quant_max = config
    assume(qscheme != torch.per_channel_affine_float_qparams)
    custom = quant_min is not None
    quant_min, quant_max = calculate_qmin_qmax(quant_min, quant_max, custom, dtype, reduce_range)
    min_val, max_val = data.draw(min_max_pairs(6))
    scale, zp = calculate_qparams(min_val, max_val, quant_min, quant_max, qscheme, dtype, FLOAT32_EPS, custom)
    for c in range(6):
        s, z = calculate_qparams(min_val[c], max_val[c], quant_min, quant_max, qscheme, dtype, FLOAT32_EPS, custom)
        assert_bit_exact(scale[c : c + 1], s, f"scale of channel {c}")
        assert_bit_exact(zp[c : c + 1], z, f"zero point of channel {c}")


@given(data=st.data(), config=qconfigs(qschemes=(torch.per_channel_affine, torch.per_channel_symmetric)))
def test_grid_covers_the_range(data, config):
    """For finite ranges: scale >= eps; affine: zp in [quant_min, quant_max] and the grid
    [(quant_min - zp) * scale, (quant_max - zp) * scale] reaches min(min_val, 0) and max(max_val, 0)
    up to one step (the zero point is rounded); symmetric: scale * (quant_max - quant_min) / 2 reaches
    max(|min_val|, max_val). Both up to a float32 rounding."""
    dtype, qscheme, reduce_range, quant_min, quant_max = config
    custom = quant_min is not None
    quant_min, quant_max = calculate_qmin_qmax(quant_min, quant_max, custom, dtype, reduce_range)
    assume(quant_max - quant_min <= 2**16)  # torch's int32 zero point overflows on the full int32 range
    min_val, max_val = data.draw(min_max_pairs(8))
    finite = torch.isfinite(min_val) & torch.isfinite(max_val) & (max_val.double() - min_val.double() < 1e38)
    min_val, max_val = min_val[finite], max_val[finite]
    scale, zp = calculate_qparams(min_val, max_val, quant_min, quant_max, qscheme, dtype, FLOAT32_EPS, custom)
    assert bool((scale >= FLOAT32_EPS).all())
    s, z = scale.double(), zp.double()
    mn, mx = torch.clamp(min_val.double(), max=0), torch.clamp(max_val.double(), min=0)
    rounding = 1 - 1e-6
    if qscheme == torch.per_channel_symmetric:
        assert bool((s * (quant_max - quant_min) / 2 >= torch.max(-mn, mx) * rounding).all())
        return
    assert bool(((zp >= quant_min) & (zp <= quant_max)).all())
    assert bool(((quant_min - z) * s * rounding <= mn + s).all())
    assert bool(((quant_max - z) * s >= (mx - s) * rounding).all())
