"""``python -m minqat check``: exit 0 on this torch, 1 when minqat drifts, 3 without torch.ao; the Tally arithmetic."""
from __future__ import annotations

import io

import pytest
import torch

import minqat
import minqat.check as check
from minqat.__main__ import main
from minqat.check.functions import check_fake_quant
from minqat.check.tally import Tally
from tests.oracle import requires_ao


@requires_ao
def test_quick_check_passes_on_this_torch(capsys):
    assert main(["check", "--quick", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "component" not in line]
    assert len(rows) == 8 and all("| 100.0000% | 0 |" in row for row in rows), out
    assert out.rstrip().splitlines()[-1].startswith("all bit-exact")


@requires_ao
def test_a_drifting_minqat_fails_the_check(monkeypatch):
    """Shift minqat's per-tensor fake quant by one step on every element: that row must fail with 1 LSB, and
    the command must exit 1 (the other components are replaced by a passing stub to keep this fast)."""
    real = minqat.fake_quantize_per_tensor_affine

    def shifted(x, scale, zero_point, quant_min, quant_max):
        return real(x, scale, zero_point, quant_min, quant_max) + torch.tensor(scale, dtype=torch.float32)

    monkeypatch.setattr(minqat, "fake_quantize_per_tensor_affine", shifted)
    rows = check_fake_quant(3, torch.Generator().manual_seed(0))
    assert [r.ok for r in rows] == [False, True, True, True]
    assert rows[0].exact == 0 and rows[0].max_lsb == pytest.approx(1.0, rel=0.01)  # float32 sums round

    passing = Tally("stub", cases=1, compared=1, exact=1)
    monkeypatch.setattr(check, "check_observers", lambda *a: passing)
    monkeypatch.setattr(check, "check_fake_quant_modules", lambda *a: passing)
    monkeypatch.setattr(check, "check_models", lambda *a: [passing])
    out = io.StringIO()
    assert check.run_check(quick=True, stream=out) == 1
    assert "NOT bit-exact: fake quant per tensor, forward (" in out.getvalue()


def test_without_torch_ao_there_is_nothing_to_check(monkeypatch, capsys):
    monkeypatch.setattr(check, "_torch_ao", lambda: (None, "torch.ao.quantization is not importable (gone)"))
    assert main(["check"]) == check.NOTHING_TO_CHECK == 3
    out = capsys.readouterr().out
    assert out.startswith("minqat check: nothing to check against: torch.ao.quantization is not importable (gone)")
    assert out.count("\n") == 1


def test_check_bad_option_is_one_line(capsys):
    assert main(["check", "--seed", "x"]) == 2
    err = capsys.readouterr().err
    assert err == "minqat check: error: argument --seed: must be an integer from 0 to 2**31 - 1, got 'x' " \
                  "(see minqat check --help)\n"


# --- Tally, by hand ----------------------------------------------------------------------------------------


def test_tally_counts_bits_not_values():
    t = Tally("t")
    nan = float("nan")
    t.add(torch.tensor([0.0, nan, 1.0, 2.0]), torch.tensor([-0.0, nan, 1.0, 2.25]), scale=0.125)
    assert (t.compared, t.exact) == (4, 2)  # -0.0 vs +0.0 differs in its bits; NaN vs NaN is the same
    assert t.max_abs == 0.25 and t.max_lsb == 2.0  # 0.25 / 0.125


def test_tally_lsb_with_per_channel_scales_and_integer_codes():
    t = Tally("t")
    t.add(torch.tensor([[1.0, 1.0], [1.0, 1.0]]), torch.tensor([[1.5, 1.0], [1.0, 2.0]]),
          scale=torch.tensor([[0.5], [0.25]]))
    assert t.max_lsb == 4.0 and t.max_abs == 1.0  # row 1: 1.0 / 0.25
    t.add(torch.tensor([3], dtype=torch.uint8), torch.tensor([250], dtype=torch.uint8), 1.0)
    assert t.max_lsb == 247.0  # codes compared as integers, no uint8 wrap-around


def test_tally_shape_or_dtype_mismatch_fails_and_is_named():
    t = Tally("t")
    t.add(torch.zeros(2), torch.zeros(3))
    assert not t.ok and t.max_abs == float("inf") and t.note == "shape/dtype (2,) torch.float32 vs (3,) torch.float32"
    u = Tally("u")
    u.add(torch.zeros(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int64))
    assert not u.ok and "torch.int32 vs (2,) torch.int64" in u.note
    assert not Tally("empty").ok  # nothing compared is not a pass
