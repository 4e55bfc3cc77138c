"""The torch.ao oracle, imported lazily: tests that need it skip with a reason where it is missing.

torch.ao.quantization and torch's quantized ops are deprecated upstream. The live cross-checks run
wherever they exist; the golden vectors under ``tests/golden/`` keep proving parity after removal.
"""
from __future__ import annotations

import pytest
import torch


def _has_ao() -> bool:
    try:
        import torch.ao.quantization as tq  # noqa: F401
    except Exception:
        return False
    return hasattr(torch, "fake_quantize_per_tensor_affine") and hasattr(tq, "MinMaxObserver")


HAS_AO = _has_ao()

requires_ao = pytest.mark.skipif(
    not HAS_AO,
    reason="torch.ao.quantization / torch.fake_quantize_* are missing in this torch; "
    "live cross-check skipped (the golden-vector tests still prove parity)",
)


def ao():
    """The ``torch.ao.quantization`` module (call only inside tests marked ``requires_ao``)."""
    import torch.ao.quantization as tq

    return tq


def assert_bit_exact(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Assert identical dtype, shape and bits (NaNs compare equal when both sides hold one)."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().cpu(), expected.detach().cpu()
    if a.is_floating_point():
        same = (a == e) | (torch.isnan(a) & torch.isnan(e))
        # -0.0 == 0.0 above; compare signs of zeros too
        same &= (torch.signbit(a) == torch.signbit(e)) | torch.isnan(a)
    else:
        same = a == e
    if not bool(same.all()):
        idx = (~same).nonzero()[:5].tolist()
        bad = [(i, a[tuple(i)].item(), e[tuple(i)].item()) for i in idx]
        raise AssertionError(f"{what}: {int((~same).sum())} of {a.numel()} elements differ, e.g. {bad}")
