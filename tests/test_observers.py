"""minqat.observers: statistics (numerics.md §3.2) and their qparams (§3.3), bit for bit with torch.ao.

Hand-worked values, live parity with torch.ao over random configurations and batch sequences,
state-dict interchange in both directions, the "accelerator" code paths (value checks switched off),
bad-input messages, and a replay of recorded torch.ao results that needs no torch.ao.
"""
from __future__ import annotations

import math
import pathlib
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import minqat.observers as mo
from minqat.dtypes import plain_dtype
from minqat.observers import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
)
from minqat.qparams import PER_CHANNEL_QSCHEMES, PER_TENSOR_QSCHEMES
from tests.oracle import ao, assert_bit_exact, requires_ao
from tests.test_qparams import F32, f32, qconfigs

GOLDEN = pathlib.Path(__file__).parent / "golden" / "observers.pt"
CLASSES = ["MinMaxObserver", "MovingAverageMinMaxObserver", "PerChannelMinMaxObserver",
           "MovingAveragePerChannelMinMaxObserver"]
PER_CHANNEL_CLASSES = {"PerChannelMinMaxObserver", "MovingAveragePerChannelMinMaxObserver"}


def quietly(fn, *args, **kwargs):
    """Call ``fn`` with warnings silenced (torch.ao's reduce_range / never-run warnings)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------
# hand-worked values
# ---------------------------------------------------------------------------------------------------


def test_min_max_running_extremes():
    obs = MinMaxObserver()
    x = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    assert obs(x) is x
    obs(torch.tensor([-1.0, 2.5]))
    assert_bit_exact(obs.min_val, torch.tensor(-2.0), "min")
    assert_bit_exact(obs.max_val, torch.tensor(3.0), "max")
    scale, zp = obs.calculate_qparams()
    s = F32(5) / F32(255)
    assert_bit_exact(scale, f32(s), "scale = 5 / 255")
    assert_bit_exact(zp, torch.tensor([int(-np.rint(F32(-2) / s))], dtype=torch.int32), "zp = 0 - rint(-2 / scale)")


def test_moving_average_by_hand():
    """min = min + fl32(0.01) * (cur - min): three float32 roundings, c rounded to float32 first."""
    obs = MovingAverageMinMaxObserver()
    obs(torch.tensor([-1.0, 1.0]))  # first batch: taken as is
    assert_bit_exact(obs.min_val, torch.tensor(-1.0), "first min")
    obs(torch.tensor([-3.0, 0.3]))
    c = F32(0.01)
    expected_min = F32(-1) + c * (F32(-3) - F32(-1))
    expected_max = F32(1) + c * (F32(0.3) - F32(1))
    assert_bit_exact(obs.min_val, torch.tensor(expected_min), "min")
    assert_bit_exact(obs.max_val, torch.tensor(expected_max), "max")


def test_moving_average_first_batch_needs_both_infinities():
    """The first-batch test is ``min == +inf and max == -inf``; a -inf min alone does not re-seed."""
    obs = MovingAverageMinMaxObserver(averaging_constant=0.5)
    obs.min_val.fill_(math.inf)
    obs.max_val.fill_(4.0)
    obs(torch.tensor([0.0, 2.0]))
    assert torch.isnan(obs.min_val)  # inf + 0.5 * (0 - inf) = inf - inf
    assert_bit_exact(obs.max_val, torch.tensor(3.0), "max averaged, not re-seeded")


def test_per_channel_by_hand():
    obs = MovingAveragePerChannelMinMaxObserver(averaging_constant=0.5, ch_axis=-1)
    x = torch.tensor([[[1.0, -1.0, 0.0]], [[2.0, 4.0, 0.0]]])  # (2, 1, 3): three channels on the last dim
    obs(x)
    assert_bit_exact(obs.min_val, torch.tensor([1.0, -1.0, 0.0]), "first min")
    assert_bit_exact(obs.max_val, torch.tensor([2.0, 4.0, 0.0]), "first max")
    obs(torch.tensor([[[3.0, -3.0, 0.0]]]))
    assert_bit_exact(obs.min_val, torch.tensor([2.0, -2.0, 0.0]), "averaged min")  # 1 + (3 - 1) / 2, ...
    assert_bit_exact(obs.max_val, torch.tensor([2.5, 0.5, 0.0]), "averaged max")  # 2 + (3 - 2) / 2, 4 + (-3 - 4) / 2
    scale, zp = obs.calculate_qparams()
    s = F32(2.5) / F32(255)  # channel 0: [0, 2.5] (0 included), channel 1: [-2, 0.5]
    assert_bit_exact(scale, f32([s, s, 2.0**-23]), "scales")
    assert_bit_exact(zp, torch.tensor([0, int(-np.rint(F32(-2) / s)), 0], dtype=torch.int32), "zps (204)")
    assert int(-np.rint(F32(-2) / s)) == 204


def test_all_zero_and_constant_inputs():
    obs = MinMaxObserver(qscheme=torch.per_tensor_symmetric)
    obs(torch.zeros(4))
    assert_bit_exact(obs.calculate_qparams()[0], f32(2.0**-23), "all-zero scale")
    assert_bit_exact(obs.calculate_qparams()[1], torch.tensor([128]), "all-zero zp")
    obs = MinMaxObserver(qscheme=torch.per_tensor_symmetric, quant_min=0, quant_max=255)
    obs(torch.full((3,), 3.0))
    assert_bit_exact(obs.calculate_qparams()[0], f32(F32(3) / F32(127.5)), "constant 3 scale")
    assert_bit_exact(obs.calculate_qparams()[1], torch.tensor([127]), "custom-range zp")


def test_default_qat_activation_range():
    """torch's default QAT activation observer: custom [0, 255] + reduce_range -> [0, 127] (§4.3)."""
    obs = MovingAverageMinMaxObserver(quant_min=0, quant_max=255, reduce_range=True)
    assert (obs.quant_min, obs.quant_max, obs.has_customized_qrange) == (0, 127, True)
    obs(torch.tensor([-1.0, 1.0]))
    assert_bit_exact(obs.calculate_qparams()[0], f32(F32(2) / F32(127)), "scale = 2 / 127")


@pytest.mark.parametrize("name", CLASSES)
def test_empty_input_is_returned_and_ignored(name):
    obs = getattr(mo, name)()
    x = torch.empty(0, 3)
    assert obs(x) is x
    state = {k: v.clone() for k, v in obs.state_dict().items()}
    with pytest.warns(UserWarning, match="must run observer before calling calculate_qparams"):
        scale, zp = obs.calculate_qparams()
    assert_bit_exact(scale, torch.tensor([1.0]), "default scale")
    assert_bit_exact(zp, torch.tensor([0]), "default zero point (int64)")
    for k, v in obs.state_dict().items():
        assert_bit_exact(v, state[k], k)


@pytest.mark.parametrize("name", CLASSES)
def test_reset_min_max_vals(name):
    obs = getattr(mo, name)()
    fresh = {k: v.clone() for k, v in obs.state_dict().items()}
    obs(torch.randn(3, 4))
    obs.reset_min_max_vals()
    for k, v in obs.state_dict().items():
        assert_bit_exact(v, fresh[k], k)


def test_legacy_dtypes_are_stored_plain():
    for legacy, plain in (("quint8", torch.uint8), ("qint8", torch.int8), ("qint32", torch.int32)):
        if hasattr(torch, legacy):
            assert MinMaxObserver(dtype=getattr(torch, legacy)).dtype == plain


def test_with_args_builds_fresh_instances():
    factory = MovingAveragePerChannelMinMaxObserver.with_args(averaging_constant=1.0).with_args(ch_axis=1)
    a, b = factory(), factory(dtype=torch.int8)
    assert a is not b and a.min_val is not b.min_val
    assert (a.ch_axis, a.averaging_constant, a.dtype, b.dtype) == (1, 1.0, torch.uint8, torch.int8)
    assert factory.func is MovingAveragePerChannelMinMaxObserver
    assert "averaging_constant=1.0" in repr(factory)


def test_extra_repr():
    text = repr(MinMaxObserver(dtype=torch.int8))
    assert "dtype=torch.int8, qscheme=torch.per_tensor_affine, quant_min=-128, quant_max=127" in text


# ---------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------


MM, MA, PC, MAPC = (MinMaxObserver, MovingAverageMinMaxObserver, PerChannelMinMaxObserver,
                    MovingAveragePerChannelMinMaxObserver)
SYM = torch.per_tensor_symmetric


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (MM, dict(qscheme=torch.per_channel_affine), r"MinMaxObserver's qscheme must be one of "
         r"torch.per_tensor_affine, torch.per_tensor_symmetric, got torch.per_channel_affine"),
        (MA, dict(qscheme=torch.per_channel_symmetric), r"MovingAverageMinMaxObserver's qscheme must be one of "),
        (PC, dict(qscheme=torch.per_tensor_affine), r"PerChannelMinMaxObserver's qscheme must be one of "
         r"torch.per_channel_affine, torch.per_channel_symmetric, torch.per_channel_affine_float_qparams, "
         r"got torch.per_tensor_affine"),
        (MM, dict(qscheme="symmetric"), r"qscheme must be one of .*, got 'symmetric'"),
        (MM, dict(dtype=torch.float32), r"dtype must be one of .*, got torch.float32"),
        (MM, dict(quant_min=0), r"quant_min and quant_max must be given together .* got quant_min=0, quant_max=None"),
        (MM, dict(quant_min=1, quant_max=255), r"must contain 0"),
        (MM, dict(dtype=torch.int8, quant_min=-128, quant_max=128), r"257 levels, more than torch.int8 holds"),
        (MM, dict(quant_min=0, quant_max=1, reduce_range=True), r"reduce_range halves the custom range"),
        (MM, dict(qscheme=SYM, reduce_range=True),
         r"reduce_range=True is not supported with symmetric qscheme and dtype uint8"),
        (PC, dict(qscheme=torch.per_channel_symmetric, reduce_range=True, quant_min=0, quant_max=255),
         r"reduce_range=True is not supported with symmetric"),
        (MM, dict(eps=0.0), r"eps must be a positive finite number, got 0.0"),
        (MM, dict(eps=float("nan")), r"eps must be a positive finite number, got nan"),
        (MA, dict(averaging_constant=0.0), r"averaging_constant must be a number in \(0, 1\], got 0.0"),
        (MA, dict(averaging_constant=1.5), r"averaging_constant must be a number in \(0, 1\], got 1.5"),
        (MAPC, dict(averaging_constant=-0.1), r"averaging_constant must be a number in \(0, 1\]"),
        (MA, dict(is_dynamic=True), r"is_dynamic=True needs averaging_constant=1"),
        (PC, dict(is_dynamic=True), r"PerChannelMinMaxObserver does not support is_dynamic=True"),
        (PC, dict(ch_axis=1.0), r"ch_axis must be an integer, got 1.0"),
    ],
)
def test_bad_constructor_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("name", ["PerChannelMinMaxObserver", "MovingAveragePerChannelMinMaxObserver"])
def test_bad_ch_axis_and_channel_count(name):
    obs = getattr(mo, name)(ch_axis=2)
    with pytest.raises(ValueError, match=r"ch_axis must lie in \[-2, 1\] for a 2-d input, got 2"):
        obs(torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"ch_axis must lie in none \(the input is 0-d\) for a 0-d input"):
        obs(torch.tensor(1.0))
    obs(torch.ones(1, 2, 3))
    with pytest.raises(ValueError, match=rf"{name} has seen 3 channels along ch_axis=2, got an input of shape \(1, 2, 4\) with 4"):
        obs(torch.ones(1, 2, 4))


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_batch_is_rejected_on_cpu(name, bad):
    obs = getattr(mo, name)()
    obs(torch.ones(2, 2))
    before = {k: v.clone() for k, v in obs.state_dict().items()}
    with pytest.raises(ValueError, match=rf"{name} observed a non-finite value \(NaN or \+-inf\) in its input"):
        obs(torch.tensor([[0.0, bad], [1.0, 2.0]]))
    for k, v in obs.state_dict().items():
        assert_bit_exact(v, before[k], f"{k} untouched")


def test_corrupt_state_min_above_max_is_rejected():
    obs = MinMaxObserver()
    obs.load_state_dict({"eps": torch.tensor([2.0**-23]), "min_val": torch.tensor(2.0), "max_val": torch.tensor(1.0)})
    with pytest.raises(ValueError, match=r"min_val must not exceed max_val, got min_val=2.0, max_val=1.0"):
        obs.calculate_qparams()


# ---------------------------------------------------------------------------------------------------
# the accelerator code paths (value checks off), run on CPU by switching reads_values off
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def no_value_reads(monkeypatch):
    monkeypatch.setattr(mo, "reads_values", lambda t: False)


def test_never_run_defaults_without_host_sync(no_value_reads):
    for qscheme, zp_dtype in ((torch.per_tensor_affine, torch.int32), (torch.per_tensor_symmetric, torch.int64)):
        obs = MovingAverageMinMaxObserver(qscheme=qscheme)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning: it would need the values
            scale, zp = obs.calculate_qparams()
        assert_bit_exact(scale, torch.tensor([1.0]), "blended default scale")
        assert_bit_exact(zp, torch.tensor([0], dtype=zp_dtype), "blended default zero point")
        obs(torch.tensor([-1.0, 1.0]))
        assert_bit_exact(obs.calculate_qparams()[0], f32(F32(2) / F32(255)), "observed scale")


@requires_ao
@pytest.mark.parametrize("name", CLASSES)
def test_nan_propagates_like_torch_without_checks(no_value_reads, name):
    ours, theirs = getattr(mo, name)(), quietly(getattr(ao(), name))
    for x in (torch.tensor([[1.0, 2.0]]), torch.tensor([[float("nan"), 0.5]]), torch.tensor([[3.0, -1.0]])):
        ours(x), theirs(x)
        assert_bit_exact(ours.min_val, theirs.min_val, "min_val")
        assert_bit_exact(ours.max_val, theirs.max_val, "max_val")


@pytest.mark.cuda
@requires_ao
@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("qscheme", ["affine", "symmetric"])
def test_cuda_parity_without_host_sync(name, qscheme):
    """On CUDA: no host synchronisation in forward / calculate_qparams, and the same bits as torch.ao's
    observers on CUDA (they divide by a Python float, i.e. multiply by its reciprocal there, §11)."""
    per_channel = name in PER_CHANNEL_CLASSES
    qscheme = getattr(torch, ("per_channel_" if per_channel else "per_tensor_") + qscheme)
    kwargs = dict(dtype=torch.int8, qscheme=qscheme, quant_min=-127, quant_max=127)
    ours, theirs = getattr(mo, name)(**kwargs).cuda(), quietly(getattr(ao(), name), **kwargs).cuda()
    gen = torch.Generator().manual_seed(0)
    if not per_channel:
        torch.cuda.set_sync_debug_mode("error")
        try:
            scale, zp = ours.calculate_qparams()  # never run: blended defaults, no warning, no sync
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert scale.tolist() == [1.0] and zp.tolist() == [0]
    for step in range(4):
        x = (torch.randn(8, 3, 5, generator=gen) * 10.0 ** (step - 2)).cuda()
        torch.cuda.set_sync_debug_mode("error")
        try:
            assert ours(x) is x
            actual = ours.calculate_qparams()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        theirs(x)
        expected = quietly(theirs.calculate_qparams)
        assert_bit_exact(ours.min_val, theirs.min_val, f"step {step}: min_val")
        assert_bit_exact(ours.max_val, theirs.max_val, f"step {step}: max_val")
        assert_bit_exact(actual[0], expected[0], f"step {step}: scale")
        assert_bit_exact(actual[1], expected[1], f"step {step}: zero_point")


# ---------------------------------------------------------------------------------------------------
# strategies: configurations and batch sequences
# ---------------------------------------------------------------------------------------------------

_KINDS = ["normal", "normal", "constant", "zeros", "positive", "negative", "tiny", "huge", "mixed"]
_CONSTANTS = [3.0, -3.0, 0.1, -1e-20, 7e30, 1e-45, -0.0]


def _values(rng: np.random.Generator, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    """float32 data of one kind: the adversarial shapes of a range (constant, one-signed, tiny...)."""
    normal = rng.standard_normal(shape)
    if kind == "normal":
        return (normal * 10.0 ** rng.uniform(-3, 3)).astype(F32)
    if kind == "constant":
        return np.full(shape, rng.choice(_CONSTANTS), dtype=F32)
    if kind == "zeros":
        return (np.zeros(shape) * rng.choice([-1.0, 1.0], shape)).astype(F32)
    if kind in ("positive", "negative"):
        return (np.abs(normal) * (1 if kind == "positive" else -1) * 10.0 ** rng.uniform(-3, 3)).astype(F32)
    if kind == "tiny":
        return (normal * rng.choice([1e-40, 1e-30, 1e-10])).astype(F32)
    if kind == "huge":
        return np.clip(normal * rng.choice([1e30, 1e37, 1e38]), -3.4e38, 3.4e38).astype(F32)
    return np.where(rng.random(shape) < 0.5, _values(rng, "constant", shape), _values(rng, "normal", shape))


@st.composite
def batch_sequences(draw, per_channel: bool, min_ndim: int = 0):
    """(ch_axis, [batches]): 1-4 float tensors of random shapes (incl. 1-element and empty ones).

    Per channel: a fixed number of dims and channels, ``ch_axis`` possibly negative; some batches
    make every channel a different kind (constant / one-signed / zero channels)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    ndim = draw(st.integers(max(min_ndim, 1 if per_channel else 0), 4))
    ch_axis = draw(st.integers(-ndim, ndim - 1)) if per_channel else 0
    channels = draw(st.integers(1, 5))
    batches = []
    for _ in range(draw(st.integers(1, 4))):
        shape = [draw(st.integers(0 if draw(st.integers(0, 9)) == 0 else 1, 4)) for _ in range(ndim)]
        if per_channel:
            shape[ch_axis] = channels
        kind = draw(st.sampled_from(_KINDS))
        x = _values(rng, kind, tuple(shape))
        if per_channel and draw(st.booleans()) and x.size:
            x = np.moveaxis(x, ch_axis, 0).copy()
            for c in range(channels):
                x[c] = _values(rng, draw(st.sampled_from(_KINDS)), x[c].shape)
            x = np.moveaxis(x, 0, ch_axis)
        dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float32, torch.float64, torch.bfloat16]))
        batches.append(torch.from_numpy(np.array(x, dtype=F32)).to(dtype))  # np.array keeps 0-d
    return ch_axis, batches


def _build(module, name: str, config, ch_axis: int, averaging_constant: float, eps: float):
    dtype, qscheme, reduce_range, quant_min, quant_max = config
    kwargs = dict(dtype=dtype, qscheme=qscheme, reduce_range=reduce_range, quant_min=quant_min,
                  quant_max=quant_max, eps=eps)
    if name in PER_CHANNEL_CLASSES:
        kwargs["ch_axis"] = ch_axis
    if name.startswith("MovingAverage"):
        kwargs["averaging_constant"] = averaging_constant
    return quietly(getattr(module, name), **kwargs)


def _assert_same_state(ours, theirs, what: str) -> None:
    assert_bit_exact(ours.min_val, theirs.min_val, f"{what}: min_val")
    assert_bit_exact(ours.max_val, theirs.max_val, f"{what}: max_val")
    assert_bit_exact(ours.eps, theirs.eps, f"{what}: eps")
    try:
        expected = quietly(theirs.calculate_qparams)
    except AssertionError:  # min > max, e.g. by a rounding of the moving average with c = 1
        with pytest.raises(ValueError, match="min_val must not exceed max_val"):
            ours.calculate_qparams()
        return
    actual = quietly(ours.calculate_qparams)
    assert_bit_exact(actual[0], expected[0], f"{what}: scale")
    assert_bit_exact(actual[1], expected[1], f"{what}: zero_point")


# ---------------------------------------------------------------------------------------------------
# parity with torch.ao
# ---------------------------------------------------------------------------------------------------


def _parity(name: str, data) -> None:
    per_channel = name in PER_CHANNEL_CLASSES
    config = data.draw(qconfigs(PER_CHANNEL_QSCHEMES if per_channel else PER_TENSOR_QSCHEMES), "config")
    # torch.ao's per-channel observers fail on 1-d inputs (minqat takes them: one value per channel)
    ch_axis, batches = data.draw(batch_sequences(per_channel, min_ndim=2 if per_channel else 0), "batches")
    averaging_constant = data.draw(st.sampled_from([0.01, 0.5, 1.0, 1 / 3]), "averaging_constant")
    eps = data.draw(st.sampled_from([torch.finfo(torch.float32).eps, 2.0**-12]), "eps")
    ours = _build(mo, name, config, ch_axis, averaging_constant, eps)
    theirs = _build(ao(), name, config, ch_axis, averaging_constant, eps)
    assert (ours.quant_min, ours.quant_max) == (theirs.quant_min, theirs.quant_max)
    assert ours.dtype == plain_dtype(theirs.dtype)
    for i, x in enumerate(batches):
        assert ours(x) is x
        theirs(x)
        _assert_same_state(ours, theirs, f"after batch {i} of shape {tuple(x.shape)}")


@requires_ao
@pytest.mark.oracle
@pytest.mark.parametrize("name", CLASSES)
@given(data=st.data())
def test_parity_with_torch_ao(name, data):
    _parity(name, data)


# ---------------------------------------------------------------------------------------------------
# state dicts interchange with torch.ao (strict=True, both ways)
# ---------------------------------------------------------------------------------------------------


@requires_ao
@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("observed_from", [True, False])
@pytest.mark.parametrize("direction", ["torch->minqat", "minqat->torch"])
def test_state_dict_interchange(name, observed_from, direction):
    """Load a state dict of one library's observer (observed or never run) into the other's
    observer (never run, or observed on a different channel count), strict=True."""
    kwargs = dict(dtype=torch.int8, eps=2.0**-12)
    src_module, dst_module = (ao(), mo) if direction == "torch->minqat" else (mo, ao())
    src = quietly(getattr(src_module, name), **kwargs)
    dst = quietly(getattr(dst_module, name), **kwargs)
    if observed_from:
        src(torch.randn(4, 3) * 3)
    dst(torch.randn(2, 5))  # per channel: 2 channels, so the load must resize
    dst.load_state_dict(src.state_dict(), strict=True)
    ours, theirs = (dst, src) if direction == "torch->minqat" else (src, dst)
    _assert_same_state(ours, theirs, direction)
    assert ours.state_dict()._metadata[""]["version"] == theirs.state_dict()._metadata[""]["version"] == 3


# ---------------------------------------------------------------------------------------------------
# properties (no oracle)
# ---------------------------------------------------------------------------------------------------


@given(batches=batch_sequences(per_channel=True), moving=st.booleans())
def test_per_channel_equals_per_tensor_per_slice(batches, moving):
    """A per-channel observer holds, for each channel, exactly what a per-tensor observer of that
    channel's slices holds (empty batches skipped by both)."""
    ch_axis, xs = batches
    if moving:
        ours = MovingAveragePerChannelMinMaxObserver(averaging_constant=0.25, ch_axis=ch_axis)
        make = lambda: MovingAverageMinMaxObserver(averaging_constant=0.25)  # noqa: E731
    else:
        ours, make = PerChannelMinMaxObserver(ch_axis=ch_axis), MinMaxObserver
    xs = [x for x in xs if x.numel()]
    if not xs:
        return
    singles = [make() for _ in range(xs[0].shape[ch_axis])]
    for x in xs:
        ours(x)
        for c, single in enumerate(singles):
            single(x.select(ch_axis, c))
    # equal values; the sign of a zero may differ (aminmax over a row vs over a slice)
    assert torch.equal(ours.min_val, torch.stack([s.min_val for s in singles]))
    assert torch.equal(ours.max_val, torch.stack([s.max_val for s in singles]))


@given(batches=batch_sequences(per_channel=False))
def test_min_max_is_order_free_and_averaging_constant_one_nearly_memoryless(batches):
    """MinMax holds the extremes of everything seen, in any order. With c = 1 the moving average
    holds the last batch's extremes up to float32 rounding: ``m + 1 * (cur - m)`` is not exactly ``cur``."""
    _, xs = batches
    xs = [x.float() for x in xs if x.numel()]
    if not xs:
        return
    forward, backward, last = MinMaxObserver(), MinMaxObserver(), MovingAverageMinMaxObserver(averaging_constant=1.0)
    for x in xs:
        forward(x), last(x)
    for x in reversed(xs):
        backward(x)
    everything = torch.cat([x.flatten() for x in xs])
    assert torch.equal(forward.min_val, everything.min()) and torch.equal(forward.max_val, everything.max())
    assert torch.equal(forward.min_val, backward.min_val) and torch.equal(forward.max_val, backward.max_val)
    tol = 4 * torch.finfo(torch.float32).eps * everything.abs().max().double()
    assert abs(last.min_val.double() - xs[-1].min().double()) <= tol
    assert abs(last.max_val.double() - xs[-1].max().double()) <= tol


# ---------------------------------------------------------------------------------------------------
# golden replay (no torch.ao needed)
# ---------------------------------------------------------------------------------------------------


def _golden():
    return torch.load(GOLDEN, weights_only=True)


def test_golden_observer_replay():
    cases = _golden()["observer_cases"]
    assert len(cases) >= 50
    for i, case in enumerate(cases):
        kwargs = dict(case["kwargs"])
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
        kwargs["qscheme"] = getattr(torch, kwargs["qscheme"])
        obs = getattr(mo, case["cls"])(**kwargs)
        flat, offset = case["inputs"], 0
        for step, shape in enumerate(case["shapes"]):
            n = math.prod(shape)
            obs(flat[offset : offset + n].reshape(shape))
            offset += n
            what = f"case {i} ({case['cls']}, {case['kwargs']}) step {step}"
            assert_bit_exact(obs.min_val, case["min_val"][step], f"{what}: min_val")
            assert_bit_exact(obs.max_val, case["max_val"][step], f"{what}: max_val")
            scale, zero_point = quietly(obs.calculate_qparams)
            assert_bit_exact(scale, case["scale"][step], f"{what}: scale")
            assert_bit_exact(zero_point, case["zero_point"][step], f"{what}: zero_point")


def test_golden_qparams_replay():
    from minqat.qparams import calculate_qparams

    cases = _golden()["qparams_cases"]
    assert len(cases) >= 50
    for i, case in enumerate(cases):
        qscheme, dtype = getattr(torch, case["qscheme"]), getattr(torch, case["dtype"])
        scale, zero_point = calculate_qparams(case["min_val"], case["max_val"], case["quant_min"], case["quant_max"],
                                              qscheme, dtype, case["eps"], case["has_customized_qrange"])
        assert_bit_exact(scale, case["scale"], f"qparams case {i}: scale")
        assert_bit_exact(zero_point, case["zero_point"], f"qparams case {i}: zero_point")


# ---------------------------------------------------------------------------------------------------
# per-channel buffers on storages that cannot be resized (a whole observer torch.load-ed before it ran)
# ---------------------------------------------------------------------------------------------------


def _torch_loaded(module):
    """``module`` through ``torch.save`` / ``torch.load`` as a whole: its tensors' storages are not resizable."""
    import io

    buffer = io.BytesIO()
    torch.save(module, buffer)
    return torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)


def test_resize_buffer_swaps_the_storage_of_the_same_tensor():
    loaded = _torch_loaded(torch.tensor([], dtype=torch.float64))
    assert not loaded.untyped_storage().resizable()
    with pytest.raises(RuntimeError, match="not resizable"):  # what torch.ao's resize_ hits
        _torch_loaded(torch.tensor([])).resize_(2)
    alias = loaded
    assert mo._resize_buffer(loaded, (3,)) is loaded
    assert alias.shape == (3,) and loaded.dtype == torch.float64 and loaded.device.type == "cpu"
    loaded.fill_(2.5)
    assert alias.tolist() == [2.5, 2.5, 2.5]
    pointer, view = loaded.data_ptr(), loaded[:2]
    mo._resize_buffer(loaded, torch.Size([3]))  # the same shape: untouched, no allocation
    assert loaded.data_ptr() == pointer and loaded.tolist() == [2.5, 2.5, 2.5]
    mo._resize_buffer(loaded, (0,))
    assert loaded.shape == (0,) and view.tolist() == [2.5, 2.5]  # an earlier view keeps the old storage


@pytest.mark.parametrize("name", sorted(PER_CHANNEL_CLASSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_per_channel_observer_torch_loaded_before_its_first_batch(name, dtype):
    """Trains like the observer never saved; the buffers stay the same tensors, of their dtype."""
    reference = getattr(mo, name)(ch_axis=1).to(dtype)
    loaded = _torch_loaded(reference)
    buffers = (loaded.min_val, loaded.max_val)
    assert not any(b.untyped_storage().resizable() for b in buffers)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        x = torch.randn(2, 3, 4, generator=gen) * (step + 1)
        assert loaded(x) is x and reference(x) is x
        assert loaded.min_val is buffers[0] and loaded.max_val is buffers[1]
        assert loaded.min_val.dtype == dtype and loaded.min_val.shape == (3,)
        assert_bit_exact(loaded.min_val, reference.min_val, f"step {step}: min_val")
        assert_bit_exact(loaded.max_val, reference.max_val, f"step {step}: max_val")
    for a, b in zip(loaded.calculate_qparams(), reference.calculate_qparams()):
        assert_bit_exact(a, b, "qparams")
    loaded.reset_min_max_vals()
    assert loaded.min_val.shape == (0,) and loaded.min_val is buffers[0]


@pytest.mark.parametrize("name", sorted(PER_CHANNEL_CLASSES))
def test_per_channel_state_dict_loads_into_a_torch_loaded_observer(name):
    trained = getattr(mo, name)()
    trained(torch.tensor([[1.0, -2.0], [3.0, 0.5], [-1.0, 4.0]]))
    for fresh in (_torch_loaded(getattr(mo, name)()), _torch_loaded(trained)):  # empty -> (3,), (3,) -> (3,)
        fresh.load_state_dict(trained.state_dict(), strict=True)
        assert_bit_exact(fresh.min_val, trained.min_val, "min_val")
        assert_bit_exact(fresh.max_val, trained.max_val, "max_val")
    emptied = _torch_loaded(trained)
    emptied.load_state_dict(getattr(mo, name)().state_dict(), strict=True)  # (3,) -> empty
    assert emptied.min_val.shape == (0,) and emptied.max_val.shape == (0,)


@pytest.mark.parametrize("name", sorted(PER_CHANNEL_CLASSES))
def test_per_channel_observer_copies_and_moves_before_its_first_batch(name):
    """deepcopy / .to() of a torch.load-ed fresh observer: independent copies, buffers follow dtype."""
    import copy

    loaded = _torch_loaded(getattr(mo, name)())
    twin = copy.deepcopy(loaded)
    wide = _torch_loaded(getattr(mo, name)()).to(torch.float64)
    x = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    twin(x), wide(x)
    assert loaded.min_val.shape == (0,), "the copy shares its buffers with the original"
    assert twin.min_val.tolist() == [-2.0, 0.5] and wide.min_val.dtype == torch.float64
    assert wide.max_val.tolist() == [1.0, 3.0]
