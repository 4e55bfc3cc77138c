"""The torch.ao oracle, imported lazily: tests that need it skip with a reason where it is missing.

torch.ao.quantization and torch's quantized ops are deprecated upstream. The live cross-checks run
wherever they exist; the golden vectors under ``tests/golden/`` keep proving parity after removal.
"""
from __future__ import annotations

import contextlib

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


# --- torch's quantized CPU kernels (fbgemm), the oracle of the int8 kernel tests -------------------------------
X86_SIMD = torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512"))
HAS_KERNELS = HAS_AO and X86_SIMD and "fbgemm" in torch.backends.quantized.supported_engines
requires_kernels = pytest.mark.skipif(
    not HAS_KERNELS, reason="needs torch's quantized CPU ops with the fbgemm engine on an x86 CPU with AVX2/AVX-512 "
    "(the golden-vector tests still prove parity)")

VIEWS = {  # applied to the integers before torch's quantized tensor copies their layout
    "nchw": lambda t: t,
    "cl": lambda t: t.contiguous(memory_format=torch.channels_last),
    "t": lambda t: t.transpose(-1, -2),
    "slice": lambda t: t[:, 1:],
    "cl-slice": lambda t: t.contiguous(memory_format=torch.channels_last)[:, 1:],
}


@contextlib.contextmanager
def quantized_engine(name: str = "fbgemm"):
    """Pin ``torch.backends.quantized.engine`` (x86 convs run on oneDNN, numerics.md §7.3) and restore it."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


@pytest.fixture(autouse=True)
def fbgemm_engine():
    """Autouse in the modules that import it: every test there runs under the fbgemm engine (if present)."""
    if not HAS_KERNELS:
        yield
        return
    with quantized_engine("fbgemm"):
        yield


def tq(x_int: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """torch's quantized tensor holding these integers with the same strides (a view of a copied storage)."""
    storage = torch.empty(0, dtype=x_int.dtype).set_(x_int.untyped_storage())  # the whole storage, 1-D
    qstorage = torch._make_per_tensor_quantized_tensor(storage.clone(), scale, zero_point)
    return qstorage.as_strided(x_int.shape, x_int.stride(), x_int.storage_offset())


def same_layout(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal strides along every dim longer than 1 (the strides of length-1 dims carry no layout)."""
    return all(actual.stride(d) == expected.stride(d) for d in range(expected.dim()) if expected.shape[d] > 1)
