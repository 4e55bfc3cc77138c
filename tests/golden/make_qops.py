"""Record torch's quantized elementwise / pooling ops on tie-heavy inputs (the int8 ops of minqat.kernels).

Run from the repository root with torch.ao present:  .venv/bin/python tests/golden/make_qops.py
Writes tests/golden/qops.pt: plain integer tensors (their memory layout kept), floats and ints -- no quantized
tensors -- replayed by tests/test_kernels_elementwise.py, tests/test_kernels_pooling.py and tests/test_qtensor.py
without torch.ao.

Tie-heavy means: output scales that are simple ratios of the input scales (so real values land on exact
half-integers of the output grid) and odd zero points, where torch's vector and scalar loops round differently.
Channel counts of channels-last average pooling are multiples of 16 or below 8, so the recorded results do not
depend on whether the recording CPU had AVX-512 (16 float lanes) or AVX2 (8); mean and matmul cases use
power-of-two scales, so torch's float sums are exact and independent of the summation order.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

OUT = Path(__file__).with_name("qops.pt")
RANGES = {"uint8": (0, 255), "int8": (-128, 127)}
LEGACY = {"uint8": "quint8", "int8": "qint8"}
GEN = torch.Generator().manual_seed(20240611)


# The same view of the integers and of torch's quantized tensor, so both have the same memory layout.
VIEWS = {
    "nchw": lambda t: t,
    "cl": lambda t: t.contiguous(memory_format=torch.channels_last),
    "t": lambda t: t.transpose(-1, -2),
    "slice": lambda t: t[:, 1:],
    "cl-slice": lambda t: t.contiguous(memory_format=torch.channels_last)[:, 1:],
}


def ints(shape, dtype: str, layout: str = "nchw") -> torch.Tensor:
    lo, hi = RANGES[dtype]
    return VIEWS[layout](torch.randint(lo, hi + 1, shape, generator=GEN).to(getattr(torch, dtype)))


def zp(dtype: str) -> int:
    lo, hi = RANGES[dtype]
    return int(torch.randint(lo, hi + 1, (1,), generator=GEN)) | 1  # odd: ties of v + z round differently


def scale() -> float:
    return float(torch.empty(1).uniform_(-7, -1, generator=GEN).exp2())  # a float32 value


def q(x_int: torch.Tensor, s: float, z: int) -> torch.Tensor:
    """torch's quantized tensor holding these integers with the same strides (a view of a copied storage)."""
    storage = torch.empty(0, dtype=x_int.dtype).set_(x_int.untyped_storage())  # the whole storage, 1-D
    qstorage = torch._make_per_tensor_quantized_tensor(storage.clone(), s, z)
    return qstorage.as_strided(x_int.shape, x_int.stride(), x_int.storage_offset())


def binary_cases() -> list[dict]:
    cases = []
    shapes = [((130,), "nchw"), ((2, 16, 3, 5), "nchw"), ((2, 16, 3, 5), "cl"), ((1, 3, 7, 7), "cl"), ((3, 9, 70), "t"),
              ((3, 5, 6, 7), "slice")]
    for i, (shape, layout) in enumerate(shapes * 2):
        dtype = ["uint8", "int8"][i % 2]
        a, b = ints(shape, dtype, layout), ints(shape, dtype, layout)
        s_a = scale()
        s_b, s_y = s_a * [0.5, 1.5, 0.25, 3.0, 1.25][i % 5], s_a * [1.0, 2.0, 0.5, 1.5][i % 4]
        z_a, z_b, z_y = zp(dtype), zp(dtype), zp(dtype)
        for op in ("add", "add_relu", "mul"):
            y = getattr(torch.ops.quantized, op)(q(a, s_a, z_a), q(b, s_b, z_b), s_y, z_y)
            cases.append(dict(op=op, a=a, a_scale=s_a, a_zero_point=z_a, b=b, b_scale=s_b, b_zero_point=z_b,
                              y_scale=s_y, y_zero_point=z_y, y=y.int_repr()))
    a, b = ints((2, 16, 4, 4), "uint8", "cl"), ints((2, 16, 1, 1), "uint8")  # squeeze-excitation style broadcast
    y = torch.ops.quantized.mul(q(a, 0.05, 3), q(b, 0.01, 0), 0.002, 5)
    cases.append(dict(op="mul", a=a, a_scale=0.05, a_zero_point=3, b=b, b_scale=0.01, b_zero_point=0,
                      y_scale=0.002, y_zero_point=5, y=y.int_repr()))
    return cases


def scalar_cases() -> list[dict]:
    cases = []
    for i, other in enumerate([0.3, -0.3, 40.0, -40.0, 2.5, 0.0, 1e-3]):
        dtype = ["uint8", "int8"][i % 2]
        x, s, z = ints((50,), dtype), scale(), zp(dtype)
        other = other if abs(other) > 1 else other * s * 100  # a few grid steps; 40: stretches the range
        for op in ("add_scalar", "mul_scalar", "add_scalar_relu", "mul_scalar_relu"):
            y = getattr(torch.ops.quantized, op)(q(x, s, z), other)
            cases.append(dict(op=op, x=x, scale=s, zero_point=z, other=other, y=y.int_repr(),
                              y_scale=y.q_scale(), y_zero_point=y.q_zero_point()))
    return cases


def cat_cases() -> list[dict]:
    cases = []
    configs = [("cl", 1, (17, 9, 3)), ("cl", 1, (8, 16)), ("nchw", 1, (5, 4)), ("nchw", 0, (5, 5)), ("cl", 2, (6, 6))]
    for i, (layout, dim, channels) in enumerate(configs):
        dtype = ["uint8", "int8"][i % 2]
        xs = [ints((2, c, 3, 2), dtype, layout) for c in channels]
        s_y, z_y = scale(), zp(dtype)
        scales = [s_y * [0.5, 1.5, 1.0][j % 3] for j in range(len(xs))]
        zero_points = [z_y if j % 3 == 2 else zp(dtype) for j in range(len(xs))]  # the third keeps the output's
        for relu in (False, True):
            op = torch.ops.quantized.cat_relu if relu else torch.ops.quantized.cat
            y = op([q(x, s, z) for x, s, z in zip(xs, scales, zero_points)], dim, s_y, z_y)
            cases.append(dict(op="cat", tensors=xs, scales=scales, zero_points=zero_points, dim=dim, relu=relu,
                              y_scale=s_y, y_zero_point=z_y, y=y.int_repr()))
    a, b = ints((3, 4, 5), "uint8"), ints((3, 5, 2), "uint8")
    y = torch.ops.quantized.matmul(q(a, 0.25, 101), q(b, 0.5, 7), 2.0, 9)
    cases.append(dict(op="matmul", a=a, a_scale=0.25, a_zero_point=101, b=b, b_scale=0.5, b_zero_point=7,
                      y_scale=2.0, y_zero_point=9, y=y.int_repr()))
    return cases


def pooling_cases() -> list[dict]:
    cases = []
    layouts = [("nchw", 5), ("cl", 16), ("cl", 3), ("nchw", 2), ("cl", 32), ("cl-slice", 9), ("t", 4)]
    for i, (layout, channels) in enumerate(layouts):
        dtype = ["uint8", "int8"][i % 2]
        x, s, z = ints((2, channels, 7, 6), dtype, layout), scale(), zp(dtype)
        qx = q(x, s, z)
        for kernel, stride, pad, ceil, include, divisor in [(2, 2, 0, False, True, None), (3, 2, 1, True, False, None),
                                                              (3, 1, 1, False, True, None), (2, 1, 1, True, True, 3)]:
            y = F.avg_pool2d(qx, kernel, stride, pad, ceil, include, divisor)
            cases.append(dict(op="avg_pool2d", x=x, scale=s, zero_point=z, kernel_size=kernel, stride=stride,
                              padding=pad, ceil_mode=ceil, count_include_pad=include, divisor_override=divisor,
                              y=y.int_repr()))
            y = F.max_pool2d(qx, kernel, stride, pad, 1 + (i % 2) * (pad == 0), ceil)
            cases.append(dict(op="max_pool2d", x=x, kernel_size=kernel, stride=stride, padding=pad,
                              dilation=1 + (i % 2) * (pad == 0), ceil_mode=ceil, y=y.int_repr()))
        for size in [1, (2, 3), (5, None), (7, 6)]:
            cases.append(dict(op="adaptive_avg_pool2d", x=x, scale=s, zero_point=z, output_size=size,
                              y=F.adaptive_avg_pool2d(qx, size).int_repr()))
        for name, fn, args in [("relu", F.relu, ()), ("hardtanh", F.hardtanh, (-20 * s + s / 2, 30.5 * s)),
                               ("relu6", F.relu6, ())]:
            cases.append(dict(op=name, x=x, scale=s, zero_point=z, bounds=args, y=fn(qx, *args).int_repr()))
        s2 = 2.0 ** -(3 + i)  # power of two: the float mean of the reference path is exact
        for dims, keepdim in [([2, 3], False), ([3], True), ([1], False), (None, False), ([0, 2], True)]:
            y = q(x, s2, z).mean(dims, keepdim=keepdim) if dims is not None else q(x, s2, z).mean()
            cases.append(dict(op="mean", x=x, scale=s2, zero_point=z, dim=dims, keepdim=keepdim, y=y.int_repr()))
    return cases


def main() -> None:
    warnings.simplefilter("ignore")  # the quantized-dtype deprecation notice
    torch.backends.quantized.engine = "fbgemm"
    torch.set_num_threads(1)
    data = {
        "torch_version": str(torch.__version__),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cases": binary_cases() + scalar_cases() + cat_cases() + pooling_cases(),
    }
    torch.save(data, OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(data['cases'])} cases)")


if __name__ == "__main__":
    main()
