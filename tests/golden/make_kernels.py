"""Record torch's quantized conv1d/2d/3d(_relu) and linear(_relu) outputs (fbgemm engine).

Run from the repository root with torch.ao present:  .venv/bin/python tests/golden/make_kernels.py
Writes tests/golden/kernels.pt: plain tensors and numbers only (uint8 inputs, int8 weights, float
scales, the uint8 int_repr of torch's output), replayed by tests/test_kernels_conv_linear.py
without torch.ao. The layers are those of the live tests (random, tie-heavy and bias-tie qparams,
all groupings, per-tensor/per-channel, asymmetric weight zero points, ReLU), plus full-range
activations (0..255: exact on this AVX512-VNNI machine, numerics.md §7.2) and multipliers so large
that fbgemm's float -> int32 conversion overflows.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.test_kernels_conv_linear import (  # noqa: E402
    MODES,
    make_conv_case,
    make_linear_case,
    torch_conv,
    torch_linear,
)

OUT = Path(__file__).with_name("kernels.pt")


def conv_cases() -> list[dict]:
    cases = []
    for i in range(48):  # 2-d: every grouping x mode x granularity
        groups_kind = ("one", "grouped", "depthwise")[i % 3]
        cases.append(make_conv_case(1000 + i, 2, groups_kind, MODES[(i // 3) % 3], per_channel=bool(i // 9 % 2)))
    cases += [make_conv_case(2000 + i, 1) for i in range(10)]
    cases += [make_conv_case(3000 + i, 3) for i in range(6)]
    cases += [make_conv_case(4000 + i, 2, x_max=255) for i in range(6)]  # full-range activations
    return cases


def linear_cases() -> list[dict]:
    cases = [make_linear_case(5000 + i, MODES[i % 3], per_channel=bool(i // 3 % 2)) for i in range(54)]
    cases += [make_linear_case(6000 + i, x_max=255) for i in range(6)]
    for i, s_y in enumerate((1e-6, 1e-9, 2.0**-30)):  # |v| >= 2**31 -> fbgemm gives 0 (or z_y with ReLU)
        cases.append(dict(make_linear_case(7000 + i, "random"), y_scale=s_y))
    return cases


def main() -> None:
    warnings.simplefilter("ignore")  # the quantized-dtype deprecation notice
    conv = [dict(case, y=torch_conv(case)) for case in conv_cases()]
    linear = [dict(case, y=torch_linear(case)) for case in linear_cases()]
    data = {"torch_version": str(torch.__version__), "engine": "fbgemm", "conv": conv, "linear": linear}
    torch.save(data, OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes): {len(conv)} conv, {len(linear)} linear cases")


if __name__ == "__main__":
    main()
