"""``python -m minqat demo``: the whole flow on real data, minqat beside torch.ao, one table at the end.

``run_demo(config)`` trains the float ``DigitsCNN`` once, then, for each bit setting, quantizes it
after training (PTQ) and with quantization-aware training (QAT), converts both to int8 and runs them
on minqat's integer kernels. Where torch.ao is importable the PTQ and QAT runs are repeated through
torch.ao from the same float weights and batches, and the two sides are compared: the prepared QAT
models tensor by tensor after training, the int8 models logit by logit.

One intra-op thread while it runs: a float convolution's gradient is summed in an order that depends
on the thread count, and the table should not depend on the machine's core count.
"""
from __future__ import annotations

import contextlib
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import flow
from .data import Digits, MissingExtra, load_digits_split
from .model import Library, minqat_library, torch_ao_library
from .progress import EpochProgress
from .report import build_report, format_table

__all__ = ["DemoConfig", "run_demo", "onnx_hook", "QUICK_EPOCHS", "DEFAULT_EPOCHS", "DEFAULT_BITS"]

DEFAULT_EPOCHS = 10
QUICK_EPOCHS = 3
DEFAULT_BITS = (8, 4, 2)

# torch.ao's own notices, expected when it runs as the reference (numerics.md §8)
_TORCH_AO_WARNINGS = (
    ("torch.ao.quantization is deprecated", DeprecationWarning),
    ("torch.quantize_per_tensor, torch.quantize_per_channel and other quantized tensor creation", UserWarning),
    ("Please use quant_min and quant_max to specify the range for observers", UserWarning),
)


@dataclass(frozen=True)
class DemoConfig:
    """What ``python -m minqat demo`` was asked for (validated by the command line)."""

    epochs: int = DEFAULT_EPOCHS  # of the float training and of each QAT fine-tuning
    bits: tuple[int, ...] = DEFAULT_BITS
    backend: str = "x86"
    seed: int = 0
    quick: bool = False
    out: Path | None = None
    torch_ao: bool = True  # run the same flow through torch.ao where it is importable
    onnx: bool = False  # export each QAT int8 model to ONNX and run it in ONNX Runtime (the onnx extra)


@dataclass
class Setting:
    """One bit setting's results (accuracies are fractions of the test set)."""

    bits: int
    ptq_int8: float = 0.0
    qat_fake_quant: float = 0.0
    qat_int8: float = 0.0
    qat_curve: list[dict] = field(default_factory=list)
    torch_ao: dict | None = None
    onnx: dict | None = None
    deployment: dict | None = None  # int8 vs its fake-quant model: default vs consistent convert
    # minqat's, for the plots: the int8 model, the classifier's QAT-trained float weight and its code range
    qat_int8_model: nn.Module | None = field(default=None, repr=False)
    qat_fc_weight: torch.Tensor | None = field(default=None, repr=False)
    weight_range: tuple[int, int] = (0, 0)


def onnx_hook(int8_model: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor, bits: int,
              enabled: bool = False) -> dict | None:
    """``--onnx``: export the QAT int8 model as an ONNX QDQ graph, run it in ONNX Runtime on the test set and
    compare with minqat's ``"onnxruntime"`` requantization mode (``minqat.onnx.evaluate_onnxruntime``):
    ORT's accuracy, top-1 agreement and bit-exact logits. Stored under ``settings[i]["onnx"]``."""
    if not enabled:
        return None
    from ..onnx import evaluate_onnxruntime

    return evaluate_onnxruntime(int8_model, x_test, y_test)


def require_onnx() -> None:
    """Raise ``MissingExtra`` unless onnx and onnxruntime import (``--onnx`` needs the ``onnx`` extra)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise MissingExtra(f'--onnx needs onnx and onnxruntime: pip install -c constraints.txt -e ".[demo,onnx]" '
                           f"({err})") from err


@contextlib.contextmanager
def _demo_environment():
    """One intra-op thread and torch.ao's expected warnings silenced, both restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            for message, category in _TORCH_AO_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        torch.set_num_threads(threads)


def _identical(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Same dtype, shape and bits (NaN equals NaN; -0.0 differs from +0.0)."""
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    if not x.is_floating_point():
        return bool((x == y).all())
    return bool((((x == y) & (x.signbit() == y.signbit())) | (x.isnan() & y.isnan())).all())


def _same_state(ours: nn.Module, theirs: nn.Module) -> tuple[int, int]:
    """(identical tensors, tensors) over the two prepared models' state dicts (their keys must match)."""
    a, b = ours.state_dict(), theirs.state_dict()
    if a.keys() != b.keys():
        return 0, max(len(a), len(b))
    return sum(_identical(a[key], b[key]) for key in b), len(b)


def _run_setting(libs: list[Library], float_model: nn.Module, data: Digits, bits: int, config: DemoConfig,
                 schedule: flow.Schedule, progress: EpochProgress) -> Setting:
    results = {}
    for lib in libs:
        ptq = flow.evaluate(flow.post_training_quantization(lib, float_model, data, bits, config.backend,
                                                            config.seed), data, lib)
        prepared, curve = flow.quantization_aware_training(lib, float_model, data, bits, config.backend, schedule,
                                                           config.seed, progress)
        int8 = flow.convert(lib, prepared)
        results[lib.name] = dict(ptq=ptq, prepared=prepared, curve=curve, int8_model=int8,
                                 fake_quant=flow.evaluate(prepared, data), int8=flow.evaluate(int8, data, lib))
    ours = results["minqat"]
    setting = Setting(bits, ours["ptq"]["accuracy"], ours["fake_quant"]["accuracy"], ours["int8"]["accuracy"],
                      ours["curve"], qat_int8_model=ours["int8_model"],
                      qat_fc_weight=ours["prepared"].fc.weight.detach().clone(),
                      weight_range=(ours["prepared"].fc.weight_fake_quant.quant_min,
                                    ours["prepared"].fc.weight_fake_quant.quant_max))
    setting.deployment = flow.deployment_consistency(ours["prepared"], ours["int8_model"], data)
    setting.onnx = onnx_hook(ours["int8_model"], data.x_test, data.y_test, bits, config.onnx)
    if "torch.ao" in results:
        theirs = results["torch.ao"]
        same, total = _same_state(ours["prepared"], theirs["prepared"])
        setting.torch_ao = {
            "ptq_int8": theirs["ptq"]["accuracy"], "qat_fake_quant": theirs["fake_quant"]["accuracy"],
            "qat_int8": theirs["int8"]["accuracy"],
            "qat_int8_agreement": flow.agreement(ours["int8"], theirs["int8"]),
            "ptq_int8_agreement": flow.agreement(ours["ptq"], theirs["ptq"]),
            "prepared_tensors_identical": same, "prepared_tensors": total,
        }
    return setting


def run_demo(config: DemoConfig, stream=None) -> dict:
    """Run the demo, print its progress and table to ``stream`` (stdout), write ``config.out`` if given.

    Returns the report (the JSON written to ``out/report.json``).

    Raises:
        data.MissingExtra: scikit-learn (or, with ``out``, matplotlib) is not installed.
    """
    stream = stream or sys.stdout
    if config.out is not None:
        from .plots import require_matplotlib

        require_matplotlib()
    if config.onnx:
        require_onnx()
    started = time.perf_counter()
    data = load_digits_split(config.seed)
    schedule = flow.Schedule(config.epochs, config.epochs)
    libs, skipped_because = [minqat_library()], "not requested"
    if config.torch_ao:
        reference, skipped_because = torch_ao_library()
        if reference is not None:
            libs.append(reference)
            skipped_because = None
    progress = EpochProgress(stream)
    with _demo_environment():
        float_model, float_curve = flow.train_float(libs[0], data, schedule, config.seed, progress)
        settings = [_run_setting(libs, float_model, data, bits, config, schedule, progress) for bits in config.bits]
    report = build_report(config, data, schedule, float_curve, settings, skipped_because,
                          seconds=time.perf_counter() - started)
    print(format_table(report), file=stream)
    if config.out is not None:
        from .plots import write_outputs

        for path in write_outputs(config.out, report, float_model, settings):
            print(f"wrote {path}", file=stream)
    return report
