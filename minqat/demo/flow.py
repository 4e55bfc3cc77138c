"""The eager-mode flow, written once and run by minqat and by torch.ao: float training, PTQ, QAT, convert.

Every step is the tutorial's (Krishnamoorthi 2018 §3; Jacob et al. 2018):

* **float**: SGD with momentum and a cosine learning-rate decay, cross-entropy loss;
* **PTQ** (post-training quantization): ``fuse_modules`` (eval mode: BN folded into the convs),
  ``prepare`` (observers), calibration on training batches, ``convert``;
* **QAT**: ``fuse_modules_qat`` (train mode: conv-BN-ReLU kept together, BN folded on the fly),
  ``prepare_qat`` (fake quants), fine-tuning from the float weights with a smaller learning rate;
  from a stated epoch the BN statistics are frozen (``freeze_bn_stats``: the fold uses the running
  statistics, as the int8 model will), from a later one the observers (``disable_observer``: the
  scales and zero points stop moving, so the last epochs train against the grid ``convert`` uses);
  then ``convert``.

Both libraries start from the same float weights, see the same batches (``data.epoch_batches``) and
run the same float ops, so minqat's prepared model, and its int8 model, should equal torch.ao's bit
for bit; ``agreement`` measures whether they do.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .data import Digits, epoch_batches
from .model import FUSE_GROUPS, Library, classifier_qconfig, ptq_qconfig, qat_qconfig

__all__ = ["Schedule", "train_float", "post_training_quantization", "quantization_aware_training",
           "evaluate", "agreement", "deployment_consistency"]

BATCH = 32
CALIBRATION_BATCHES = 8  # PTQ: 256 training images through the observers


@dataclass(frozen=True)
class Schedule:
    """Epochs and learning rates; ``freeze_bn_epoch`` / ``freeze_observer_epoch`` are 0-based epochs from
    which (at their start) QAT freezes the BN statistics / the observers. The observers see at least one
    epoch first (a weight fake quant has no per-channel qparams before its first batch); with one QAT
    epoch they are frozen only after training.

    >>> [(Schedule(1, e).freeze_bn_epoch, Schedule(1, e).freeze_observer_epoch) for e in (1, 2, 3, 10)]
    [(0, 1), (1, 1), (1, 2), (5, 7)]
    """

    float_epochs: int
    qat_epochs: int
    float_lr: float = 0.05
    qat_lr: float = 0.01
    momentum: float = 0.9

    @property
    def freeze_bn_epoch(self) -> int:
        return self.qat_epochs // 2

    @property
    def freeze_observer_epoch(self) -> int:
        return max(1, self.freeze_bn_epoch, (3 * self.qat_epochs) // 4)


Progress = Callable[[str, int, int, dict], None]  # (run name, epoch, epochs, metrics) after each epoch


def _train(model: nn.Module, data: Digits, epochs: int, lr: float, momentum: float, seed: int, name: str,
           progress: Progress, at_epoch_start: Callable[[int], None] | None = None) -> list[dict]:
    """Minibatch SGD with a cosine learning-rate decay (per step); one metrics dict per epoch."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    steps_per_epoch = math.ceil(len(data.y_train) / BATCH)
    total, step, curve = epochs * steps_per_epoch, 0, []
    for epoch in range(epochs):
        model.train()  # a frozen BN stays frozen (the fused QAT modules' train() keeps it)
        if at_epoch_start is not None:
            at_epoch_start(epoch)
        loss_sum, correct = 0.0, 0
        for idx in epoch_batches(len(data.y_train), BATCH, seed, epoch):
            opt.param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            logits = model(data.x_train[idx])
            loss = F.cross_entropy(logits, data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == data.y_train[idx]).sum())
        metrics = {"epoch": epoch + 1, "loss": loss_sum / len(data.y_train),
                   "train_accuracy": correct / len(data.y_train),
                   "test_accuracy": evaluate(model, data)["accuracy"]}  # observers paused inside
        curve.append(metrics)
        progress(name, epoch + 1, epochs, metrics)
    model.eval()
    return curve


def train_float(lib: Library, data: Digits, schedule: Schedule, seed: int, progress: Progress):
    """A float ``DigitsCNN`` (built with ``lib``'s stubs, identities before preparation), trained."""
    torch.manual_seed(seed)
    model = lib.build()
    curve = _train(model, data, schedule.float_epochs, schedule.float_lr, schedule.momentum, seed, "float", progress)
    return model, curve


def _with_stubs(lib: Library, float_model: nn.Module) -> nn.Module:
    """A copy of the float model built with ``lib``'s stubs (the weights are shared by value)."""
    model = lib.build()
    model.load_state_dict(float_model.state_dict(), strict=True)
    return model


def post_training_quantization(lib: Library, float_model: nn.Module, data: Digits, bits: int, backend: str,
                               seed: int) -> nn.Module:
    """fuse_modules -> prepare -> calibrate -> convert: the int8 model of the float weights."""
    model = _with_stubs(lib, float_model).eval()
    model.qconfig = ptq_qconfig(lib, bits, backend)
    model.fc.qconfig = classifier_qconfig(lib, bits, backend, qat=False) or model.qconfig
    model = lib.ns.fuse_modules(model, FUSE_GROUPS)
    model = lib.ns.prepare(model)
    with torch.no_grad():
        for idx in epoch_batches(len(data.y_train), BATCH, seed, -1)[:CALIBRATION_BATCHES]:
            model(data.x_train[idx])
    with lib.int8_context():
        return lib.ns.convert(model)


def quantization_aware_training(lib: Library, float_model: nn.Module, data: Digits, bits: int, backend: str,
                                schedule: Schedule, seed: int, progress: Progress):
    """fuse_modules_qat -> prepare_qat -> fine-tune (BN, then observers frozen) -> the prepared model."""
    model = _with_stubs(lib, float_model).train()
    model.qconfig = qat_qconfig(lib, bits, backend)
    model.fc.qconfig = classifier_qconfig(lib, bits, backend, qat=True) or model.qconfig
    model = lib.ns.fuse_modules_qat(model, FUSE_GROUPS)
    model = lib.ns.prepare_qat(model)

    def at_epoch_start(epoch: int) -> None:
        if epoch >= schedule.freeze_bn_epoch:
            model.apply(lib.freeze_bn_stats)
        if epoch >= schedule.freeze_observer_epoch:
            model.apply(lib.ns.disable_observer)

    curve = _train(model, data, schedule.qat_epochs, schedule.qat_lr, schedule.momentum, seed + bits,
                   f"{lib.name} QAT {bits}-bit", progress, at_epoch_start)
    model.apply(lib.ns.disable_observer)  # keep the trained qparams through convert (numerics.md §6.2)
    return model, curve


def convert(lib: Library, prepared: nn.Module) -> nn.Module:
    """``lib``'s convert of a copy of the prepared model (torch.ao's packed for, and pinned to, fbgemm)."""
    with lib.int8_context():
        return lib.ns.convert(copy.deepcopy(prepared).eval())


def evaluate(model: nn.Module, data: Digits, lib: Library | None = None) -> dict:
    """Test accuracy, the logits and -- for an int8 model -- the integer codes that ``DeQuantStub`` gets.

    Returns ``{"accuracy", "logits" (N, 10) float32, "codes" (N, 10) int64 or None, "scale", "zero_point"}``.
    """
    seen = {}

    def grab(module, args):
        x = args[0]
        if getattr(x, "is_quantized", False):  # a minqat QTensor or a torch quantized tensor
            seen["codes"] = x.int_repr().long()
            seen["scale"], seen["zero_point"] = float(x.q_scale()), int(x.q_zero_point())

    handle = model.dequant.register_forward_pre_hook(grab)
    was_training = model.training  # restored afterwards: evaluate runs between training epochs
    # .eval() does not stop observers (numerics.md §9.16): pause them, so test images never move a scale
    observing = [m for m in model.modules() if hasattr(m, "observer_enabled") and bool(m.observer_enabled[0])]
    for m in observing:
        m.disable_observer()
    model.eval()
    try:
        with torch.no_grad(), (lib.int8_context() if lib else contextlib.nullcontext()):
            logits = model(data.x_test)
    finally:
        handle.remove()
        model.train(was_training)
        for m in observing:
            m.enable_observer()
    accuracy = float((logits.argmax(1) == data.y_test).float().mean())
    return {"accuracy": accuracy, "logits": logits, "codes": seen.get("codes"),
            "scale": seen.get("scale"), "zero_point": seen.get("zero_point")}


def deployment_consistency(prepared: nn.Module, int8_default: nn.Module, data: Digits, images: int = 128) -> dict:
    """minqat's int8 models against their own fake-quant model, layer by layer (``minqat.compare_layers``).

    ``int8_default`` is torch.ao's convert (minqat's default); ``convert(model, consistent=True)`` deploys the
    fake quants' qparams, folded weights and clamp range instead (``minqat.consistent``). Per mode: the largest
    LSB difference of any layer on ``images`` test images, the first layer above 1 LSB, and the test accuracy.
    """
    from ..convert import convert as minqat_convert
    from ..fake_quantize import disable_observer
    from ..report import compare_layers

    model = copy.deepcopy(prepared).eval()
    model.apply(disable_observer)  # the demo froze them; make sure nothing moves from here on
    x = data.x_test[:images]
    with torch.no_grad():
        model(x)  # the last eval forward, whose qparams the consistent mode deploys
    modes = {"default": int8_default, "consistent": minqat_convert(model, consistent=True)}
    result = {}
    for mode, int8 in modes.items():
        report = compare_layers(model, int8, x)
        first = report.first_over(1.0)
        result[mode] = {"max_lsb": report.max_lsb, "first_layer_over_1_lsb": first.name if first else None,
                        "accuracy": evaluate(int8, data)["accuracy"]}
    return result


def agreement(ours: dict, theirs: dict) -> dict:
    """How closely two int8 models' outputs (``evaluate`` results) agree.

    * ``bit_exact``: fraction of logits whose integer codes and output qparams are identical;
    * ``max_lsb``: the largest difference of the dequantized logits, in units of the output scale
      (``|x_a - x_b| / s``; the codes' difference when both sides share the qparams);
    * ``top1``: fraction of test images given the same class.

    >>> a = {"codes": torch.tensor([[3, 5]]), "scale": 0.5, "zero_point": 0, "logits": torch.tensor([[1.5, 2.5]])}
    >>> b = {"codes": torch.tensor([[3, 4]]), "scale": 0.5, "zero_point": 0, "logits": torch.tensor([[1.5, 2.0]])}
    >>> agreement(a, b)
    {'bit_exact': 0.5, 'max_lsb': 1.0, 'top1': 1.0, 'same_qparams': True}
    """
    same_qparams = (ours["scale"], ours["zero_point"]) == (theirs["scale"], theirs["zero_point"])
    if same_qparams:
        equal = ours["codes"] == theirs["codes"]
        lsb = (ours["codes"] - theirs["codes"]).abs().max().item()
    else:
        equal = torch.zeros_like(ours["codes"], dtype=torch.bool)
        lsb = ((ours["logits"] - theirs["logits"]).abs().max() / theirs["scale"]).item()
    top1 = (ours["logits"].argmax(1) == theirs["logits"].argmax(1)).float().mean().item()
    return {"bit_exact": equal.float().mean().item(), "max_lsb": float(lsb), "top1": top1,
            "same_qparams": same_qparams}
