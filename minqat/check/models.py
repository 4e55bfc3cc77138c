"""Components 4-5 of ``python -m minqat check``: a prepared QAT model over SGD steps, and its int8 conversion.

The same float ``CheckNet`` is prepared by both libraries (each with its own stubs), trained on the same
batches, then converted -- torch.ao's on its fbgemm engine, whose arithmetic minqat's kernels reproduce.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .engine import quantized_engine
from .tally import Tally

__all__ = ["CheckNet", "check_models"]


# --- 4. a prepared QAT model and 5. its int8 conversion ------------------------------------------------


class CheckNet(nn.Module):
    """quant -> conv-BN-ReLU -> conv-BN + identity (FloatFunctional add_relu) -> max pool -> flatten ->
    linear-ReLU -> linear -> dequant; ``parts`` = (QuantStub, DeQuantStub, FloatFunctional) of one library."""

    GROUPS = [["conv1", "bn1", "relu1"], ["conv2", "bn2"], ["fc1", "relu2"]]

    def __init__(self, parts):
        super().__init__()
        quant, dequant, functional = parts
        self.quant, self.dequant, self.skip = quant(), dequant(), functional()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.fc1, self.relu2, self.fc2 = nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 5)

    def forward(self, x):  # (N, 3, 8, 8)
        x = self.relu1(self.bn1(self.conv1(self.quant(x))))
        x = self.pool(self.skip.add_relu(self.bn2(self.conv2(x)), x))  # (N, 8, 4, 4)
        return self.dequant(self.fc2(self.relu2(self.fc1(torch.flatten(x, 1)))))


def _prepared(lib, parts, float_model: nn.Module, backend: str, version: int) -> nn.Module:
    model = CheckNet(parts).train()
    model.load_state_dict(float_model.state_dict(), strict=True)
    model.qconfig = lib.get_default_qat_qconfig(backend, version)
    return lib.prepare_qat(lib.fuse_modules_qat(model, CheckNet.GROUPS))


def _train_step(model: nn.Module, opt, x, target) -> tuple[torch.Tensor, list[torch.Tensor]]:
    y = model(x)
    opt.zero_grad()
    F.cross_entropy(y, target).backward()
    opt.step()
    return y.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _int8_outputs(model: nn.Module, x: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """({module name: quantized output}, float output) of an int8 model on ``x``."""
    seen, handles = {}, []
    for name, module in model.named_modules():
        if name and not name.endswith("_packed_params"):
            handles.append(module.register_forward_hook(
                lambda m, args, out, name=name: seen.__setitem__(name, out) if getattr(out, "is_quantized", False)
                else None))
    try:
        y = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen, y


def check_models(cases: int, gen: torch.Generator, tq, int8_engine: bool = True) -> list[Tally]:
    """Per case and qconfig: both libraries prepare the same float CheckNet, train 4 SGD steps (BN frozen
    before the 3rd, observers before the 4th), then convert (torch.ao on fbgemm, if ``int8_engine``)."""
    import torch.ao.nn.intrinsic.qat as tniqat
    import torch.ao.nn.quantized as tnnq

    import minqat

    trained = Tally("prepared QAT model, 4 SGD steps: outputs, gradients, state")
    int8 = Tally("converted int8 model (fbgemm): every layer's codes and qparams, output")
    sides = [(minqat, (minqat.QuantStub, minqat.DeQuantStub, minqat.FloatFunctional), minqat.freeze_bn_stats),
             (tq, (tq.QuantStub, tq.DeQuantStub, tnnq.FloatFunctional), tniqat.freeze_bn_stats)]
    qconfigs = [("x86", 1), ("fbgemm", 0), ("qnnpack", 1)]
    for case in range(cases):
        torch.manual_seed(int(torch.randint(0, 2**31, (), generator=gen)))
        float_model = CheckNet(sides[0][1])
        for backend, version in qconfigs:
            models = [_prepared(lib, parts, float_model, backend, version) for lib, parts, _ in sides]
            opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
            for step in range(4):
                for (lib, _, freeze_bn), model in zip(sides, models):
                    if step == 2:
                        model.apply(freeze_bn)
                    if step == 3:
                        model.apply(lib.disable_observer)
                x, target = torch.randn(6, 3, 8, 8, generator=gen), torch.randint(0, 5, (6,), generator=gen)
                (y_o, g_o), (y_t, g_t) = (_train_step(m, o, x, target) for m, o in zip(models, opts))
                trained.add(y_o, y_t)
                for a, b in zip(g_o, g_t):
                    trained.add(a, b)
            state_o, state_t = models[0].state_dict(), models[1].state_dict()
            for key in state_o.keys() | state_t.keys():  # a key on one side only counts as a mismatch
                missing = torch.zeros(0)
                trained.add(state_o.get(key, missing), state_t.get(key, missing))
            trained.cases += 1
            if int8_engine and backend != "qnnpack":  # activations on [0, 127]: exact on every x86 CPU (§7.2)
                _compare_int8(models, tq, gen, int8)
    if not int8_engine:
        int8.note, int8.skipped = "skipped: torch's fbgemm engine is missing here", True
    return [trained, int8]


def _compare_int8(models: list[nn.Module], tq, gen: torch.Generator, tally: Tally) -> None:
    """Convert both prepared models; compare every int8 module's output codes and qparams, and the float output."""
    import minqat

    with quantized_engine("fbgemm"):  # minqat's kernels reproduce fbgemm's arithmetic (§7.1)
        ours, theirs = minqat.convert(copy.deepcopy(models[0]).eval()), tq.convert(copy.deepcopy(models[1]).eval())
        scale, zero_point = float(ours.quant.scale), int(ours.quant.zero_point)
        x = ((torch.randint(0, 128, (32, 3, 8, 8), generator=gen) - zero_point) * scale).float()  # codes in [0, 127]
        (q_o, y_o), (q_t, y_t) = _int8_outputs(ours, x), _int8_outputs(theirs, x)
    for name in q_o.keys() - q_t.keys():  # an int8 layer only minqat has: a mismatch
        tally.add(q_o[name].int_repr(), torch.zeros(0))
    for name, out in q_t.items():
        if name not in q_o:
            tally.add(torch.zeros(0), out.int_repr())
            continue
        tally.add(q_o[name].int_repr().long(), out.int_repr().long(), 1.0)
        tally.add(torch.tensor([float(q_o[name].q_scale()), float(q_o[name].q_zero_point())]),
                  torch.tensor([out.q_scale(), float(out.q_zero_point())]))
    tally.add(y_o, y_t)
    tally.cases += 1
