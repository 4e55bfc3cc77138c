"""Record torch.ao's fake-quant modules over batch sequences -> tests/golden/fake_quantize_modules.pt.

Run from the repository root: ``.venv/bin/python tests/golden/make_fake_quantize_modules.py``.

Each case runs one module over a few batches (with a switch or LSQ mode change before some of them)
and stores, per batch: the input, the upstream gradient, the output, the input gradient, the
scale/zero-point gradients (LSQ) and the whole state dict. ``qparams_fbgemm`` stores fbgemm's
qparams for hard ranges (zero, one-signed, tiny, huge, infinite). Everything is a plain tensor, so
``tests/test_fake_quantize_modules.py`` and ``tests/test_qparams_fbgemm.py`` replay it against minqat
without torch.ao.
This module imports torch.ao only inside :func:`main`.
"""
from __future__ import annotations

import pathlib
import sys
import warnings

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = pathlib.Path(__file__).with_name("fake_quantize_modules.pt")

# name -> (minqat.qconfig factory or LSQ spec, input shape, batch kinds, action before each batch, SGD lr)
CASES = {
    "fused_act": ("default_fused_act_fake_quant", (2, 3, 4), ["normal", "offset", "tiny", "zeros", "normal"],
                  ["none", "none", "disable_observer", "enable_observer", "disable_fake_quant"], 0.0),
    "fused_wt": ("default_fused_wt_fake_quant", (4, 6), ["one_signed", "normal", "tiny", "constant"],
                 ["none", "none", "none", "none"], 0.0),
    "fused_per_channel_wt": ("default_fused_per_channel_wt_fake_quant", (4, 3, 2, 2),
                             ["one_signed", "normal", "constant", "tiny"], ["none", "none", "none", "none"], 0.0),
    "fused_per_channel_neg127": ("fused_per_channel_wt_fake_quant_range_neg_127_to_127", (3, 5),
                                 ["normal", "one_signed", "zeros"], ["none", "none", "none"], 0.0),
    "fake_quant_act": ("default_fake_quant", (3, 4), ["normal", "offset", "normal", "tiny"],
                       ["none", "disable_fake_quant", "enable_fake_quant", "disable_observer"], 0.0),
    "fake_quant_per_channel_wt": ("default_per_channel_weight_fake_quant", (4, 2, 3),
                                  ["normal", "one_signed", "constant"], ["none", "none", "none"], 0.0),
    "lsq_per_channel_sym": ("lsq", (3, 4), ["normal", "offset", "normal", "one_signed"],
                            ["none", "enable_param_learning", "none", "enable_static_estimate"], 0.1),
}

LSQ_KWARGS = dict(quant_min=-8, quant_max=7, qscheme=torch.per_channel_symmetric, channel_len=3,
                  use_grad_scaling=True, scale=0.5, zero_point=1.0)

# (min, max) pairs for choose_qparams_fbgemm, and the (quant_min, quant_max, preserve_sparsity) settings
FBGEMM_RANGES = [(0.0, 0.0), (-1.0, 3.0), (-1.0, 0.5), (-3.0, -3.0), (3.0, 3.0), (0.0, 1e-3), (-1e-3, 0.0),
                 (-1e-3, 1e-3), (-2e-7, 5e-8), (-1e30, 1e30), (1e-45, 1e-45), (-float("inf"), 2.0),
                 (-0.3, 1e-38), (-123.456, 0.001), (2.5, 1e6)]
FBGEMM_SETTINGS = [(0, 255, False), (0, 127, False), (-128, 127, True), (0, 255, True), (-127, 127, True),
                   (-8, 7, False)]


def make_batch(rng: np.random.Generator, shape, kind: str) -> torch.Tensor:
    x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-2, 2)
    if kind == "offset":
        x = x + rng.uniform(-5, 5)
    elif kind == "one_signed":
        sign = np.where(rng.random(shape[:1] + (1,) * (len(shape) - 1)) < 0.5, -1.0, 1.0)
        x = np.abs(x) * sign
    elif kind == "constant":
        x = np.full(shape, rng.uniform(-3, 3))
    elif kind == "tiny":
        x = x * 1e-6
    elif kind == "zeros":
        x = np.zeros(shape)
    return torch.tensor(x, dtype=torch.float32)


def build_minqat(name: str):
    """The minqat module of a case (used by the replay test)."""
    import minqat.qconfig as mq
    from minqat.fake_quantize import LearnableFakeQuantize
    from minqat.observers import MovingAveragePerChannelMinMaxObserver

    spec = CASES[name][0]
    if spec == "lsq":
        return LearnableFakeQuantize(MovingAveragePerChannelMinMaxObserver, dtype=torch.int8, **LSQ_KWARGS)
    return getattr(mq, spec)()


def _build_torch(name: str):
    import torch.ao.quantization as tq
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize

    spec = CASES[name][0]
    if spec == "lsq":
        return _LearnableFakeQuantize(tq.MovingAveragePerChannelMinMaxObserver, dtype=torch.qint8, **LSQ_KWARGS)
    return getattr(tq, spec)()


def run_case(module, inputs, grads, actions, lr: float):
    """Step ``module`` through the batches; return the per-batch records (shared with the replay)."""
    records = []
    for x, dy, action in zip(inputs, grads, actions):
        if action != "none":
            getattr(module, action)()
        x = x.clone().requires_grad_()
        y = module(x)
        record = {"output": y.detach().clone()}
        if y.requires_grad:
            y.backward(dy)
            record["dx"] = x.grad.clone()
        for pname in ("scale", "zero_point"):
            param = getattr(module, pname)
            if isinstance(param, torch.nn.Parameter) and param.grad is not None:
                record["d" + pname] = param.grad.clone()
                param.data.add_(param.grad, alpha=-lr)
                param.grad = None
        record["state"] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        records.append(record)
    return records


def _fbgemm_reference():
    mn = torch.tensor([r[0] for r in FBGEMM_RANGES])
    mx = torch.tensor([r[1] for r in FBGEMM_RANGES])
    out = {"min": mn, "max": mx, "settings": torch.tensor([[a, b, int(c)] for a, b, c in FBGEMM_SETTINGS])}
    scales, zero_points = [], []
    for qmin, qmax, sym in FBGEMM_SETTINGS:
        scale, zero_point = torch.ones(len(mn)), torch.zeros(len(mn), dtype=torch.int32)
        torch.fused_moving_avg_obs_fake_quant(torch.zeros(len(mn), 1), torch.tensor([0]), torch.tensor([1]),
                                              mn.clone(), mx.clone(), scale, zero_point, 0.01, qmin, qmax, 0,
                                              True, sym)
        scales.append(scale)
        zero_points.append(zero_point)
    out["scale"], out["zero_point"] = torch.stack(scales), torch.stack(zero_points)
    return out


def main() -> None:
    sys.path.insert(0, str(ROOT))
    warnings.filterwarnings("ignore")
    golden = {"torch_version": str(torch.__version__), "qparams_fbgemm": _fbgemm_reference()}
    for i, (name, (_, shape, kinds, actions, lr)) in enumerate(CASES.items()):
        rng = np.random.default_rng(1000 + i)
        inputs = [make_batch(rng, shape, kind) for kind in kinds]
        grads = [torch.tensor(rng.standard_normal(shape), dtype=torch.float32) for _ in kinds]
        records = run_case(_build_torch(name), inputs, grads, actions, lr)
        golden[name] = {"inputs": inputs, "grads": grads, "actions": actions, "lr": lr, "records": records}
    torch.save(golden, OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
