"""The demo's report: one JSON-ready dict, and the tables printed at the end of ``python -m minqat demo``.

Accuracies are fractions of the test set. Agreement between minqat's and torch.ao's int8 models
(``flow.agreement``) is measured on the integer codes of the logits, the input of ``DeQuantStub``.
"""
from __future__ import annotations

import platform

import torch

from .data import Digits
from .flow import BATCH, CALIBRATION_BATCHES, Schedule

__all__ = ["build_report", "format_table", "qconfig_summary"]

MODEL = "QuantStub -> conv3x3-BN-ReLU 1->16 -> conv3x3/2-BN-ReLU 16->32 -> flatten -> linear 512->10 -> DeQuantStub"


def qconfig_summary(bits: int, backend: str) -> str:
    """How ``bits`` is realized (``model.qat_qconfig`` / ``ptq_qconfig``), in one line.

    >>> qconfig_summary(4, "x86")
    'weights int8 codes in [-7, 7] per channel, activations uint8 codes in [0, 15], logits 8-bit'
    """
    if bits == 8:
        act = "[0, 255]" if backend == "qnnpack" else "[0, 127] (reduce_range)"
        weights = "per tensor" if backend == "qnnpack" else "per channel"
        return f"{backend} defaults: weights int8 symmetric {weights}, activations uint8 {act}"
    w = 2 ** (bits - 1) - 1
    return (f"weights int8 codes in [-{w}, {w}] per channel, activations uint8 codes in [0, {2 ** bits - 1}], "
            "logits 8-bit")


def _during(epoch: int, epochs: int) -> int | None:
    """A 0-based freeze epoch as the 1-based epoch it starts, None where it falls after training."""
    return epoch + 1 if epoch < epochs else None


def _from_epoch(epoch: int | None) -> str:
    return f"from epoch {epoch}" if epoch is not None else "after training"


def build_report(config, data: Digits, schedule: Schedule, float_curve: list[dict], settings: list,
                 torch_ao_reason: str | None, seconds: float) -> dict:
    """The JSON report (``run.run_demo``); ``torch_ao_reason`` is None where torch.ao ran."""
    return {
        "config": {"epochs": config.epochs, "bits": list(config.bits), "backend": config.backend,
                   "seed": config.seed, "quick": config.quick},
        "data": {"name": "scikit-learn load_digits", "train_images": len(data.y_train),
                 "test_images": len(data.y_test), "image_shape": list(data.x_test.shape[1:])},
        "model": MODEL,
        "schedule": {"float_epochs": schedule.float_epochs, "qat_epochs": schedule.qat_epochs,
                     "batch": BATCH, "float_lr": schedule.float_lr, "qat_lr": schedule.qat_lr,
                     "momentum": schedule.momentum, "lr_decay": "cosine, per step",
                     "calibration_images": BATCH * CALIBRATION_BATCHES,
                     "freeze_bn_from_epoch": _during(schedule.freeze_bn_epoch, schedule.qat_epochs),
                     "freeze_observers_from_epoch": _during(schedule.freeze_observer_epoch, schedule.qat_epochs)},
        "float": {"test_accuracy": float_curve[-1]["test_accuracy"], "curve": float_curve},
        "settings": [{"bits": s.bits, "qconfig": qconfig_summary(s.bits, config.backend), "ptq_int8": s.ptq_int8,
                      "qat_fake_quant": s.qat_fake_quant, "qat_int8": s.qat_int8, "qat_curve": s.qat_curve,
                      "torch_ao": s.torch_ao, "onnx": s.onnx, "deployment": s.deployment} for s in settings],
        "torch_ao": {"ran": torch_ao_reason is None, "reason": torch_ao_reason,
                     "engine": "fbgemm" if torch_ao_reason is None else None},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "platform": platform.platform(), "machine": platform.machine(), "intra_op_threads": 1},
        "runtime_s": round(seconds, 2),
    }


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _accuracy_table(report: dict) -> list[str]:
    lines = ["| bits | float | PTQ int8 | QAT fake-quant | QAT int8 |", "|---|---:|---:|---:|---:|"]
    for s in report["settings"]:
        lines.append(f"| {s['bits']} | {_pct(report['float']['test_accuracy'])} | {_pct(s['ptq_int8'])} "
                     f"| {_pct(s['qat_fake_quant'])} | {_pct(s['qat_int8'])} |")
    return lines


def _agreement_table(report: dict) -> list[str]:
    lines = ["| bits | torch.ao PTQ / QAT int8 | QAT logits bit-exact | max LSB | top-1 agree | PTQ logits bit-exact "
             "| prepared QAT tensors identical |", "|---|---:|---:|---:|---:|---:|---:|"]
    for s in report["settings"]:
        t = s["torch_ao"]
        qat, ptq = t["qat_int8_agreement"], t["ptq_int8_agreement"]
        lines.append(f"| {s['bits']} | {_pct(t['ptq_int8'])} / {_pct(t['qat_int8'])} | {_pct(qat['bit_exact'])} "
                     f"| {qat['max_lsb']:g} | {_pct(qat['top1'])} | {_pct(ptq['bit_exact'])} "
                     f"| {t['prepared_tensors_identical']} / {t['prepared_tensors']} |")
    return lines


def _deployment_table(report: dict) -> list[str]:
    lines = ["| bits | convert (torch.ao's): max LSB | first layer > 1 LSB | accuracy "
             "| convert(consistent=True): max LSB | accuracy |", "|---|---:|---|---:|---:|---:|"]
    for s in report["settings"]:
        d, c = s["deployment"]["default"], s["deployment"]["consistent"]
        lines.append(f"| {s['bits']} | {d['max_lsb']:g} | {d['first_layer_over_1_lsb'] or '-'} | {_pct(d['accuracy'])} "
                     f"| {c['max_lsb']:g} | {_pct(c['accuracy'])} |")
    return lines


def _onnx_table(report: dict) -> list[str]:
    lines = ["| bits | ONNX Runtime QAT int8 | top-1 agree with minqat | logits bit-exact |", "|---|---:|---:|---:|"]
    for s in report["settings"]:
        o = s["onnx"]
        exact = 1 - o["mismatches"] / o["outputs"] if o["outputs"] else 1.0
        lines.append(f"| {s['bits']} | {_pct(o['accuracy'])} | {_pct(o['agreement'])} | {_pct(exact)} |")
    return lines


def all_bit_exact(report: dict) -> bool:
    """Every compared int8 logit and prepared tensor identical (True where torch.ao did not run)."""
    for s in report["settings"]:
        t = s["torch_ao"]
        if t is not None and (t["qat_int8_agreement"]["bit_exact"] < 1 or t["ptq_int8_agreement"]["bit_exact"] < 1
                              or t["prepared_tensors_identical"] < t["prepared_tensors"]):
            return False
    return True


def format_table(report: dict) -> str:
    """The text printed at the end of the demo: setup, accuracy table, torch.ao agreement table, notes."""
    d, sch, cfg = report["data"], report["schedule"], report["config"]
    lines = [
        "",
        f"minqat demo: handwritten digits (scikit-learn, {d['train_images']:,} train / {d['test_images']:,} test "
        f"8x8 images), seed {cfg['seed']}",
        f"model: {report['model']}",
        f"float: {sch['float_epochs']} epochs, SGD lr {sch['float_lr']:g} momentum {sch['momentum']:g}, cosine decay; "
        f"PTQ: {sch['calibration_images']} calibration images",
        f"QAT: {sch['qat_epochs']} epochs from the float weights, lr {sch['qat_lr']:g}; BN statistics frozen "
        f"{_from_epoch(sch['freeze_bn_from_epoch'])}, observers {_from_epoch(sch['freeze_observers_from_epoch'])}",
    ]
    lines += [f"{s['bits']} bits: {s['qconfig']}" for s in report["settings"]]
    lines += ["", f"Test accuracy ({d['test_images']} images); int8 = converted model on minqat's integer kernels", ""]
    lines += _accuracy_table(report)
    ao = report["torch_ao"]
    if not ao["ran"]:
        lines += ["", f"torch.ao cross-check skipped: {ao['reason']}"]
    else:
        lines += ["", "The same flow through torch.ao (same float weights and batches; int8 on torch's fbgemm engine, "
                  "whose arithmetic minqat's kernels reproduce):", ""]
        lines += _agreement_table(report)
        lines += ["", "bit-exact: logits whose integer codes and output qparams are identical; LSB: one step of "
                  "the output scale"]
        if cfg["backend"] == "qnnpack":
            lines += ["qnnpack's activations use [0, 255]: on a CPU without AVX512-VNNI torch's fbgemm kernels "
                      "saturate int16 sums of codes above 127 (numerics.md §7.2), which minqat does not model"]
        if not all_bit_exact(report):
            lines += ["NOT bit-exact somewhere above: `python -m minqat check` cross-checks each component"]
    if all(s.get("deployment") for s in report["settings"]):
        lines += ["", "Each QAT int8 model against its own fake-quant model, layer by layer (minqat.compare_layers, "
                  "128 test images, each layer fed the same input):", ""]
        lines += _deployment_table(report)
    if any(s["onnx"] for s in report["settings"]):
        lines += ["", "The QAT int8 models exported as ONNX QDQ graphs (minqat.export_onnx) and run by ONNX Runtime "
                  "(CPU), against minqat's \"onnxruntime\" requantization mode:", ""]
        lines += _onnx_table(report)
    lines += ["", f"{report['runtime_s']:.1f} s, torch {report['environment']['torch']}, one intra-op thread"]
    return "\n".join(lines)
