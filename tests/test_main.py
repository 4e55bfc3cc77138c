"""The command line itself: subcommands, ``bench`` forwarding to ``bench/run.py``, the console-script entry."""
from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import minqat.__main__ as cli
from minqat.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def test_bench_forwards_its_flags_to_the_checkout_runner(monkeypatch):
    calls = []
    runner = types.SimpleNamespace(main=lambda argv: calls.append(argv) or 0)
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: {"bench.run": runner}[name])
    assert main(["bench", "--quick", "--json"]) == 0
    assert main(["bench", "--raw-malloc"]) == 0
    assert calls == [["--quick", "--json"], ["--raw-malloc"]]


def test_bench_outside_a_source_checkout_says_so(monkeypatch, tmp_path, capsys):
    installed = tmp_path / "site-packages" / "minqat"
    installed.mkdir(parents=True)
    monkeypatch.setattr(cli, "__file__", str(installed / "__main__.py"))
    assert main(["bench"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minqat bench: the benchmarks run from a source checkout") and err.count("\n") == 1


def test_the_runner_really_is_next_to_the_package():
    assert (ROOT / "bench" / "run.py").is_file()  # what ``minqat bench`` runs in this checkout


def test_no_command_and_unknown_command_are_one_line_errors(capsys):
    assert main([]) == 2
    assert main(["train"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "minqat: error: the following arguments are required: command (see minqat --help)"
    assert err[1].startswith("minqat: error: argument command: invalid choice: 'train'") and len(err) == 2


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(command in out for command in ("demo", "check", "bench"))


def test_python_dash_m_runs_the_module_and_returns_its_status():
    """``python -m minqat`` in a fresh interpreter: the status of a bad option reaches the shell."""
    result = subprocess.run([sys.executable, "-m", "minqat", "demo", "--bits", "0"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("minqat demo: error: argument --bits:") and result.stderr.count("\n") == 1
