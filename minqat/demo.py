"""The short example behind ``python -m minqat demo``: 4-bit QAT of a linear model, cross-checked.

A linear model learns a synthetic regression three ways:

1. float training;
2. post-training quantization (PTQ): the float weights rounded to a 4-bit per-channel grid;
3. quantization-aware training (QAT): the weights pass through a fake quantizer during training,
   so SGD (through the straight-through estimator) finds weights that survive the rounding.

When torch.ao is importable, the QAT run is repeated with torch.ao's modules from the same initial
weights and batches, and the two runs are compared bit for bit.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .fake_quantize import FakeQuantize, disable_observer
from .nn.qat import Linear as QATLinear
from .observers import MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver
from .qconfig import QConfig

IN_FEATURES, OUT_FEATURES, SAMPLES, BATCH = 32, 8, 1024, 64
WEIGHT_BITS = 4
QAT_SGD = {"lr": 0.003, "momentum": 0.0, "decay": True}  # fine-tuning: small, decaying steps


def four_bit_qconfig(fake_quant=FakeQuantize, weight_observer=MovingAveragePerChannelMinMaxObserver,
                     act_observer=MovingAverageMinMaxObserver) -> QConfig:
    """4-bit per-channel symmetric weights ([-8, 7]), 8-bit activations (unused by a bare Linear)."""
    lo, hi = -(2 ** (WEIGHT_BITS - 1)), 2 ** (WEIGHT_BITS - 1) - 1
    return QConfig(
        activation=fake_quant.with_args(observer=act_observer, quant_min=0, quant_max=255),
        weight=fake_quant.with_args(observer=weight_observer, quant_min=lo, quant_max=hi, dtype=torch.int8,
                                    qscheme=torch.per_channel_symmetric),
    )


def _data(seed: int):
    """Correlated features (so one weight's rounding error can be compensated by its neighbours,
    which is what QAT learns to do) and a teacher with a few large weights per output channel."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.eye(IN_FEATURES) + 0.9 * torch.randn(IN_FEATURES, IN_FEATURES, generator=g) / IN_FEATURES**0.5
    x = torch.randn(SAMPLES, IN_FEATURES, generator=g) @ mixing
    w_true = torch.randn(OUT_FEATURES, IN_FEATURES, generator=g)
    w_true[:, ::4] *= 4.0
    return x, x @ w_true.T


def _train(model: nn.Module, x, y, steps: int, lr: float = 0.01, momentum: float = 0.9,
           decay: bool = False) -> list[float]:
    """Minibatch SGD; ``decay`` lowers the learning rate linearly to 0, which damps the weights'
    oscillation across grid cells that QAT is known for (Nagel et al. 2022)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    losses = []
    for step in range(steps):
        if decay:
            opt.param_groups[0]["lr"] = lr * (1 - step / steps)
        i = (step * BATCH) % SAMPLES
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x[i:i + BATCH]), y[i:i + BATCH])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _eval(model: nn.Module, x, y) -> float:
    with torch.no_grad():
        return nn.functional.mse_loss(model(x), y).item()


def _torch_ao_qat(float_model: nn.Linear, x, y, steps: int):
    """The same QAT run through torch.ao (the oracle), or None where torch.ao is missing."""
    try:
        import torch.ao.nn.qat as tnqat
        import torch.ao.quantization as tq
    except ImportError:
        return None
    model = copy.deepcopy(float_model)
    model.qconfig = four_bit_qconfig(tq.FakeQuantize, tq.MovingAveragePerChannelMinMaxObserver,
                                     tq.MovingAverageMinMaxObserver)
    qat = tnqat.Linear.from_float(model)
    _train(qat, x, y, steps, **QAT_SGD)
    return qat


def run_example(steps: int = 200, seed: int = 0) -> int:
    x, y = _data(seed)
    torch.manual_seed(seed + 1)
    float_model = nn.Linear(IN_FEATURES, OUT_FEATURES)
    _train(float_model, x, y, steps)

    ptq = copy.deepcopy(float_model)
    ptq.qconfig = four_bit_qconfig()
    ptq = QATLinear.from_float(ptq)
    ptq(x)  # calibration: the observer sees the trained weights once; they are rounded from now on

    # QAT fine-tunes the float model with its weights fake-quantized (straight-through gradients).
    reference = _torch_ao_qat(float_model, x, y, steps)  # the same run through torch.ao, if present
    qat = copy.deepcopy(float_model)
    qat.qconfig = four_bit_qconfig()
    qat = QATLinear.from_float(qat)
    _train(qat, x, y, steps, **QAT_SGD)
    same = reference is not None and all(
        torch.equal(a, b) for a, b in zip(qat.state_dict().values(), reference.state_dict().values()))

    for model in (ptq, qat):
        model.apply(disable_observer)  # .eval() alone would keep the observers updating
    rows = [("float32", _eval(float_model, x, y)), (f"PTQ, {WEIGHT_BITS}-bit weights", _eval(ptq, x, y)),
            (f"QAT, {WEIGHT_BITS}-bit weights", _eval(qat, x, y))]
    print(f"minqat demo: linear regression {IN_FEATURES}->{OUT_FEATURES}, {steps} SGD steps, seed {seed}")
    print(f"{'model':<24}{'MSE':>12}")
    for name, mse in rows:
        print(f"{name:<24}{mse:>12.4f}")
    if reference is None:
        print("torch.ao not available: cross-check skipped")
        return 0
    print(f"cross-check against torch.ao QAT (weights and fake-quant buffers after {steps} steps): "
          f"{'bit-exact' if same else 'DIFFERENT'}")
    return 0 if same else 1
