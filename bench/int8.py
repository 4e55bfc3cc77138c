"""int8 inference: minqat's integer reference kernels vs torch's fbgemm quantized ops vs float.

Three kinds of case, each timed in one loop (one thread, round-robin, medians; see ``_timing.py``):

* **conv**: every distinct convolution of ResNet-18 on a 224x224 image (the 7x7 stem, the 3x3 convs
  of each stage, the stride-2 3x3 and 1x1 downsample convs entering a stage), and the 3x3 depthwise
  convs of MobileNetV2 (torchvision's quantizable one: ``groups == channels``, one per feature size,
  stride 2 where it halves the size), batch 1 and 8;
* **linear**: ResNet-18's ``fc`` (512 -> 1000) and a 2048 -> 2048 layer, batch 1 and 8;
* **model**: a whole converted ResNet -- ResNet-18 itself (7x7 stem + max pool, stages of two basic
  blocks at 64..512 channels, residual ``FloatFunctional.add_relu``, average pool, fc 512 -> 1000)
  on 224x224 images, and the CIFAR-style ResNet-14 of ``qat_step.py`` on 32x32 images -- prepared
  with ``prepare_qat`` by torch.ao, run a few training-mode forwards (observers and BN statistics
  move), loaded into minqat's prepared twin (``load_state_dict(strict=True)``), converted by both.

Contenders per case:

* ``minqat``: the int8 module (``minqat.nn.quantized.Conv2d`` / ``Linear``, or the converted model)
  on a ``QTensor``: what a user runs;
* ``kernel``: the kernel function computing the same integers (``minqat.kernels.quantized_conv2d`` /
  ``quantized_linear``), which checks its arguments, packs the weight and derives the requantization
  constants on every call; the module does that once and keeps it (``module / bare kernel``, below 1);
* ``torch``:  ``torch.ao.nn.quantized.Conv2d`` / ``Linear`` (or torch.ao's converted model) with
  ``torch.backends.quantized.engine = "fbgemm"``, on the channels-last ``quint8`` tensor a quantized
  conv produces (a contiguous one would add torch's own NCHW -> NHWC copy);
* ``float``:  the float ``nn.Conv2d`` / ``nn.Linear`` on the same values in the default contiguous
  layout, or the float model in eval mode with BatchNorm folded (``minqat.fuse_modules``).

Weights are quantized per output channel, symmetric, as fbgemm's default qconfig does; biases are
float32; input codes lie in [0, 127] (zero point 64 for the image entering the stem, else 0: a ReLU's),
so fbgemm is exact on CPUs without AVX512-VNNI too (numerics.md §7.2). Before any timing, minqat's
int8 output (codes, scale, zero point; for a model, the dequantized float output) is asserted equal
to torch's bit for bit: a bench that times a wrong kernel is worthless.

Targets (issue 4): reference conv <= 1.0x float conv and <= 4x torch's quantized conv; reference
linear <= 2x torch's quantized linear; all bit-exact. No target is set for whole models.

Run: ``python -m bench.int8 [--quick] [--json]`` (its own table, with torch's int8 / float ratio),
or ``python -m bench.run`` (its rows in the shared table). ``--quick`` runs a subset at batch 1.
"""
from __future__ import annotations

import contextlib
import copy
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as ``python bench/int8.py``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import nn

import minqat
from bench._timing import bench_main, interleaved_medians
from bench.qat_step import BasicBlock
from minqat.check.engine import quantized_engine
from minqat.kernels import quantized_conv2d, quantized_linear
from minqat.nn import quantized as mnnq
from minqat.qtensor import QTensor

CONV_TARGETS = {"ratio": 4.0, "vs_float": 1.0}  # minqat / torch int8, minqat / float
LINEAR_TARGETS = {"ratio": 2.0}
IMAGE_ZERO_POINT = 64  # the stem's input (a normalised image); every other input follows a ReLU: 0


@dataclass(frozen=True)
class Conv:
    name: str
    c_in: int
    c_out: int
    kernel: int
    stride: int
    size: int  # input height = width
    groups: int = 1  # depthwise: groups == c_in == c_out

    @property
    def padding(self) -> int:
        return self.kernel // 2


RESNET18_CONVS = (  # the distinct conv shapes of torchvision's resnet18 on a 224x224 image
    Conv("conv1 7x7 s2", 3, 64, 7, 2, 224),
    Conv("layer1 3x3", 64, 64, 3, 1, 56),
    Conv("layer2.0.conv1 3x3 s2", 64, 128, 3, 2, 56),
    Conv("layer2 3x3", 128, 128, 3, 1, 28),
    Conv("layer2.0.downsample 1x1 s2", 64, 128, 1, 2, 56),
    Conv("layer3.0.conv1 3x3 s2", 128, 256, 3, 2, 28),
    Conv("layer3 3x3", 256, 256, 3, 1, 14),
    Conv("layer3.0.downsample 1x1 s2", 128, 256, 1, 2, 28),
    Conv("layer4.0.conv1 3x3 s2", 256, 512, 3, 2, 14),
    Conv("layer4 3x3", 512, 512, 3, 1, 7),
    Conv("layer4.0.downsample 1x1 s2", 256, 512, 1, 2, 14),
)
MOBILENET_V2_DEPTHWISE = tuple(  # 3x3 depthwise convs of MobileNetV2 on a 224x224 image: (channels, size, stride)
    Conv(f"mobilenet_v2 dw 3x3{' s2' if s == 2 else ''}", c, c, 3, s, size, groups=c)
    for c, size, s in ((32, 112, 1), (96, 112, 2), (144, 56, 1), (192, 28, 1), (384, 14, 1), (960, 7, 1)))
QUICK_CONVS = (RESNET18_CONVS[1], RESNET18_CONVS[6], RESNET18_CONVS[10], MOBILENET_V2_DEPTHWISE[3])
LINEARS = (("fc", 512, 1000), ("square", 2048, 2048))  # (name, in_features, out_features)


# --- shared helpers ---------------------------------------------------------------------------------


@contextlib.contextmanager
def fbgemm():
    """torch's fbgemm engine, with torch.ao's deprecation warnings silenced (the oracle side only)."""
    with quantized_engine("fbgemm"), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", message=".*reduce_range.*")
        yield


def quantized_input(shape: tuple[int, ...], zero_point: int, seed: int) -> tuple[torch.Tensor, float, int]:
    """``(x, scale, zero_point)``: float values that quantize exactly onto codes in [0, 127]."""
    gen = torch.Generator().manual_seed(seed)
    scale = 0.02
    x_int = torch.randint(0, 128, shape, generator=gen)
    return (x_int - zero_point) * scale, scale, zero_point


def per_channel_weight(w: torch.Tensor) -> torch.Tensor:
    """fbgemm's default weights: per output channel, symmetric, int8 codes in [-128, 127]."""
    scale = (w.abs().amax(dim=tuple(range(1, w.dim()))) / 127.5).clamp(min=1e-8).double()
    return torch.quantize_per_channel(w, scale, torch.zeros(w.size(0), dtype=torch.long), 0, torch.qint8)


def output_qparams(y: torch.Tensor) -> tuple[float, int]:
    """uint8 qparams covering ``[min(y, 0), max(y, 0)]`` (what a MinMax observer would pick)."""
    lo, hi = min(float(y.min()), 0.0), max(float(y.max()), 0.0)
    scale = max(hi - lo, 1e-6) / 255
    return scale, int(round(-lo / scale))


def same_int8(ours: QTensor, theirs: torch.Tensor) -> bool:
    return (torch.equal(ours.int_repr(), theirs.int_repr()) and float(ours.scale) == theirs.q_scale()
            and int(ours.zero_point) == theirs.q_zero_point())


def timed(fns: dict[str, Callable[[], object]], budget_s: float, max_reps: int) -> dict[str, float]:
    """``interleaved_medians`` with as many repetitions as fit ``budget_s`` (between 5 and ``max_reps``)."""
    start = time.perf_counter()
    for fn in fns.values():  # one warm-up call each, also the estimate of one round's cost
        fn()
    per_round = time.perf_counter() - start
    reps = max(5, min(max_reps, int(budget_s / per_round)))
    return interleaved_medians(fns, reps, warmup=1)


def int8_row(kind: str, case: str, numel: int, ms: dict[str, float], targets: dict | None) -> dict:
    """The shared runner's row: minqat vs torch's int8, vs float, module vs its bare kernel."""
    r = {"bench": "int8", "case": case, "numel": numel, "minqat_ms": ms["minqat"], "torch_ms": ms["torch"],
         "float_ms": ms["float"], "kernel_ms": ms.get("kernel"), "copy_ms": None, "kind": kind,
         "ratio": ms["minqat"] / ms["torch"], "vs_copy": None, "vs_float": ms["minqat"] / ms["float"],
         "torch_vs_float": ms["torch"] / ms["float"], "exact": True}
    if "kernel" in ms:
        r["vs_bare"] = ms["minqat"] / ms["kernel"]
    if targets:
        r["targets"] = targets
    return r


# --- layers -----------------------------------------------------------------------------------------


def conv_case(c: Conv, batch: int, budget_s: float) -> dict:
    """One conv shape: build the float, torch int8 and minqat int8 layers, check, time."""
    import torch.ao.nn.quantized as tnnq

    torch.manual_seed(0)
    float_conv = nn.Conv2d(c.c_in, c.c_out, c.kernel, c.stride, c.padding, groups=c.groups).eval()
    zero_point = IMAGE_ZERO_POINT if c.c_in == 3 else 0
    x, s_x, z_x = quantized_input((batch, c.c_in, c.size, c.size), zero_point, seed=1)
    w_q, bias = per_channel_weight(float_conv.weight.detach()), float_conv.bias.detach()
    s_y, z_y = output_qparams(F.conv2d(x, w_q.dequantize(), bias, c.stride, c.padding, groups=c.groups))

    theirs = tnnq.Conv2d(c.c_in, c.c_out, c.kernel, c.stride, c.padding, groups=c.groups)
    theirs.set_weight_bias(w_q, bias)
    theirs.scale, theirs.zero_point = s_y, z_y
    x_q = torch.quantize_per_tensor(x, s_x, z_x, torch.quint8).contiguous(memory_format=torch.channels_last)

    ours = mnnq.Conv2d(c.c_in, c.c_out, c.kernel, c.stride, c.padding, groups=c.groups)
    ours.set_weight_bias(w_q.int_repr(), w_q.q_per_channel_scales().float(), w_q.q_per_channel_zero_points(), bias)
    ours.scale, ours.zero_point = s_y, z_y
    x_ours = QTensor(x_q.int_repr(), s_x, z_x)  # the same channels-last codes

    def kernel():
        return quantized_conv2d(x_ours.int_repr(), s_x, z_x, ours.weight_int, ours.weight_scale,
                                ours.weight_zero_point, bias, y_scale=s_y, y_zero_point=z_y, stride=c.stride,
                                padding=c.padding, groups=c.groups)

    assert same_int8(ours(x_ours), theirs(x_q)), f"minqat's int8 conv differs from torch's: {c}, batch {batch}"
    ms = timed({"minqat": lambda: ours(x_ours), "kernel": kernel, "torch": lambda: theirs(x_q),
                "float": lambda: float_conv(x)}, budget_s, max_reps=50)
    case = f"conv {c.name} {c.c_in}->{c.c_out} on {batch}x{c.size}x{c.size}"
    return int8_row("conv", case, x.numel(), ms, CONV_TARGETS)


def linear_case(name: str, k: int, n: int, batch: int, budget_s: float) -> dict:
    """One linear layer, as ``conv_case``."""
    import torch.ao.nn.quantized as tnnq

    torch.manual_seed(0)
    float_linear = nn.Linear(k, n).eval()
    x, s_x, z_x = quantized_input((batch, k), 0, seed=1)
    w_q, bias = per_channel_weight(float_linear.weight.detach()), float_linear.bias.detach()
    s_y, z_y = output_qparams(F.linear(x, w_q.dequantize(), bias))

    theirs = tnnq.Linear(k, n)
    theirs.set_weight_bias(w_q, bias)
    theirs.scale, theirs.zero_point = s_y, z_y
    x_q = torch.quantize_per_tensor(x, s_x, z_x, torch.quint8)

    ours = mnnq.Linear(k, n)
    ours.set_weight_bias(w_q.int_repr(), w_q.q_per_channel_scales().float(), w_q.q_per_channel_zero_points(), bias)
    ours.scale, ours.zero_point = s_y, z_y
    x_ours = QTensor(x_q.int_repr(), s_x, z_x)

    def kernel():
        return quantized_linear(x_ours.int_repr(), s_x, z_x, ours.weight_int, ours.weight_scale,
                                ours.weight_zero_point, bias, y_scale=s_y, y_zero_point=z_y)

    assert same_int8(ours(x_ours), theirs(x_q)), f"minqat's int8 linear differs from torch's: {k}->{n}, batch {batch}"
    ms = timed({"minqat": lambda: ours(x_ours), "kernel": kernel, "torch": lambda: theirs(x_q),
                "float": lambda: float_linear(x)}, budget_s, max_reps=500)
    return int8_row("linear", f"linear {name} {k}->{n}, batch {batch}", x.numel(), ms, LINEAR_TARGETS)


# --- whole models -----------------------------------------------------------------------------------


class ResNet(nn.Module):
    """Basic-block ResNet between QuantStub and DeQuantStub, every residual add a ``FloatFunctional.add_relu``.

    ``imagenet=True``: torchvision's stem (7x7 stride-2 conv-BN-ReLU, 3x3 stride-2 max pool); else a
    3x3 stride-1 conv-BN-ReLU (CIFAR). Widths (64, 128, 256, 512) with 1000 classes is ResNet-18.
    """

    def __init__(self, parts: tuple, widths: tuple[int, ...], classes: int, imagenet: bool, blocks: int = 2):
        super().__init__()
        quant, dequant, functional = parts
        self.quant, self.dequant = quant(), dequant()
        k, s = (7, 2) if imagenet else (3, 1)
        self.conv1 = nn.Conv2d(3, widths[0], k, s, k // 2, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(widths[0]), nn.ReLU()
        self.pool = nn.MaxPool2d(3, 2, 1) if imagenet else nn.Identity()
        stages, inplanes = [], widths[0]
        for i, planes in enumerate(widths):
            stages.append(nn.Sequential(*[BasicBlock(inplanes if j == 0 else planes, planes,
                                                     2 if i > 0 and j == 0 else 1, functional)
                                          for j in range(blocks)]))
            inplanes = planes
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(widths[-1], classes)

    def forward(self, x):
        x = self.layers(self.pool(self.relu(self.bn1(self.conv1(self.quant(x))))))
        return self.dequant(self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))

    def fusion_groups(self) -> list[list[str]]:
        groups = [["conv1", "bn1", "relu"]]
        for name, m in self.named_modules():
            if isinstance(m, BasicBlock):
                groups += [[f"{name}.conv1", f"{name}.bn1", f"{name}.relu"], [f"{name}.conv2", f"{name}.bn2"]]
                if m.downsample is not None:
                    groups.append([f"{name}.downsample.0", f"{name}.downsample.1"])
        return groups


MODELS = {  # name -> (widths, classes, imagenet stem, image size)
    "ResNet-18": ((64, 128, 256, 512), 1000, True, 224),
    "ResNet-14 (CIFAR, qat_step.py)": ((16, 32, 64), 10, False, 32),
}


def converted_models(name: str, calibration_batches: int = 3, seed: int = 0) -> dict[str, nn.Module]:
    """``float`` (eval, BN folded), ``torch`` and ``minqat`` int8 models from the same prepared state."""
    import torch.ao.nn.quantized as tnnq
    import torch.ao.quantization as tq

    widths, classes, imagenet, size = MODELS[name]
    torch.manual_seed(seed)
    float_model = ResNet((minqat.QuantStub, minqat.DeQuantStub, minqat.FloatFunctional), widths, classes, imagenet)
    groups = float_model.fusion_groups()
    theirs = ResNet((tq.QuantStub, tq.DeQuantStub, tnnq.FloatFunctional), widths, classes, imagenet)
    theirs.load_state_dict(float_model.state_dict())
    theirs.qconfig = tq.get_default_qat_qconfig("fbgemm")
    theirs = tq.prepare_qat(tq.fuse_modules_qat(theirs.train(), groups))
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(calibration_batches):  # training-mode forwards: observers and BN statistics move
        theirs(torch.randn(2, 3, size, size, generator=gen))
    ours = copy.deepcopy(float_model).train()
    ours.qconfig = minqat.get_default_qat_qconfig("fbgemm")
    ours = minqat.prepare_qat(minqat.fuse_modules_qat(ours, groups))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    float_eval = copy.deepcopy(float_model).eval()  # its own weights: only its time is used
    return {"float": minqat.fuse_modules(float_eval, groups), "torch": tq.convert(theirs.eval()),
            "minqat": minqat.convert(ours.eval())}


def model_case(name: str, batch: int, budget_s: float) -> dict:
    """One whole converted model at one batch size: check the float outputs bit for bit, time."""
    size = MODELS[name][3]
    nets = converted_models(name)
    scale, zero_point = float(nets["minqat"].quant.scale), int(nets["minqat"].quant.zero_point)
    x_int = torch.randint(0, 128, (batch, 3, size, size), generator=torch.Generator().manual_seed(2))
    x = ((x_int - zero_point) * scale).float()  # quantizes onto codes in [0, 127]
    y_ours, y_theirs = nets["minqat"](x), nets["torch"](x)
    assert torch.equal(y_ours, y_theirs), f"minqat's converted {name} differs from torch.ao's at batch {batch}"
    ms = timed({contender: (lambda m=m: m(x)) for contender, m in nets.items()}, budget_s, max_reps=30)
    return int8_row("model", f"model {name} on {batch}x3x{size}x{size}", x.numel(), ms, None)


# --- the benchmark ------------------------------------------------------------------------------------


def run(quick: bool = False) -> list[dict]:
    """Every case at batch 1 and 8; ``quick``: four conv shapes (one depthwise), fc and ResNet-14, batch 1 only."""
    batches, budget = ((1,), 0.2) if quick else ((1, 8), 1.5)
    convs = QUICK_CONVS if quick else RESNET18_CONVS + MOBILENET_V2_DEPTHWISE
    linears = LINEARS[:1] if quick else LINEARS
    models = list(MODELS)[1:] if quick else list(MODELS)
    with fbgemm():
        return ([conv_case(c, batch, budget) for c in convs for batch in batches]
                + [linear_case(name, k, n, batch, budget) for name, k, n in linears for batch in batches]
                + [model_case(name, batch, 3 * budget) for name in models for batch in batches])


def _verdict(r: dict) -> str:
    misses = [f"{key} {r[key]:.2f} > {limit:g}" for key, limit in r.get("targets", {}).items() if r[key] > limit]
    return ("missed: " + "; ".join(misses)) if misses else ("met" if r.get("targets") else "")


def format_table(rows: list[dict]) -> str:
    """Ratios only: minqat over torch's fbgemm int8 and over float, torch's int8 over float."""
    lines = ["| case | minqat / torch int8 | minqat / float | torch int8 / float | module / bare kernel "
             "| same bits | targets |",
             "|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        bare = "" if r.get("vs_bare") is None else f"{r['vs_bare']:.2f}x"
        lines.append(f"| {r['case']} | {r['ratio']:.2f}x | {r['vs_float']:.2f}x | {r['torch_vs_float']:.2f}x "
                     f"| {bare} | {'yes' if r['exact'] else 'NO'} | {_verdict(r)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return bench_main(argv, "int8 inference: minqat vs torch's fbgemm vs float", run, format_table)


if __name__ == "__main__":
    sys.exit(main())
