"""Record short QAT training runs of torch.ao's fused Conv-BN(-ReLU) and Linear-BN modules.

Run from the repository root with torch.ao present:  .venv/bin/python tests/golden/make_conv_bn.py
Writes tests/golden/conv_bn.pt: plain tensors and numbers only. Each case holds the initial float
state (weight, bias, bn.*), and per SGD step the phase (train / freeze_bn / eval), the input, the
output gradient, and torch.ao's output, input gradient, parameter gradients and full state dict
after the step (BN running stats, every fake-quant buffer). tests/test_conv_bn_qat.py and
tests/test_linear_bn_qat.py replay them against minqat without torch.ao, step by step from the
recorded state.

Recorded with one intra-op thread: the conv weight gradient (a reduction over the batch) depends on
how torch splits it over threads and on the CPU's vector ISA, so the file also stores the CPU
capability; the replay is bit-exact on the same capability with one thread, and otherwise within
float32 reduction-order noise.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

OUT = Path(__file__).with_name("conv_bn.pt")
PHASES = ["train", "train", "freeze_bn", "eval"]
LR = 0.05

# (kind, dim, relu, cin, cout, kernel, groups, bias, momentum, backend, version, slow)
CASES = [
    ("conv_bn", 2, True, 2, 3, 3, 1, True, 0.1, "fbgemm", 0, False),
    ("conv_bn", 2, True, 2, 3, 3, 1, True, None, "fbgemm", 1, False),
    ("conv_bn", 2, False, 3, 3, 3, 3, False, 0.1, "qnnpack", 0, False),
    ("conv_bn", 2, True, 2, 4, 2, 2, True, 0.1, "fbgemm", 1, True),
    ("conv_bn", 1, False, 2, 2, 2, 1, False, None, "qnnpack", 1, True),
    ("conv_bn", 3, True, 1, 2, 2, 1, True, 0.1, "fbgemm", 1, False),
    ("linear_bn", 0, False, 4, 3, 0, 1, True, None, "fbgemm", 0, False),
    ("linear_bn", 0, False, 5, 2, 0, 1, False, 0.1, "qnnpack", 1, False),
]


def build(kind, dim, relu, cin, cout, kernel, groups, bias, momentum, backend, version, slow):
    import torch.ao.nn.intrinsic.qat as nniqat
    import torch.ao.quantization as tq

    qconfig = tq.get_default_qat_qconfig(backend, version)
    if kind == "linear_bn":
        model = nniqat.LinearBn1d(cin, cout, bias=bias, momentum=momentum, qconfig=qconfig)
    else:
        cls = getattr(nniqat, f"ConvBn{'ReLU' if relu else ''}{dim}d")
        model = cls(cin, cout, kernel, groups=groups, bias=bias, momentum=momentum, qconfig=qconfig)
        model._enable_slow_path_for_better_numerical_stability = slow
    with torch.no_grad():  # non-trivial BN state (γ of both signs, moved running stats)
        model.bn.weight.copy_((torch.rand(cout) + 0.5) * torch.where(torch.rand(cout) < 0.3, -1.0, 1.0))
        model.bn.bias.uniform_(-1, 1)
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.num_batches_tracked.fill_(2)
        if model.bias is not None:
            model.bias.uniform_(-0.5, 0.5)  # torch.ao's LinearBn1d leaves its bias uninitialised
    return model


def record(index: int, spec: tuple) -> dict:
    kind, dim, relu, cin, cout, kernel, groups, bias, momentum, backend, version, slow = spec
    torch.manual_seed(1000 + index)
    model = build(*spec)
    init = {k: v.clone() for k, v in model.state_dict().items() if "fake_quant" not in k}
    in_shape = (3, cin) + (5,) * dim if dim else (4, cin)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    steps = []
    for phase in PHASES:
        if phase == "freeze_bn":
            model.freeze_bn_stats()
        elif phase == "eval":
            model.eval()
        x = torch.randn(in_shape).requires_grad_()
        y = model(x)
        g = torch.randn(y.shape)
        opt.zero_grad()
        y.backward(g)
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        opt.step()
        steps.append({"phase": phase, "x": x.detach(), "g": g, "y": y.detach(), "dx": x.grad, "grads": grads,
                      "state": {k: v.clone() for k, v in model.state_dict().items()}})
    return {"name": f"{kind}{dim}d-{backend}-v{version}-{'slow' if slow else 'approx'}-{index}", "kind": kind,
            "dim": dim, "relu": relu, "cin": cin, "cout": cout, "kernel": kernel, "groups": groups, "bias": bias,
            "momentum": momentum, "backend": backend, "version": version, "slow": slow, "lr": LR, "init": init,
            "steps": steps}


def main() -> None:
    warnings.simplefilter("ignore")  # torch.ao's deprecation and reduce_range notices
    torch.set_num_threads(1)  # reductions split over threads round differently (see the docstring)
    data = {"torch_version": str(torch.__version__), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cases": [record(i, spec) for i, spec in enumerate(CASES)]}
    torch.save(data, OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KiB, {len(data['cases'])} cases)")


if __name__ == "__main__":
    main()
