"""What every benchmark shares: the interleaved timing loop, saved-tensor bytes, machine facts.

Benchmarks report ratios against torch measured in the same loop, never absolute times: on a shared
machine the absolute figures drift from run to run, while the ratio of two calls that alternate
inside one loop stays put. Each loop calls every contender once per iteration (the starting one
rotates, so none always runs first on a cache left warm by the same neighbour) and keeps the median.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["pin_malloc", "interleaved_medians", "saved_bytes_per_element", "machine_info", "ratio_row"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's largest allowed value on 64-bit machines: 32 MiB


def pin_malloc() -> bool:
    """Make glibc keep freed memory for reuse; returns False where that is not possible.

    By default glibc hands every block above a moving threshold back to the kernel when it is freed,
    and the next tensor of that size page-faults all over again (about 1.5 us per 4 KiB page on the
    2-vCPU VM these figures come from: 1.6 ms per fresh 4 MiB buffer, several times the work of a
    fake-quant pass). How often that happens depends on the order of allocations, so a small change
    in the loop moved minqat's per-channel forward between 0.25x and 1.1x torch's. With the heap
    pinned (blocks below 32 MiB come from a heap that is never trimmed) the figures measure the
    arithmetic; blocks of 32 MiB and more are still mapped fresh, hence the benchmarks' 7.9 M elements.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))  # C int: never trim
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows)
        return False


def interleaved_medians(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds per call of each function, calling them round-robin in one loop."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + reps):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            fns[name]()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def saved_bytes_per_element(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    """Bytes autograd keeps for the backward of ``fn(x)``, per element of ``x``.

    Every tensor saved for backward passes through ``saved_tensors_hooks``; storages are counted once.
    A bool mask costs 1 byte per element, a saved float32 copy of ``x`` 4 bytes.
    """
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = x.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(storages.values()) / x.numel()


def ratio_row(bench: str, case: str, numel: int, ms: dict[str, float], **extra) -> dict:
    """One result row: ``ms`` holds the medians of ``minqat``, ``torch`` and ``copy``."""
    return {"bench": bench, "case": case, "numel": numel, "minqat_ms": ms["minqat"], "torch_ms": ms["torch"],
            "copy_ms": ms["copy"], "ratio": ms["minqat"] / ms["torch"], "vs_copy": ms["minqat"] / ms["copy"],
            **extra}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(malloc_pinned: bool) -> dict:
    """The facts a table needs next to it: CPU, cores, torch, threads, date."""
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "malloc_pinned": malloc_pinned, "date": datetime.date.today().isoformat()}


def machine_line(info: dict) -> str:
    """The one line of machine facts printed above every table."""
    return (f"{info['cpu']}, {info['cores']} cores ({info['cpu_capability']}), torch {info['torch']}, "
            f"python {info['python']}, {info['threads']} thread, malloc pinned: {info['malloc_pinned']}, "
            f"{info['date']}")


def bench_main(argv: list[str] | None, description: str, run: Callable[..., list[dict]],
               format_table: Callable[[list[dict]], str]) -> int:
    """The command line every benchmark shares: ``--quick``, ``--json``, ``--raw-malloc``; one thread;
    ``run(quick=...)`` gives the rows, printed as the machine line over ``format_table(rows)``, or as JSON."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions (smoke run)")
    parser.add_argument("--json", action="store_true", help="print machine facts and rows as JSON")
    parser.add_argument("--raw-malloc", action="store_true",
                        help="leave glibc's malloc as it is (fresh buffers page-fault; see pin_malloc)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pinned = False if args.raw_malloc else pin_malloc()
    rows = run(quick=args.quick)
    info = machine_info(pinned)
    if args.json:
        print(json.dumps({"machine": info, "rows": rows}, indent=1))
    else:
        print(machine_line(info) + "\n\n" + format_table(rows))
    return 0
