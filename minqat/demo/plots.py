"""``--out DIR``: the JSON report and two PNG figures (matplotlib, Agg backend: no display needed).

* ``training_curves.png``: loss and test accuracy per epoch, float training followed by each bit
  setting's QAT fine-tuning (with its PTQ accuracy as a dashed line), with the epochs where BN statistics
  and observers freeze marked;
* ``weight_histogram.png``: the classifier's weights for one output class (``fc`` row 0, 512 weights),
  per bit setting -- the float model's weights (what PTQ rounds) and the QAT-trained ones, under the
  int8 model's quantization grid ``k * scale`` (``k`` in ``[quant_min, quant_max]``) and its clamp
  range ``[quant_min * scale, quant_max * scale]``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .data import INSTALL_HINT, MissingExtra

__all__ = ["require_matplotlib", "write_outputs", "CHANNEL"]

CHANNEL = 0  # the fc output row (digit class) whose weights are drawn


def require_matplotlib():
    """``matplotlib.pyplot`` on the Agg backend.

    Raises:
        MissingExtra: matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError as err:
        raise MissingExtra(f"--out needs matplotlib for its plots: {INSTALL_HINT}") from err
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _training_curves(plt, report: dict, path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    float_curve = report["float"]["curve"]
    n_float = len(float_curve)
    epochs = [m["epoch"] for m in float_curve]
    ax_loss.plot(epochs, [m["loss"] for m in float_curve], "k-o", ms=3, label="float")
    ax_acc.plot(epochs, [100 * m["test_accuracy"] for m in float_curve], "k-o", ms=3, label="float")
    for s in report["settings"]:
        x = [n_float + m["epoch"] for m in s["qat_curve"]]
        ax_loss.plot(x, [m["loss"] for m in s["qat_curve"]], "-o", ms=3, label=f"QAT {s['bits']}-bit")
        (line,) = ax_acc.plot(x, [100 * m["test_accuracy"] for m in s["qat_curve"]], "-o", ms=3,
                              label=f"QAT {s['bits']}-bit (fake quant)")
        ax_acc.hlines(100 * s["ptq_int8"], x[0], x[-1], colors=line.get_color(), linestyles="--", lw=1,
                      label=f"PTQ {s['bits']}-bit (int8), for comparison")
    sch = report["schedule"]
    for ax in (ax_loss, ax_acc):
        ax.axvline(n_float + 0.5, color="grey", lw=0.8, label="QAT starts (from the float weights)")
        for key, style, label in (("freeze_bn_from_epoch", "--", "BN statistics frozen"),
                                  ("freeze_observers_from_epoch", ":", "observers frozen")):
            if sch[key] is not None:
                ax.axvline(n_float + sch[key] - 0.5, color="grey", ls=style, lw=0.8, label=label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax_loss.set_ylabel("training loss (cross-entropy)")
    ax_loss.set_yscale("log")
    ax_acc.set_ylabel("test accuracy (%)")
    fig.suptitle("minqat demo: digits, float training then quantization-aware fine-tuning")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _grid(int8_model: nn.Module, qat_weight_range: tuple[int, int]) -> tuple[float, int, int]:
    """(scale, quant_min, quant_max) of the int8 classifier's weight row ``CHANNEL``."""
    scale = int8_model.fc.weight_scale
    scale = float(scale[CHANNEL] if scale.dim() == 1 else scale)
    return scale, *qat_weight_range


def _weight_histogram(plt, float_model: nn.Module, settings: list, path: Path) -> None:
    fig, axes = plt.subplots(1, len(settings), figsize=(4.5 * len(settings), 3.6), squeeze=False)
    w_float = float_model.fc.weight.detach()[CHANNEL]  # (512,)
    for ax, s in zip(axes[0], settings):
        int8 = s.qat_int8_model
        w_int = int8.fc.weight_int[CHANNEL].float()
        scale, q_min, q_max = _grid(int8, s.weight_range)
        w_qat = s.qat_fc_weight[CHANNEL]
        lo, hi = q_min * scale, q_max * scale
        span = max(float(w_float.abs().max()), float(w_qat.abs().max()), abs(lo), hi) * 1.1
        bins = torch.linspace(-span, span, 121).tolist()
        ax.hist(w_float.tolist(), bins=bins, alpha=0.45, color="grey", label="float (PTQ rounds these)")
        ax.hist(w_qat.tolist(), bins=bins, alpha=0.6, color="tab:blue", label="after QAT (latent float)")
        step = max(1, (q_max - q_min) // 32)  # at 8 bits draw every few grid points only
        for k in range(q_min, q_max + 1, step):
            ax.axvline(k * scale, color="tab:red", lw=0.5, alpha=0.5)
        ax.axvspan(-span, lo, color="tab:red", alpha=0.08)
        ax.axvspan(hi, span, color="tab:red", alpha=0.08, label="clamped")
        used = int(torch.unique(w_int).numel())
        grid_note = f"grid k*s, k in [{q_min}, {q_max}]" + ("" if step == 1 else f" (every {step}th drawn)")
        ax.set_title(f"{s.bits}-bit: fc row {CHANNEL}, s = {scale:.3g}\n{grid_note}; {used} codes used", fontsize=9)
        ax.set_xlim(-span, span)
        ax.set_xlabel("weight value")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("count")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(out: Path, report: dict, float_model: nn.Module, settings: list) -> list[Path]:
    """Write ``report.json``, ``training_curves.png``, ``weight_histogram.png`` into ``out``; their paths."""
    plt = require_matplotlib()
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "training_curves.png", out / "weight_histogram.png"]
    report = dict(report, plots=[p.name for p in paths[1:]])
    paths[0].write_text(json.dumps(report, indent=1) + "\n")
    _training_curves(plt, report, paths[1])
    _weight_histogram(plt, float_model, settings, paths[2])
    return paths
