"""ReLU / ReLU6 / clamp, max / avg / adaptive-avg pooling and mean on integers (minqat.kernels.pooling).

(1) hand-worked values where torch's layouts and loops round differently, (2) live parity with torch's
quantized ops (F.* on quantized tensors) for NCHW, channels-last and strided inputs, (3) oracle-free
properties, the recorded golden vectors (replayed without torch.ao) and every error message.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, strategies as st

from minqat.kernels import pooling
from minqat.dtypes import dtype_range
from tests.oracle import VIEWS, assert_bit_exact, fbgemm_engine, requires_kernels, same_layout, tq  # noqa: F401

GOLDEN_FILE = Path(__file__).parent / "golden" / "qops.pt"


def planes(values, channels: int, dtype=torch.uint8, channels_last: bool = False) -> torch.Tensor:
    """A (1, C, H, W) tensor whose every channel is the 2-D list ``values``."""
    x = torch.tensor(values, dtype=dtype).expand(1, channels, -1, -1).contiguous()
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# ----------------------------------------------------------------------------------------------
# (1) hand-worked values
# ----------------------------------------------------------------------------------------------
def test_relu_and_clamp_bounds_use_torchs_scalar_quantize():
    assert pooling.relu(torch.tensor([3, 10, 20], dtype=torch.uint8), 10).tolist() == [10, 10, 20]
    # q(0.25) with s = 0.5, z = 3: fl32(0.25 * 2) + 3 = 3.5 -> rint -> 4 (zero point BEFORE rounding; adding it
    # after would give rint(0.5) + 3 = 3)
    assert int(pooling.quantize_scalar(0.25, 0.5, 3, torch.uint8)) == 4
    x = torch.arange(0, 10, dtype=torch.uint8)
    assert pooling.clamp(x, 0.5, 3, 0.25, 1.75).tolist() == [4, 4, 4, 4, 4, 5, 6, 6, 6, 6]  # q(1.75) = rint(6.5) = 6
    assert pooling.clamp(x, 0.5, 3, None, 0.0).tolist() == [0, 1, 2, 3, 3, 3, 3, 3, 3, 3]
    # relu6 with 6 beyond the grid: q(6) = 600 + 0 -> clamped to 255, so relu6 == relu here
    assert pooling.relu6(torch.tensor([0, 255], dtype=torch.uint8), 0.01, 0).tolist() == [0, 255]
    assert pooling.relu6(torch.tensor([0, 50, 200], dtype=torch.uint8), 0.05, 10).tolist() == [10, 50, 130]


def test_max_pool_padding_never_wins():
    x = torch.full((1, 1, 2, 2), -100, dtype=torch.int8)  # padding is -inf, not the zero point and not 0
    assert pooling.max_pool2d(x, 2, 1, 1).unique().tolist() == [-100]


def test_avg_pool_tie_rounds_by_layout():
    # [[1, 2], [3, 4]], z = 1: acc = 10 - 4 * 1 = 6, m = 1/4, acc * m = 1.5
    # NCHW:                   rint(1.5 + 1) = rint(2.5) = 2
    # channels-last, C = 16:  every channel in the vector loop: rint(1.5) + 1 = 3   (AVX2 and AVX-512)
    # channels-last, C = 3:   every channel in the scalar loop: rint(1.5 + 1) = 2
    values = [[1, 2], [3, 4]]
    assert pooling.avg_pool2d(planes(values, 16), 1, 2).unique().tolist() == [2]
    assert pooling.avg_pool2d(planes(values, 16, channels_last=True), 1, 2).unique().tolist() == [3]
    assert pooling.avg_pool2d(planes(values, 3, channels_last=True), 1, 2).unique().tolist() == [2]


def test_avg_pool_divisors():
    # 2x2 input [[4, 8], [12, 16]], z = 0, kernel 2, stride 1, padding 1: 3x3 windows.
    # corner (0, 0) sees only 4: divisor 4 with padding counted -> 1; without -> 4; override 3 -> rint(1.33) = 1
    # centre (1, 1) sees all four: 40 / 4 = 10; override 3 -> rint(13.33) = 13
    x = torch.tensor([[[[4, 8], [12, 16]]]], dtype=torch.uint8)
    with_pad = pooling.avg_pool2d(x, 0, 2, 1, 1, count_include_pad=True)
    without = pooling.avg_pool2d(x, 0, 2, 1, 1, count_include_pad=False)
    override = pooling.avg_pool2d(x, 0, 2, 1, 1, divisor_override=3)
    assert (with_pad[0, 0, 0, 0], without[0, 0, 0, 0], override[0, 0, 0, 0]) == (1, 4, 1)
    assert (with_pad[0, 0, 1, 1], without[0, 0, 1, 1], override[0, 0, 1, 1]) == (10, 10, 13)


def test_adaptive_avg_pool_fma_and_layouts():
    # window of 6 (2x3 input -> 1x1), int8, z = -86, values summing to 27: acc = 27 - 6 * (-86) = 543.
    # m = fl32(1/6) = 0.1666666716337204; 543 m = 90.50000269711018 exactly.
    # scalar loop: fl32(543 m) = 90.5 (the excess 2.7e-6 < half ulp 3.8e-6), 90.5 - 86 = 4.5 -> rint -> 4
    # FMA (channels c < C // 8 * 8): fl32(543 m - 86) = 4.5000026 -> 5
    # NCHW: no zero point, r = fl32(fl32(1/2) / 3) = 0.16666667; fl32(27 r) = 4.5 -> 4
    values = [[4, 4, 4], [5, 5, 5]]
    fma = pooling.adaptive_avg_pool2d(planes(values, 8, torch.int8, channels_last=True), -86, 1)
    scalar = pooling.adaptive_avg_pool2d(planes(values, 7, torch.int8, channels_last=True), -86, 1)
    nchw = pooling.adaptive_avg_pool2d(planes(values, 8, torch.int8), -86, 1)
    assert (fma.unique().tolist(), scalar.unique().tolist(), nchw.unique().tolist()) == ([5], [4], [4])


def test_mean_fast_path_and_reference_path():
    # innermost dims of a contiguous tensor: rint(fl32(sum) / n), no qparams involved: 3/2 -> 2, 11/2 -> 6
    # other dims: quantize(mean(dequantize)): 0.1 * [3, 4] = [0.3, 0.4] (as float32 means), / 0.1 -> 3, 4
    x = torch.tensor([[1, 2], [5, 6]], dtype=torch.uint8)
    assert pooling.mean(x, 0.1, 0, 1).tolist() == [2, 6]
    assert pooling.mean(x, 0.1, 0, 0).tolist() == [3, 4]
    assert pooling.mean(x.T.contiguous().T, 0.1, 0, 1).tolist() == [2, 6]  # same values, reference path


# ----------------------------------------------------------------------------------------------
# (2) live parity with torch's quantized ops
# ----------------------------------------------------------------------------------------------
@st.composite
def images(draw, min_side: int = 1):
    """Random integer images in every layout; half of them tie-heavy: small values, a far and odd zero point.

    With ``x`` near 0 and ``|z|`` large, ``acc / n = mean(x) - z`` is large while the result ``mean(x)`` is small,
    so the float32 rounding of ``acc * m`` decides ties -- where torch's loops and layouts differ.
    """
    dtype = draw(st.sampled_from([torch.uint8, torch.int8]))
    lo, hi = dtype_range(dtype)
    kind = draw(st.sampled_from(["nchw", "cl", "cl", "t", "slice", "cl-slice"]))
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 40))
    h, w = draw(st.integers(min_side, 9)), draw(st.integers(min_side, 9))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    tie_heavy = draw(st.booleans())
    low, high = (max(lo, 0), max(lo, 0) + 8) if tie_heavy else (lo, hi)
    x = VIEWS[kind](torch.randint(low, high + 1, (n, c + 1, h, w), generator=g).to(dtype))
    if draw(st.booleans()):
        x = x[0]  # 3-D (C, H, W)
    scale = draw(st.floats(2.0**-10, 1.0).map(lambda v: float(torch.tensor(v))))
    zero_point = draw(st.integers(hi - 70, hi) if tie_heavy and lo == 0 else
                      st.integers(lo, lo + 70) if tie_heavy else st.integers(lo, hi)) | 1
    return x, scale, zero_point


def check(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert_bit_exact(actual, expected.int_repr(), what)
    assert same_layout(actual, expected.int_repr()), f"{what}: layout {actual.stride()} != {expected.stride()}"


@requires_kernels
@given(image=images(), kernel=st.integers(1, 4), stride=st.integers(1, 3), pad=st.integers(0, 2),
       ceil=st.booleans(), include=st.booleans(), divisor=st.sampled_from([None, None, 1, 3, 7]))
def test_avg_pool2d_matches_torch(image, kernel, stride, pad, ceil, include, divisor):
    x, s, z = image
    assume(pad <= kernel // 2 and kernel <= min(x.shape[-2:]) + 2 * pad)
    assume(x.shape[-1] * x.shape[-2] > 1 or pad == 0)  # torch scrambles 1x1 inputs padded to a larger output
    expected = F.avg_pool2d(tq(x, s, z), kernel, stride, pad, ceil, include, divisor)
    check(pooling.avg_pool2d(x, z, kernel, stride, pad, ceil, include, divisor), expected, "avg_pool2d")


@requires_kernels
@given(image=images(), kernel=st.integers(1, 4), stride=st.integers(1, 3), pad=st.integers(0, 2),
       dilation=st.integers(1, 2), ceil=st.booleans())
def test_max_pool2d_matches_torch(image, kernel, stride, pad, dilation, ceil):
    x, s, z = image
    assume(pad <= kernel // 2 and (kernel - 1) * dilation + 1 <= min(x.shape[-2:]) + 2 * pad)
    assume(x.shape[-1] * x.shape[-2] > 1 or pad == 0)
    expected = F.max_pool2d(tq(x, s, z), kernel, stride, pad, dilation, ceil)
    check(pooling.max_pool2d(x, kernel, stride, pad, dilation, ceil), expected, "max_pool2d")


@requires_kernels
@given(image=images(), data=st.data())
def test_adaptive_avg_pool2d_matches_torch(image, data):
    x, s, z = image
    h, w = x.shape[-2:]
    size = data.draw(st.one_of(st.integers(1, min(h, w)),
                               st.tuples(st.one_of(st.none(), st.integers(1, h)), st.integers(1, w))))
    expected = F.adaptive_avg_pool2d(tq(x, s, z), size)
    check(pooling.adaptive_avg_pool2d(x, z, size), expected, "adaptive_avg_pool2d")


@requires_kernels
@given(image=images(), dims=st.sampled_from([[2, 3], [-1, -2], [3], [1], [0, 2], [1, 2, 3], None]),
       keepdim=st.booleans())
def test_mean_matches_torch(image, dims, keepdim):
    x, s, z = image
    if x.dim() == 3 and dims is not None:
        dims = [d - 1 for d in dims if d != 0 and d - 1 < 3] or [0]
    q = tq(x, s, z)
    expected = q.mean(dims, keepdim=keepdim) if dims is not None else q.mean()
    check(pooling.mean(x, s, z, dims, keepdim if dims is not None else False), expected, "mean")


@requires_kernels
@given(image=images(), low=st.integers(-300, 300), width=st.integers(0, 400), tie=st.booleans())
def test_activations_match_torch(image, low, width, tie):
    x, s, z = image
    q = tq(x, s, z)
    min_val, max_val = (low + 0.5 * tie) * s, (low + width + 0.5 * tie) * s  # half-steps: quantize_val's ties
    check(pooling.relu(x, z), F.relu(q), "relu")
    check(pooling.relu6(x, s, z), F.relu6(q), "relu6")
    check(pooling.clamp(x, s, z, min_val, max_val), F.hardtanh(q, min_val, max_val), "hardtanh")
    check(pooling.clamp(x, s, z, min_val, None), torch.clamp(q, min=min_val), "clamp min")
    check(pooling.clamp(x, s, z, None, max_val), torch.clamp(q, max=max_val), "clamp max")


@requires_kernels
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8])
def test_channel_lanes_match_torch(dtype):
    # Every channel count 1..40 in channels-last: which channels torch's vector loops take (avg_pool2d: 16 with
    # AVX-512 / 8 with AVX2; adaptive: 8) shows on tie-heavy data (small values, far odd zero point).
    lo, hi = dtype_range(dtype)
    z = lo + 41 if lo else hi - 40  # odd
    g = torch.Generator().manual_seed(0)
    for c in range(1, 41):
        x = torch.randint(max(lo, 0), 9, (2, c, 6, 7), generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
        q = tq(x, 0.1, z)
        check(pooling.avg_pool2d(x, z, 2), F.avg_pool2d(q, 2), f"avg_pool2d C={c}")
        check(pooling.avg_pool2d(x, z, 3, 2, 1, True, False), F.avg_pool2d(q, 3, 2, 1, True, False), f"avg_pool2d C={c}")
        check(pooling.adaptive_avg_pool2d(x, z, (1, 1)), F.adaptive_avg_pool2d(q, (1, 1)), f"adaptive C={c}")
        check(pooling.adaptive_avg_pool2d(x, z, (4, 5)), F.adaptive_avg_pool2d(q, (4, 5)), f"adaptive C={c}")


# ----------------------------------------------------------------------------------------------
# (3) properties (no oracle)
# ----------------------------------------------------------------------------------------------
@given(image=images(), kernel=st.integers(1, 3))
def test_pooling_properties(image, kernel):
    x, s, z = image
    h, w = x.shape[-2:]
    assume(kernel <= min(h, w))
    constant = torch.full_like(x, int(x.flatten()[0]))
    for out in (pooling.avg_pool2d(constant, z, kernel, 1, 0), pooling.adaptive_avg_pool2d(constant, z, (1, 2))):
        assert bool((out == constant.flatten()[0]).all())  # the average of a constant is the constant
    assert torch.equal(pooling.adaptive_avg_pool2d(x, z, (h, w)), x.contiguous(
        memory_format=torch.channels_last) if pooling._lanes_layout(x) else x.contiguous())  # identity windows
    expected = F.max_pool2d(x.double(), kernel, 1).to(x.dtype)
    assert torch.equal(pooling.max_pool2d(x, kernel, 1), expected)
    assert pooling.mean(constant, s, z, [-1], True).unique().tolist() == [int(x.flatten()[0])]


@given(image=images(), low=st.integers(-300, 300), width=st.integers(0, 400))
def test_activation_properties(image, low, width):
    x, s, z = image
    y = pooling.relu(x, z)
    assert torch.equal(pooling.relu(y, z), y) and bool((y >= z).all())
    lo, hi = pooling.quantize_scalar(low * s, s, z, x.dtype), pooling.quantize_scalar((low + width) * s, s, z, x.dtype)
    y = pooling.clamp(x, s, z, low * s, (low + width) * s)
    assert bool(((y >= lo) | (y == hi)).all() and (y <= hi).all())


@pytest.mark.cuda
def test_cuda_equals_cpu():
    # The kernels are device-agnostic emulations of torch's CPU ops: the same integers on an accelerator
    # (power-of-two scale: the float mean of mean()'s reference path is exact in any summation order).
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 9, (2, 24, 7, 6), generator=g).to(torch.uint8)
    for layout in (torch.contiguous_format, torch.channels_last):
        results = {}
        for device in ("cpu", "cuda"):
            x_d = x.to(device).contiguous(memory_format=layout)
            results[device] = [pooling.avg_pool2d(x_d, 201, 2), pooling.adaptive_avg_pool2d(x_d, 201, (3, 2)),
                               pooling.max_pool2d(x_d, 3, 2, 1), pooling.mean(x_d, 0.125, 201, [2, 3]),
                               pooling.clamp(x_d, 0.1, 201, -0.35, 0.25), pooling.relu6(x_d, 0.1, 3)]
        for actual, want in zip(results["cuda"], results["cpu"]):
            assert_bit_exact(actual, want, "cuda vs cpu")


# ----------------------------------------------------------------------------------------------
# golden vectors recorded from torch 2.13 (tests/golden/make_qops.py), replayed without torch.ao
# ----------------------------------------------------------------------------------------------
def run_case(case: dict) -> torch.Tensor | None:
    """minqat's result for one recorded pooling / activation case, or None for other ops."""
    op, x = case["op"], case.get("x")
    if op == "avg_pool2d":
        return pooling.avg_pool2d(x, case["zero_point"], case["kernel_size"], case["stride"], case["padding"],
                                  case["ceil_mode"], case["count_include_pad"], case["divisor_override"])
    if op == "max_pool2d":
        return pooling.max_pool2d(x, case["kernel_size"], case["stride"], case["padding"], case["dilation"],
                                  case["ceil_mode"])
    if op == "adaptive_avg_pool2d":
        return pooling.adaptive_avg_pool2d(x, case["zero_point"], case["output_size"])
    if op == "mean":
        return pooling.mean(x, case["scale"], case["zero_point"], case["dim"], case["keepdim"])
    if op in ("relu", "relu6"):
        return pooling.relu(x, case["zero_point"]) if op == "relu" else pooling.relu6(x, case["scale"],
                                                                                     case["zero_point"])
    if op == "hardtanh":
        return pooling.clamp(x, case["scale"], case["zero_point"], *case["bounds"])
    return None


def test_golden_vectors():
    cases = torch.load(GOLDEN_FILE, weights_only=True)["cases"]
    replayed = 0
    for i, case in enumerate(cases):
        y = run_case(case)
        if y is None:
            continue
        assert_bit_exact(y, case["y"], f"golden case {i} ({case['op']})")
        assert same_layout(y, case["y"]), f"golden case {i} ({case['op']}): layout"
        replayed += 1
    assert replayed >= 100


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
X = torch.zeros(1, 2, 4, 4, dtype=torch.uint8)


@pytest.mark.parametrize("call, match", [
    (lambda: pooling.relu(X.float(), 0), r"x_int must be a tensor of dtype torch.uint8, torch.int8, torch.int32, got Tensor torch.float32"),
    (lambda: pooling.relu(X, 256), r"zero_point must lie in \[quant_min, quant_max\] = \[0, 255\]"),
    (lambda: pooling.avg_pool2d(X.int(), 0, 2), r"x_int must be a tensor of dtype torch.uint8, torch.int8, got"),
    (lambda: pooling.avg_pool2d(X[0, 0], 0, 2), r"x_int must be 3-D \(C, H, W\) or 4-D \(N, C, H, W\), got shape \(4, 4\)"),
    (lambda: pooling.avg_pool2d(X, 0, 2, 1, 2), r"padding must be at most half the kernel size, got padding=2"),
    (lambda: pooling.avg_pool2d(X, 0, 5), r"avg_pool2d: the output would be empty"),
    (lambda: pooling.avg_pool2d(X, 0, 2, divisor_override=0), r"divisor_override must be non-zero"),
    (lambda: pooling.avg_pool2d(X, 0, (2, 2, 2)), r"kernel_size must be an int or a pair of ints"),
    (lambda: pooling.max_pool2d(X, 3, 1, 2, 2), r"padding must be at most half the kernel size, got padding=2"),
    (lambda: pooling.adaptive_avg_pool2d(X, 0, 0), r"output_size must be a positive int or a pair"),
    (lambda: pooling.mean(X, 0.1, 0, 4), r"dim must be None, an int or a list of ints in \[-4, 3\], got 4"),
    (lambda: pooling.clamp(X, 0.1, 0, 1.0, 0.5), r"min_val cannot be greater than max_val"),
    (lambda: pooling.relu6(X, 0.0, 0), r"scale must be positive and finite"),
])
def test_error_messages(call, match):
    with pytest.raises(ValueError, match=match):
        call()
