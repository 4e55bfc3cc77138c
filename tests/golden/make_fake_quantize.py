"""Record torch's fake quantization on adversarial inputs into ``fake_quantize.pt``.

Run from the repository root with the torch that still ships ``torch.fake_quantize_*``:

    .venv/bin/python tests/golden/make_fake_quantize.py

Each case stores the inputs exactly as minqat receives them (``x``, ``scale``, ``zero_point``,
``axis`` (None per tensor), ``quant_min``, ``quant_max``), torch's output ``out`` and the input
gradient mask ``mask`` (bool: ``dx = dy * mask``). Where torch wants other dtypes than minqat accepts
(a float32 scale, an int32 zero point, a non-negative axis) torch got the converted value; the case
name says so. ``tests/test_fake_quantize.py`` replays the file without torch.ao.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).with_name("fake_quantize.pt")
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
I32, I64 = torch.int32, torch.int64
WIDE = (-(2**31), 2**31 - 1)
SPECIALS = [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 0.0, -0.0]


def adversarial(scale, zero_point, quant_min, quant_max, numel, seed, dtype):
    """``numel`` adversarial values (ties, ±1 ulp, clamp edges, specials); float64 nudged off float32."""
    from tests.strategies import adversarial_values

    x = adversarial_values(scale, zero_point, quant_min, quant_max, numel // 4 + 1, seed)[:numel].to(dtype)
    if dtype == F64:
        nudge = np.random.default_rng(seed).choice([-1.0, 0.0, 1.0], numel) * 2.0**-30
        x = x * (1 + torch.from_numpy(nudge))
    return x


def record(fn, x, *args):
    """torch's output and gradient mask (upstream gradient of ones)."""
    x = x.clone().requires_grad_(True)
    y = fn(x, *args)
    y.backward(torch.ones_like(y))
    return y.detach(), x.grad != 0


def per_tensor(name, qmin, qmax, scale, zero_point, dtype=F32, extra=(), tensor_qparams=None, seed=0, x=None):
    """``tensor_qparams``: (scale dtype, zero point dtype) to pass tensors instead of numbers;
    ``x``: the input, if not the default adversarial values + specials + ``extra``."""
    if x is None:
        x = torch.cat([adversarial(scale, float(zero_point), qmin, qmax, 96, seed, dtype),
                       torch.tensor(SPECIALS + list(extra), dtype=dtype)])
    if tensor_qparams is None:
        args, ref_args = (scale, zero_point), (scale, zero_point)
    else:
        scale_t = torch.tensor([scale], dtype=tensor_qparams[0])
        zp_t = torch.tensor([zero_point], dtype=tensor_qparams[1])
        args, ref_args = (scale_t, zp_t), (scale_t.float(), zp_t)
    out, mask = record(torch.fake_quantize_per_tensor_affine, x, *ref_args, qmin, qmax)
    return dict(name=name, x=x, scale=args[0], zero_point=args[1], axis=None, quant_min=qmin, quant_max=qmax,
                out=out, mask=mask)


def per_channel(name, qmin, qmax, scales, zero_points, shape, axis, dtype=F32, scale_dtype=F32, zp_dtype=I32, seed=0,
                extra=()):
    """``extra``: values written at the start of every channel (before shuffling), after the specials."""
    moved = (shape[axis],) + tuple(shape[:axis % len(shape)]) + tuple(shape[axis % len(shape) + 1:])
    per = math.prod(moved[1:])
    rows = []
    for c, (s, z) in enumerate(zip(scales, zero_points)):
        row = adversarial(s, z, qmin, qmax, per, seed + c, dtype)
        fixed = (SPECIALS + list(extra))[:per]  # specials (and extra) in every channel
        row[: len(fixed)] = torch.tensor(fixed, dtype=dtype)
        rows.append(row[torch.randperm(per, generator=torch.Generator().manual_seed(seed + c))])
    x = torch.stack(rows).reshape(moved).movedim(0, axis % len(shape)).contiguous()
    scale, zp = torch.tensor(scales, dtype=scale_dtype), torch.tensor(zero_points, dtype=zp_dtype)
    zp_ref = zp.float() if zp.is_floating_point() else zp.int()
    out, mask = record(torch.fake_quantize_per_channel_affine, x, scale.float(), zp_ref, axis % x.dim(), qmin, qmax)
    return dict(name=name, x=x, scale=scale, zero_point=zp, axis=axis, quant_min=qmin, quant_max=qmax,
                out=out, mask=mask)


def cases():
    third = 1.0 / 3.0  # not float32-representable: the narrowing of the scale is recorded too
    return [
        # --- per tensor, Python-number qparams (torch's cachemask overload)
        per_tensor("pt_u8", 0, 255, 0.1, 128, extra=[12.75, 12.85, -12.85, 12.65]),
        per_tensor("pt_s8_third", -128, 127, third, 0, seed=1),
        per_tensor("pt_narrow_s8", -127, 127, 0.05, 0, seed=2),
        per_tensor("pt_u4", 0, 15, 0.5, 3, seed=3),
        per_tensor("pt_s4_zp_at_qmin", -8, 7, 2.0, -8, seed=4),
        per_tensor("pt_1bit_zp_at_qmax", 0, 1, 1.0, 1, extra=[0.5, -0.5, -1.5, 1.5], seed=5),
        per_tensor("pt_s16", -32768, 32767, 1e-4, 100, seed=6),
        per_tensor("pt_u16_tiny_scale", 0, 65535, 1e-8, 65535, seed=7),
        per_tensor("pt_custom", -1000, 3000, 0.7, -1000, seed=8),
        per_tensor("pt_reciprocal_not_division", 0, 255, 7.0, 0, extra=[45.5, 0.35], seed=9),
        per_tensor("pt_ties_scale1", -128, 127, 1.0, 0, seed=10,
                   extra=[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 127.5, -128.5]),
        per_tensor("pt_wide_int32", *WIDE, 1.0, 0, seed=11),
        per_tensor("pt_wide_u31_big_scale", 0, 2**31 - 1, 1e4, 12345, seed=12),
        per_tensor("pt_wide_custom", -(2**30), 2**30 + 12345, 3e-3, -7, seed=13),
        per_tensor("pt_f64_u8", 0, 255, 0.1, 128, dtype=F64, extra=[0.3], seed=14),
        per_tensor("pt_f64_s8", -128, 127, third, -5, dtype=F64, seed=15),
        per_tensor("pt_f64_wide", *WIDE, 0.25, 1000, dtype=F64, seed=16),
        per_tensor("pt_f16", 0, 255, 0.02, 100, dtype=F16, seed=17),
        per_tensor("pt_bf16", -128, 127, 0.05, 0, dtype=BF16, seed=18),
        # --- per tensor, tensor qparams (FakeQuantize's overload); float zero points truncate
        per_tensor("pt_tq_f32_i32", 0, 255, 0.0235, 37, tensor_qparams=(F32, I32), seed=19),
        per_tensor("pt_tq_f32_i64", -128, 127, 0.013, -3, tensor_qparams=(F32, I64), seed=20),
        per_tensor("pt_tq_float_zp_2.7", 0, 10, 1.0, 2.7, tensor_qparams=(F32, F32), extra=[-3.0], seed=21),
        per_tensor("pt_tq_float_zp_-2.7", -10, 10, 1.0, -2.7, tensor_qparams=(F32, F32), extra=[3.0, 8.5], seed=22),
        per_tensor("pt_tq_f64_scale_narrowed", 0, 255, 0.1 + 1e-12, 7, tensor_qparams=(F64, I64), seed=23),
        per_tensor("pt_tq_wide", *WIDE, 5e-3, -4321, tensor_qparams=(F32, I64), seed=24),
        per_tensor("pt_tq_f64_x", 0, 255, 0.07, 200, dtype=F64, tensor_qparams=(F32, I32), seed=25),
        # --- per channel, integer zero point
        per_channel("pc_axis0_u8", 0, 255, [0.1, 0.02, 7.0], [0, 128, 255], (3, 40), 0, seed=26),
        per_channel("pc_axis1_s8_i64_zp", -128, 127, [third, 1.0], [-128, 5], (4, 2, 12), 1, zp_dtype=I64, seed=27),
        per_channel("pc_axis_neg1_s4", -8, 7, [0.5, 2.0, 1e-3, 1e4], [0, -8, 7, 1], (2, 3, 4), -1, seed=28),
        per_channel("pc_1d_per_element", 0, 15, [0.1, 0.2, 0.3, 0.4, 0.5], [0, 3, 7, 12, 15], (5,), 0, seed=29),
        per_channel("pc_wide_int32", *WIDE, [1.0, 1e-3], [0, -(2**31)], (2, 24), 0, seed=30),
        per_channel("pc_f64_scale_narrowed", 0, 255, [0.1 + 1e-12, third], [3, 250], (2, 24), 0,
                    scale_dtype=F64, seed=31),
        per_channel("pc_u16", 0, 65535, [1e-8, 2.0**-20], [0, 65535], (2, 24), 0, seed=32),
        per_channel("pc_f16", 0, 255, [0.02, 0.5], [100, 0], (2, 24), 0, dtype=F16, seed=33),
        per_channel("pc_bf16", -128, 127, [0.05, 0.25], [0, -1], (24, 2), 1, dtype=BF16, seed=34),
        # --- per channel, float zero point (added before rounding, FMA)
        per_channel("pc_float_zp_u8", 0, 255, [0.1, 0.02, 7.0], [0.5, 127.25, 254.75], (3, 40), 0,
                    zp_dtype=F32, seed=35),
        per_channel("pc_float_zp_s8", -128, 127, [third, 1.0, 0.01], [3.0, -0.5, 126.9], (2, 3, 12), 1,
                    zp_dtype=F32, seed=36),
        per_channel("pc_float_zp_wide", *WIDE, [1.0, 3e-3], [12345.5, -1e9], (2, 24), 0, zp_dtype=F32, seed=37),
        per_channel("pc_float64_zp_narrowed", 0, 255, [0.1, 0.3], [0.1, 77.7], (2, 24), 0, zp_dtype=F64, seed=38),
        per_channel("pc_float_zp_f16", 0, 255, [0.02, 0.5], [100.5, 1.25], (2, 24), 0, dtype=F16,
                    zp_dtype=F32, seed=39),
        # --- per channel, float64 input and float zero point 0.0 (known minqat deviations)
        per_channel("pc_f64_x_int_zp", 0, 255, [0.1, third], [0, 128], (2, 24), 0, dtype=F64, seed=40),
        per_channel("pc_f64_x_float_zp", -128, 127, [0.1, third], [0.5, -3.25], (2, 24), 0, dtype=F64,
                    zp_dtype=F32, seed=41),
        per_channel("pc_float_zp_exact_zero", -128, 127, [1.0, 0.1], [0.0, 0.0], (2, 24), 0, zp_dtype=F32, seed=42,
                    extra=[-0.01, -0.04, -0.1]),
        per_channel("pc_f64_x_wide_zp", *WIDE, [1.0], [134217724], (24, 1), 1, dtype=F64, seed=45,
                    extra=[2013265923.0, 2013265924.0, 2013265925.0]),
        # --- shapes: 0-d, empty
        per_tensor("pt_0d", 0, 255, 0.1, 3, x=torch.tensor(0.25)),
        per_tensor("pt_empty", 0, 255, 0.1, 3, x=torch.empty(0, 3)),
        per_channel("pc_empty_rows", 0, 255, [0.1, 0.2, 0.3], [0, 1, 2], (0, 3), 1, seed=44),
    ]


def main() -> None:
    sys.path.insert(0, str(ROOT))
    torch.manual_seed(0)
    recorded = cases()
    assert len({c["name"] for c in recorded}) == len(recorded), "case names must be unique"
    torch.save({"torch_version": str(torch.__version__), "cases": recorded}, OUT)
    print(f"wrote {len(recorded)} cases, {OUT.stat().st_size} bytes, torch {torch.__version__} -> {OUT}")


if __name__ == "__main__":
    main()
