"""Command line: ``python -m minqat demo`` (also installed as the ``minqat`` console script)."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="minqat", description="minqat: quantization-aware training on plain tensors")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the short example: QAT of a small linear model, cross-checked against torch.ao")
    demo.add_argument("--steps", type=int, default=200, help="SGD steps (default 200)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.steps < 1:
            parser.error(f"--steps must be a positive integer, got {args.steps}")
        from .demo import run_example

        return run_example(steps=args.steps, seed=args.seed)
    return 2


if __name__ == "__main__":
    sys.exit(main())
