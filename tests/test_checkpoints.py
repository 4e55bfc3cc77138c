"""Checkpoints of prepared QAT models: state dicts, across libraries, deepcopy and pickle.

(a) A minqat prepared model's ``state_dict`` (and the optimizer's) saved mid-training and loaded into
    a freshly prepared model -- other initial weights, observers that never ran, so per-channel
    min/max buffers still empty and qparam buffers of size 1 -- resumes BIT-IDENTICALLY to a run
    that was never interrupted: outputs, gradients and the whole state, step after step. Also after
    ``disable_observer`` (the flags travel in the state dict and must switch the observers off in
    the loaded model) and after ``freeze_bn_stats`` (which is not state: re-applied after loading,
    as with torch.ao).
(b) torch.ao's prepared model's ``state_dict`` loads into minqat's equivalent prepared model with
    ``strict=True``, and the reverse, for every default QAT qconfig; training then continues bit
    for bit alike on both sides.
(c) ``copy.deepcopy``, ``pickle`` and ``torch.save``/``torch.load`` of a prepared model (fresh, trained,
    observers off) give independent copies that train exactly as the original does. A whole model
    ``torch.load``-ed before its first step -- whose per-channel buffers then sit on storages that
    cannot be resized, which breaks torch.ao's ``resize_`` -- trains, loads checkpoints and converts
    to int8 exactly like the model that was never saved.

The model is test_qat_flow's KITCHEN_SINK: a conv-bn-relu stem, a strided residual block
(``add_relu``, a depthwise conv-bn with ``momentum=None``, a conv-bn downsample), a residual block
with ``add`` + ReLU, a two-branch ``cat`` block, an unfused conv / non-affine BN / ReLU chain, a
grouped conv-relu, a conv-bn, and a Linear-BN1d hidden layer.
"""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import minqat
import minqat.qconfig as mqc
from tests.oracle import ao, assert_bit_exact, requires_ao
from tests.test_convert import ResNet, quantizable_input
from tests.test_qat_flow import (
    KITCHEN_SINK,
    MINQAT_PARTS,
    Library,
    Net,
    assert_same_records,
    batches,
    fusion_groups,
    minqat_library,
    prepare_model,
    randomize_bn,
    sgd,
    torch_ao_parts,
    train_step,
)

ARCH = KITCHEN_SINK
GROUPS = fusion_groups(ARCH)

# every default QAT qconfig: (name, minqat's, torch.ao's as a function of the torch.ao module)
DEFAULT_QAT_QCONFIGS = [
    *[(f"{backend} v{version}",
       lambda b=backend, v=version: minqat.get_default_qat_qconfig(b, v),
       lambda tq, b=backend, v=version: tq.get_default_qat_qconfig(b, v))
      for backend in ("fbgemm", "x86", "qnnpack", "onednn") for version in (0, 1)],
    ("default_qat_qconfig", lambda: mqc.default_qat_qconfig, lambda tq: tq.default_qat_qconfig),
    ("default_qat_qconfig_v2", lambda: mqc.default_qat_qconfig_v2, lambda tq: tq.default_qat_qconfig_v2),
    ("symmetric qnnpack qat", lambda: mqc.default_symmetric_qnnpack_qat_qconfig,
     lambda tq: tq.default_symmetric_qnnpack_qat_qconfig),
    ("per-channel symmetric qnnpack qat", lambda: mqc.default_per_channel_symmetric_qnnpack_qat_qconfig,
     lambda tq: tq.default_per_channel_symmetric_qnnpack_qat_qconfig),
]
QCONFIG_IDS = [name for name, _, _ in DEFAULT_QAT_QCONFIGS]


def float_net(seed: int, parts=MINQAT_PARTS) -> nn.Module:
    torch.manual_seed(seed)
    net = Net(ARCH, *parts)
    randomize_bn(net, seed)
    return net.train()


def minqat_prepared(seed: int, qconfig) -> nn.Module:
    lib = Library(qconfig, minqat.fuse_modules_qat, minqat.prepare_qat, minqat.freeze_bn_stats,
                  minqat.disable_observer)
    return prepare_model(float_net(seed), GROUPS, lib)


def torch_ao_prepared(seed: int, qconfig) -> nn.Module:
    tq = ao()
    lib = Library(qconfig, tq.fuse_modules_qat, tq.prepare_qat, None, None)
    return prepare_model(float_net(seed, torch_ao_parts()), GROUPS, lib)


def weight_fake_quants(model: nn.Module) -> list[nn.Module]:
    return [m.weight_fake_quant for m in model.modules() if hasattr(m, "weight_fake_quant")]


def run(model: nn.Module, opt, data, first_step: int = 0) -> list[dict]:
    return [train_step(model, opt, x, target, seed=first_step + i) for i, (x, target) in enumerate(data)]


def assert_same_runs(ours: list[dict], theirs: list[dict], what: str) -> None:
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert_same_records(a, b, f"{what}, step {step}")


def checkpoint(model: nn.Module, opt) -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    return buffer.getvalue()


def load_checkpoint(data: bytes) -> dict:
    return torch.load(io.BytesIO(data))  # weights_only (the default): a checkpoint is plain tensors


# --- (a) mid-training checkpoints resume bit-identically ------------------------------------------------


@pytest.mark.parametrize("when", ["training", "observers off", "bn frozen"])
@pytest.mark.parametrize("key", [("fbgemm", 1), ("x86", 0), ("qnnpack", 1), ("qnnpack", 0)])
def test_checkpoint_resumes_bit_identically(key, when):
    data = batches(ARCH, 0, 4)
    model = minqat_prepared(0, minqat.get_default_qat_qconfig(*key))
    opt = sgd(model)
    run(model, opt, data[:1])
    if when == "observers off":
        model.apply(minqat.disable_observer)
    elif when == "bn frozen":
        model.apply(minqat.freeze_bn_stats)
    run(model, opt, data[1:2], first_step=1)
    saved = checkpoint(model, opt)
    uninterrupted = run(model, opt, data[2:], first_step=2)

    fresh = minqat_prepared(1, minqat.get_default_qat_qconfig(*key))  # other weights, observers never ran
    if key[0] != "qnnpack":  # per-channel weight observers: buffers not sized yet
        assert all(fq.activation_post_process.min_val.numel() == 0 for fq in weight_fake_quants(fresh))
    state = load_checkpoint(saved)
    fresh.load_state_dict(state["model"], strict=True)
    fresh_opt = sgd(fresh)
    fresh_opt.load_state_dict(state["optimizer"])
    if when == "bn frozen":  # freeze_bn_stats is a mode, not state (as in torch.ao): apply it again
        fresh.apply(minqat.freeze_bn_stats)
    if when == "observers off":  # ...whereas the observer flags are buffers and come with the checkpoint
        assert not any(fq._observer_on for fq in fresh.modules() if isinstance(fq, minqat.FakeQuantizeBase))
    assert_same_runs(run(fresh, fresh_opt, data[2:], first_step=2), uninterrupted, f"resumed ({when})")


def test_checkpoint_taken_before_any_step_loads_into_a_trained_model():
    """Loading shrinks nothing by accident: empty per-channel buffers load over sized ones."""
    qconfig = minqat.get_default_qat_qconfig("fbgemm", 0)
    fresh_state = minqat_prepared(0, qconfig).state_dict()
    trained = minqat_prepared(1, qconfig)
    run(trained, sgd(trained), batches(ARCH, 0, 1))
    trained.load_state_dict(fresh_state, strict=True)
    assert all(fq.activation_post_process.min_val.numel() == 0 for fq in weight_fake_quants(trained))
    again, reference = minqat_prepared(0, qconfig), trained
    data = batches(ARCH, 1, 2)
    assert_same_runs(run(reference, sgd(reference), data), run(again, sgd(again), data), "after loading a fresh state")


# --- (b) across libraries ---------------------------------------------------------------------------------


@requires_ao
@pytest.mark.parametrize("direction", ["torch.ao -> minqat", "minqat -> torch.ao"])
@pytest.mark.parametrize("qconfigs", DEFAULT_QAT_QCONFIGS, ids=QCONFIG_IDS)
def test_state_dict_moves_between_libraries_and_training_agrees(qconfigs, direction):
    _move_between_libraries(*qconfigs[1:], direction, observers_off=False)


@requires_ao
@pytest.mark.parametrize("direction", ["torch.ao -> minqat", "minqat -> torch.ao"])
@pytest.mark.parametrize("key", [("fbgemm", 0), ("qnnpack", 1)])
def test_disabled_observers_move_between_libraries(key, direction):
    """The flags are buffers (uint8 in FakeQuantize, int64 in the fused module): off stays off."""
    _move_between_libraries(lambda: minqat.get_default_qat_qconfig(*key), lambda tq: tq.get_default_qat_qconfig(*key),
                            direction, observers_off=True)


def _move_between_libraries(ours_qconfig, theirs_qconfig, direction: str, observers_off: bool) -> None:
    build = {"minqat": lambda seed: minqat_prepared(seed, ours_qconfig()),
             "torch.ao": lambda seed: torch_ao_prepared(seed, theirs_qconfig(ao()))}
    source_lib, target_lib = direction.split(" -> ")
    data = batches(ARCH, 2, 4)
    source = build[source_lib](0)
    opt = sgd(source)
    run(source, opt, data[:1])
    if observers_off:
        source.apply(ao().disable_observer if source_lib == "torch.ao" else minqat.disable_observer)
    run(source, opt, data[1:2], 1)
    saved = checkpoint(source, opt)
    target = build[target_lib](1)  # other weights, observers never ran
    assert [n for n, _ in target.named_parameters()] == [n for n, _ in source.named_parameters()]
    state = load_checkpoint(saved)
    target.load_state_dict(state["model"], strict=True)
    target_opt = sgd(target)
    target_opt.load_state_dict(state["optimizer"])
    assert_same_runs(run(target, target_opt, data[2:], 2), run(source, opt, data[2:], 2), direction)


# --- (c) deepcopy and pickle ------------------------------------------------------------------------------

# torch.load (zip format) gives every tensor a storage that cannot be resized. torch.ao sizes the
# per-channel observer and qparam buffers with Tensor.resize_ on their first batch (and in
# _load_from_state_dict), so a torch.ao model torch.load-ed before its observers ever ran fails with
# "Trying to resize storage that is not resizable". minqat swaps in a fresh storage instead
# (minqat.observers._resize_buffer): the tests below train and load such models.


def _clone(model: nn.Module, method: str) -> nn.Module:
    if method == "deepcopy":
        return copy.deepcopy(model)
    if method == "pickle":
        return pickle.loads(pickle.dumps(model))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    return torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)


@pytest.mark.parametrize("method", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("when", ["fresh", "trained", "observers off"])
@pytest.mark.parametrize("torch_ao_stubs", [False, True], ids=["minqat-stubs", "torch.ao-stubs"])
def test_copies_train_exactly_like_the_original(torch_ao_stubs, when, method):
    if torch_ao_stubs:
        pytest.importorskip("torch.ao.quantization")
        model = prepare_model(float_net(0, torch_ao_parts()), GROUPS, minqat_library(("fbgemm", 1)))
    else:
        model = minqat_prepared(0, minqat.get_default_qat_qconfig("fbgemm", 1))
    data = batches(ARCH, 3, 3)
    if when != "fresh":
        run(model, sgd(model), data[:1])
    if when == "observers off":
        model.apply(minqat.disable_observer)
    clone = _clone(model, method)
    assert all(a is not b for a, b in zip(clone.parameters(), model.parameters())), "the copy shares parameters"
    expected = run(model, sgd(model), data[1:], 1)
    assert_same_runs(run(clone, sgd(clone), data[1:], 1), expected, method)


@pytest.mark.parametrize("method", ["deepcopy", "pickle", "torch.save"])
def test_a_copied_fresh_model_loads_a_checkpoint(method):
    qconfig = minqat.get_default_qat_qconfig("x86", 0)
    trained = minqat_prepared(0, qconfig)
    data = batches(ARCH, 4, 3)
    opt = sgd(trained)
    run(trained, opt, data[:1])
    clone = _clone(minqat_prepared(1, qconfig), method)
    if method == "torch.save":  # the case torch.ao's resize_ cannot handle
        assert not any(fq.scale.untyped_storage().resizable() for fq in weight_fake_quants(clone))
    clone.load_state_dict(trained.state_dict(), strict=True)
    clone_opt = sgd(clone)
    clone_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # else the momentum buffers are shared
    assert_same_runs(run(clone, clone_opt, data[1:], 1), run(trained, opt, data[1:], 1), method)


def _per_channel_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The weight fake quants' buffers whose size comes from the data."""
    return [t for fq in weight_fake_quants(model)
            for t in (fq.scale, fq.zero_point, fq.activation_post_process.min_val, fq.activation_post_process.max_val)]


@pytest.mark.parametrize("key", [("fbgemm", 0), ("fbgemm", 1)], ids=["FakeQuantize", "fused"])
def test_torch_loaded_fresh_model_trains_and_converts_like_the_original(key):
    """Save the whole prepared model before its first step, torch.load it, train a step, convert:
    every step's outputs, gradients and state, then the int8 model's state and output, bit for bit
    as the model that was never saved."""
    torch.manual_seed(0)
    model = ResNet(MINQAT_PARTS, "avg").train()
    model.qconfig = minqat.get_default_qat_qconfig(*key)
    original = minqat.prepare_qat(minqat.fuse_modules_qat(model, model.groups()))
    loaded = _clone(original, "torch.save")
    before = _per_channel_buffers(loaded)
    assert before and not any(t.untyped_storage().resizable() for t in before), "torch.load's storages"
    gen = torch.Generator().manual_seed(5)
    data = [(torch.randn(4, 3, 16, 16, generator=gen), torch.randint(0, 10, (4,), generator=gen))]
    assert_same_runs(run(loaded, sgd(loaded), data), run(original, sgd(original), data), "torch.load-ed")
    after = _per_channel_buffers(loaded)
    assert all(a is b for a, b in zip(after, before, strict=True)), "the buffers are resized in place"
    assert all(t.numel() > 1 for t in after), "the per-channel buffers took the channel count"

    expected, ours = minqat.convert(original.eval()), minqat.convert(loaded.eval())
    theirs_state, ours_state = expected.state_dict(), ours.state_dict()
    assert ours_state.keys() == theirs_state.keys()
    for name, value in theirs_state.items():
        if isinstance(value, torch.Tensor):
            assert_bit_exact(ours_state[name], value, f"int8 {name}")
        else:
            assert ours_state[name] == value, name
    x = quantizable_input(expected, (3, 3, 16, 16), 1)
    assert_bit_exact(ours(x), expected(x), "int8 output")
