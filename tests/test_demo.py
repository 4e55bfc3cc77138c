"""``python -m minqat demo``: the quick run end to end, its report and plots, missing extras, progress output.

The end-to-end test runs the command as a user would (``--quick --bits 8,2 --out DIR``, about 5 s) and
reads its JSON: QAT's int8 model is within 2 points of float at 8 bits and clearly above PTQ at 2 bits
(where PTQ loses 20-30 points on this task, QAT 3-5), the plots are real PNG files, and -- with torch.ao --
minqat's run of the flow agrees with torch.ao's (see ``test_quick_demo_end_to_end`` for the thresholds).
"""
from __future__ import annotations

import io
import json
import sys

import pytest
import torch

from minqat.__main__ import main
from minqat.demo import flow, run
from minqat.demo.progress import EpochProgress
from tests.oracle import HAS_AO

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _needs_demo_extra():
    pytest.importorskip("sklearn", reason="the demo's data comes from scikit-learn (pip install -e '.[demo]')")


def test_quick_demo_end_to_end(tmp_path, capsys):
    _needs_demo_extra()
    pytest.importorskip("matplotlib", reason="--out draws its plots with matplotlib (the demo extra)")
    threads = torch.get_num_threads()
    assert main(["demo", "--quick", "--bits", "8,2", "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads  # the demo's one-thread setting is undone
    out = capsys.readouterr().out
    assert "| bits | float | PTQ int8 | QAT fake-quant | QAT int8 |" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"] == {"epochs": run.QUICK_EPOCHS, "bits": [8, 2], "backend": "x86", "seed": 0,
                                "quick": True}
    assert report["data"]["train_images"] + report["data"]["test_images"] == 1797
    settings = {s["bits"]: s for s in report["settings"]}
    float_accuracy = report["float"]["test_accuracy"]
    assert float_accuracy > 0.9
    assert abs(settings[8]["qat_int8"] - float_accuracy) <= 0.02
    assert settings[2]["qat_int8"] >= settings[2]["ptq_int8"] + 0.05  # measured: +18 to +29 points, seeds 0-3
    assert len(report["float"]["curve"]) == run.QUICK_EPOCHS == len(settings[2]["qat_curve"])
    for bits, setting in settings.items():  # convert(consistent=True): each layer within 1 LSB of its fake quant
        assert setting["deployment"]["consistent"]["max_lsb"] <= 1.0, bits
        assert setting["deployment"]["default"]["max_lsb"] >= setting["deployment"]["consistent"]["max_lsb"], bits
    assert "convert(consistent=True): max LSB" in out
    for name in report["plots"]:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, name
    if not HAS_AO:
        assert not report["torch_ao"]["ran"] and "cross-check skipped" in out
        return
    # minqat claims bit-exactness with torch.ao here: the prepared models after QAT are float computations
    # on one machine, so they must be identical everywhere. The int8 logits are bit-exact on this machine
    # (AVX512-VNNI); fbgemm on a CPU without VNNI saturates int16 pair sums of activation codes above 127
    # (numerics.md §7.2), which a layer output beyond its observed range can reach, moving a logit by a few
    # LSB. So the int8 agreement is asserted at >= 99 % (at most 4 of 450 test images may flip a near tie).
    assert report["torch_ao"] == {"ran": True, "reason": None, "engine": "fbgemm"}
    for bits, setting in settings.items():
        ao = setting["torch_ao"]
        assert ao["prepared_tensors"] > 0 and ao["prepared_tensors_identical"] == ao["prepared_tensors"], bits
        for key in ("qat_int8_agreement", "ptq_int8_agreement"):
            agreement = ao[key]
            assert set(agreement) == {"bit_exact", "max_lsb", "top1", "same_qparams"}
            assert agreement["same_qparams"] and agreement["top1"] >= 0.99 and agreement["bit_exact"] >= 0.99, key
        assert ao["qat_fake_quant"] == setting["qat_fake_quant"]  # the same prepared model
    assert "QAT logits bit-exact" in out


def test_demo_without_torch_ao_calls_the_onnx_hook(monkeypatch, capsys):
    """``--no-torch-ao``: the table says the cross-check was skipped; the --onnx hook point receives every QAT
    int8 model with the test set, and what it returns lands in the report."""
    _needs_demo_extra()
    calls = []

    def hook(int8_model, x_test, y_test, bits, enabled):
        calls.append((type(int8_model.fc).__module__, tuple(x_test.shape), tuple(y_test.shape), bits, enabled))
        return {"accuracy": bits / 10, "agreement": 1.0, "mismatches": 0, "outputs": 4500, "path": None}

    monkeypatch.setattr(run, "onnx_hook", hook)
    report = run.run_demo(run.DemoConfig(epochs=1, bits=(3,), torch_ao=False))
    out = capsys.readouterr().out
    assert "torch.ao cross-check skipped: not requested" in out and "3 bits: weights int8 codes in [-3, 3]" in out
    assert calls == [("minqat.nn.quantized.linear", (450, 1, 8, 8), (450,), 3, False)]
    assert report["settings"][0]["onnx"]["accuracy"] == 0.3 and report["settings"][0]["torch_ao"] is None


def test_onnx_flag_runs_the_int8_models_in_onnx_runtime(capsys):
    """``--onnx``: ORT runs each exported QAT int8 model; its logits equal minqat's "onnxruntime" mode bit for bit."""
    _needs_demo_extra()
    pytest.importorskip("onnxruntime", reason="--onnx runs ONNX Runtime (pip install -e '.[onnx]')")
    report = run.run_demo(run.DemoConfig(epochs=1, bits=(8, 2), torch_ao=False, onnx=True))
    for setting in report["settings"]:
        o = setting["onnx"]
        assert o["mismatches"] == 0 and o["outputs"] == 450 * 10 and o["agreement"] == 1.0
        assert abs(o["accuracy"] - setting["qat_int8"]) <= 0.02  # ORT rounds a few ties differently from fbgemm
    assert "ONNX Runtime QAT int8" in capsys.readouterr().out


def test_onnx_flag_without_the_onnx_extra_is_one_line_and_status_2(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["demo", "--quick", "--onnx"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and '.[demo,onnx]' in err and "Traceback" not in err


@pytest.mark.parametrize("missing, argv", [("sklearn", ["demo", "--quick"]),
                                           ("matplotlib", ["demo", "--quick", "--out", "unused"])])
def test_missing_demo_extra_is_one_line_and_status_2(missing, argv, monkeypatch, capsys, tmp_path):
    for name in [missing] + [m for m in sys.modules if m.startswith(missing + ".")]:
        monkeypatch.setitem(sys.modules, name, None)  # makes ``import missing(.sub)`` raise ImportError
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("minqat demo: ") and 'pip install -c constraints.txt -e ".[demo]"' in err
    assert not (tmp_path / "unused").exists()  # nothing trained, nothing written


@pytest.mark.parametrize("args, message", [
    (["--bits", "9"],
     "argument --bits: must be distinct bit widths from 2 to 8, comma-separated (e.g. 8,4 or 4), got '9'"),
    (["--bits", "4,4"], "got '4,4'"),
    (["--bits", "8,x"], "got '8,x'"),
    (["--bits", "1"], "got '1'"),
    (["--bits", ""], "got ''"),
    (["--epochs", "0"], "argument --epochs: must be an integer from 1 to 1000, got '0'"),
    (["--epochs", "ten"], "argument --epochs: must be an integer from 1 to 1000, got 'ten'"),
    (["--seed", "-1"], "argument --seed: must be an integer from 0 to 2**31 - 1, got '-1'"),
    (["--backend", "onednn"], "argument --backend: invalid choice: 'onednn'"),
    (["--out", "a_file"], "argument --out: must be a directory (created if missing), got the file 'a_file'"),
    (["--steps", "3"], "unrecognized arguments: --steps 3"),
])
def test_bad_options_give_one_line_and_status_2(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("")
    assert main(["demo", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err and err.rstrip().endswith("--help)")


def test_schedule_freezes_bn_then_observers_after_one_observed_epoch():
    schedules = [flow.Schedule(1, e) for e in (1, 2, 3, 4, 10, 20)]
    assert [(s.freeze_bn_epoch, s.freeze_observer_epoch) for s in schedules] == \
        [(0, 1), (1, 1), (1, 2), (2, 3), (5, 7), (10, 15)]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_a_bar_on_a_terminal_and_lines_elsewhere():
    pytest.importorskip("tqdm", reason="progress bars come from tqdm (the demo extra)")
    metrics = {"loss": 0.25, "train_accuracy": 0.5, "test_accuracy": 0.75}
    terminal, log = _Terminal(), io.StringIO()
    for stream in (terminal, log):
        progress = EpochProgress(stream)
        for epoch in (1, 2):
            progress("float", epoch, 2, metrics)
    assert "2/2" in terminal.getvalue() and "\r" in terminal.getvalue() and "test 75.00%" in terminal.getvalue()
    assert log.getvalue().splitlines() == [
        "float                  epoch  1/2   loss 0.2500   train 50.00%   test 75.00%",
        "float                  epoch  2/2   loss 0.2500   train 50.00%   test 75.00%"]
