"""QTensor, the int8 value type (minqat.qtensor): accessors, the torch-function table, QFunctional twins.

(1) hand-worked values and accessors, (2) live parity with torch's quantized tensors: every supported torch
function / method / nn module gives the same integers, qparams and layout, and minqat.qtensor.add/mul/... equal
torch.ao's QFunctional, (3) properties, the golden vectors replayed through the QTensor API (no torch.ao) and
every error message (unsupported ops name the op; float tensors where a QTensor is expected).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch import nn

from minqat import qtensor as qt
from minqat.qtensor import QTensor
from minqat.dtypes import dtype_range
from tests.oracle import assert_bit_exact, fbgemm_engine, requires_kernels, tq  # noqa: F401 (fbgemm_engine: autouse)

GOLDEN_FILE = Path(__file__).parent / "golden" / "qops.pt"
LEGACY = {torch.uint8: "quint8", torch.int8: "qint8", torch.int32: "qint32"}


def assert_same(actual, expected, what: str) -> None:
    """Same integers, qparams and layout as torch's quantized result (tuples element by element)."""
    if isinstance(expected, (tuple, list)):
        assert isinstance(actual, tuple) and len(actual) == len(expected), what
        for a, e in zip(actual, expected):
            assert_same(a, e, what)
        return
    assert isinstance(actual, QTensor), f"{what}: got {type(actual).__name__}"
    assert_bit_exact(actual.int_repr().contiguous(), expected.int_repr().contiguous(), what)
    assert (actual.q_scale(), actual.q_zero_point()) == (expected.q_scale(), expected.q_zero_point()), what
    assert all(actual.stride(d) == expected.stride(d) for d in range(actual.dim()) if actual.shape[d] > 1), \
        f"{what}: layout {actual.stride()} != {expected.stride()}"


# ----------------------------------------------------------------------------------------------
# (1) hand-worked values and accessors
# ----------------------------------------------------------------------------------------------
def test_accessors_per_tensor():
    # 0.75 / 0.5 + 2 = 3.5 -> 4 (zero point added before rounding, ties to even); -1 / 0.5 + 2 = 0
    x = QTensor.quantize(torch.tensor([[-1.0, 0.75, 2.0]]), 0.5, 2, torch.uint8)
    assert x.int_repr().tolist() == [[0, 4, 6]] and x.dequantize().tolist() == [[-1.0, 1.0, 2.0]]
    assert (x.q_scale(), x.q_zero_point(), x.dtype, x.is_quantized) == (0.5, 2, torch.uint8, True)
    assert (x.shape, x.size(), x.size(1), x.dim(), x.ndim, x.numel(), len(x)) == ((1, 3), (1, 3), 3, 2, 2, 3, 1)
    assert x.qscheme() == torch.per_tensor_affine and x.device == torch.device("cpu")
    assert repr(x) == "QTensor(int_repr=tensor([[0, 4, 6]], dtype=torch.uint8), scale=0.5, zero_point=2)"
    y = QTensor(torch.tensor([1, 2], dtype=torch.int8), torch.tensor([0.25]), torch.tensor([1]))
    assert (y.q_scale(), y.q_zero_point(), y.dequantize().tolist()) == (0.25, 1, [0.0, 0.25])
    assert x.cpu().int_repr() is not None and x.to("cpu").q_scale() == 0.5


def test_accessors_per_channel():
    # channel 0: 1 / 1 + 0 = 1; channel 1: 1 / 0.5 + 10 = 12 (both exact)
    x = QTensor.quantize(torch.ones(2, 3), torch.tensor([1.0, 0.5]), torch.tensor([0, 10]), torch.uint8, axis=0)
    assert x.int_repr().tolist() == [[1, 1, 1], [12, 12, 12]] and x.dequantize().tolist() == [[1.0] * 3] * 2
    assert x.q_per_channel_scales().tolist() == [1.0, 0.5] and x.q_per_channel_scales().dtype == torch.float64
    assert x.q_per_channel_zero_points().tolist() == [0, 10] and x.q_per_channel_axis() == 0
    assert x.qscheme() == torch.per_channel_affine and x.contiguous().axis == 0


def test_shape_ops_move_integers_only():
    x = QTensor(torch.arange(24, dtype=torch.uint8).view(1, 4, 3, 2), 0.1, 5)
    assert torch.flatten(x, 1).int_repr().tolist() == [list(range(24))]
    a, b = torch.chunk(x, 2, 1)
    assert (a.shape, b.int_repr()[0, 0, 0, 0].item(), a.q_scale(), b.q_zero_point()) == ((1, 2, 3, 2), 12, 0.1, 5)
    assert x.view(4, 6).transpose(0, 1).contiguous().int_repr()[1].tolist() == [1, 7, 13, 19]
    assert x[:, 1:2].int_repr().flatten().tolist() == list(range(6, 12))
    assert torch.channel_shuffle(x, 2).int_repr()[0, :, 0, 0].tolist() == [0, 12, 6, 18]  # channels 0, 2, 1, 3


def test_inplace_relu_writes_into_the_integers():
    # z = 5: relu is max(x, 5); the in-place forms mutate int_repr and return the same object
    ints = torch.tensor([3, 5, 9], dtype=torch.uint8)
    x = QTensor(ints, 0.1, 5)
    assert F.relu(x, inplace=True) is x and ints.tolist() == [5, 5, 9]
    y = QTensor(torch.tensor([1, 7], dtype=torch.uint8), 0.1, 5)
    assert torch.relu_(y) is y and y.int_repr().tolist() == [5, 7]
    assert nn.Dropout().eval()(y) is y and nn.Identity()(y) is y


# ----------------------------------------------------------------------------------------------
# (2) live parity with torch's quantized tensors
# ----------------------------------------------------------------------------------------------
TORCH_CALLS = {  # the same call on torch's quantized tensor and on a QTensor
    "torch.flatten": lambda t: torch.flatten(t, 1),
    "Tensor.flatten": lambda t: t.flatten(1),
    "Tensor.reshape": lambda t: t.reshape(t.shape[0], -1),
    "Tensor.view": lambda t: t.contiguous().view(-1),
    "torch.transpose": lambda t: torch.transpose(t, 1, 2),
    "Tensor.permute": lambda t: t.permute(0, 2, 3, 1),
    "Tensor.contiguous": lambda t: t.transpose(2, 3).contiguous(),
    "Tensor.contiguous(cl)": lambda t: t.contiguous(memory_format=torch.channels_last),
    "torch.chunk": lambda t: torch.chunk(t, 2, 1),
    "Tensor.split": lambda t: t.split(1, 1),
    "Tensor.unsqueeze/squeeze": lambda t: t.unsqueeze(0).squeeze(0),
    "indexing": lambda t: t[:, 1:],
    "torch.channel_shuffle": lambda t: torch.channel_shuffle(t, 2),
    "F.relu": F.relu,
    "F.relu inplace": lambda t: F.relu(t.clone(), inplace=True),
    "torch.relu": torch.relu,
    "Tensor.relu": lambda t: t.relu(),
    "F.relu6": F.relu6,
    "F.hardtanh": lambda t: F.hardtanh(t, -3.3 * t.q_scale(), 20.5 * t.q_scale()),
    "torch.clamp": lambda t: torch.clamp(t, -4.5 * t.q_scale(), 0.5 * t.q_scale()),
    "Tensor.clamp": lambda t: t.clamp(min=1.5 * t.q_scale()),
    "F.max_pool2d": lambda t: F.max_pool2d(t, 3, 2, 1),
    "F.avg_pool2d": lambda t: F.avg_pool2d(t, 2),
    "F.avg_pool2d pad": lambda t: F.avg_pool2d(t, 3, 2, 1, True, False),
    "F.adaptive_avg_pool2d": lambda t: F.adaptive_avg_pool2d(t, (2, 1)),
    "Tensor.mean": lambda t: t.mean([2, 3]),
    "torch.mean keepdim": lambda t: torch.mean(t, [1], True),
    "F.dropout eval": lambda t: F.dropout(t, 0.5, False),
    "nn.ReLU(inplace)": lambda t: nn.ReLU(inplace=True)(t.clone()),
    "nn.ReLU6": nn.ReLU6(),
    "nn.Hardtanh": nn.Hardtanh(-0.1, 0.1),
    "nn.MaxPool2d": nn.MaxPool2d(2, ceil_mode=True),
    "nn.AvgPool2d": nn.AvgPool2d(3, 1, 1),
    "nn.AdaptiveAvgPool2d": nn.AdaptiveAvgPool2d(1),
    "nn.Flatten": nn.Flatten(),
    "nn.Dropout": nn.Dropout().eval(),
    "nn.Identity": nn.Identity(),
    "a CNN tail": nn.Sequential(nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout()).eval(),
}


@st.composite
def activations(draw):
    """(N, C, H, W) integers as torch's quantized convs leave them (channels-last) or as a QuantStub does (NCHW)."""
    dtype = draw(st.sampled_from([torch.uint8, torch.int8]))
    lo, hi = dtype_range(dtype)
    n, c, h, w = draw(st.integers(1, 2)), 2 * draw(st.integers(1, 12)), draw(st.integers(2, 7)), draw(st.integers(2, 7))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randint(lo, hi + 1, (n, c, h, w), generator=g).to(dtype)
    if draw(st.booleans()):
        x = x.contiguous(memory_format=torch.channels_last)
    scale = draw(st.floats(2.0**-10, 1.0).map(lambda v: float(torch.tensor(v))))
    return x, scale, draw(st.integers(lo, hi)) | 1


@requires_kernels
@pytest.mark.parametrize("name", list(TORCH_CALLS))
@given(case=activations())
def test_torch_functions_match_torchs_quantized_tensors(name, case):
    x_int, s, z = case
    if name == "torch.channel_shuffle" and x_int.dtype == torch.int8:
        return  # torch's quantized channel_shuffle supports quint8 only (minqat: any dtype, it moves integers)
    call = TORCH_CALLS[name]
    assert_same(call(QTensor(x_int.clone(), s, z)), call(tq(x_int, s, z)), name)


@requires_kernels
@pytest.mark.filterwarnings("ignore:All inputs of this cat operator:UserWarning")
@given(case=activations(), data=st.data())
def test_torch_cat_requantizes_to_the_first_inputs_qparams(case, data):
    x_int, s, z = case
    lo, hi = dtype_range(x_int.dtype)
    other = x_int.flip(0).contiguous(memory_format=torch.channels_last if data.draw(st.booleans()) else
                                     torch.contiguous_format)
    s2, z2 = s * data.draw(st.sampled_from([0.5, 1.5, 1.0])), data.draw(st.integers(lo, hi))
    dim = data.draw(st.sampled_from([1, -3, 0, 2]))
    expected = torch.cat([tq(x_int, s, z), tq(other, s2, z2)], dim)  # torch warns, then requantizes
    with pytest.warns(UserWarning, match="must share the same quantization parameters") if (s2, z2) != (s, z) \
            else contextlib.nullcontext():
        actual = torch.cat([QTensor(x_int, s, z), QTensor(other, s2, z2)], dim)
    assert_same(actual, expected, "torch.cat")


@requires_kernels
@given(case=activations(), data=st.data())
def test_qfunctional_twins_match_torch_ao(case, data):
    import torch.ao.nn.quantized as nnq

    x_int, s, z = case
    lo, hi = dtype_range(x_int.dtype)
    other = x_int.roll(1, 0).contiguous(memory_format=torch.channels_last if data.draw(st.booleans()) else
                                        torch.contiguous_format)
    s2, z2 = s * data.draw(st.sampled_from([0.5, 1.5, 1.0, 3.0])), data.draw(st.integers(lo, hi))
    f = nnq.QFunctional()
    f.scale, f.zero_point = s * data.draw(st.sampled_from([1.0, 2.0, 0.5, 0.37])), data.draw(st.integers(lo, hi)) | 1
    a, b = QTensor(x_int, s, z), QTensor(other, s2, z2)
    ta, tb = tq(x_int, s, z), tq(other, s2, z2)
    c = data.draw(st.floats(-50, 50)) * s
    for name, mine, theirs in [
        ("add", qt.add(a, b, f.scale, f.zero_point), f.add(ta, tb)),
        ("add_relu", qt.add_relu(a, b, f.scale, f.zero_point), f.add_relu(ta, tb)),
        ("mul", qt.mul(a, b, f.scale * s2, f.zero_point), nnq.QFunctional.mul(_with(f, s2), ta, tb)),
        ("add_scalar", qt.add_scalar(a, c), f.add_scalar(ta, c)),
        ("mul_scalar", qt.mul_scalar(a, c), f.mul_scalar(ta, c)),
        ("cat", qt.cat([a, b], 1, f.scale, f.zero_point), f.cat([ta, tb], 1)),
        ("matmul", qt.matmul(a, b.transpose(2, 3), f.scale * 10, f.zero_point),
         _with(f, 10.0).matmul(ta, tb.transpose(2, 3))),
    ]:
        assert_same(mine, theirs, name)


def _with(f, factor: float):
    """A copy of QFunctional ``f`` whose output scale is multiplied by ``factor``."""
    import torch.ao.nn.quantized as nnq

    g = nnq.QFunctional()
    g.scale, g.zero_point = f.scale * factor, f.zero_point
    return g


@requires_kernels
@given(data=st.data())
def test_quantize_and_dequantize_match_torch(data):
    dtype = data.draw(st.sampled_from([torch.uint8, torch.int8, torch.int32]))
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 1000))))
    x = [x, x.contiguous(memory_format=torch.channels_last), x.transpose(1, 3)][data.draw(st.integers(0, 2))]
    lo, hi = max(dtype_range(dtype)[0], -1000), min(dtype_range(dtype)[1], 1000)  # int32: a usable zero point
    s, z = data.draw(st.floats(1e-3, 1.0)), data.draw(st.integers(lo, hi))
    mine, theirs = QTensor.quantize(x, s, z, dtype), torch.quantize_per_tensor(x, s, z, getattr(torch, LEGACY[dtype]))
    assert_same(mine, theirs, "quantize_per_tensor")
    assert_bit_exact(mine.dequantize(), theirs.dequantize(), "dequantize")
    channels = x.shape[1]
    scales, zps = torch.rand(channels, dtype=torch.float64) + 0.01, torch.randint(max(lo, -100), min(hi, 100), (channels,))
    mine = QTensor.quantize(x, scales, zps, dtype, axis=1)
    theirs = torch.quantize_per_channel(x, scales, zps, 1, getattr(torch, LEGACY[dtype]))
    assert_bit_exact(mine.int_repr().contiguous(), theirs.int_repr().contiguous(), "quantize_per_channel")
    assert_bit_exact(mine.dequantize().contiguous(), theirs.dequantize().contiguous(), "per-channel dequantize")
    assert torch.equal(mine.q_per_channel_scales(), theirs.q_per_channel_scales())
    assert mine.stride() == theirs.stride()


# ----------------------------------------------------------------------------------------------
# (3) properties and golden vectors through the QTensor API (no torch.ao)
# ----------------------------------------------------------------------------------------------
@given(case=activations())
def test_views_keep_qparams_and_dequantize_consistently(case):
    x_int, s, z = case
    x = QTensor(x_int, s, z)
    for y in (torch.flatten(x, 1), x.permute(0, 2, 3, 1), x[:, :1], torch.chunk(x, 2, 1)[1]):
        assert (y.q_scale(), y.q_zero_point()) == (s, z)
    assert torch.equal(torch.flatten(x, 1).dequantize(), torch.flatten(x.dequantize(), 1))
    assert torch.equal(F.relu(x).dequantize(), F.relu(x.dequantize()))  # relu commutes with dequantize


def run_through_qtensor(case: dict):
    """A recorded case computed through the QTensor API (torch functions and minqat.qtensor.*), or None."""
    op = case["op"]
    if "x" in case and "scale" in case:
        x = QTensor(case["x"], case["scale"], case["zero_point"])
        calls = {
            "avg_pool2d": lambda: F.avg_pool2d(x, case["kernel_size"], case["stride"], case["padding"],
                                               case["ceil_mode"], case["count_include_pad"], case["divisor_override"]),
            "adaptive_avg_pool2d": lambda: F.adaptive_avg_pool2d(x, case["output_size"]),
            "mean": lambda: x.mean(case["dim"], case["keepdim"]),
            "relu": lambda: F.relu(x), "relu6": lambda: F.relu6(x),
            "hardtanh": lambda: F.hardtanh(x, *case["bounds"]),
            "add_scalar": lambda: qt.add_scalar(x, case["other"]), "mul_scalar": lambda: qt.mul_scalar(x, case["other"]),
        }
        return calls[op]() if op in calls else None
    if op in ("add", "add_relu", "mul", "matmul"):
        a = QTensor(case["a"], case["a_scale"], case["a_zero_point"])
        b = QTensor(case["b"], case["b_scale"], case["b_zero_point"])
        return getattr(qt, op)(a, b, case["y_scale"], case["y_zero_point"])
    if op == "cat" and not case["relu"]:
        tensors = [QTensor(t, s, z) for t, s, z in zip(case["tensors"], case["scales"], case["zero_points"])]
        return qt.cat(tensors, case["dim"], case["y_scale"], case["y_zero_point"])
    return None


def test_golden_vectors_through_the_qtensor_api():
    cases = torch.load(GOLDEN_FILE, weights_only=True)["cases"]
    replayed = 0
    for i, case in enumerate(cases):
        y = run_through_qtensor(case)
        if y is None:
            continue
        assert_bit_exact(y.int_repr(), case["y"], f"golden case {i} ({case['op']})")
        if "y_scale" in case:
            assert (y.q_scale(), y.q_zero_point()) == (case["y_scale"], case["y_zero_point"]), f"golden case {i}"
        replayed += 1
    assert replayed >= 120


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
Q = QTensor(torch.zeros(1, 2, 4, 4, dtype=torch.uint8), 0.1, 3)
P = QTensor(torch.zeros(2, 3, dtype=torch.int8), torch.tensor([0.1, 0.2, 0.3]), torch.zeros(3, dtype=torch.long), 1)


@pytest.mark.parametrize("call, error, match", [
    (lambda: torch.sigmoid(Q), TypeError, r"minqat.QTensor does not support torch.sigmoid: dequantize\(\) first"),
    (lambda: F.hardswish(Q), TypeError, r"does not support torch.nn.functional.hardswish"),
    (lambda: nn.Conv2d(2, 2, 1)(Q), TypeError, r"does not support torch.conv2d"),
    (lambda: torch.add(Q, Q), TypeError, r"does not support torch.add"),
    (lambda: torch.stack([Q, Q]), TypeError, r"does not support torch.stack"),
    (lambda: Q.sigmoid(), AttributeError, r"minqat.QTensor does not support Tensor.sigmoid"),
    (lambda: Q + Q, TypeError, r"does not support \+, -, \* or / directly"),
    (lambda: torch.zeros(1, 2, 4, 4) * Q, TypeError, r"does not support \+, -, \* or / directly"),
    (lambda: qt.add(torch.zeros(3), Q, 0.1, 0), TypeError, r"a must be a minqat.QTensor, got a torch.Tensor of dtype torch.float32"),
    (lambda: qt.mul(Q, Q.int_repr(), 0.1, 0), TypeError, r"b must be a minqat.QTensor, got a torch.Tensor of dtype torch.uint8"),
    (lambda: torch.cat([Q, torch.zeros(1, 2, 4, 4)]), TypeError, r"tensors\[1\] must be a minqat.QTensor"),
    (lambda: qt.add(Q, QTensor(Q.int_repr().to(torch.int8), 0.1, 3), 0.1, 0), ValueError, r"a_int and b_int must have the same dtype"),
    (lambda: qt.add(P, P, 0.1, 0), NotImplementedError, r"a needs a per-tensor QTensor; this one is quantized per channel along axis 1"),
    (lambda: P.q_scale(), NotImplementedError, r"q_scale\(\) needs a per-tensor QTensor"),
    (lambda: Q.q_per_channel_scales(), NotImplementedError, r"q_per_channel_scales\(\) needs a per-channel QTensor"),
    (lambda: torch.flatten(P), NotImplementedError, r"torch.flatten's input needs a per-tensor QTensor"),
    (lambda: F.dropout(Q, 0.5, True), NotImplementedError, r"dropout in training mode is not supported"),
    (lambda: F.max_pool2d(Q, 2, return_indices=True), TypeError, r"does not support torch.nn.functional.max_pool2d_with_indices"),
    (lambda: Q.mean([2, 3], dtype=torch.float32), ValueError, r"dtype must be None for the mean of a QTensor"),
    (lambda: torch.clamp(Q, torch.tensor(0.0)), ValueError, r"min and max must be Python numbers"),
    (lambda: Q.to(torch.float32), TypeError, r"QTensor.to cannot change the dtype"),
    (lambda: QTensor(torch.zeros(2), 0.1, 0), ValueError, r"int_repr must be a torch.uint8, torch.int8 or torch.int32 tensor, got Tensor torch.float32"),
    (lambda: QTensor(Q.int_repr(), -1.0, 0), ValueError, r"scale must be positive and finite"),
    (lambda: QTensor(Q.int_repr(), 0.1, 256), ValueError, r"zero_point must lie in \[quant_min, quant_max\] = \[0, 255\]"),
    (lambda: QTensor(P.int_repr(), torch.ones(2), torch.zeros(3, dtype=torch.long), 1), ValueError, r"scale must be a 1-D tensor with one entry per channel \(3\)"),
    (lambda: QTensor(P.int_repr(), torch.ones(3), torch.zeros(3), 1), ValueError, r"zero_point must be an integer tensor"),
    (lambda: QTensor(P.int_repr(), torch.ones(3), torch.zeros(3, dtype=torch.long), 2), ValueError, r"axis must lie in \[-2, 1\]"),
])
def test_error_messages(call, error, match):
    with pytest.raises(error, match=match):
        call()
