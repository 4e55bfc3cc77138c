"""One QAT training step of a ResNet-like CNN: float vs torch.ao QAT vs minqat QAT.

The model: a CIFAR-style ResNet -- a 3x3 conv-bn-relu stem (3 -> 16 channels), three stages of two
basic blocks (16, 32, 64 channels; the first block of stages 2 and 3 has stride 2 and a 1x1
conv-bn downsample), every residual add a ``FloatFunctional.add_relu`` (torchvision's quantizable
ResNet), global average pooling and a 64 -> 10 Linear, between QuantStub and DeQuantStub: 15 convs,
7 of them conv-bn-relu. Input ``[32, 3, 32, 32]`` (the issue's case; a second row at batch 8 shows
the fixed per-call cost of the fake quants), cross-entropy loss, SGD with momentum.

One step = ``zero_grad`` + forward + backward + ``optimizer.step()``, in training mode, timed for

* ``float``:    the unprepared float model (the stubs are identities, the adds plain adds);
* ``torch.ao``: ``torch.ao.quantization.fuse_modules_qat`` + ``prepare_qat`` with
  ``get_default_qat_qconfig('fbgemm')`` (version 1: fused observer + fake quant modules);
* ``minqat``:   the same flow through ``minqat.fuse_modules_qat`` / ``prepare_qat`` / its qconfig,

from identical initial weights on the same batch, round-robin in one loop on one thread (see
``_timing.py``); the table gives ratios of the medians. Before timing, one step of the two QAT
models is compared bit for bit (output, every gradient, the whole state dict): ``exact``.

Memory, two honest numbers per contender, measured outside the timed loop:

* ``peak``: the highest number of bytes held by torch's CPU allocator during one step above what
  was allocated when it began (parameters, buffers, optimizer state and the input are already
  there; gradients are set to None before). Read from the allocation records of
  ``torch.profiler`` (``profile_memory=True``): the running sum of every allocation and free
  (frees of blocks older than the step are not recorded, so the level is never underestimated).
  Its C++ side prints a line or two to stderr per profiled step.
* ``saved``: the bytes of the distinct storages autograd keeps between forward and backward
  (``saved_tensors_hooks``): the activations and masks, plus the weights and input it references.

Targets (issue 3): minqat's QAT step <= 1.0x torch.ao's (stretch 0.8x); peak memory <= torch.ao's.
Measured by the issue author: torch.ao's QAT step is 1.5x its float step on one thread.

Run: ``python -m bench.qat_step [--quick] [--json]`` (its own table with the float ratios and
memory), or ``python -m bench.run`` (its rows in the shared table: minqat / torch.ao, saved bytes
per input element, same bits; ``--json`` has everything).
"""
from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as ``python bench/qat_step.py``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import nn

import minqat
from bench._timing import bench_main, interleaved_medians

TARGETS = {"ratio": 1.0, "peak_ratio": 1.0}  # minqat / torch.ao: time, peak memory
STRETCH = 0.8


# --- the model --------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """torchvision's quantizable basic block: ``add_relu(bn2(conv2(relu(bn1(conv1(x))))), shortcut)``."""

    def __init__(self, inplanes: int, planes: int, stride: int, functional: type[nn.Module]):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        self.add_relu = functional()

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        identity = x if self.downsample is None else self.downsample(x)
        return self.add_relu.add_relu(out, identity)


class ResNet(nn.Module):
    """Stem 3->16, stages of two blocks at 16, 32, 64 channels, pool, Linear 64->10."""

    def __init__(self, quant: type[nn.Module], dequant: type[nn.Module], functional: type[nn.Module],
                 widths: tuple[int, ...] = (16, 32, 64), blocks_per_stage: int = 2, classes: int = 10):
        super().__init__()
        self.quant, self.dequant = quant(), dequant()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(widths[0]), nn.ReLU()
        stages, inplanes = [], widths[0]
        for i, planes in enumerate(widths):
            blocks = [BasicBlock(inplanes if j == 0 else planes, planes, 2 if i > 0 and j == 0 else 1, functional)
                      for j in range(blocks_per_stage)]
            stages.append(nn.Sequential(*blocks))
            inplanes = planes
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(widths[-1], classes)

    def forward(self, x):
        x = self.layers(self.relu(self.bn1(self.conv1(self.quant(x)))))  # (N, 64, 8, 8)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # (N, 64)
        return self.dequant(self.fc(x))

    def fusion_groups(self) -> list[list[str]]:
        groups = [["conv1", "bn1", "relu"]]
        for name, m in self.named_modules():
            if isinstance(m, BasicBlock):
                groups += [[f"{name}.conv1", f"{name}.bn1", f"{name}.relu"], [f"{name}.conv2", f"{name}.bn2"]]
                if m.downsample is not None:
                    groups.append([f"{name}.downsample.0", f"{name}.downsample.1"])
        return groups


def models(seed: int = 0) -> dict[str, nn.Module]:
    """``float``, ``torch.ao`` and ``minqat`` models from the same initial weights, in training mode."""
    import torch.ao.nn.quantized as tnnq
    import torch.ao.quantization as tq

    torch.manual_seed(seed)
    float_model = ResNet(minqat.QuantStub, minqat.DeQuantStub, minqat.FloatFunctional).train()
    groups = float_model.fusion_groups()

    theirs = ResNet(tq.QuantStub, tq.DeQuantStub, tnnq.FloatFunctional).train()
    theirs.load_state_dict(float_model.state_dict())
    theirs.qconfig = tq.get_default_qat_qconfig("fbgemm")
    theirs = tq.prepare_qat(tq.fuse_modules_qat(theirs, groups))

    ours = copy.deepcopy(float_model)
    ours.qconfig = minqat.get_default_qat_qconfig("fbgemm")
    ours = minqat.prepare_qat(minqat.fuse_modules_qat(ours, groups))
    return {"float": float_model, "torch.ao": theirs, "minqat": ours}


# --- one step ---------------------------------------------------------------------------------------


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def training_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
                  target: torch.Tensor) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        y = model(x)
        F.cross_entropy(y, target).backward()
        opt.step()
        return y
    return step


def batch(batch_size: int, size: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 3, size, size, generator=gen), torch.randint(0, 10, (batch_size,), generator=gen)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) and \
        bool((torch.signbit(a) == torch.signbit(b)).all() if a.is_floating_point() else True)


def exact_step(ours: nn.Module, theirs: nn.Module, x: torch.Tensor, target: torch.Tensor) -> bool:
    """One step of copies of both QAT models: same output, gradients and state dict, bit for bit?"""
    ours, theirs = copy.deepcopy(ours), copy.deepcopy(theirs)
    y_ours, y_theirs = training_step(ours, sgd(ours), x, target)(), training_step(theirs, sgd(theirs), x, target)()
    grads_ours = {k: p.grad for k, p in ours.named_parameters()}
    grads_theirs = {k: p.grad for k, p in theirs.named_parameters()}
    state_ours, state_theirs = ours.state_dict(), theirs.state_dict()
    return (_same_bits(y_ours.detach(), y_theirs.detach()) and grads_ours.keys() == grads_theirs.keys()
            and all(_same_bits(grads_ours[k], grads_theirs[k]) for k in grads_ours)
            and state_ours.keys() == state_theirs.keys()
            and all(_same_bits(state_ours[k], state_theirs[k]) for k in state_ours))


# --- memory -----------------------------------------------------------------------------------------


def peak_step_bytes(step: Callable[[], object], opt: torch.optim.Optimizer) -> int:
    """Peak bytes held by torch's CPU allocator during ``step()`` above the level at its start."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    opt.zero_grad(set_to_none=True)  # the step's own zero_grad then frees nothing allocated earlier
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()

    def walk(events):
        for event in events:
            yield event
            yield from walk(event.children)

    allocations = sorted((e for e in walk(prof.profiler.kineto_results.experimental_event_tree())
                          if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu"),
                         key=lambda e: e.start_time_ns)
    level = peak = 0
    for event in allocations:
        level += event.extra_fields.alloc_size
        peak = max(peak, level)
    return peak


def saved_for_backward_bytes(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves during the forward (and loss) of one step."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), target)
    del loss
    return sum(storages.values())


# --- the benchmark ------------------------------------------------------------------------------------


def measure(batch_size: int, reps: int, warmup: int) -> dict:
    """Medians (ms), peak and saved bytes of each contender, and the exactness check."""
    x, target = batch(batch_size)
    nets = models()
    exact = exact_step(nets["minqat"], nets["torch.ao"], x, target)
    opts = {name: sgd(model) for name, model in nets.items()}
    steps = {name: training_step(model, opts[name], x, target) for name, model in nets.items()}
    peak = {name: peak_step_bytes(steps[name], opts[name]) for name in nets}
    saved = {name: saved_for_backward_bytes(model, x, target) for name, model in nets.items()}
    ms = interleaved_medians(steps, reps, warmup)
    return {"input_shape": list(x.shape), "ms": ms, "peak_bytes": peak, "saved_bytes": saved, "exact": exact}


def row(result: dict, targets: dict | None) -> dict:
    """The shared runner's row: minqat vs torch.ao, with the float step and memory as extras."""
    ms, peak, saved = result["ms"], result["peak_bytes"], result["saved_bytes"]
    numel = int(torch.Size(result["input_shape"]).numel())
    r = {"bench": "qat_step", "case": f"ResNet-14 SGD step, input {result['input_shape']}", "numel": numel,
         "minqat_ms": ms["minqat"], "torch_ms": ms["torch.ao"], "float_ms": ms["float"], "copy_ms": None,
         "ratio": ms["minqat"] / ms["torch.ao"], "vs_copy": None,
         "minqat_vs_float": ms["minqat"] / ms["float"], "torch_vs_float": ms["torch.ao"] / ms["float"],
         "peak_bytes": peak, "saved_bytes": saved, "peak_ratio": peak["minqat"] / peak["torch.ao"],
         "saved_B_per_el": saved["minqat"] / numel, "torch_saved_B_per_el": saved["torch.ao"] / numel,
         "exact": result["exact"]}
    if targets:
        r["targets"] = targets
    return r


def run(quick: bool = False) -> list[dict]:
    """Batch 32 (the issue's case, with its targets) and batch 8 (where the fixed per-call cost of
    each fake quant weighs more); ``quick``: batch 8 only, few repetitions."""
    if quick:
        return [row(measure(8, reps=5, warmup=2), None)]
    return [row(measure(32, reps=30, warmup=5), TARGETS), row(measure(8, reps=30, warmup=5), None)]


def format_table(rows: list[dict]) -> str:
    """Per row: milliseconds, ratios to the float step and to torch.ao, peak and saved memory."""
    mib = 2**20
    lines = ["| input | contender | step ms | / float | / torch.ao | peak MiB | saved for backward MiB | same bits |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ms = {"float": r["float_ms"], "torch.ao": r["torch_ms"], "minqat": r["minqat_ms"]}
        for name in ("float", "torch.ao", "minqat"):
            exact = ("yes" if r["exact"] else "NO") if name == "minqat" else ""
            lines.append(f"| {r['numel'] // 3072}x3x32x32 | {name} | {ms[name]:.1f} | {ms[name] / ms['float']:.2f}x "
                         f"| {ms[name] / ms['torch.ao']:.2f}x | {r['peak_bytes'][name] / mib:.1f} "
                         f"| {r['saved_bytes'][name] / mib:.1f} | {exact} |")
    for r in rows:
        if r.get("targets"):
            met = r["ratio"] <= TARGETS["ratio"] and r["peak_ratio"] <= TARGETS["peak_ratio"]
            lines.append(f"\nTargets at batch {r['numel'] // 3072}: minqat <= 1.0x torch.ao in time and peak memory: "
                         f"{'met' if met else 'missed'} ({r['ratio']:.2f}x, {r['peak_ratio']:.2f}x); "
                         f"stretch <= {STRETCH}x: {'met' if r['ratio'] <= STRETCH else 'missed'}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return bench_main(argv, "one QAT training step: float vs torch.ao vs minqat", run, format_table)


if __name__ == "__main__":
    sys.exit(main())
