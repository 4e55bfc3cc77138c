"""``python -m minqat check``: does this torch build still compute what minqat reproduces?

Random cases go through minqat and through the installed ``torch.ao.quantization`` side by side, one
component of the flow at a time, and a table says per component how many values were compared, the
fraction identical bit for bit, the largest absolute difference and the largest difference in
quantization steps (LSB: ``|a - b| / scale``):

1. fake quant per tensor and per channel -- forward and input gradient (clipped STE), on random ranges
   from 2 to 16 bits, near-tie inputs and values past the clamp edges (numerics.md §2);
2. observers -- min/max, moving average, per channel, histogram: running min/max, scale, zero point
   over a few batches (§3);
3. fake-quant modules -- ``FakeQuantize`` and the fused ``FusedMovingAvgObsFakeQuantize``, per tensor and
   per channel: outputs, input gradients, scale and zero point over a few steps (§4);
4. a prepared QAT model -- a small CNN with conv-BN-ReLU, conv-BN, a residual add and linear layers,
   prepared by each library under the x86, fbgemm (version 0) and qnnpack default QAT qconfigs: outputs,
   every gradient and the whole state dict over SGD steps (BN frozen, then observers frozen, §5);
5. its converted int8 model -- torch.ao's on its fbgemm engine: every int8 layer's output codes and
   qparams, and the float output (§6, §7).

Everything above is claimed bit-exact, so any difference fails the check (exit status 1). The int8
comparison feeds activations in [0, 127]; on a CPU without AVX512-VNNI an intermediate code above 127
can make torch's fbgemm differ (§7.2), which the failure message mentions. torch.ao is imported here,
lazily, only when the check runs: minqat itself never imports it. One intra-op thread while it runs.

Exit status of ``run_check``: 0 all exact; 1 a difference; 3 nothing to check against (torch.ao or its
quantized ops missing from this torch).
"""
from __future__ import annotations

import platform
import sys
import time
import warnings

import torch

from .functions import check_fake_quant, check_fake_quant_modules, check_observers
from .models import check_models
from .tally import Tally

__all__ = ["Tally", "run_check", "format_rows", "NOTHING_TO_CHECK"]

NOTHING_TO_CHECK = 3



def _torch_ao():
    """``(torch.ao.quantization, None)`` or ``(None, why)`` where this torch has nothing to check against."""
    try:
        import torch.ao.quantization as tq
    except ImportError as err:
        return None, f"torch.ao.quantization is not importable ({err})"
    missing = [name for name in ("fake_quantize_per_tensor_affine", "fake_quantize_per_channel_affine", "quint8")
               if not hasattr(torch, name)] + [name for name in ("prepare_qat", "convert", "HistogramObserver")
                                                if not hasattr(tq, name)]
    if missing:
        return None, f"this torch lacks {', '.join(missing)}"
    return tq, None


def format_rows(rows: list[Tally]) -> str:
    """A Markdown table, one row per component.

    >>> print(format_rows([Tally("x", cases=2, compared=10, exact=10)]))
    | component | cases | values | bit-exact | max abs diff | max LSB diff |
    |---|---:|---:|---:|---:|---:|
    | x | 2 | 10 | 100.0000% | 0 | - |
    """
    lines = ["| component | cases | values | bit-exact | max abs diff | max LSB diff |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        exact = f"{100 * r.exact / r.compared:.4f}%" if r.compared else "-"
        lsb = "-" if r.max_lsb is None else f"{r.max_lsb:g}"
        note = f" ({r.note})" if r.note else ""
        lines.append(f"| {r.component}{note} | {r.cases} | {r.compared:,} | {exact} | {r.max_abs:g} | {lsb} |")
    return "\n".join(lines)


def run_check(quick: bool = False, seed: int = 0, stream=None) -> int:
    """Run every component, print the table to ``stream`` (stdout); the exit status (module docstring)."""
    stream = stream or sys.stdout
    tq, why = _torch_ao()
    if tq is None:
        print(f"minqat check: nothing to check against: {why} (torch {torch.__version__}). minqat's golden vectors "
              "recorded from torch 2.13 still prove its parity: python -m pytest tests", file=stream)
        return NOTHING_TO_CHECK
    cases = dict(fq=12, obs=4, mod=2, model=1) if quick else dict(fq=200, obs=40, mod=20, model=8)
    gen = torch.Generator().manual_seed(seed)
    started, threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(1)  # a float conv's gradient sum order depends on the thread count
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notices
            rows = check_fake_quant(cases["fq"], gen) + [check_observers(cases["obs"], gen, tq),
                                                         check_fake_quant_modules(cases["mod"], gen, tq)]
            int8 = "fbgemm" in torch.backends.quantized.supported_engines
            rows += check_models(cases["model"], gen, tq, int8)
    finally:
        torch.set_num_threads(threads)
    print(f"minqat check: minqat against torch {torch.__version__} (torch.ao.quantization), "
          f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}, seed {seed}, one thread\n", file=stream)
    print(format_rows(rows), file=stream)
    failed = [r for r in rows if not r.ok and not r.skipped]
    seconds = time.perf_counter() - started
    if failed:
        print(f"\nNOT bit-exact: {'; '.join(r.component for r in failed)} ({seconds:.1f} s). minqat reproduces torch "
              "2.13's CPU arithmetic (numerics.md); another torch build, or an int8 layer output above 127 on a "
              "CPU without AVX512-VNNI (§7.2), can change these numbers.", file=stream)
        return 1
    print(f"\nall bit-exact ({seconds:.1f} s)", file=stream)
    return 0
