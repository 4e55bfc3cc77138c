"""LSQ learnable fake quantization (minqat.functional.learnable), forward and all three gradients.

(1) hand-worked golden values in each region (below / inside / above) and at torch's quirks,
(2) live parity with torch._fake_quantize_learnable_per_{tensor,channel}_affine, atol=0 for the output
and for dX, dScale, dZeroPoint (numerics.md §2.5), (3) oracle-free properties: the STE derivation in
float64 autograd, gradcheck where LSQ's gradient is the true derivative, per channel == per tensor per
slice, grad_factor as the last product; plus the recorded golden vectors (replayed without torch.ao)
and every error message.

A note on float64. torch's backward refuses anything but float32 (TORCH_CHECK on X, dY, scale and
zero_point) and minqat mirrors it. Nor could a float64 finite-difference gradcheck confirm most of LSQ:
the forward is piecewise constant in x and z, so finite differences see 0 where LSQ's straight-through
estimator defines dx = dy and dz = -dy*s. Hence (a) gradcheck runs in float64 through a float32 cast
on power-of-two data, restricted to clipped inputs where y = (q_bound - z)*s is smooth and LSQ's
gradient is the true derivative; (b) the STE terms are checked against float64 autograd through an
explicit STE graph (the paper's definition), away from rounding ties.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from minqat.functional.fake_quantize import fake_quantize_per_tensor_affine
from minqat.functional.learnable import (
    fake_quantize_learnable_per_channel_affine as lsq_per_channel,
    fake_quantize_learnable_per_tensor_affine as lsq_per_tensor,
)
from tests.oracle import HAS_AO, assert_bit_exact, requires_ao
from tests.strategies import adversarial_values, quant_ranges, shapes

NAN, INF = float("nan"), float("inf")
GOLDEN_FILE = Path(__file__).parent / "golden" / "learnable.pt"

requires_lsq = pytest.mark.skipif(
    not (HAS_AO and hasattr(torch, "_fake_quantize_learnable_per_tensor_affine")),
    reason="torch._fake_quantize_learnable_* is missing; the golden-vector tests still prove parity",
)

# float32 scales in [1e-8, 1e4] (1e-8 is no float32, which st.floats(width=32) rejects as a bound).
scales = st.one_of(
    st.floats(1e-8, 1e4).map(lambda v: float(np.float32(v))),
    st.sampled_from([1e-8, 2.0**-20, 0.1, 0.5, 1.0, 1.0 / 3.0, 2.0, 1e4]),
)
# torch's backward needs quant_min <= 0 <= quant_max.
ranges_with_zero = quant_ranges().filter(lambda r: r[0] <= 0 <= r[1])
# .5 exercises half-to-even (forward) against half-up (per-tensor backward).
zp_fractions = st.sampled_from([0.0, 0.0, 0.5, -0.5, 0.25, -0.75, 0.4999999])
grad_factors = st.one_of(st.sampled_from([1.0, 0.5, 1e-3, 3.7]), st.floats(1e-4, 10.0))


def run(fn, x, scale, zero_point, *args, dy=None):
    """``(y, dx, dscale, dzero_point)`` of ``fn(x, scale, zero_point, *args)`` for upstream ``dy``."""
    x, scale, zero_point = (t.detach().clone().requires_grad_() for t in (x, scale, zero_point))
    y = fn(x, scale, zero_point, *args)
    y.backward(torch.ones_like(y) if dy is None else dy)
    return y.detach(), x.grad, scale.grad, zero_point.grad


def assert_same(actual, expected, what):
    for name, a, e in zip(("y", "dx", "dscale", "dzero_point"), actual, expected):
        assert_bit_exact(a, e, f"{what}: {name}")


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# (1) hand-worked golden values. Common setting: scale s = 0.5 (inv = 2, exact), zero_point = 2.5,
# range [-8, 7], dy = 2, grad_factor g = 0.25. The forward zero point is rint(2.5) = 2 (half to
# even); the per-tensor backward zero point is trunc(2.5 + 0.5) = 3 (half up).
# ----------------------------------------------------------------------------------------------
S, ZP, QMIN, QMAX, DY, G = t(0.5), t(2.5), -8, 7, t(2.0), 0.25


def lsq_hand(x):
    return run(lsq_per_tensor, t(x), S, ZP, QMIN, QMAX, G, dy=DY)


def test_golden_inside():
    # x = fl32(1.2) = 10066330 * 2**-23.  Forward: rint(1.2 * 2) + 2 = 4, y = (4 - 2) * 0.5 = 1.0.
    # Backward: x_int = rint(fma(1.2, 2, 3)) = rint(5.4) = 5, inside [-8, 7]  ->  dx = dy = 2, dz = 0.
    # x_fq - x = fma(5 - 3, 0.5, -1.2) = 1 - 1.2 = -1677722 * 2**-23 (exact: 10066330 - 8388608);
    # dscale = ((2 * -1677722*2**-23) * 2) * 0.25 = -1677722 * 2**-23 (all power-of-two products, exact).
    y, dx, ds, dz = lsq_hand(1.2)
    assert_same((y, dx, ds, dz), (t(1.0), t(2.0), t(-1677722 * 2.0**-23), t(0.0)), "inside")


def test_golden_below():
    # x = -10: forward rint(-20) + 2 = -18 < -8  ->  y = (-8 - 2) * 0.5 = -5.
    # Backward: x_int = rint(-20 + 3) = -17 < -8: dx = 0, dscale = dy * (qmin - 3) * g = 2 * -11 * 0.25
    # = -5.5, dzero_point = -dy * s * g = -2 * 0.5 * 0.25 = -0.25.
    assert_same(lsq_hand(-10.0), (t(-5.0), t(0.0), t(-5.5), t(-0.25)), "below")


def test_golden_above():
    # x = 10: forward 20 + 2 = 22 > 7  ->  y = (7 - 2) * 0.5 = 2.5.  Backward: x_int = 23 > 7: dx = 0,
    # dscale = 2 * (7 - 3) * 0.25 = 2.0, dzero_point = -0.25.
    assert_same(lsq_hand(10.0), (t(2.5), t(0.0), t(2.0), t(-0.25)), "above")


def test_golden_three_regions_sum():
    # One call over the three points: dscale and dzero_point are the sums of the cases above.
    # torch.sum of (-1677722*2**-23, -5.5, 2.0): -0.2000000477 - 5.5 = -5.7000000477 -> fl32 -> + 2.
    y, dx, ds, dz = run(lsq_per_tensor, t(1.2, -10.0, 10.0), S, ZP, QMIN, QMAX, G, dy=t(2.0, 2.0, 2.0))
    assert_same((y, dx), (t(1.0, -5.0, 2.5), t(2.0, 0.0, 0.0)), "three regions")
    expected_ds = (np.float32(-1677722 * 2.0**-23) + np.float32(-5.5)) + np.float32(2.0)
    assert_bit_exact(ds, t(float(expected_ds)), "three regions: dscale")
    assert_bit_exact(dz, t(-0.5), "three regions: dzero_point")


def test_golden_forward_and_backward_zero_points_disagree():
    # x = 2.25: forward rint(4.5) = 4 (even) + 2 = 6 <= 7: not clipped, y = (6 - 2) * 0.5 = 2.0.
    # Backward: x_int = rint(4.5 + 3) = rint(7.5) = 8 > 7: counted ABOVE, so dx = 0 although the forward
    # did not clip; dscale = 2 * (7 - 3) * 0.25 = 2.0, dzero_point = -0.25 (torch, numerics.md §2.5).
    assert_same(lsq_hand(2.25), (t(2.0), t(0.0), t(2.0), t(-0.25)), "zero point 2.5")


def test_golden_negative_integer_zero_point_quirk():
    # zero_point = -3, s = 1, range [-8, 7], x = 50, dy = 1, g = 1. Forward z = -3: y = (7 + 3) * 1 = 10.
    # Backward z' = trunc(-3 + 0.5) = trunc(-2.5) = -2 (torch truncates toward zero): dscale = 7 - (-2) = 9,
    # not 10. dzero_point = -1. Per channel, the backward uses z = -3: dscale = 10.
    assert_same(run(lsq_per_tensor, t(50.0), t(1.0), t(-3.0), -8, 7), (t(10.0), t(0.0), t(9.0), t(-1.0)), "zp -3")
    y, _, ds, _ = run(lsq_per_channel, t(50.0).reshape(1, 1), t(1.0), t(-3.0), 0, -8, 7)
    assert_bit_exact(ds, t(10.0), "per channel zp -3: dscale")


def test_golden_special_values_count_as_below():
    # s = 1, zero_point = 2.5 (forward 2, backward 3), range [-8, 7], dy = -1.
    # Forward (numerics §2.1): NaN -> (qmin - 2) = -10, +inf -> 7 - 2 = 5, -inf -> -10.
    # Backward: torch casts x_int to int64; NaN, +inf and 1e30 become INT64_MIN, i.e. BELOW the range:
    # dscale = -1 * (-8 - 3) = 11 each, dzero_point = -(-1) * 1 = 1 each; dx = -1 * 0 = -0.0.
    x = t(NAN, INF, -INF, 1e30)
    y, dx, ds, dz = run(lsq_per_tensor, x, t(1.0), t(2.5), -8, 7, dy=-torch.ones(4))
    assert_same((y, dx, ds, dz), (t(-10, 5, -10, 5), t(-0.0, -0.0, -0.0, -0.0), t(44.0), t(4.0)), "specials")


def test_golden_per_channel():
    # x (2, 2), axis 1, s = (0.1, 0.2), z = (0, 0), range [-8, 7], dy = 1.
    # column 0: 0.25 * fl32(1/0.1) = 2.5 -> rint 2 -> y = 2 * 0.1 = 0.2;  x_fq - x = fma(2, 0.1, -0.25)
    # column 1: 0.25 * 5 = 1.25 -> 1 -> y = 0.2;  x = 3.0 in row 1: 3 * 5 = 15 > 7 -> y = 7 * 0.2 = 1.4.
    # dscale_1 = (x_fq - x)/s (row 0) + (7 - 0) (row 1) = (0.2 - 0.25) * 5 + 7 = 6.75 (to float32 rounding).
    x = t(0.25, 0.25, 0.25, 3.0).reshape(2, 2)
    y, dx, ds, dz = run(lsq_per_channel, x, t(0.1, 0.2), t(0.0, 0.0), 1, -8, 7)
    torch.testing.assert_close(y, t(0.2, 0.2, 0.2, 1.4).reshape(2, 2), rtol=0, atol=1e-7)
    assert_bit_exact(dx, t(1.0, 1.0, 1.0, 0.0).reshape(2, 2), "dx")
    torch.testing.assert_close(ds, t(-1.0, 6.75), rtol=1e-6, atol=0)
    assert_bit_exact(dz, t(0.0, -0.2), "dzero_point")


def test_empty_input_gets_zero_qparam_gradients():
    # torch returns (X, scale, zero_point) itself as the gradients of an empty input; minqat returns zeros.
    y, dx, ds, dz = run(lsq_per_tensor, torch.empty(0, 3), t(0.5), t(1.0), -8, 7)
    assert y.shape == dx.shape == (0, 3)
    assert_same((ds, dz), (t(0.0), t(0.0)), "empty per tensor")
    _, _, ds, dz = run(lsq_per_channel, torch.empty(0, 3), t(1, 2, 3), t(0, 0, 0), 1, -8, 7)
    assert_same((ds, dz), (t(0, 0, 0), t(0, 0, 0)), "empty per channel")


def test_qparam_gradients_keep_the_qparam_shape():
    x = t(0.3, -9.0, 9.0)
    for scale, zp in ((torch.tensor(0.5), torch.tensor(1.0)), (t(0.5).reshape(1, 1), t(1.0).reshape(1, 1, 1))):
        _, _, ds, dz = run(lsq_per_tensor, x, scale, zp, -8, 7)
        assert ds.shape == scale.shape and dz.shape == zp.shape


# ----------------------------------------------------------------------------------------------
# (2) live parity with torch
# ----------------------------------------------------------------------------------------------
def _fill(values: torch.Tensor, shape) -> torch.Tensor:
    numel = math.prod(shape)
    reps = -(-numel // max(values.numel(), 1))
    return values.repeat(max(reps, 1))[:numel].reshape(shape)


def _upstream(shape, seed: int, ones: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.ones(shape) if ones else torch.randn(shape, generator=gen)


@st.composite
def per_tensor_cases(draw):
    qmin, qmax = draw(ranges_with_zero)
    scale = draw(scales)
    zp_int = draw(st.integers(qmin, qmax))
    zp = float(np.float32(zp_int + draw(zp_fractions)))
    seed = draw(st.integers(0, 2**16))
    x = _fill(adversarial_values(scale, zp_int, qmin, qmax, n=40, seed=seed),
              draw(shapes(min_dims=0, max_dims=4, max_side=6, allow_empty=False)))
    gf = draw(st.one_of(grad_factors, st.just(1 / math.sqrt(x.numel() * max(qmax, 1)))))  # the paper's g
    return x, t(scale), t(zp), qmin, qmax, gf, _upstream(x.shape, seed, draw(st.booleans()))


@requires_ao
@requires_lsq
@given(case=per_tensor_cases())
def test_per_tensor_matches_torch(case):
    x, scale, zp, qmin, qmax, gf, dy = case
    expected = run(torch._fake_quantize_learnable_per_tensor_affine, x, scale, zp, qmin, qmax, gf, dy=dy)
    assert_same(run(lsq_per_tensor, x, scale, zp, qmin, qmax, gf, dy=dy), expected, "per tensor")


@requires_ao
@requires_lsq
@given(qrange=ranges_with_zero, scale=scales, seed=st.integers(0, 2**16), half=st.sampled_from([0.5, -0.5]))
def test_per_tensor_elementwise_matches_torch(qrange, scale, seed, half):
    """Each element of dscale / dzero_point on its own (one-element calls): no sum hides a mismatch."""
    qmin, qmax = qrange
    zp_int = (qmin + qmax) // 2
    values = adversarial_values(scale, zp_int, qmin, qmax, n=4, seed=seed)
    zp = t(min(max(zp_int + half, qmin), qmax))
    for v in values:
        x, dy = v.reshape(1), torch.randn(1, generator=torch.Generator().manual_seed(seed))
        expected = run(torch._fake_quantize_learnable_per_tensor_affine, x, t(scale), zp, qmin, qmax, 0.3, dy=dy)
        assert_same(run(lsq_per_tensor, x, t(scale), zp, qmin, qmax, 0.3, dy=dy), expected, f"x={v.item()!r}")


@st.composite
def per_channel_cases(draw):
    qmin, qmax = draw(ranges_with_zero)
    shape = draw(shapes(min_dims=2, max_dims=4, max_side=5, allow_empty=False))  # torch's backward fails on 1-D
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    channels = shape[axis]
    scale = draw(st.lists(scales, min_size=channels, max_size=channels))
    zp_int = draw(st.lists(st.integers(qmin, qmax), min_size=channels, max_size=channels))
    zp = [float(np.float32(z + draw(zp_fractions))) for z in zp_int]
    seed = draw(st.integers(0, 2**16))
    moved = list(shape)
    moved.insert(0, moved.pop(axis % len(shape)))  # (C, rest...)
    rows = [_fill(adversarial_values(s, z, qmin, qmax, n=24, seed=seed + c), moved[1:])
            for c, (s, z) in enumerate(zip(scale, zp_int))]
    x = torch.stack(rows).movedim(0, axis)  # a permuted (non-contiguous) layout: sums follow x's layout
    if draw(st.booleans()):
        x = x.contiguous()
    gf = draw(st.one_of(grad_factors, st.just(1 / math.sqrt(x.numel() / channels * max(qmax, 1)))))
    return x, t(*scale), t(*zp), axis, qmin, qmax, gf, _upstream(x.shape, seed, draw(st.booleans()))


@requires_ao
@requires_lsq
@given(case=per_channel_cases())
def test_per_channel_matches_torch(case):
    x, scale, zp, axis, qmin, qmax, gf, dy = case
    expected = run(torch._fake_quantize_learnable_per_channel_affine, x, scale, zp, axis % x.dim(), qmin, qmax,
                   gf, dy=dy)
    assert_same(run(lsq_per_channel, x, scale, zp, axis, qmin, qmax, gf, dy=dy), expected, "per channel")


@requires_ao
@requires_lsq
@given(qrange=ranges_with_zero, scale=scales, zp=st.floats(-1.0, 1.0), frac=zp_fractions, seed=st.integers(0, 2**16))
def test_per_channel_elementwise_matches_torch(qrange, scale, zp, frac, seed):
    """Shape (N, 1) along axis 0: one channel per element, so dscale/dzero_point are per element."""
    qmin, qmax = qrange
    zp_int = round(qmin + (zp + 1) / 2 * (qmax - qmin))
    x = adversarial_values(scale, zp_int, qmin, qmax, n=40, seed=seed).reshape(-1, 1)
    scale_c, zp_c = torch.full((x.shape[0],), scale), torch.full((x.shape[0],), zp_int + frac)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    expected = run(torch._fake_quantize_learnable_per_channel_affine, x, scale_c, zp_c, 0, qmin, qmax, 0.7, dy=dy)
    assert_same(run(lsq_per_channel, x, scale_c, zp_c, 0, qmin, qmax, 0.7, dy=dy), expected, "elementwise")


# ----------------------------------------------------------------------------------------------
# (3) oracle-free properties
# ----------------------------------------------------------------------------------------------
def _away_from_ties(scale: float, zp: int, qmin: int, qmax: int, n: int, seed: int) -> torch.Tensor:
    """float32 x with x/s + z at least 0.05 away from every half-integer, over and beyond the range."""
    rng = np.random.default_rng(seed)
    k = rng.integers(qmin - zp - 4, qmax - zp + 5, size=n) + rng.uniform(-0.45, 0.45, size=n)
    return torch.from_numpy((k * scale).astype(np.float32))


def _ste_reference(x, scale, zp, qmin, qmax, gf, dy):
    """LSQ gradients by float64 autograd through the paper's STE graph (Esser et al. 2020, §2):
    round_ste(v) = v + (rint(v) - v).detach(); grad_scale(s, g) = (s - s*g).detach() + s*g."""
    x, scale, zp = (v.double().requires_grad_() for v in (x, scale, zp))
    round_ste = lambda v: v + (torch.round(v) - v).detach()  # noqa: E731
    s = (scale - scale * gf).detach() + scale * gf
    z = (zp - zp * gf).detach() + zp * gf
    z = round_ste(z)
    x_q = torch.clamp(round_ste(x / s + z), qmin, qmax)  # clamp's gradient: 1 on [qmin, qmax] inclusive
    ((x_q - z) * s).backward(dy.double())
    return x.grad, scale.grad, zp.grad


@given(qrange=quant_ranges(max_bits=8), scale=scales, zp=st.floats(0, 1), gf=grad_factors, seed=st.integers(0, 2**16))
def test_gradients_equal_float64_ste_autograd(qrange, scale, zp, gf, seed):
    """Elementwise (N, 1) per channel: dx exactly, dscale / dzero_point to float32 rounding (~5 ulp)."""
    qmin, qmax = qrange
    zp = round(qmin + zp * (qmax - qmin))
    x = _away_from_ties(scale, zp, qmin, qmax, 64, seed).reshape(-1, 1)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    scale_c, zp_c = torch.full((64,), scale), torch.full((64,), float(zp))
    _, dx, ds, dz = run(lsq_per_channel, x, scale_c, zp_c, 0, qmin, qmax, gf, dy=dy)
    dx_ref, ds_ref, dz_ref = _ste_reference(x, scale_c.reshape(-1, 1), zp_c.reshape(-1, 1), qmin, qmax, gf, dy)
    assert torch.equal(dx, dx_ref.float()), "dx"  # value equality: autograd's clipped zeros are all +0.0
    tol = 1e-6 * (dy.abs() * gf * (abs(qmax - zp) + abs(qmin - zp) + 1)).flatten().double() + 1e-30
    assert bool(((ds.double() - ds_ref.flatten()).abs() <= tol).all()), "dscale"
    torch.testing.assert_close(dz.double(), dz_ref.flatten(), rtol=1e-6, atol=0)


def test_gradcheck_where_lsq_is_the_true_derivative():
    """Clipped inputs: y = (q_bound - z) * s, so dy/ds = q_bound - z and dy/dx = 0 are true derivatives.

    float64 leaves cast to float32; s = 0.5, eps = 2**-10 and integer q_bound - z keep every
    perturbed forward and every finite difference exact, so the check is exact (atol = rtol = 0).
    """
    x = torch.tensor([-40.0, -9.5, 9.5, 40.0, 1e6], dtype=torch.float64, requires_grad=True)  # x/s beyond [-8, 7]
    s = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    zp = t(1.0)

    def f(x64, s64):
        return lsq_per_tensor(x64.float(), s64.float(), zp, -8, 7, 1.0).double()  # g = 1: the true derivative

    assert torch.autograd.gradcheck(f, (x, s), eps=2**-10, atol=0, rtol=0)


@given(seed=st.integers(0, 2**16), scale=scales, zp=st.integers(0, 15), gf=grad_factors)
def test_per_channel_equals_per_tensor_per_slice(seed, scale, zp, gf):
    """Non-negative integer zero points (where half-up == half-to-even): every slice is a per-tensor call."""
    values = adversarial_values(scale, zp, 0, 15, n=20, seed=seed)
    # finite and moderate: per channel maps +inf and huge values to quant_min, per tensor to quant_max
    x = _fill(values.nan_to_num(0.0, 0.0, 0.0).clamp(-1e6 * scale, 1e6 * scale), (3, 2, 7))
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    scale_c, zp_c = torch.full((2,), scale), torch.full((2,), float(zp))
    y, dx, ds, dz = run(lsq_per_channel, x, scale_c, zp_c, 1, 0, 15, gf, dy=dy)
    for c in range(2):
        xs, dys = x[:, c].contiguous(), dy[:, c].contiguous()
        ys, dxs, dss, dzs = run(lsq_per_tensor, xs, t(scale), t(float(zp)), 0, 15, gf, dy=dys)
        assert_same((y[:, c], dx[:, c]), (ys, dxs), f"slice {c}")
        torch.testing.assert_close(ds[c:c + 1], dss, rtol=2e-6, atol=1e-6 * float(dys.abs().sum()) * 16 * gf)
        torch.testing.assert_close(dz[c:c + 1], dzs, rtol=2e-6, atol=1e-6 * float(dys.abs().sum()) * scale * gf)


@given(seed=st.integers(0, 2**16), scale=scales, gf=grad_factors, frac=zp_fractions)
def test_grad_factor_is_the_last_product(seed, scale, gf, frac):
    """Elementwise: dscale(g) = fl32(dscale(1) * fl32(g)), same for dzero_point; y and dx ignore g."""
    x = adversarial_values(scale, 100, 0, 255, n=20, seed=seed).reshape(-1, 1)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    s, z = torch.full((x.shape[0],), scale), torch.full((x.shape[0],), 100 + frac)
    y1, dx1, ds1, dz1 = run(lsq_per_channel, x, s, z, 0, 0, 255, 1.0, dy=dy)
    yg, dxg, dsg, dzg = run(lsq_per_channel, x, s, z, 0, 0, 255, gf, dy=dy)
    assert_same((yg, dxg, dsg, dzg), (y1, dx1, ds1 * gf, dz1 * gf), f"g={gf}")


@given(seed=st.integers(0, 2**16), qrange=quant_ranges(), scale=scales, frac=zp_fractions)
def test_forward_is_fake_quant_with_the_rounded_zero_point(seed, qrange, scale, frac):
    """Including ranges without 0, which torch's backward refuses and minqat accepts."""
    qmin, qmax = qrange
    zp = min(max((qmin + qmax) // 2 + frac, qmin), qmax)
    x = adversarial_values(scale, round(zp), qmin, qmax, n=16, seed=seed)
    y, dx, _, _ = run(lsq_per_tensor, x, t(scale), t(zp), qmin, qmax)
    z = int(np.clip(np.rint(np.float32(zp)), qmin, qmax))  # rint: half to even
    assert_bit_exact(y, fake_quantize_per_tensor_affine(x, scale, z, qmin, qmax), "forward")
    assert set(dx.unique().tolist()) <= {0.0, 1.0}


def test_one_dimensional_per_channel_input():
    # torch's backward sums over an empty dim list, i.e. over everything, and then fails; minqat keeps
    # one gradient per channel = per element. Element 0 inside: (x_fq - x)/s = (1 - 1.25)/1 = -0.25;
    # element 1 above (9 > 7): 7 - 0 = 7.  dzero_point: 0 and -s = -2.
    x = t(1.25, 20.0)
    y, dx, ds, dz = run(lsq_per_channel, x, t(1.0, 2.0), t(0.0, 0.0), 0, -8, 7)
    assert_same((y, dx, ds, dz), (t(1.0, 14.0), t(1.0, 0.0), t(-0.25, 7.0), t(0.0, -2.0)), "1-D per channel")


@pytest.mark.cuda
def test_cuda_matches_cpu():
    """Same element-wise formulas on CUDA: y and dx bit-exact; the sums may add in another order."""
    x = _fill(adversarial_values(0.1, 3, -8, 7, n=64, seed=5), (4, 3, 27))
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    for fn, s, z, args in ((lsq_per_tensor, t(0.1), t(2.5), (-8, 7, 0.3)),
                           (lsq_per_channel, t(0.1, 0.2, 0.05), t(2.5, -3.0, 0.0), (1, -8, 7, 0.3))):
        cpu = run(fn, x, s, z, *args, dy=dy)
        cuda = run(fn, x.cuda(), s.cuda(), z.cuda(), *args, dy=dy.cuda())
        assert_same(cuda[:2], cpu[:2], "cuda vs cpu")
        for a, e in zip(cuda[2:], cpu[2:]):
            torch.testing.assert_close(a.cpu(), e, rtol=1e-5, atol=1e-5 * float(dy.abs().sum()))


def test_no_second_derivative():
    x, s, z = t(0.3, 9.0), t(0.5).requires_grad_(), t(0.0).requires_grad_()
    (ds,) = torch.autograd.grad(lsq_per_tensor(x, s, z, -8, 7).sum(), s, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        ds.backward()


# ----------------------------------------------------------------------------------------------
# golden vectors recorded from torch 2.13 (tests/golden/make_learnable.py), replayed without torch.ao
# ----------------------------------------------------------------------------------------------
def _golden():
    return torch.load(GOLDEN_FILE, weights_only=True)


def test_golden_vectors_per_tensor():
    cases = _golden()["per_tensor"]
    assert len(cases) >= 20
    for c in cases:
        got = run(lsq_per_tensor, c["x"], c["scale"], c["zero_point"], c["quant_min"], c["quant_max"],
                  c["grad_factor"], dy=c["dy"])
        assert_same(got, (c["y"], c["dx"], c["dscale"], c["dzero_point"]), f"golden per tensor {c['quant_min']}")


def test_golden_vectors_per_channel():
    cases = _golden()["per_channel"]
    assert len(cases) >= 10
    for c in cases:
        got = run(lsq_per_channel, c["x"], c["scale"], c["zero_point"], c["axis"], c["quant_min"], c["quant_max"],
                  c["grad_factor"], dy=c["dy"])
        assert_same(got, (c["y"], c["dx"], c["dscale"], c["dzero_point"]), f"golden per channel axis {c['axis']}")


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
X, ONE, ZERO, C3 = torch.zeros(2, 3), t(1.0), t(0.0), torch.ones(3)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: lsq_per_tensor(X.double(), ONE, ZERO, 0, 255), "x must be a float32 tensor, got Tensor torch.float64"),
        (lambda: lsq_per_tensor([0.0], ONE, ZERO, 0, 255), "x must be a float32 tensor, got list"),
        (lambda: lsq_per_tensor(X, 1.0, ZERO, 0, 255), "scale must be a float32 tensor, got float"),
        (lambda: lsq_per_tensor(X, ONE.double(), ZERO, 0, 255), "scale must be a float32 tensor"),
        (lambda: lsq_per_tensor(X, ONE, 0, 0, 255), "zero_point must be a float32 tensor, got int"),
        (lambda: lsq_per_tensor(X, ONE, ZERO.long(), 0, 255), "zero_point must be a float32 tensor"),
        (lambda: lsq_per_tensor(X, C3, ZERO, 0, 255), "scale must hold exactly one element"),
        (lambda: lsq_per_tensor(X, ONE, torch.zeros(0), 0, 255), "zero_point must hold exactly one element"),
        (lambda: lsq_per_tensor(X, ONE.to("meta"), ZERO, 0, 255), r"scale must be on x's device \(cpu\)"),
        (lambda: lsq_per_tensor(X, t(0.0), ZERO, 0, 255), "scale must be positive and finite"),
        (lambda: lsq_per_tensor(X, t(-1.0), ZERO, 0, 255), "scale must be positive and finite"),
        (lambda: lsq_per_tensor(X, t(INF), ZERO, 0, 255), "scale must be positive and finite"),
        (lambda: lsq_per_tensor(X, t(NAN), ZERO, 0, 255), "scale must be positive and finite"),
        (lambda: lsq_per_tensor(X, ONE, t(NAN), 0, 255), "zero_point must not be NaN"),
        (lambda: lsq_per_tensor(X, ONE, ZERO, 5, 5), "quant_min must be less than quant_max"),
        (lambda: lsq_per_tensor(X, ONE, ZERO, 0, 2.5), "quant_max must be an integer"),
        (lambda: lsq_per_tensor(X, ONE, ZERO, 0, 2**24 + 1), r"quant_min and quant_max must lie in \[-2\*\*24"),
        (lambda: lsq_per_tensor(X, ONE, ZERO, 0, 255, INF), "grad_factor must be a finite real number"),
        (lambda: lsq_per_tensor(X, ONE, ZERO, 0, 255, NAN), "grad_factor must be a finite real number"),
        (lambda: lsq_per_tensor(X, ONE, ZERO, 0, 255, True), "grad_factor must be a finite real number"),
        (lambda: lsq_per_tensor(X, ONE, ZERO, 0, 255, torch.tensor(1.0)), "grad_factor must be a finite real"),
        (lambda: lsq_per_channel(X, C3, C3, 2, 0, 255), r"axis must lie in \[-2, 1\]"),
        (lambda: lsq_per_channel(torch.tensor(1.0), ONE, ZERO, 0, 0, 255), "axis must lie in none"),
        (lambda: lsq_per_channel(X, C3, C3, 0, 0, 255), r"scale must be a 1-D tensor .* \(2,\), got shape \(3,\)"),
        (lambda: lsq_per_channel(X, C3, C3[:2], 1, 0, 255), "zero_point must be a 1-D tensor with one entry"),
        (lambda: lsq_per_channel(X, C3.reshape(3, 1), C3, 1, 0, 255), "scale must be a 1-D tensor"),
        (lambda: lsq_per_channel(X, C3.double(), C3, 1, 0, 255), "scale must be a float32 tensor"),
        (lambda: lsq_per_channel(X, C3, C3.int(), 1, 0, 255), "zero_point must be a float32 tensor"),
        (lambda: lsq_per_channel(X, -C3, C3, 1, 0, 255), "scale must be positive and finite"),
        (lambda: lsq_per_channel(X, C3, C3 * NAN, 1, 0, 255), "zero_point must not be NaN"),
        (lambda: lsq_per_channel(X, C3, C3, 1, 0, 255, NAN), "grad_factor must be a finite real number"),
        (lambda: lsq_per_channel(X, C3, C3, 1, 3, -3), "quant_min must be less than quant_max"),
    ],
)
def test_error_messages(call, match):
    with pytest.raises(ValueError, match=match):
        call()
