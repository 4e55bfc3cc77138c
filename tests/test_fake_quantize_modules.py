"""FakeQuantize, FusedMovingAvgObsFakeQuantize, LearnableFakeQuantize: parity with torch.ao over
sequences of batches (outputs, input gradients, every buffer), switches, state dicts, copies,
argument errors and the absence of host synchronisation in forward."""
from __future__ import annotations

import copy
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import minqat.qconfig as mq
from minqat import fake_quantize as mfq
from minqat.observers import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
)
from tests.golden import make_fake_quantize_modules as golden_script
from tests.oracle import ao, assert_bit_exact, requires_ao

# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------

KINDS = ["normal", "normal", "offset", "one_signed", "constant", "tiny", "zeros"]


def make_batch(rng: np.random.Generator, shape: tuple[int, ...], kind: str) -> torch.Tensor:
    """float32 data of one flavour: ordinary, shifted, one-signed per channel, constant, tiny, zeros."""
    x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-2, 2)
    if kind == "offset":
        x = x + rng.uniform(-5, 5)
    elif kind == "one_signed":  # each slice along dims 0 and 1 all >= 0 or all <= 0
        sign = np.where(rng.random(shape[:2] + (1,) * (len(shape) - 2)) < 0.5, -1.0, 1.0)
        x = np.abs(x) * sign
    elif kind == "constant":
        x = np.full(shape, rng.uniform(-3, 3))
    elif kind == "tiny":  # ranges below 255 * 6.1e-5: fbgemm's small-scale cut-off
        x = x * 1e-6
    elif kind == "zeros":
        x = np.zeros(shape)
    return torch.tensor(x, dtype=torch.float32)


ACTIONS = ["none", "none", "disable_observer", "enable_observer", "disable_fake_quant", "enable_fake_quant"]


@st.composite
def sequences(draw, min_dims: int = 1, max_dims: int = 4, kinds=KINDS):
    """1-4 batches of one shape, with a switch action before each batch after the first."""
    ndim = draw(st.integers(min_dims, max_dims))
    shape = tuple(draw(st.integers(1, 5)) for _ in range(ndim))
    n = draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batches = [make_batch(rng, shape, draw(st.sampled_from(kinds))) for _ in range(n)]
    grads = [torch.tensor(rng.standard_normal(shape), dtype=torch.float32) for _ in range(n)]
    actions = ["none"] + [draw(st.sampled_from(ACTIONS)) for _ in range(n - 1)]
    return batches, grads, actions


# ----------------------------------------------------------------------------------------------
# comparing a minqat module with torch.ao's twin
# ----------------------------------------------------------------------------------------------


def apply_action(action: str, ours: nn.Module, theirs: nn.Module) -> None:
    """The model.apply helpers on both sides."""
    if action != "none":
        ours.apply(getattr(mfq, action))
        theirs.apply(getattr(ao(), action))


def assert_same_state(ours: nn.Module, theirs: nn.Module, what: str) -> None:
    a, b = ours.state_dict(), theirs.state_dict()
    assert set(a) == set(b), f"{what}: state dict keys differ: {set(a) ^ set(b)}"
    for key in b:
        assert_bit_exact(a[key], b[key], f"{what}: {key}")


def step(ours, theirs, x, dy, what):
    """One forward/backward on both; outputs, input gradients and all buffers must agree."""
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
    assert_bit_exact(y_ours, y_theirs, f"{what}: output")
    y_ours.backward(dy)
    y_theirs.backward(dy)
    assert_bit_exact(x_ours.grad, x_theirs.grad, f"{what}: dx")
    assert_same_state(ours, theirs, what)


def run_sequence(ours, theirs, seq):
    batches, grads, actions = seq
    for i, (x, dy, action) in enumerate(zip(batches, grads, actions)):
        apply_action(action, ours, theirs)
        step(ours, theirs, x, dy, f"batch {i} ({action})")


# ----------------------------------------------------------------------------------------------
# the configurations: (name, minqat factory, torch.ao factory, smallest input rank)
# ----------------------------------------------------------------------------------------------

QCONFIG_FAKE_QUANTS = [
    "default_fake_quant",
    "default_weight_fake_quant",
    "default_per_channel_weight_fake_quant",
    "default_fused_act_fake_quant",
    "default_fused_wt_fake_quant",
    "default_fused_per_channel_wt_fake_quant",
    "fused_wt_fake_quant_range_neg_127_to_127",
    "fused_per_channel_wt_fake_quant_range_neg_127_to_127",
]


def _custom_configs():
    """Observers and ranges the qconfigs do not cover (torch side built lazily)."""
    int8_sym = dict(dtype=torch.int8, qscheme=torch.per_tensor_symmetric)
    return [
        ("minmax_affine", dict(observer=MinMaxObserver, quant_min=0, quant_max=255),
         lambda t: dict(observer=t.MinMaxObserver, quant_min=0, quant_max=255), 1, "fq"),
        ("ma_int8_affine_c05", dict(observer=MovingAverageMinMaxObserver, quant_min=-128, quant_max=127,
                                    dtype=torch.int8, averaging_constant=0.5),
         lambda t: dict(observer=t.MovingAverageMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.qint8,
                        averaging_constant=0.5), 1, "both"),
        ("ma_4bit_sym", dict(observer=MovingAverageMinMaxObserver, quant_min=-8, quant_max=7, **int8_sym),
         lambda t: dict(observer=t.MovingAverageMinMaxObserver, quant_min=-8, quant_max=7, dtype=torch.qint8,
                        qscheme=torch.per_tensor_symmetric), 1, "both"),
        ("ma_uint8_sym", dict(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255,
                              qscheme=torch.per_tensor_symmetric),
         lambda t: dict(observer=t.MovingAverageMinMaxObserver, quant_min=0, quant_max=255,
                        qscheme=torch.per_tensor_symmetric), 1, "both"),
        ("perchannel_minmax_axis1", dict(observer=PerChannelMinMaxObserver, quant_min=0, quant_max=255, ch_axis=1),
         lambda t: dict(observer=t.PerChannelMinMaxObserver, quant_min=0, quant_max=255, ch_axis=1), 2, "fq"),
        ("ma_perchannel_affine", dict(observer=MovingAveragePerChannelMinMaxObserver, quant_min=0, quant_max=15,
                                      qscheme=torch.per_channel_affine),
         lambda t: dict(observer=t.MovingAveragePerChannelMinMaxObserver, quant_min=0, quant_max=15,
                        qscheme=torch.per_channel_affine), 2, "both"),
    ]


def all_configs():
    """(name, minqat factory, torch factory (lazy), min_dims) for FakeQuantize and the fused module."""
    configs = []
    for name in QCONFIG_FAKE_QUANTS:
        min_dims = 2 if "per_channel" in name else 1
        configs.append((name, getattr(mq, name), lambda name=name: getattr(ao(), name), min_dims))
    for backend in ("x86", "qnnpack", "onednn"):  # fbgemm's settings equal x86's (tests/test_qconfig.py)
        for version in (0, 1):
            for role in ("activation", "weight"):
                ours = getattr(mq.get_default_qat_qconfig(backend, version), role)

                def theirs(backend=backend, version=version, role=role):
                    return getattr(ao().get_default_qat_qconfig(backend, version), role)

                configs.append((f"qat_{backend}_v{version}_{role}", ours, theirs, 2 if role == "weight" else 1))
    for role in ("activation", "weight"):  # int8 activations, [-127, 127] weights, eps 2**-12
        ours = getattr(mq.default_symmetric_qnnpack_qat_qconfig, role)
        configs.append((f"symmetric_qnnpack_qat_{role}", ours,
                        lambda role=role: getattr(ao().default_symmetric_qnnpack_qat_qconfig, role), 1))
    for name, kwargs, torch_kwargs, min_dims, which in _custom_configs():
        classes = [("FakeQuantize", mfq.FakeQuantize)] if which == "fq" else [
            ("FakeQuantize", mfq.FakeQuantize), ("FusedMovingAvgObsFakeQuantize", mfq.FusedMovingAvgObsFakeQuantize)]
        for cls_name, cls in classes:
            def theirs(cls_name=cls_name, torch_kwargs=torch_kwargs):
                return getattr(ao(), cls_name).with_args(**torch_kwargs(ao()))

            configs.append((f"{cls_name}_{name}", cls.with_args(**kwargs), theirs, min_dims))
    return configs


CONFIGS = all_configs()


@requires_ao
@pytest.mark.parametrize("name, ours, theirs, min_dims", CONFIGS, ids=[c[0] for c in CONFIGS])
@settings(max_examples=25)  # x 36 configurations
@given(data=st.data())
def test_parity_over_sequences(name, ours, theirs, min_dims, data):
    seq = data.draw(sequences(min_dims=min_dims))
    run_sequence(ours(), theirs()(), seq)


@requires_ao
def test_parity_histogram_fake_quant():
    """FakeQuantize around a HistogramObserver (its calibration search is slow: two batches only)."""
    rng = np.random.default_rng(7)
    seq = ([make_batch(rng, (3, 5), "normal"), make_batch(rng, (3, 5), "offset")],
           [torch.ones(3, 5), torch.full((3, 5), -0.5)], ["none", "none"])
    run_sequence(mq.default_histogram_fake_quant(bins=64), ao().default_histogram_fake_quant(bins=64), seq)


@requires_ao
def test_fused_reseeds_infinite_running_values_per_element():
    """A -inf batch min poisons nothing: the next batch re-seeds that entry only (§4.2)."""
    kwargs = dict(quant_min=-128, quant_max=127, dtype=torch.int8, qscheme=torch.per_channel_symmetric)
    ours = mfq.FusedMovingAvgObsFakeQuantize(MovingAveragePerChannelMinMaxObserver, **kwargs)
    theirs = ao().FusedMovingAvgObsFakeQuantize(ao().MovingAveragePerChannelMinMaxObserver,
                                                **dict(kwargs, dtype=torch.qint8))
    x0 = torch.tensor([[1.0, -2.0], [0.5, 3.0], [-1.0, 1.0]])
    x1 = torch.tensor([[-float("inf"), 0.0], [0.25, float("inf")], [-2.0, 2.0]])
    x2 = torch.tensor([[4.0, -4.0], [1.0, 2.0], [-0.5, 0.5]])
    step(ours, theirs, x0, torch.ones(3, 2), "x0")
    for m in (ours, theirs):
        m.disable_fake_quant()  # inf qparams would make the fake quant meaningless
    step(ours, theirs, x1, torch.ones(3, 2), "x1 (inf)")
    assert ours.activation_post_process.min_val[0].item() == -float("inf")
    step(ours, theirs, x2, torch.ones(3, 2), "x2 (re-seed)")
    assert ours.activation_post_process.min_val[0].item() == -4.0  # re-seeded, not averaged
    for m in (ours, theirs):
        m.enable_fake_quant()
    step(ours, theirs, x2, torch.ones(3, 2), "x2 again")


# ----------------------------------------------------------------------------------------------
# LearnableFakeQuantize
# ----------------------------------------------------------------------------------------------

LSQ_CONFIGS = [
    ("per_tensor_affine_u8", dict(quant_min=0, quant_max=255), "MovingAverageMinMaxObserver", False),
    ("per_tensor_sym_i8", dict(quant_min=-128, quant_max=127, dtype=torch.int8,
                               qscheme=torch.per_tensor_symmetric), "MovingAverageMinMaxObserver", False),
    ("per_tensor_affine_4bit", dict(quant_min=0, quant_max=15), "MinMaxObserver", False),
    ("per_channel_sym_i8", dict(quant_min=-128, quant_max=127, dtype=torch.int8,
                                qscheme=torch.per_channel_symmetric), "MovingAveragePerChannelMinMaxObserver", True),
    ("per_channel_affine_u8", dict(quant_min=0, quant_max=255, qscheme=torch.per_channel_affine),
     "MovingAveragePerChannelMinMaxObserver", True),
]
LSQ_MODES = ["none", "enable_param_learning", "enable_static_estimate", "enable_static_observation",
             "disable_fake_quant", "enable_fake_quant"]


def _torch_kwargs(kwargs: dict) -> dict:
    legacy = {torch.int8: torch.qint8, torch.uint8: torch.quint8}
    return {k: legacy.get(v, v) if k == "dtype" else v for k, v in kwargs.items()}


def _lsq_pair(kwargs, observer_name, per_channel, channels, use_grad_scaling):
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize

    import minqat.observers as mo

    extra = dict(channel_len=channels if per_channel else -1, use_grad_scaling=use_grad_scaling, scale=0.5,
                 zero_point=1.0)
    ours = mfq.LearnableFakeQuantize(getattr(mo, observer_name), **kwargs, **extra)
    theirs = _LearnableFakeQuantize(getattr(ao(), observer_name), **_torch_kwargs(kwargs), **extra)
    return ours, theirs


def _lsq_step(ours, theirs, x, dy, lr, what):
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
    assert_bit_exact(y_ours, y_theirs, f"{what}: output")
    if y_theirs.requires_grad:
        y_ours.backward(dy)
        y_theirs.backward(dy)
        assert_bit_exact(x_ours.grad, x_theirs.grad, f"{what}: dx")
    for name in ("scale", "zero_point"):
        g_ours, g_theirs = getattr(ours, name).grad, getattr(theirs, name).grad
        assert (g_ours is None) == (g_theirs is None), f"{what}: {name}.grad presence"
        if g_theirs is not None:
            assert_bit_exact(g_ours, g_theirs, f"{what}: d{name}")
            for module in (ours, theirs):  # one SGD step (a big lr drives the scale below eps)
                param = getattr(module, name)
                param.data.add_(param.grad, alpha=-lr)
                param.grad = None
    assert_same_state(ours, theirs, what)


@requires_ao
@pytest.mark.parametrize("name, kwargs, observer_name, per_channel", LSQ_CONFIGS, ids=[c[0] for c in LSQ_CONFIGS])
@settings(max_examples=30)
@given(seq=sequences(min_dims=2, max_dims=4, kinds=["normal", "offset", "one_signed", "constant"]),
       use_grad_scaling=st.booleans(), data=st.data())
def test_learnable_parity(name, kwargs, observer_name, per_channel, seq, use_grad_scaling, data):
    batches, grads, _ = seq
    channels = batches[0].shape[0]
    ours, theirs = _lsq_pair(kwargs, observer_name, per_channel, channels, use_grad_scaling)
    for i, (x, dy) in enumerate(zip(batches, grads)):
        mode = data.draw(st.sampled_from(LSQ_MODES)) if i else "none"
        lr = data.draw(st.sampled_from([0.0, 1e-3, 0.1, 10.0]))
        if mode != "none":
            getattr(ours, mode)()
            getattr(theirs, mode)()
        _lsq_step(ours, theirs, x, dy, lr, f"batch {i} ({mode}, lr={lr})")


@requires_ao
def test_learnable_scale_clamped_to_eps_in_place():
    ours, theirs = _lsq_pair(dict(quant_min=0, quant_max=255), "MovingAverageMinMaxObserver", False, 1, False)
    for m in (ours, theirs):
        m.enable_param_learning()
        m.scale.data.fill_(-1.0)
    _lsq_step(ours, theirs, torch.linspace(-1, 1, 7), torch.ones(7), 0.0, "negative scale")
    assert ours.scale.item() == torch.finfo(torch.float32).eps
    assert ours.calculate_qparams()[1].dtype == torch.int64


def test_learnable_symmetric_zeroes_zero_point_and_bitwidth():
    fq = mfq.LearnableFakeQuantize(MovingAverageMinMaxObserver, quant_min=-8, quant_max=7, dtype=torch.int8,
                                   qscheme=torch.per_tensor_symmetric, zero_point=3.0)
    fq.enable_param_learning()
    fq(torch.tensor([0.5, -0.25]))
    assert fq.zero_point.item() == 0.0 and fq.bitwidth == 4
    assert fq.learning_enabled.item() == 1 and fq.static_enabled.item() == 0
    fq.enable_static_observation()
    x = torch.tensor([0.3])
    assert fq(x) is x and fq.scale.requires_grad is False


# ----------------------------------------------------------------------------------------------
# hand-worked values
# ----------------------------------------------------------------------------------------------


def test_fake_quantize_uses_the_just_updated_qparams():
    """Batch 2 is quantized with the EMA after batch 2 (§4.1), computed here by hand."""
    fq = mfq.FakeQuantize(MovingAverageMinMaxObserver.with_args(averaging_constant=0.5), quant_min=0,
                          quant_max=255)
    fq(torch.tensor([0.0, 2.55]))  # min 0, max 2.55
    y = fq(torch.tensor([0.0, 5.1, 1.0]))  # max = 2.55 + 0.5 * (5.1 - 2.55) ~ 3.825 -> scale ~ 0.015
    f = np.float32
    max_val = f(2.55) + f(0.5) * (f(5.1) - f(2.55))  # three float32 operations
    scale = f(max_val / f(255))
    assert fq.scale.item() == float(scale) and fq.zero_point.item() == 0
    expected = [0.0, float(np.float32(255 * scale)), float(np.float32(np.rint(np.float32(1.0 * (1 / scale))) * scale))]
    assert y.tolist() == expected  # 5.1 clamps to quant_max


def test_fused_symmetric_trains_with_fbgemm_qparams_but_reports_python_ones():
    fq = mq.default_fused_per_channel_wt_fake_quant()
    w = torch.tensor([[-1.0, 0.5], [-3.0, -1.0], [0.0, 0.0]])  # straddling, one-signed, all zero
    y = fq(w)
    assert fq.scale.tolist() == [2.0**-7, float(np.float32(3 / 255)), float(np.float32(0.1))]
    assert fq.zero_point.tolist() == [0, 127, 127]  # one-signed and zero channels: affine zero points
    scale, zero_point = fq.calculate_qparams()  # the Python formula: max(|min|, max) / 127.5, zero point 0
    assert scale.tolist()[:2] == [float(np.float32(1 / 127.5)), float(np.float32(3 / 127.5))]
    assert zero_point.tolist() == [0, 0, 0]
    assert y[1].tolist() == [-3.0, float(np.float32(np.float32(3 / 255) * -85))]  # -1 -> rint(-85.0)


def test_fused_tiny_range_hits_the_small_scale_cut_off():
    fq = mq.default_fused_act_fake_quant()
    y = fq(torch.tensor([0.0, 1e-3, 5e-4]))  # (1e-3 - 0) / 255 < 6.1e-5
    assert fq.scale.item() == float(np.float32(6.1e-5)) and fq.zero_point.item() == 0
    s = np.float32(6.1e-5)
    inv = np.float32(1 / s)
    expected = [0.0, float(np.float32(np.rint(np.float32(np.float32(1e-3) * inv)) * s)),
                float(np.float32(np.rint(np.float32(np.float32(5e-4) * inv)) * s))]
    assert y.tolist() == expected  # 16.39 -> 16, 8.19 -> 8 steps of 6.1e-5
    assert fq.calculate_qparams()[0].item() == float(np.float32(np.float32(1e-3) / np.float32(255)))  # no cut-off


def test_disabled_fake_quant_returns_input_and_observer_keeps_running():
    fq = mfq.FakeQuantize()
    fq.disable_fake_quant()
    x = torch.tensor([-1.0, 1.0])
    assert fq(x) is x
    assert fq.activation_post_process.min_val.item() == -1.0
    fused = mq.default_fused_act_fake_quant()
    fused.disable_fake_quant()
    y = fused(x)
    assert y is not x and torch.equal(y, x)  # the fused op returns a copy


def test_empty_input_changes_nothing():
    for fq in (mfq.FakeQuantize(), mq.default_fused_act_fake_quant(), mq.default_fused_per_channel_wt_fake_quant()):
        fq(torch.tensor([[-1.0, 2.0], [0.5, 1.0]]))
        before = copy.deepcopy(fq.state_dict())
        y = fq(torch.empty(0, 2))
        assert y.shape == (0, 2)
        for key, value in fq.state_dict().items():
            assert torch.equal(value, before[key]), key


# ----------------------------------------------------------------------------------------------
# switches, state dicts, copies
# ----------------------------------------------------------------------------------------------


def _modules():
    return [mq.default_fake_quant(), mq.default_per_channel_weight_fake_quant(), mq.default_fused_act_fake_quant(),
            mq.default_fused_per_channel_wt_fake_quant(),
            mfq.LearnableFakeQuantize(MovingAverageMinMaxObserver, quant_min=0, quant_max=255)]


def test_apply_helpers_reach_every_fake_quant_and_skip_other_modules():
    model = nn.Sequential(nn.Linear(2, 2), *_modules(), nn.ReLU())
    model.apply(mfq.disable_observer)
    model.apply(mfq.disable_fake_quant)
    for fq in model[1:-1]:
        assert fq._observer_on is False and fq._fake_quant_on is False
        assert fq.fake_quant_enabled.item() == 0
    assert model[1].observer_enabled.dtype == torch.uint8 and model[3].observer_enabled.dtype == torch.int64
    assert model[-2].static_enabled.item() == 0 and model[-2].observer_enabled.item() == 1  # as in torch
    model.apply(mfq.enable_observer)
    model.apply(mfq.enable_fake_quant)
    assert all(fq._observer_on and fq._fake_quant_on for fq in model[1:-1])


def test_load_state_dict_reads_the_flags_back():
    for src, dst in zip(_modules(), _modules()):
        src(torch.tensor([[-1.0, 2.0], [0.5, 1.0]]))
        src.disable_observer()
        src.disable_fake_quant()
        dst.load_state_dict(src.state_dict(), strict=True)
        assert dst._observer_on is False and dst._fake_quant_on is False
        x = torch.tensor([[5.0, -7.0], [0.5, 1.0]])
        assert torch.equal(dst(x), x)
        assert torch.equal(dst.state_dict()["activation_post_process.min_val"],
                           src.state_dict()["activation_post_process.min_val"])


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))], ids=["deepcopy", "pickle"])
def test_copies_keep_flags_buffers_and_behaviour(clone):
    x0, x1 = torch.tensor([[-1.0, 2.0], [0.5, 1.0]]), torch.tensor([[-3.0, 1.0], [0.25, 4.0]])
    for fq in _modules():
        fq(x0)
        fq.disable_observer()
        twin = clone(fq)
        assert twin._observer_on is False
        assert_bit_exact(twin(x1), fq(x1), type(fq).__name__)
        twin.enable_observer()
        twin(x1)
        assert fq._observer_on is False  # independent
        for key, value in fq.state_dict().items():
            assert value.dtype == twin.state_dict()[key].dtype


@requires_ao
@pytest.mark.parametrize("name", ["default_fake_quant", "default_per_channel_weight_fake_quant",
                                  "default_fused_act_fake_quant", "default_fused_per_channel_wt_fake_quant"])
def test_state_dict_interchange_with_torch(name):
    x0, x1 = torch.tensor([[-1.0, 2.0, 0.0], [0.5, 1.0, 3.0]]), torch.tensor([[-3.0, 1.0, 2.0], [0.25, 4.0, -1.0]])
    for src, dst in ((getattr(ao(), name)(), getattr(mq, name)()), (getattr(mq, name)(), getattr(ao(), name)())):
        src(x0)
        src.disable_observer()
        dst.load_state_dict(src.state_dict(), strict=True)  # fresh per-channel buffers get resized
        assert_same_state(dst, src, "after load")  # keys, dtypes, shapes, bits
        assert_bit_exact(dst(x1), src(x1), f"{name}: output after load")  # observer off on both


@requires_ao
def test_learnable_state_dict_interchange_with_torch():
    ours, theirs = _lsq_pair(dict(quant_min=0, quant_max=255), "MovingAverageMinMaxObserver", False, 1, True)
    theirs(torch.tensor([-1.0, 3.0]))
    theirs.enable_param_learning()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert ours._observer_on is False
    _lsq_step(ours, theirs, torch.tensor([-2.0, 0.1, 5.0]), torch.ones(3), 0.1, "after load")
    theirs.load_state_dict(ours.state_dict(), strict=True)


# ----------------------------------------------------------------------------------------------
# bad arguments
# ----------------------------------------------------------------------------------------------


class _OddObserver(nn.Module):
    """An observer-shaped module whose qscheme a fake quant cannot use."""

    def __init__(self, **kwargs):
        super().__init__()
        self.qscheme, self.dtype, self.quant_min, self.quant_max, self.is_dynamic = "odd", torch.uint8, 0, 255, False


@pytest.mark.parametrize("build, match", [
    (lambda: mfq.FakeQuantize(quant_min=0), "quant_min and quant_max must be given together"),
    (lambda: mfq.FakeQuantize(quant_min=5, quant_max=3), "quant_min must be less than quant_max"),
    (lambda: mfq.FakeQuantize(quant_min=0, quant_max=255, dtype=torch.int8), "quant_max must be <= 127"),
    (lambda: mfq.FakeQuantize(quant_min=-10, quant_max=100), "quant_min must be >= 0"),
    (lambda: mfq.FakeQuantize(quant_min=-1, quant_max=255), "257 levels"),  # the observer's own check
    (lambda: mfq.FakeQuantize(_OddObserver), "qscheme must be per-tensor or per-channel"),
    (lambda: mfq.FusedMovingAvgObsFakeQuantize(MinMaxObserver), "observer must build a MovingAverage"),
    (lambda: mfq.FusedMovingAvgObsFakeQuantize(MovingAveragePerChannelMinMaxObserver, ch_axis=1),
     "ch_axis must be 0"),
    (lambda: mfq.FusedMovingAvgObsFakeQuantize(MovingAveragePerChannelMinMaxObserver,
                                               qscheme=torch.per_channel_affine_float_qparams),
     "per_channel_affine_float_qparams is not supported"),
    (lambda: mfq.LearnableFakeQuantize(MovingAverageMinMaxObserver, quant_min=3, quant_max=3),
     "quant_min must be less than quant_max"),
    (lambda: mfq.LearnableFakeQuantize(MovingAverageMinMaxObserver, channel_len=0), "channel_len must be"),
    (lambda: mfq.LearnableFakeQuantize(MovingAverageMinMaxObserver, quant_min=-10, quant_max=10),
     "quant_min must be >= 0"),
])
def test_bad_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_inputs_to_the_fused_per_channel_module():
    fq = mq.default_fused_per_channel_wt_fake_quant()
    with pytest.raises(ValueError, match="at least 2 dims"):
        fq(torch.ones(3))
    fq(torch.ones(3, 2))
    with pytest.raises(ValueError, match="has seen 3 channels"):
        fq(torch.ones(4, 2))


# ----------------------------------------------------------------------------------------------
# no host synchronisation in forward
# ----------------------------------------------------------------------------------------------

SYNCING_METHODS = ["item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"]


def _no_sync_modules():
    lsq = mfq.LearnableFakeQuantize(MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127,
                                    dtype=torch.int8, qscheme=torch.per_channel_symmetric, channel_len=3,
                                    use_grad_scaling=True)
    lsq_learning = copy.deepcopy(lsq)
    lsq_learning.enable_param_learning()
    return {
        "fake_quant": mq.default_fake_quant(),
        "fake_quant_per_channel": mq.default_per_channel_weight_fake_quant(),
        "fused_act": mq.default_fused_act_fake_quant(),
        "fused_per_channel": mq.default_fused_per_channel_wt_fake_quant(),
        "learnable_static": lsq,
        "learnable_learning": lsq_learning,
    }


@pytest.mark.parametrize("name", list(_no_sync_modules()))
def test_forward_reads_no_tensor_value_on_the_host(name, monkeypatch):
    """With minqat's CPU-only value checks switched off (as on an accelerator), forward never calls
    a Tensor method that copies a value to the host."""
    fq = _no_sync_modules()[name]
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("minqat") and hasattr(module, "reads_values"):
            monkeypatch.setattr(module, "reads_values", lambda t: False)
    calls = []

    def recorder(method):
        original = getattr(torch.Tensor, method)

        def record(self, *args, **kwargs):
            calls.append(method)
            return original(self, *args, **kwargs)

        return record

    xs = [torch.randn(3, 4) * s for s in (1.0, 2.0, 0.5)]
    with monkeypatch.context() as patch:
        for method in SYNCING_METHODS:
            patch.setattr(torch.Tensor, method, recorder(method))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i, x in enumerate(xs):
                if i == 2:
                    fq.disable_observer()
                fq(x)
    assert calls == []


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(_no_sync_modules()))
def test_forward_does_not_synchronize_on_cuda(name):
    fq = _no_sync_modules()[name].cuda()
    xs = [torch.randn(3, 4, device="cuda") * s for s in (1.0, 2.0, 0.5)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i, x in enumerate(xs):
            if i == 2:
                fq.disable_observer()
            y = fq(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert y.device.type == "cuda"


# ----------------------------------------------------------------------------------------------
# golden vectors (recorded from torch.ao by tests/golden/make_fake_quantize_modules.py; no torch.ao here)
# ----------------------------------------------------------------------------------------------

GOLDEN_FILE = Path(__file__).parent / "golden" / "fake_quantize_modules.pt"


@pytest.mark.parametrize("name", list(golden_script.CASES))
def test_golden_vectors(name):
    case = torch.load(GOLDEN_FILE, weights_only=True)[name]
    module = golden_script.build_minqat(name)
    records = golden_script.run_case(module, case["inputs"], case["grads"], case["actions"], case["lr"])
    for i, (ours, expected) in enumerate(zip(records, case["records"])):
        assert set(ours) == set(expected), f"batch {i}: recorded fields differ"
        for field in ("output", "dx", "dscale", "dzero_point"):
            if field in expected:
                assert_bit_exact(ours[field], expected[field], f"{name} batch {i}: {field}")
        assert set(ours["state"]) == set(expected["state"])
        for key, value in expected["state"].items():
            assert_bit_exact(ours["state"][key], value, f"{name} batch {i}: {key}")


# ----------------------------------------------------------------------------------------------
# per-channel buffers on storages that cannot be resized (a whole module torch.load-ed before it ran)
# ----------------------------------------------------------------------------------------------


def _torch_loaded(module: nn.Module, **load_kwargs) -> nn.Module:
    """``module`` through ``torch.save`` / ``torch.load`` as a whole (zip storages: not resizable)."""
    import io

    buffer = io.BytesIO()
    torch.save(module, buffer)
    return torch.load(io.BytesIO(buffer.getvalue()), weights_only=False, **load_kwargs)


def _per_channel_modules():
    float_qparams = dict(observer=MovingAveragePerChannelMinMaxObserver, dtype=torch.uint8,
                         qscheme=torch.per_channel_affine_float_qparams)
    return {
        "fake_quant_per_channel": mq.default_per_channel_weight_fake_quant,
        "fake_quant_float_qparams": lambda: mfq.FakeQuantize(**float_qparams),  # float32 zero point
        "fake_quant_min_max_per_channel": lambda: mfq.FakeQuantize(PerChannelMinMaxObserver, quant_min=-128,
                                                                   quant_max=127, dtype=torch.int8,
                                                                   qscheme=torch.per_channel_symmetric),
        "fused_per_channel": mq.default_fused_per_channel_wt_fake_quant,
        "learnable_per_channel": lambda: mfq.LearnableFakeQuantize(
            MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.int8,
            qscheme=torch.per_channel_symmetric, channel_len=3),
    }


def _data_sized(fq: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers whose shape comes from the first batch."""
    obs = fq.activation_post_process
    sized = {"min_val": obs.min_val, "max_val": obs.max_val}
    if not isinstance(fq, mfq.LearnableFakeQuantize):  # its scale / zero point are fixed-size Parameters
        sized.update(scale=fq.scale, zero_point=fq.zero_point)
    return sized


@pytest.mark.parametrize("name", list(_per_channel_modules()))
def test_torch_loaded_fresh_module_trains_like_the_original(name):
    """A module saved whole before its first batch: same outputs, gradients and state bit for bit as the
    module never saved; its buffers stay the same tensor objects, dtypes and devices, and the fake
    quant's qparam buffers never alias the observer's."""
    reference = _per_channel_modules()[name]()
    loaded = _torch_loaded(reference)
    before = _data_sized(loaded)
    assert not any(t.untyped_storage().resizable() for t in before.values())
    dtypes = {key: t.dtype for key, t in before.items()}
    gen = torch.Generator().manual_seed(0)
    for i in range(3):
        step(loaded, reference, torch.randn(3, 4, generator=gen) * (i + 1), torch.randn(3, 4, generator=gen),
             f"{name} step {i}")  # outputs, input gradients, whole state
        after = _data_sized(loaded)
        assert all(after[key] is t and t.dtype == dtypes[key] for key, t in before.items()), "buffers replaced"
    pointers = [t.untyped_storage().data_ptr() for t in after.values()]
    assert len(set(pointers)) == len(pointers), "two buffers share a storage"


@pytest.mark.parametrize("name", ["fake_quant_per_channel", "fused_per_channel"])
def test_torch_loaded_fresh_module_loads_a_state_dict_copies_and_moves(name):
    build = _per_channel_modules()[name]
    trained = build()
    x0, x1 = torch.tensor([[-1.0, 2.0], [0.5, 1.0], [3.0, -4.0]]), torch.tensor([[-3.0, 1.0], [0.25, 4.0], [1.0, 2.0]])
    trained(x0)
    loaded = _torch_loaded(build())
    loaded.load_state_dict(trained.state_dict(), strict=True)  # [1] / empty -> [3], non-resizable storages
    assert_same_state(loaded, trained, f"{name} after load")
    twin, moved = copy.deepcopy(_torch_loaded(build())), _torch_loaded(build()).to(torch.device("cpu"))
    untouched = _torch_loaded(build())
    for fq in (twin, moved):
        fresh = build()
        assert_bit_exact(fq(x1), fresh(x1), f"{name}: copied / moved output")
        assert_same_state(fq, fresh, f"{name}: copied / moved")
    assert untouched.scale.shape == (1,) and untouched.activation_post_process.min_val.shape == (0,)
    assert_bit_exact(loaded(x1), trained(x1), f"{name}: output after load")


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(_per_channel_modules()))
def test_torch_loaded_fresh_module_trains_on_cuda(name):
    reference = _per_channel_modules()[name]().cuda()
    loaded = _torch_loaded(reference)  # storages restored onto the GPU
    before = _data_sized(loaded)
    for step in range(2):
        x = torch.randn(3, 4, device="cuda") * (step + 1)
        assert_bit_exact(loaded(x), reference(x), f"{name} step {step}: output")
        assert_same_state(loaded, reference, f"{name} step {step}")
    after = _data_sized(loaded)
    assert all(after[key] is t and t.device.type == "cuda" for key, t in before.items())
