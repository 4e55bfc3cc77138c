"""int8 add / add_relu / mul / add_scalar / mul_scalar / cat / matmul (minqat.kernels.elementwise).

(1) hand-worked values at the points where torch's vector and scalar loops round differently, (2) live parity
with torch.ops.quantized.* (int_repr, and output qparams where they change) on tie-heavy qparams, NCHW and
channels-last, 1 and 2 threads, (3) oracle-free properties, the recorded golden vectors (replayed without
torch.ao) and every error message.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, strategies as st

from minqat.kernels import elementwise as ew
from minqat.functional.float32 import fma32
from minqat.functional.quantize import dequantize
from minqat.dtypes import dtype_range
from tests.oracle import VIEWS, assert_bit_exact, fbgemm_engine, requires_kernels, same_layout, tq  # noqa: F401

GOLDEN_FILE = Path(__file__).parent / "golden" / "qops.pt"
TIE_RATIOS = [0.5, 1.5, 0.25, 2.0, 1.25, 3.0, 1.0]


def u8(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8)


# ----------------------------------------------------------------------------------------------
# (1) hand-worked values
# ----------------------------------------------------------------------------------------------
def test_add_vector_and_scalar_loops_round_ties_differently():
    # a = b = x with s = 0.5, z = 0: v = 0.5 x + 0.5 x = x exactly; y_scale 2, z_y 1: v / 2 = 0.5, 1.5, 2.5.
    # vector loop  rint(v / 2) + 1       = 0 + 1, 2 + 1, 2 + 1 = 1, 3, 3
    # scalar loop  rint(v / 2 + 1)       = rint(1.5), rint(2.5), rint(3.5) = 2, 2, 4
    x = u8(1, 3, 5)
    assert ew.add(x, 0.5, 0, x, 0.5, 0, 2.0, 1).tolist() == [2, 2, 4]  # 3 elements: all scalar
    x66 = u8(1, 3, 5).repeat(22)  # 66 elements: the first 64 vector, positions 64, 65 (values 3, 5) scalar
    y = ew.add(x66, 0.5, 0, x66, 0.5, 0, 2.0, 1)
    assert y[:64].tolist() == [1, 3, 3] * 21 + [1] and y[64:].tolist() == [2, 4]


def test_vector_dequantize_premultiplies_the_zero_point():
    # s = fl32(0.1) = 13421773 * 2**-27; 3 s = 40265319 * 2**-27 needs 26 bits, so fl32(-3 s) = -40265320 * 2**-27
    # (round to a multiple of 4). At q = z = 3: fma(s, 3, fl32(-3 s)) = (40265319 - 40265320) * 2**-27 = -2**-27,
    # where the exact dequantize gives 0.
    s = torch.tensor(0.1)
    assert ew.dequantize_fma(u8(3), s, 3).item() == -(2.0 ** -27)
    assert dequantize(u8(3), 0.1, 3).item() == 0.0


def test_vector_lane_mask_positions():
    ones = lambda *shape: torch.ones(shape, dtype=torch.uint8)  # noqa: E731
    assert ew.vector_lane_mask(ones(130), ones(130)).sum() == 128  # 2 blocks of 64, then 2 scalar
    assert ew.vector_lane_mask(ones(63), ones(63)).sum() == 0
    cl = ones(1, 2, 5, 7).contiguous(memory_format=torch.channels_last)  # 70 elements in (N, H, W, C) order
    mask = ew.vector_lane_mask(cl, cl)
    # memory position of (n, c, h, w) = ((n * 5 + h) * 7 + w) * 2 + c: (0, 1, 4, 6) -> 69, (0, 1, 4, 3) -> 63
    assert mask[0, 0, 0, 0] and mask[0, 1, 4, 3] and not mask[0, 1, 4, 6] and mask.sum() == 64
    assert ew.vector_lane_mask(cl, ones(1, 2, 5, 7)).sum() == 0  # different layouts: element by element
    # 70000 elements on 2 threads: 2 chunks of 35000, each 34944 = 546 * 64 vector + 56 scalar
    mask = ew.vector_lane_mask(ones(70000), ones(70000), num_threads=2)
    assert (~mask).sum() == 112 and not mask[34944] and mask[35000] and not mask[-1]


def test_mul_requantizes_the_exact_product():
    # (3 - 1) * 2 = 4, (5 - 1) * 2 = 8; m = fl32(1 * 0.5) * 1 = 0.5 -> 2, 4; relu at z_y = 3 -> 3, 4 + 3 = 7
    a, b = u8(3, 5), u8(2)
    assert ew.mul(a, 1.0, 1, b, 0.5, 0, 1.0, 0).tolist() == [2, 4]
    assert ew.mul(u8(0, 5), 1.0, 1, b, 0.5, 0, 1.0, 3, relu=True).tolist() == [3, 7]


def test_add_scalar_three_cases():
    # z - c_q in range: c_q = rint(2 / 0.5) = 4, integers kept, z' = 10 - 4 = 6
    y, s, z = ew.add_scalar(u8(0, 10), 0.5, 10, 2.0)
    assert (y.tolist(), s, z) == ([0, 10], 0.5, 6)
    # z - c_q = 2 - 10 = -8 < 0: s' = (255 + 8) / 255, z' = 0; x - z + c_q = 10, 263 times fl32(255 / 263)
    # -> 9.696 -> 10 and 255.0 -> 255
    y, s, z = ew.add_scalar(u8(2, 255), 1.0, 2, 10.0)
    assert (y.tolist(), s, z) == ([10, 255], 263 / 255, 0)
    # z - c_q = 250 + 10 = 260 > 255: s' = 260 / 255, z' = 255; -260 * 255 / 260 = -255 -> 0, -10 * 255 / 260
    # = -9.81 -> -10 -> 245
    y, s, z = ew.add_scalar(u8(0, 250), 1.0, 250, -10.0)
    assert (y.tolist(), s, z) == ([0, 245], 260 / 255, 255)
    y, _, z = ew.add_scalar(u8(0, 10), 0.5, 10, 2.0, relu=True)  # relu at z' = 6
    assert (y.tolist(), z) == ([6, 10], 6)


def test_mul_scalar_three_cases():
    y, s, z = ew.mul_scalar(u8(0, 200), 0.5, 10, 3.0)
    assert (y.tolist(), s, z) == ([0, 200], 1.5, 10)
    y, s, z = ew.mul_scalar(u8(0, 200), 0.5, 10, 0.0)
    assert (y.tolist(), s, z) == ([0, 0], 1.0, 0)
    y, s, z = ew.mul_scalar(u8(0, 200), 0.5, 10, -2.0)  # mirrored: 255 - x, z' = 255 - 10
    assert (y.tolist(), s, z) == ([255, 55], 1.0, 245)
    y, _, _ = ew.mul_scalar(torch.tensor([-128, 100], dtype=torch.int8), 0.5, 0, -1.0, relu=True)
    assert y.tolist() == [127, -1]  # -1 - x, then max(y, z' = 127 - 128 = -1)


def test_cat_nhwc_vector_channels_and_copies():
    # x = 2 with s = 1, z = 1: x_hat = 1 (exact on both loops); output s 2, z 1: v / 2 = 0.5
    # channels 0..7 (vector) rint(0.5) + 1 = 1; channel 8 (scalar) rint(0.5 + 1) = 2
    x = torch.full((1, 9, 1, 1), 2, dtype=torch.uint8)
    y = ew.cat([x], [1.0], [1], 1, 2.0, 1)
    assert y.flatten().tolist() == [1] * 8 + [2]
    kept = torch.full((1, 2, 1, 1), 7, dtype=torch.uint8)  # the output's qparams: copied unchanged
    assert ew.cat([kept, x], [2.0, 1.0], [1, 1], 1, 2.0, 1).flatten().tolist() == [7, 7] + [1] * 8 + [2]
    # general path (dim 0): quantize_per_tensor(x_hat) with the FMA: fma(1, 0.5, 1) = 1.5 -> 2
    assert ew.cat([x], [1.0], [1], 0, 2.0, 1).flatten().tolist() == [2] * 9


# ----------------------------------------------------------------------------------------------
# (2) live parity with torch.ops.quantized
# ----------------------------------------------------------------------------------------------
SHAPES = [((7,), "nchw"), ((130,), "nchw"), ((2, 16, 3, 5), "nchw"), ((2, 16, 3, 5), "cl"), ((1, 3, 7, 7), "cl"),
          ((3, 70, 9), "t"), ((2, 5, 1, 1), "nchw"), ((3, 5, 6, 7), "slice"), ((2, 6, 5, 4), "cl-slice"),
          ((2, 64), "nchw"), ((4, 32, 2, 2), "cl")]  # the last two: every element in the vector loop


def layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    return VIEWS[kind](x)


@st.composite
def binary_cases(draw):
    dtype = draw(st.sampled_from([torch.uint8, torch.int8]))
    lo, hi = dtype_range(dtype)
    shape, kind = draw(st.sampled_from(SHAPES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    a = layout(torch.randint(lo, hi + 1, shape, generator=g).to(dtype), kind)
    b = layout(torch.randint(lo, hi + 1, shape, generator=g).to(dtype), kind)
    s_a = draw(st.floats(2.0**-10, 1.0).map(lambda v: float(torch.tensor(v))))
    s_b = s_a * draw(st.sampled_from(TIE_RATIOS))
    s_y = s_a * draw(st.sampled_from(TIE_RATIOS))
    zps = [draw(st.integers(lo, hi)) for _ in range(3)]
    return a, s_a, zps[0], b, s_b, zps[1], s_y, zps[2]


@requires_kernels
@given(case=binary_cases(), relu=st.booleans())
def test_add_matches_torch(case, relu):
    a, s_a, z_a, b, s_b, z_b, s_y, z_y = case
    op = torch.ops.quantized.add_relu if relu else torch.ops.quantized.add
    expected = op(tq(a, s_a, z_a), tq(b, s_b, z_b), s_y, z_y).int_repr()
    actual = ew.add(a, s_a, z_a, b, s_b, z_b, s_y, z_y, relu=relu)
    assert_bit_exact(actual, expected, "add")
    assert same_layout(actual, expected)


@requires_kernels
@pytest.mark.parametrize("shape, kind", [((70001,), "nchw"), ((4, 64, 13, 11), "cl"), ((3, 33000), "nchw")])
def test_add_on_two_threads_matches_torch(shape, kind):
    g = torch.Generator().manual_seed(0)
    a = layout(torch.randint(0, 256, shape, generator=g).to(torch.uint8), kind)
    b = layout(torch.randint(0, 256, shape, generator=g).to(torch.uint8), kind)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = torch.ops.quantized.add(tq(a, 0.1, 3), tq(b, 0.05, 7), 0.05, 5).int_repr()
        actual = ew.add(a, 0.1, 3, b, 0.05, 7, 0.05, 5)
    finally:
        torch.set_num_threads(threads)
    assert_bit_exact(actual, expected, "add, 2 threads")


@requires_kernels
@given(case=binary_cases(), relu=st.booleans(), broadcast=st.booleans())
def test_mul_matches_torch(case, relu, broadcast):
    a, s_a, z_a, b, s_b, z_b, s_y, z_y = case
    if broadcast and b.dim() == 4:
        b = b[:, :, :1, :1].contiguous()
    op = torch.ops.quantized.mul_relu if relu else torch.ops.quantized.mul
    expected = op(tq(a, s_a, z_a), tq(b, s_b, z_b), s_y * s_b, z_y).int_repr()
    assert_bit_exact(ew.mul(a, s_a, z_a, b, s_b, z_b, s_y * s_b, z_y, relu=relu), expected, "mul")


@requires_kernels
@given(case=binary_cases(), steps=st.floats(-300, 300), tie=st.booleans(), relu=st.booleans())
def test_scalar_ops_match_torch(case, steps, tie, relu):
    x, s, z = case[:3]
    other = (round(steps) + 0.5 if tie else steps) * s  # ties of other / s, and range-stretching values
    for name, fn in [("add_scalar", ew.add_scalar), ("mul_scalar", ew.mul_scalar)]:
        expected = getattr(torch.ops.quantized, name + ("_relu" if relu else ""))(tq(x, s, z), other)
        y, y_scale, y_zero_point = fn(x, s, z, other, relu=relu)
        assert_bit_exact(y, expected.int_repr(), name)
        assert (y_scale, y_zero_point) == (expected.q_scale(), expected.q_zero_point())


@requires_kernels
@given(data=st.data(), relu=st.booleans())
def test_cat_matches_torch(data, relu):
    dtype = data.draw(st.sampled_from([torch.uint8, torch.int8]))
    lo, hi = dtype_range(dtype)
    kind = data.draw(st.sampled_from(["cl", "cl", "nchw", "slice", "cl-slice"]))
    dim = data.draw(st.sampled_from([1, 1, 1, 0, 2, -3]))
    channels = data.draw(st.lists(st.integers(1, 40), min_size=1, max_size=3))
    n, h, w = (data.draw(st.integers(1, 3)) for _ in range(3))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    sizes = [(n, c + 1, h, w) if dim in (1, -3) else (n, channels[0] + 1, h, w) for c in channels]
    xs = [layout(torch.randint(lo, hi + 1, size, generator=g).to(dtype), kind) for size in sizes]
    s_y = data.draw(st.floats(2.0**-10, 1.0).map(lambda v: float(torch.tensor(v))))
    z_y = data.draw(st.integers(lo, hi - 1)) | 1  # odd: ties of v / s_y round differently in the two loops
    scales = [s_y * data.draw(st.sampled_from([0.5, 1.5, 2.5, 1.0, 0.3])) for _ in xs]
    zero_points = [data.draw(st.one_of(st.just(z_y), st.integers(lo, hi))) for _ in xs]
    op = torch.ops.quantized.cat_relu if relu else torch.ops.quantized.cat
    expected = op([tq(x, s, z) for x, s, z in zip(xs, scales, zero_points)], dim, s_y, z_y).int_repr()
    assert_bit_exact(ew.cat(xs, scales, zero_points, dim, s_y, z_y, relu=relu), expected, "cat")


@requires_kernels
@given(case=binary_cases())
def test_matmul_matches_torch(case):
    a, s_a, z_a, b, s_b, z_b, s_y, z_y = case
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]).T
    expected = torch.ops.quantized.matmul(tq(a, s_a, z_a), tq(b, s_b, z_b), s_y * 10, z_y).int_repr()
    assert_bit_exact(ew.matmul(a, s_a, z_a, b, s_b, z_b, s_y * 10, z_y), expected, "matmul")


# ----------------------------------------------------------------------------------------------
# (3) properties (no oracle)
# ----------------------------------------------------------------------------------------------
@given(case=binary_cases())
def test_add_properties(case):
    a, s_a, z_a, b, s_b, z_b, s_y, z_y = case
    lo, hi = dtype_range(a.dtype)
    y = ew.add(a, s_a, z_a, b, s_b, z_b, s_y, z_y)
    assert torch.equal(y, ew.add(b, s_b, z_b, a, s_a, z_a, s_y, z_y))  # commutative, loop by loop
    relu = ew.add_relu(a, s_a, z_a, b, s_b, z_b, s_y, z_y)
    assert torch.equal(relu, torch.maximum(y, torch.tensor(z_y, dtype=y.dtype)))  # relu == clamp at z_y
    real = dequantize(a, s_a, z_a).double() + dequantize(b, s_b, z_b).double()
    inside = (y > lo) & (y < hi)  # not clamped: within half a step (plus float32 rounding)
    err = (dequantize(y, s_y, z_y).double() - real)[inside].abs()
    assert bool((err <= s_y * (0.5 + 1e-4)).all())


@given(case=binary_cases(), k=st.integers(-3, 3))
def test_scalar_ops_move_only_qparams_when_they_can(case, k):
    x, s, z = case[:3]
    lo, hi = dtype_range(x.dtype)
    y, y_scale, y_zero_point = ew.add_scalar(x, s, z, k * s)  # a whole number of steps
    if lo <= z - k <= hi:
        assert torch.equal(y, x) and (y_scale, y_zero_point) == (s, z - k)
    y, y_scale, _ = ew.mul_scalar(x, s, z, 2.0)
    assert torch.equal(y, x) and y_scale == 2.0 * s


@given(case=binary_cases())
def test_cat_of_one_tensor_with_its_own_qparams_is_identity(case):
    x, s, z = case[:3]
    for dim in range(x.dim()):
        assert torch.equal(ew.cat([x], [s], [z], dim, s, z), x)


@pytest.mark.cuda
def test_cuda_equals_cpu():
    # The kernels are device-agnostic emulations of torch's CPU ops: the same integers on an accelerator.
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (2, 24, 5, 7), generator=g).to(torch.uint8).contiguous(memory_format=torch.channels_last)
    b = torch.randint(0, 256, (2, 24, 5, 7), generator=g).to(torch.uint8).contiguous(memory_format=torch.channels_last)
    for device in ("cpu", "cuda"):
        a_d, b_d = a.to(device), b.to(device)
        results = [ew.add(a_d, 0.1, 3, b_d, 0.05, 7, 0.05, 5), ew.mul(a_d, 0.1, 3, b_d, 0.05, 7, 0.002, 5),
                   ew.cat([a_d, b_d], [0.1, 0.05], [3, 7], 1, 0.05, 5), ew.add_scalar(a_d, 0.1, 3, 2.55)[0],
                   ew.matmul(a_d[0, 0], 0.25, 3, b_d[0, 0].T.contiguous(), 0.5, 7, 4.0, 5)]
        if device == "cpu":
            expected = results
    for actual, want in zip(results, expected):
        assert_bit_exact(actual, want, "cuda vs cpu")


# ----------------------------------------------------------------------------------------------
# golden vectors recorded from torch 2.13 (tests/golden/make_qops.py), replayed without torch.ao
# ----------------------------------------------------------------------------------------------
def run_case(case: dict):
    """minqat's result (and output qparams) for one recorded elementwise case, or None for other ops."""
    op = case["op"]
    if op in ("add", "add_relu", "mul", "matmul"):
        args = [case[k] for k in ("a", "a_scale", "a_zero_point", "b", "b_scale", "b_zero_point", "y_scale",
                                  "y_zero_point")]
        return getattr(ew, op)(*args), case["y_scale"], case["y_zero_point"]
    if op.startswith(("add_scalar", "mul_scalar")):
        fn = ew.add_scalar if op.startswith("add") else ew.mul_scalar
        return fn(case["x"], case["scale"], case["zero_point"], case["other"], relu=op.endswith("_relu"))
    if op == "cat":
        y = ew.cat(case["tensors"], case["scales"], case["zero_points"], case["dim"], case["y_scale"],
                   case["y_zero_point"], relu=case["relu"])
        return y, case["y_scale"], case["y_zero_point"]
    return None


def test_golden_vectors():
    cases = torch.load(GOLDEN_FILE, weights_only=True)["cases"]
    replayed = 0
    for i, case in enumerate(cases):
        result = run_case(case)
        if result is None:
            continue
        y, y_scale, y_zero_point = result
        assert_bit_exact(y, case["y"], f"golden case {i} ({case['op']})")
        assert same_layout(y, case["y"]), f"golden case {i}: layout"
        assert (y_scale, y_zero_point) == (case.get("y_scale", y_scale), case.get("y_zero_point", y_zero_point))
        replayed += 1
    assert replayed >= 70


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
A = u8(1, 2, 3)


@pytest.mark.parametrize("call, match", [
    (lambda: ew.add(A.float(), 1.0, 0, A, 1.0, 0, 1.0, 0), r"a_int must be a torch.uint8 or torch.int8 tensor, got Tensor torch.float32"),
    (lambda: ew.add(A, 1.0, 0, A.to(torch.int32), 1.0, 0, 1.0, 0), r"b_int must be a torch.uint8 or torch.int8 tensor"),
    (lambda: ew.add(A, 1.0, 0, A.to(torch.int8), 1.0, 0, 1.0, 0), r"a_int and b_int must have the same dtype"),
    (lambda: ew.add(A, 1.0, 0, A[:2], 1.0, 0, 1.0, 0), r"a_int and b_int must have the same shape, got \(3,\) and \(2,\)"),
    (lambda: ew.add(A, 0.0, 0, A, 1.0, 0, 1.0, 0), r"a_scale must be positive and finite"),
    (lambda: ew.mul(A, 1.0, 0, A, 1.0, 300, 1.0, 0), r"b_zero_point must lie in \[quant_min, quant_max\] = \[0, 255\]"),
    (lambda: ew.mul(A, 1.0, 0, A, 1.0, 0, -1.0, 0), r"y_scale must be positive and finite"),
    (lambda: ew.add_scalar(A, 1.0, -1, 2.0), r"zero_point must lie in \[quant_min, quant_max\]"),
    (lambda: ew.mul_scalar([1, 2], 1.0, 0, 2.0), r"x_int must be a torch.uint8 or torch.int8 tensor, got list"),
    (lambda: ew.cat([], [], [], 0, 1.0, 0), r"tensors must be a non-empty list of integer tensors"),
    (lambda: ew.cat([A, A], [1.0], [0, 0], 0, 1.0, 0), r"scales and zero_points must have one entry per tensor \(2\)"),
    (lambda: ew.cat([A, A.to(torch.int8)], [1.0, 1.0], [0, 0], 0, 1.0, 0), r"all tensors must have the same dtype"),
    (lambda: ew.matmul(A, 1.0, 0, A.to(torch.int8), 1.0, 0, 1.0, 0), r"a_int and b_int must have the same dtype"),
])
def test_error_messages(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- fast paths: proven equal to the general ones ----------------------------------------------------------
@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=4), channels_last=st.booleans(),
       threads=st.integers(1, 4), permute_b=st.booleans())
def test_all_vector_lanes_says_exactly_when_the_mask_is_all_true(shape, channels_last, threads, permute_b):
    a = torch.zeros(shape, dtype=torch.uint8)
    if channels_last and a.dim() == 4:
        a = a.contiguous(memory_format=torch.channels_last)
    b = a.transpose(0, -1).contiguous().transpose(0, -1) if permute_b and a.dim() > 1 else a.clone()
    assert ew.all_vector_lanes(a, b, threads) == bool(ew.vector_lane_mask(a, b, threads).all())


@pytest.mark.parametrize("n", [64, 128 * 64, 70_016])  # whole blocks: the all-vector branch, 1 and 2 chunks
@pytest.mark.parametrize("relu, dtype", [(False, torch.uint8), (True, torch.int8)])
def test_all_vector_add_equals_the_masked_computation(n, relu, dtype, monkeypatch):
    """The shortcut (no scalar-loop emulation) against the general path with its lane mask, forced."""
    gen = torch.Generator().manual_seed(n)
    lo = 0 if dtype == torch.uint8 else -128
    a = torch.randint(lo, lo + 256, (n,), generator=gen).to(dtype)
    b = torch.randint(lo, lo + 256, (n,), generator=gen).to(dtype)
    assert ew.all_vector_lanes(a, b, 2)
    args = (a, 0.037, 11, b, 0.051, -20 if lo else 200, 0.09, 3)
    got = ew.add(*args, relu=relu, num_threads=2)
    monkeypatch.setattr(ew, "all_vector_lanes", lambda *_: False)  # the masked computation, both loops
    want = ew.add(*args, relu=relu, num_threads=2)
    assert torch.equal(got, want)


@given(scale=st.floats(2.0**-23, 2.0**20), zero_point=st.integers(-128, 255), signed=st.booleans())
def test_dequantize_fma_float64_form_equals_the_emulated_fma(scale, zero_point, signed):
    dtype = torch.int8 if signed else torch.uint8
    x = torch.arange(-128, 128) if signed else torch.arange(0, 256)
    x = x.to(dtype)
    s = torch.tensor(scale, dtype=torch.float32)
    fast = ew.dequantize_fma(x, s, zero_point)
    xf = x.float()
    slow = fma32(s.expand_as(xf), xf, (s * -torch.tensor(float(zero_point))).expand_as(xf))
    assert torch.equal(fast, slow)
