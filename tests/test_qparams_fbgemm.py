"""fbgemm's ChooseQuantizationParams (minqat.qparams_fbgemm): golden values, torch parity, properties."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from minqat.qparams import calculate_qparams
from minqat.qparams_fbgemm import choose_qparams_fbgemm
from tests.oracle import assert_bit_exact, requires_ao
from tests.strategies import quant_ranges


def f32(v: float) -> float:
    """The float32 rounding of a Python number, as a Python float."""
    return float(np.float32(v))


T6 = f32(6.1e-5)

# ----------------------------------------------------------------------------------------------
# (1) hand-worked golden values
# ----------------------------------------------------------------------------------------------

# (min, max, quant_min, quant_max, preserve_sparsity, scale, zero_point), worked out by hand:
GOLDEN = [
    # affine: scale 4/255; z_min = 0 + 1/s = 63.75 has error 63.75 < 255 + 191.25 -> rint 64
    (-1.0, 3.0, 0, 255, False, f32(4 / 255), 64),
    # symmetric int8: m = max(1/128, 0.5/127) = 1/128 -> range [-1, 127/128], scale (255/128)/255
    (-1.0, 0.5, -128, 127, True, 2.0**-7, 0),  # zero point (-128 + 127) / 2 = -0.5 -> rint -0
    (-1.0, 0.5, 0, 255, True, 2.0**-7, 128),  # 127.5 -> 128 (half to even)
    (-1.0, 0.5, -127, 127, True, f32(255 / 128 / 254), 0),  # sq range still [-128, 127]
    # one-signed ranges in symmetric mode are affine: step 1 needs min < 0 < max
    (-3.0, -3.0, -128, 127, True, f32(3 / 255), 127),  # z_max = 127 (error 127 < 383)
    (-3.0, -3.0, 0, 255, True, f32(3 / 255), 255),  # errors tie (255 vs 255) -> z_max = 255
    (3.0, 3.0, -128, 127, True, f32(3 / 255), -128),  # z_min = -128 (error 128 < 382)
    # all zeros: scale 0 -> 0.1; z_min error |qmin| vs z_max error |qmax|
    (0.0, 0.0, 0, 255, False, f32(0.1), 0),
    (0.0, 0.0, -128, 127, False, f32(0.1), 127),  # 127 < 128: the top end wins
    (0.0, 0.0, -128, 127, True, f32(0.1), 127),
    # tiny ranges hit the 6.1e-5 cut-off (the Python formula would keep ~4e-6)
    (0.0, 1e-3, 0, 255, False, T6, 0),
    (-1e-3, 0.0, 0, 255, False, T6, 255),
    (-1e-3, 1e-3, 0, 255, True, T6, 128),
    (-1e-3, 1e-3, -128, 127, True, T6, 0),
]


@pytest.mark.parametrize("mn, mx, qmin, qmax, sym, scale, zp", GOLDEN)
def test_golden_values(mn, mx, qmin, qmax, sym, scale, zp):
    s, z = choose_qparams_fbgemm(torch.tensor(mn), torch.tensor(mx), qmin, qmax, sym)
    assert s.dtype == torch.float32 and z.dtype == torch.int32 and s.dim() == 0
    assert s.item() == scale
    assert z.item() == zp


def test_per_channel_matches_elementwise_goldens():
    mn = torch.tensor([g[0] for g in GOLDEN if g[2:4] == (-128, 127)])
    mx = torch.tensor([g[1] for g in GOLDEN if g[2:4] == (-128, 127)])
    sym = [g[4] for g in GOLDEN if g[2:4] == (-128, 127)]
    for flag in (False, True):
        s, z = choose_qparams_fbgemm(mn, mx, -128, 127, flag)
        assert s.shape == z.shape == (len(mn),)
        for i in range(len(mn)):
            s_i, z_i = choose_qparams_fbgemm(mn[i], mx[i], -128, 127, flag)
            assert s[i].item() == s_i.item() and z[i].item() == z_i.item()
    assert any(sym) and not all(sym)


def test_differs_from_python_formula():
    """The documented differences: symmetric scale, one-signed ranges, the 6.1e-5 cut-off."""
    cases = [
        (-1.0, 0.5, torch.per_tensor_symmetric, True),
        (-3.0, -3.0, torch.per_tensor_symmetric, True),
        (0.0, 1e-3, torch.per_tensor_affine, False),
    ]
    for mn, mx, qscheme, sym in cases:
        s_fb, z_fb = choose_qparams_fbgemm(torch.tensor(mn), torch.tensor(mx), -128, 127, sym)
        s_py, z_py = calculate_qparams(torch.tensor(mn), torch.tensor(mx), -128, 127, qscheme, torch.int8)
        assert (s_fb.item(), z_fb.item()) != (s_py.item(), z_py.item())


def test_bad_arguments():
    with pytest.raises(ValueError, match="quant_min must be less than quant_max"):
        choose_qparams_fbgemm(torch.tensor(0.0), torch.tensor(1.0), 5, 5, False)
    with pytest.raises(ValueError, match="min_val and max_val must have the same shape"):
        choose_qparams_fbgemm(torch.zeros(2), torch.zeros(3), 0, 255, False)


# ----------------------------------------------------------------------------------------------
# (2) parity with torch's fused kernel
# ----------------------------------------------------------------------------------------------


def torch_fbgemm_qparams(mn: torch.Tensor, mx: torch.Tensor, qmin: int, qmax: int, sym: bool):
    """Run torch.fused_moving_avg_obs_fake_quant with the observer off: it only chooses qparams."""
    channels = mn.numel()
    running_min, running_max = mn.clone().reshape(channels), mx.clone().reshape(channels)
    scale = torch.ones(channels)
    zero_point = torch.zeros(channels, dtype=torch.int32)
    try:
        torch.fused_moving_avg_obs_fake_quant(
            torch.zeros(channels, 1), torch.tensor([0]), torch.tensor([1]), running_min, running_max,
            scale, zero_point, 0.01, qmin, qmax, 0, True, sym,
        )
    except RuntimeError:  # NaN ranges: the qparams are written, then the fake quant rejects them
        pass
    return scale.reshape(mn.shape), zero_point.reshape(mn.shape)


SPECIAL = [0.0, -0.0, 1e-30, -1e-30, 1e-45, 3e-5, -3e-5, 1.0, -1.0, 1e38, -1e38, float("inf"), -float("inf")]
finite_or_special = st.one_of(
    st.floats(-1e6, 1e6, width=32),
    st.floats(-(2.0**-10), 2.0**-10, width=32),
    st.sampled_from(SPECIAL),
)


@st.composite
def ranges(draw, n_max: int = 16):
    n = draw(st.integers(1, n_max))
    pairs = [sorted(draw(st.tuples(finite_or_special, finite_or_special))) for _ in range(n)]
    return torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])


@requires_ao
@given(ranges(), quant_ranges(max_bits=16), st.booleans())
def test_parity_with_torch(min_max, qrange, sym):
    mn, mx = min_max
    qmin, qmax = qrange
    s, z = choose_qparams_fbgemm(mn, mx, qmin, qmax, sym)
    s_ref, z_ref = torch_fbgemm_qparams(mn, mx, qmin, qmax, sym)
    assert_bit_exact(s, s_ref, "scale")
    assert_bit_exact(z, z_ref, "zero_point")


@requires_ao
def test_parity_bulk_random_and_tiny_ranges():
    """20k random ranges (x 14 configurations) over 16 decades, incl. zero-, one-signed and tiny
    ones (6.1e-5 cut-off)."""
    rng = np.random.default_rng(0)
    n = 20_000
    a = rng.standard_normal(n) * 10.0 ** rng.integers(-12, 4, n)
    b = rng.standard_normal(n) * 10.0 ** rng.integers(-12, 4, n)
    kind = rng.integers(0, 5, n)
    mn, mx = np.minimum(a, b), np.maximum(a, b)
    mn = np.where(kind == 0, 0, mn)
    mx = np.where(kind == 1, 0, mx)
    mx = np.where(kind == 2, mn, mx)
    mn = torch.tensor(mn, dtype=torch.float32)
    mx = torch.maximum(mn, torch.tensor(mx, dtype=torch.float32))
    for qmin, qmax in [(0, 255), (-128, 127), (0, 127), (-127, 127), (-64, 63), (0, 15), (-32768, 32767)]:
        for sym in (False, True):
            s, z = choose_qparams_fbgemm(mn, mx, qmin, qmax, sym)
            s_ref, z_ref = torch_fbgemm_qparams(mn, mx, qmin, qmax, sym)
            assert_bit_exact(s, s_ref, f"scale {qmin, qmax, sym}")
            assert_bit_exact(z, z_ref, f"zero_point {qmin, qmax, sym}")


# ----------------------------------------------------------------------------------------------
# (3) oracle-free properties
# ----------------------------------------------------------------------------------------------

finite = st.floats(-1e4, 1e4, width=32)


@given(st.lists(st.tuples(finite, finite), min_size=1, max_size=8), quant_ranges(max_bits=16), st.booleans())
def test_properties(pairs, qrange, sym):
    qmin, qmax = qrange
    mn = torch.tensor([min(p) for p in pairs])
    mx = torch.tensor([max(p) for p in pairs])
    s, z = choose_qparams_fbgemm(mn, mx, qmin, qmax, sym)
    # the cut-off: no scale below 6.1e-5; zero points inside the range
    assert bool((s >= T6).all())
    assert bool(((z >= qmin) & (z <= qmax)).all())
    # symmetric ranges straddling zero get the middle zero point, rint((qmin + qmax) / 2)
    mid = round((qmin + qmax) / 2)  # Python's round is half to even too
    straddles = (mn < 0) & (mx > 0)
    if sym:
        assert bool((z[straddles] == mid).all())
    # per channel == per element
    for i in range(len(pairs)):
        s_i, z_i = choose_qparams_fbgemm(mn[i], mx[i], qmin, qmax, sym)
        assert s_i.item() == s[i].item() and z_i.item() == z[i].item()


@given(st.lists(st.tuples(finite, finite), min_size=1, max_size=8))
def test_affine_grid_covers_the_range(pairs):
    """8-bit affine: the grid [(qmin - zp) * s, (qmax - zp) * s] reaches min/max within one step."""
    mn = torch.tensor([min(p) for p in pairs]).clamp_max(0)
    mx = torch.tensor([max(p) for p in pairs]).clamp_min(0)
    s, z = choose_qparams_fbgemm(mn, mx, 0, 255, False)
    lo = (0 - z).double() * s.double()
    hi = (255 - z).double() * s.double()
    assert bool((lo <= mn.double() + s.double()).all())
    assert bool((hi >= mx.double() - s.double()).all())


# ----------------------------------------------------------------------------------------------
# (4) golden vectors recorded from torch.ao (tests/golden/make_fake_quantize_modules.py)
# ----------------------------------------------------------------------------------------------


def test_golden_vectors():
    golden = torch.load(Path(__file__).parent / "golden" / "fake_quantize_modules.pt", weights_only=True)
    ref = golden["qparams_fbgemm"]
    for i, (qmin, qmax, sym) in enumerate(ref["settings"].tolist()):
        s, z = choose_qparams_fbgemm(ref["min"], ref["max"], qmin, qmax, bool(sym))
        assert_bit_exact(s, ref["scale"][i], f"scale {qmin, qmax, sym}")
        assert_bit_exact(z, ref["zero_point"][i], f"zero_point {qmin, qmax, sym}")
