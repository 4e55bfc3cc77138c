"""Run every benchmark in ``bench/`` and print one table of ratios against torch.

Each ``bench/<name>.py`` (names starting with ``_`` are helpers) exposes ``run(quick: bool) -> list[dict]``;
a row holds ``bench``, ``case``, ``numel``, the medians ``minqat_ms``/``torch_ms``/``copy_ms``,
``ratio`` = minqat / torch and ``vs_copy`` = minqat / copy_ (``None`` where no copy_ was timed), and
optionally ``vs_float`` (minqat / the float op or model; ``qat_step`` calls it ``minqat_vs_float``), ``vs_bare``,
``saved_B_per_el``, ``torch_saved_B_per_el``, ``exact`` and ``targets`` (column -> largest value).

The table shows ratios only (times drift on a shared machine, ratios measured in one loop do not);
``--json`` prints everything, milliseconds included.

    python -m bench.run            # full run, about a minute
    python -m bench.run --quick    # smoke run, a few seconds
    python -m bench.run --json
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as ``python bench/run.py``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from bench._timing import bench_main

BENCH_DIR = Path(__file__).resolve().parent


def discover() -> list:
    """The benchmark modules: every ``bench/*.py`` except helpers (``_*``) and this runner."""
    names = sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_") and p.stem != "run")
    return [importlib.import_module(f"bench.{name}") for name in names]


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _misses(row: dict) -> list[str]:
    return [f"{key} {row[key]:.2f} > {limit:g}" for key, limit in row.get("targets", {}).items()
            if row.get(key) is not None and row[key] > limit]


def _saved(row: dict) -> str:
    if "saved_B_per_el" not in row:
        return ""
    return f"{row['saved_B_per_el']:g} / {row['torch_saved_B_per_el']:g}"


def format_table(rows: list[dict]) -> str:
    """A Markdown table (pastes into ``bench/README.md`` as is)."""
    lines = ["| bench | case | elements | minqat / torch | minqat / copy_ | minqat / float | module / bare fn "
             "| saved B/el minqat / torch | same bits | targets |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for row in rows:
        misses = _misses(row)
        verdict = ("missed: " + "; ".join(misses)) if misses else ("met" if row.get("targets") else "")
        exact = {True: "yes", False: "NO"}.get(row.get("exact"), "")
        vs_float = row.get("vs_float", row.get("minqat_vs_float"))
        lines.append(f"| {row['bench']} | {row['case']} | {row['numel']:,} | {_ratio(row['ratio'])} "
                     f"| {_ratio(row['vs_copy'])} | {_ratio(vs_float)} | {_ratio(row.get('vs_bare'))} "
                     f"| {_saved(row)} | {exact} | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None, modules: list | None = None) -> int:
    def run(quick: bool) -> list[dict]:
        return [row for module in (modules or discover()) for row in module.run(quick=quick)]

    return bench_main(argv, "minqat benchmarks: ratios against torch, measured in one loop", run, format_table)

if __name__ == "__main__":
    sys.exit(main())
