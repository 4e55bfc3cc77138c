"""Command line (``python -m minqat ...``, also installed as the ``minqat`` console script).

* ``demo``  -- QAT on scikit-learn's digits end to end, minqat beside torch.ao, a table and plots
  (``minqat.demo``; needs the ``demo`` extra);
* ``check`` -- minqat's numbers against the installed torch.ao, component by component (``minqat.check``);
* ``bench`` -- the benchmarks of ``bench/`` (a source checkout), one table of ratios against torch.

Wrong option values print one line and exit with status 2, as argparse does (without the usage
block); ``--help`` on each command lists its options.

>>> main(["demo", "--bits", "9"])
2
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``minqat demo: error: argument --bits: ...`` (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(limit: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if not 1 <= value <= limit:
            raise argparse.ArgumentTypeError(f"must be an integer from 1 to {limit}, got {text!r}")
        return value

    return parse


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**31:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**31 - 1, got {text!r}")
    return value


def _bits(text: str) -> tuple[int, ...]:
    """``"8,4,2"`` -> ``(8, 4, 2)``: distinct bit widths from 2 to 8."""
    try:
        bits = tuple(int(part) for part in text.split(","))
    except ValueError:
        bits = ()
    if not bits or any(not 2 <= b <= 8 for b in bits) or len(set(bits)) != len(bits):
        raise argparse.ArgumentTypeError(
            f"must be distinct bit widths from 2 to 8, comma-separated (e.g. 8,4 or 4), got {text!r}")
    return bits


def _out_dir(text: str) -> Path:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"must be a directory (created if missing), got the file {text!r}")
    return path


def _parser() -> argparse.ArgumentParser:
    from .demo.run import DEFAULT_BITS, DEFAULT_EPOCHS, QUICK_EPOCHS

    parser = _Parser(prog="minqat", description="minqat: quantization-aware training on plain tensors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser("demo", help="QAT on scikit-learn's digits: float, PTQ and QAT accuracy, int8 "
                                       "cross-checked against torch.ao", description=(
        "Train a small CNN on scikit-learn's bundled digits, quantize it after training (PTQ) and with "
        "quantization-aware training (QAT), convert both to int8, and compare every int8 logit with torch.ao's "
        "run of the same flow. Needs the demo extra: pip install -e \".[demo]\"."))
    demo.add_argument("--epochs", type=_positive_int(1000), default=None,
                      help=f"epochs of the float training and of each QAT run (default {DEFAULT_EPOCHS}, "
                           f"--quick {QUICK_EPOCHS})")
    demo.add_argument("--bits", type=_bits, default=DEFAULT_BITS,
                      help=f"bit settings, comma-separated, 2 to 8 (default {','.join(map(str, DEFAULT_BITS))}); "
                           "8 = the backend's default qconfigs")
    demo.add_argument("--backend", choices=("x86", "fbgemm", "qnnpack"), default="x86",
                      help="whose default qconfigs the 8-bit setting uses (default x86); torch.ao's int8 model "
                           "always runs on its fbgemm engine")
    demo.add_argument("--seed", type=_seed, default=0, help="seed of the split, the weights and the batches "
                                                            "(default 0)")
    demo.add_argument("--quick", action="store_true", help=f"{QUICK_EPOCHS} epochs (the tests' smoke run)")
    demo.add_argument("--out", type=_out_dir, default=None, metavar="DIR",
                      help="write report.json, training_curves.png and weight_histogram.png there")
    demo.add_argument("--no-torch-ao", action="store_true", help="skip the torch.ao run and comparison")
    demo.add_argument("--onnx", action="store_true", help="export each QAT int8 model to ONNX and run it in ONNX "
                                                         "Runtime: accuracy and agreement (needs the onnx extra)")

    check = sub.add_parser("check", help="cross-check minqat against the installed torch.ao, component by "
                                         "component", description=(
        "Random cases through minqat and torch.ao: fake quant (forward, gradient), observers, FakeQuantize "
        "modules, a prepared QAT model and its int8 conversion. Exit status: 0 all exact, 1 something claimed "
        "exact is not, 3 nothing to check against (torch.ao missing)."))
    check.add_argument("--quick", action="store_true", help="fewer cases (a few seconds)")
    check.add_argument("--seed", type=_seed, default=0, help="seed of the random cases (default 0)")

    bench = sub.add_parser("bench", help="run the benchmarks of bench/ (source checkout): ratios against torch")
    bench.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    bench.add_argument("--json", action="store_true", help="machine facts and rows as JSON")
    bench.add_argument("--raw-malloc", action="store_true", help="leave glibc's malloc as it is")
    return parser


def _demo(args) -> int:
    from .demo import DemoConfig, MissingExtra, run_demo
    from .demo.run import DEFAULT_EPOCHS, QUICK_EPOCHS

    epochs = args.epochs or (QUICK_EPOCHS if args.quick else DEFAULT_EPOCHS)
    config = DemoConfig(epochs=epochs, bits=args.bits, backend=args.backend, seed=args.seed, quick=args.quick,
                        out=args.out, torch_ao=not args.no_torch_ao, onnx=args.onnx)
    try:
        run_demo(config)
    except MissingExtra as err:
        print(f"minqat demo: {err}", file=sys.stderr)
        return 2
    return 0


def _bench(args) -> int:
    """Run ``bench/run.py`` of the source checkout this package lives in."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "bench" / "run.py").is_file() or not (root / "pyproject.toml").is_file():
        print(f"minqat bench: the benchmarks run from a source checkout (bench/ next to minqat/); none next to "
              f"{Path(__file__).resolve().parent}: clone the repository and pip install -e . there", file=sys.stderr)
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    runner = importlib.import_module("bench.run")
    argv = [flag for flag, on in (("--quick", args.quick), ("--json", args.json), ("--raw-malloc", args.raw_malloc))
            if on]
    return runner.main(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a bad option (2, its one line already printed)
        return int(exit_.code or 0)
    if args.command == "demo":
        return _demo(args)
    if args.command == "check":
        from .check import run_check

        return run_check(quick=args.quick, seed=args.seed)
    return _bench(args)


if __name__ == "__main__":
    sys.exit(main())
