"""Components 1-3 of ``python -m minqat check``: fake quant functions, observers, fake-quant modules.

Each ``check_*`` runs random cases through minqat and torch.ao (passed in as ``tq``, imported by the
caller) and returns ``Tally`` rows. This cross-check tool (with ``models.py``) is the only place in
``minqat/`` that calls torch.ao and torch's fake-quant ops: as the oracle, imported lazily by ``run_check``,
never in minqat's own computations.
"""
from __future__ import annotations

import torch

from .tally import Tally

__all__ = ["check_fake_quant", "check_observers", "check_fake_quant_modules"]

U8, I8 = torch.uint8, torch.int8


def _dtypes(legacy: bool) -> tuple[torch.dtype, torch.dtype]:
    """(activation, weight) dtypes: torch.ao wants its legacy quantized ones (looked up by name), minqat plain."""
    return (getattr(torch, "quint8"), getattr(torch, "qint8")) if legacy else (U8, I8)


# --- 1. fake quant functions ----------------------------------------------------------------------


def _range(gen: torch.Generator) -> tuple[int, int]:
    """A quantization range of 2 to 16 bits, unsigned, signed or a narrower random piece."""
    bits = int(torch.randint(2, 17, (), generator=gen))
    kind = int(torch.randint(0, 3, (), generator=gen))
    if kind == 0:
        return 0, 2**bits - 1
    if kind == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    lo = int(torch.randint(-(2**bits), 2**bits, (), generator=gen))
    return lo, lo + int(torch.randint(1, 2**bits, (), generator=gen))


def _inputs(shape, scale: torch.Tensor, zero_point: torch.Tensor, q_min: int, q_max: int,
            gen: torch.Generator) -> torch.Tensor:
    """Near ties ``(k + 0.5 +- tiny) * scale``, values past both clamp edges and ordinary ones, shuffled."""
    n = int(torch.Size(shape).numel())
    k = torch.randint(q_min - 3, q_max + 3, (n,), generator=gen).double().reshape(shape) - zero_point
    offset = torch.tensor([0.0, 0.5, -0.5, 0.5 - 2**-20, 0.5 + 2**-20, 0.25])[torch.randint(0, 6, shape, generator=gen)]
    x = ((k + offset) * scale).float()
    wide = torch.randn(shape, generator=gen) * scale * (q_max - q_min)
    return torch.where(torch.rand(shape, generator=gen) < 0.2, wide.float(), x)


def _grad_pair(fn_ours, fn_theirs, x: torch.Tensor, gen: torch.Generator):
    g = torch.randn(x.shape, generator=gen)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    ys = [fn_ours(xs[0]), fn_theirs(xs[1])]
    for y, xi in zip(ys, xs):
        y.backward(g)
    return ys, (xs[0].grad, xs[1].grad)


def check_fake_quant(cases: int, gen: torch.Generator) -> list[Tally]:
    import minqat

    rows = [Tally(f"fake quant per {k}, {what}") for k in ("tensor", "channel") for what in ("forward", "gradient")]
    for _ in range(cases):
        q_min, q_max = _range(gen)
        shape = (4, 8, 6, 6)
        scale = float(torch.empty(()).uniform_(-3, 1, generator=gen).exp2())
        zp = int(torch.randint(q_min, q_max + 1, (), generator=gen))
        x = _inputs(shape, torch.tensor(scale), torch.tensor(zp), q_min, q_max, gen)
        (y_o, y_t), (g_o, g_t) = _grad_pair(
            lambda t: minqat.fake_quantize_per_tensor_affine(t, scale, zp, q_min, q_max),
            lambda t: torch.fake_quantize_per_tensor_affine(t, scale, zp, q_min, q_max), x, gen)
        rows[0].add(y_o, y_t, scale)
        rows[1].add(g_o, g_t)
        axis = int(torch.randint(0, 4, (), generator=gen))
        c = shape[axis]
        scales = torch.empty(c).uniform_(-3, 1, generator=gen).exp2()
        zps = torch.randint(q_min, q_max + 1, (c,), generator=gen, dtype=torch.int32)
        view = [1, 1, 1, 1]
        view[axis] = c
        x = _inputs(shape, scales.double().reshape(view), zps.double().reshape(view), q_min, q_max, gen)
        (y_o, y_t), (g_o, g_t) = _grad_pair(
            lambda t: minqat.fake_quantize_per_channel_affine(t, scales, zps, axis, q_min, q_max),
            lambda t: torch.fake_quantize_per_channel_affine(t, scales, zps, axis, q_min, q_max), x, gen)
        rows[2].add(y_o, y_t, scales.reshape(view))
        rows[3].add(g_o, g_t)
        for row in rows:
            row.cases += 1
    return rows


# --- 2. observers and 3. fake-quant modules -------------------------------------------------------------


def _observer_configs(lib, legacy: bool, gen: torch.Generator) -> list[tuple[str, object]]:
    """(name, factory) per observer kind, with a random dtype / scheme / range drawn once per case."""
    u8, i8 = _dtypes(legacy)
    signed = bool(torch.randint(0, 2, (), generator=gen))
    symmetric = bool(torch.randint(0, 2, (), generator=gen))
    narrow = bool(torch.randint(0, 3, (), generator=gen) == 0)
    kwargs = {"dtype": i8 if signed else u8}
    if narrow:
        kwargs.update(quant_min=-7, quant_max=7) if signed else kwargs.update(quant_min=0, quant_max=15)
    else:  # (torch.ao rejects reduce_range for symmetric uint8)
        kwargs["reduce_range"] = bool(torch.randint(0, 2, (), generator=gen)) and (signed or not symmetric)
    tensor_scheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
    channel_scheme = torch.per_channel_symmetric if symmetric else torch.per_channel_affine
    c = float(torch.empty(()).uniform_(0.01, 1.0, generator=gen))
    return [
        ("MinMaxObserver", lib.MinMaxObserver.with_args(qscheme=tensor_scheme, **kwargs)),
        ("MovingAverageMinMaxObserver", lib.MovingAverageMinMaxObserver.with_args(
            averaging_constant=c, qscheme=tensor_scheme, **kwargs)),
        ("PerChannelMinMaxObserver", lib.PerChannelMinMaxObserver.with_args(ch_axis=1, qscheme=channel_scheme,
                                                                            **kwargs)),
        ("MovingAveragePerChannelMinMaxObserver", lib.MovingAveragePerChannelMinMaxObserver.with_args(
            averaging_constant=c, ch_axis=0, qscheme=channel_scheme, **kwargs)),
        ("HistogramObserver", lib.HistogramObserver.with_args(bins=256, qscheme=tensor_scheme, **kwargs)),
    ]


def check_observers(cases: int, gen: torch.Generator, tq) -> Tally:
    import minqat

    tally = Tally("observers: min/max, scale, zero point")
    for case in range(cases):
        seed = int(torch.randint(0, 2**31, (), generator=gen))
        ours = _observer_configs(minqat, False, torch.Generator().manual_seed(seed))
        theirs = _observer_configs(tq, True, torch.Generator().manual_seed(seed))
        batches = [torch.randn(4, 6, 5, generator=gen) * float(torch.rand((), generator=gen) * 10)
                   + float(torch.randn((), generator=gen)) for _ in range(3)]
        for (_, make_ours), (_, make_theirs) in zip(ours, theirs):
            obs_ours, obs_theirs = make_ours(), make_theirs()
            for x in batches:
                tally.add(obs_ours(x.clone()), obs_theirs(x.clone()))
            tally.add(obs_ours.min_val, obs_theirs.min_val)
            tally.add(obs_ours.max_val, obs_theirs.max_val)
            (s_o, z_o), (s_t, z_t) = obs_ours.calculate_qparams(), obs_theirs.calculate_qparams()
            tally.add(s_o, s_t)
            tally.add(z_o, z_t)
            tally.cases += 1
    return tally


def _fake_quant_factories(lib, legacy: bool) -> list:
    u8, i8 = _dtypes(legacy)
    return [
        lib.FakeQuantize.with_args(observer=lib.MovingAverageMinMaxObserver, quant_min=0, quant_max=127, dtype=u8),
        lib.FakeQuantize.with_args(observer=lib.MovingAverageMinMaxObserver, quant_min=0, quant_max=15, dtype=u8),
        lib.FakeQuantize.with_args(observer=lib.MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127,
                                   dtype=i8, qscheme=torch.per_channel_symmetric, ch_axis=0),
        lib.FusedMovingAvgObsFakeQuantize.with_args(observer=lib.MovingAverageMinMaxObserver, quant_min=0,
                                                    quant_max=255, dtype=u8),
        lib.FusedMovingAvgObsFakeQuantize.with_args(observer=lib.MovingAveragePerChannelMinMaxObserver,
                                                    quant_min=-128, quant_max=127, dtype=i8,
                                                    qscheme=torch.per_channel_symmetric, ch_axis=0),
    ]


def check_fake_quant_modules(cases: int, gen: torch.Generator, tq) -> Tally:
    """Each module over 4 steps (observer off before the last): outputs, input gradients, qparams."""
    import minqat

    tally = Tally("FakeQuantize modules over 4 steps: outputs, gradients, qparams")
    for _ in range(cases):
        for make_ours, make_theirs in zip(_fake_quant_factories(minqat, False), _fake_quant_factories(tq, True)):
            fq_ours, fq_theirs = make_ours(), make_theirs()
            for step in range(4):
                if step == 3:
                    fq_ours.disable_observer()
                    fq_theirs.disable_observer()
                x = torch.randn(6, 4, 3, generator=gen) * float(torch.rand((), generator=gen) * 4) + 0.5
                (y_o, y_t), (g_o, g_t) = _grad_pair(fq_ours, fq_theirs, x, gen)
                scale = fq_theirs.scale.reshape(-1, 1, 1) if fq_theirs.scale.numel() > 1 else fq_theirs.scale
                tally.add(y_o, y_t, scale)
                tally.add(g_o, g_t)
                tally.add(fq_ours.scale, fq_theirs.scale)
                tally.add(fq_ours.zero_point, fq_theirs.zero_point)
            tally.cases += 1
    return tally
