"""HistogramObserver (minqat.histogram): hand-worked histograms and searches, parity with torch.ao's
HistogramObserver over batch sequences, oracle-free properties, golden vectors, errors."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

from minqat.histogram import HistogramObserver, non_linear_param_search, quantization_error
from minqat.observers import ObserverBase
from tests.oracle import ao, assert_bit_exact, requires_ao

GOLDEN_FILE = Path(__file__).parent / "golden" / "histogram.pt"


def observe(obs, *batches):
    for x in batches:
        obs(torch.tensor(x) if not isinstance(x, torch.Tensor) else x)
    return obs


# ----------------------------------------------------------------------------------------------
# (1) hand-worked golden values
# ----------------------------------------------------------------------------------------------
def test_constant_input():
    # min = max = 3: bin_width 0, the search keeps [3, 3]; qparams of [0, 3] (zero included):
    # affine uint8 scale = 3 / 255, zero point 0.
    obs = observe(HistogramObserver(bins=32), [3.0] * 10)
    scale, zero_point = obs.calculate_qparams()
    assert scale.tolist() == [float(np.float32(3.0) / np.float32(255.0))]
    assert zero_point.tolist() == [0]


def test_first_batch_histogram():
    # histc over [min, max] = [0, 4], 4 bins of width 1; the max lands in the last bin
    obs = observe(HistogramObserver(bins=4), [0.0, 0.5, 1.5, 3.9, 4.0])
    assert obs.histogram.tolist() == [2.0, 1.0, 0.0, 2.0]
    assert (obs.min_val.item(), obs.max_val.item()) == (0.0, 4.0)


def test_same_range_adds_histograms():
    obs = observe(HistogramObserver(bins=4), [0.0, 4.0], [1.5, 2.5, 2.5])
    assert obs.histogram.tolist() == [1.0, 1.0, 2.0, 1.0]


def test_single_value_history_moves_to_its_new_bin():
    # batch 1: three 2.0s -> min = max = 2 (histc widens to [1, 3]: bin 2). Batch 2 widens the range
    # to [0, 4]: its histogram is [1, 0, 0, 1]; the old mass (3) goes to the bin of 2.0 in [0, 4],
    # bin 2 -> [1, 0, 3, 1].
    obs = observe(HistogramObserver(bins=4), [2.0, 2.0, 2.0], [0.0, 4.0])
    assert obs.histogram.tolist() == [1.0, 0.0, 3.0, 1.0]
    assert (obs.min_val.item(), obs.max_val.item()) == (0.0, 4.0)


def test_upscaled_history():
    # batch 1 over [0, 4]: [1, 2, 3, 3]. Batch 2 (8.0) widens to [0, 8] (bins of width 2): old bins
    # 0, 1 -> new bin 0 (mass 3), old bins 2, 3 -> new bin 1 (mass 6); 8.0 itself -> last bin.
    obs = observe(HistogramObserver(bins=4), [0.0, 1.5, 1.5, 2.5, 2.5, 2.5, 3.5, 3.5, 4.0], [8.0])
    assert obs.histogram.tolist() == [3.0, 6.0, 0.0, 1.0]
    assert (obs.min_val.item(), obs.max_val.item()) == (0.0, 8.0)


def test_quantization_error_of_aligned_bins_is_step_squared_over_12():
    # 256 source bins coinciding with the 256 destination bins (width 1), one value each: every value
    # is uniform within its bin, error 1/12 each -> 256 / 12 (float32 sums: relative 1e-6).
    assert quantization_error(torch.ones(256), 1.0, 0, 255, 256) == pytest.approx(256 / 12, rel=1e-6)
    # width 0.5 -> step^2 = 1/4: error 256 / 48 (density doubles, cube shrinks 8x)
    assert quantization_error(torch.ones(256), 0.5, 0, 255, 256) == pytest.approx(256 / 48, rel=1e-6)


def test_search_first_move_is_always_kept():
    # histogram [0, 50, 50, 0] over [0, 4]. Step 1: l = 1 (first cSum >= 0.001), r = 1 (last
    # cSum <= 99.999); the end side frees more bins (2 > 1) -> end_bin = 1, clipping bin 2's 50 values,
    # and it is kept because the best error so far is +inf. Step 2: l = r = 1, start side -> start_bin
    # = 1; its error (~16.77) is below step 1's (~16.87). start == end: done -> [1, 2].
    new_min, new_max = non_linear_param_search(torch.tensor([0.0, 50.0, 50.0, 0.0]), torch.tensor(0.0),
                                               torch.tensor(4.0), 256)
    assert (new_min.item(), new_max.item()) == (1.0, 2.0)


def test_search_clips_an_outlier():
    histogram = torch.tensor([100.0] * 6 + [0.0, 1.0])
    new_min, new_max = non_linear_param_search(histogram, torch.tensor(0.0), torch.tensor(8.0), 256)
    assert (new_min.item(), new_max.item()) == (0.0, 7.0)


def test_inf_values_are_ignored_with_a_warning():
    obs = HistogramObserver(bins=4)
    with pytest.warns(UserWarning, match="ignoring \\+-inf values"):
        obs(torch.tensor([0.0, math.inf, 4.0, -math.inf]))
    assert obs.histogram.tolist() == [1.0, 0.0, 0.0, 1.0]
    with pytest.warns(UserWarning, match="ignoring"):
        obs(torch.tensor([math.inf]))  # nothing left: no change
    assert obs.histogram.sum().item() == 2.0


def test_unobserved_defaults_and_empty_input():
    obs = HistogramObserver(bins=8)
    assert obs(torch.empty(0)).numel() == 0
    with pytest.warns(UserWarning, match="must run observer"):
        scale, zero_point = obs.calculate_qparams()
    assert scale.tolist() == [1.0] and zero_point.tolist() == [0] and zero_point.dtype == torch.int64


def test_reset_and_with_args_and_buffers():
    factory = HistogramObserver.with_args(bins=8, dtype=torch.qint8)
    obs = factory()
    assert isinstance(obs, ObserverBase) and obs.bins == 8 and obs.dtype == torch.int8 and obs.dst_nbins == 256
    assert list(dict(obs.named_buffers())) == ["eps", "histogram", "min_val", "max_val"]
    observe(obs, [1.0, 2.0])
    obs.reset_min_max_vals()
    assert obs.histogram.sum().item() == 0.0 and obs.min_val.item() == math.inf and obs.max_val.item() == -math.inf


# ----------------------------------------------------------------------------------------------
# (2) parity with torch.ao.quantization.HistogramObserver
# ----------------------------------------------------------------------------------------------
DISTRIBUTIONS = ["normal", "uniform", "lognormal", "constant", "outlier", "integers", "tiny", "positive", "with_inf"]


def make_batch(kind: str, size: int, gen: torch.Generator, scale: float) -> torch.Tensor:
    x = torch.randn(size, generator=gen)
    if kind == "uniform":
        x = torch.rand(size, generator=gen) * 2 - 0.5
    elif kind == "lognormal":
        x = x.exp()
    elif kind == "constant":
        x = torch.full((size,), float(x[0]))
    elif kind == "outlier":
        x[0] = 1e3 * float(torch.rand(1, generator=gen)) + 10
    elif kind == "integers":
        x = torch.randint(-3, 4, (size,), generator=gen).float()
    elif kind == "tiny":
        x = x * 1e-7
    elif kind == "positive":
        x = x.abs() + 1
    elif kind == "with_inf":
        x[0] = math.inf if size % 2 else -math.inf
    return x * scale


@st.composite
def observer_configs(draw):
    dtype = draw(st.sampled_from(["quint8", "qint8", "qint8", "quint8", "qint32"]))
    qscheme = draw(st.sampled_from([torch.per_tensor_affine, torch.per_tensor_symmetric]))
    reduce_range = dtype != "qint32" and draw(st.booleans())
    custom = draw(st.sampled_from([None, None, (0, 255), (-128, 127), (0, 15), (-8, 7), (-127, 127)]))
    if custom is not None:
        assume(dtype != "qint32" and (custom[0] < 0) == (dtype == "qint8"))
    assume(not (qscheme == torch.per_tensor_symmetric and reduce_range and dtype == "quint8"))
    bins = draw(st.sampled_from([1, 3, 16, 64, 128, 256, 2048]))
    kwargs = {"bins": bins, "dtype": getattr(torch, dtype), "qscheme": qscheme, "reduce_range": reduce_range}
    if custom is not None:
        kwargs.update(quant_min=custom[0], quant_max=custom[1])
    return kwargs


@st.composite
def batch_sequences(draw):
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    n = draw(st.integers(1, 4))
    return [make_batch(draw(st.sampled_from(DISTRIBUTIONS)), draw(st.integers(1, 300)), gen,
                       draw(st.sampled_from([1.0, 0.01, 30.0]))) for _ in range(n)]


def assert_same_state(obs, ref, what):
    assert_bit_exact(obs.histogram, ref.histogram, f"{what}: histogram")
    assert_bit_exact(obs.min_val, ref.min_val, f"{what}: min_val")
    assert_bit_exact(obs.max_val, ref.max_val, f"{what}: max_val")


@requires_ao
@settings(max_examples=40)
@given(kwargs=observer_configs(), xs=batch_sequences())
def test_matches_torch_ao(kwargs, xs):
    ref = ao().HistogramObserver(**kwargs)
    obs = HistogramObserver(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the +-inf notices of both observers
        for i, x in enumerate(xs):
            ref(x)
            obs(x)
            assert_same_state(obs, ref, f"after batch {i}")
    scale_ref, zp_ref = ref.calculate_qparams()
    scale, zp = obs.calculate_qparams()
    assert_bit_exact(scale, scale_ref, "scale")
    assert_bit_exact(zp, zp_ref, "zero_point")
    new_min, new_max = non_linear_param_search(obs.histogram, obs.min_val, obs.max_val, obs.dst_nbins)
    ref_min, ref_max = ref._non_linear_param_search()
    assert_bit_exact(new_min, ref_min, "search min")
    assert_bit_exact(new_max, ref_max, "search max")


@requires_ao
def test_state_dicts_interchange_with_torch_ao():
    x = torch.randn(500, generator=torch.Generator().manual_seed(0))
    ref = ao().HistogramObserver(bins=64)
    ref(x)
    obs = HistogramObserver(bins=64)
    obs.load_state_dict(ref.state_dict(), strict=True)
    assert_same_state(obs, ref, "loaded from torch.ao")
    back = ao().HistogramObserver(bins=64)
    back.load_state_dict(obs.state_dict(), strict=True)
    for a, b in zip(back.calculate_qparams(), obs.calculate_qparams()):
        assert_bit_exact(a, b, "qparams after round trip")


# ----------------------------------------------------------------------------------------------
# (3) oracle-free properties
# ----------------------------------------------------------------------------------------------
def linear_scan_search(histogram, min_val, max_val, dst_nbins):
    """torch.ao's search loop as written there (linear scans, float32 comparisons), for reference."""
    bins = histogram.numel()
    c_sum = torch.cumsum(histogram, dim=0)
    total = torch.sum(histogram).item()
    bin_width = (max_val.item() - min_val.item()) / bins
    alpha, beta, start_bin, end_bin, norm_min = 0.0, 1.0, 0, bins - 1, math.inf
    while alpha < beta and start_bin < end_bin:  # torch.ao idles on when start == end: nothing moves
        next_alpha, next_beta = alpha + 1e-5, beta - 1e-5
        left, right = start_bin, end_bin
        while left < end_bin and c_sum[left] < next_alpha * total:
            left += 1
        while right > start_bin and c_sum[right] > next_beta * total:
            right -= 1
        next_start, next_end = start_bin, end_bin
        if (left - start_bin) > (end_bin - right):
            next_start, alpha = left, next_alpha
        else:
            next_end, beta = right, next_beta
        if (next_start, next_end) == (start_bin, end_bin):
            continue
        norm = quantization_error(histogram, bin_width, next_start, next_end, dst_nbins)
        if norm > norm_min:
            break
        norm_min, start_bin, end_bin = norm, next_start, next_end
    return start_bin, end_bin


@settings(max_examples=20)
@given(counts=st.lists(st.sampled_from([0.0, 0.0, 1.0, 2.0, 7.0, 100.0, 0.0625, 1e4]), min_size=2, max_size=40))
def test_bisection_search_equals_linear_scans(counts):
    histogram = torch.tensor(counts)
    assume(histogram.sum() > 0)
    min_val, max_val = torch.tensor(-1.0), torch.tensor(2.5)
    start_bin, end_bin = linear_scan_search(histogram, min_val, max_val, 256)
    bin_width = (max_val - min_val) / len(counts)
    new_min, new_max = non_linear_param_search(histogram, min_val, max_val, 256)
    assert_bit_exact(new_min, min_val + bin_width * start_bin, "new_min")
    assert_bit_exact(new_max, min_val + bin_width * (end_bin + 1), "new_max")


@settings(max_examples=30)
@given(kwargs=observer_configs(), xs=batch_sequences())
def test_mass_range_and_qparams_properties(kwargs, xs):
    obs = HistogramObserver(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x in xs:
            obs(x)
    finite = torch.cat([x[torch.isfinite(x)] for x in xs])
    assume(finite.numel() > 0)
    assert obs.histogram.sum().item() == finite.numel()  # counts and 1/16 splits: exact in float32
    assert (obs.min_val.item(), obs.max_val.item()) == (finite.min().item(), finite.max().item())
    new_min, new_max = non_linear_param_search(obs.histogram, obs.min_val, obs.max_val, obs.dst_nbins)
    slack = (abs(obs.min_val.item()) + abs(obs.max_val.item())) * 2**-20  # min + width * bins rounds
    assert obs.min_val.item() <= new_min.item() <= new_max.item() <= obs.max_val.item() + slack
    scale, zero_point = obs.calculate_qparams()
    assert scale.item() > 0
    assert obs.quant_min <= zero_point.item() <= obs.quant_max


# ----------------------------------------------------------------------------------------------
# golden vectors recorded from torch 2.13 (tests/golden/make_histogram.py), replayed without torch.ao
# ----------------------------------------------------------------------------------------------
def test_golden_vectors():
    cases = torch.load(GOLDEN_FILE, weights_only=True)["cases"]
    assert len(cases) >= 8
    for case in cases:
        kwargs = {"bins": case["bins"], "dtype": getattr(torch, case["dtype"]),
                  "qscheme": getattr(torch, case["qscheme"]), "reduce_range": case["reduce_range"]}
        if case["custom_range"]:
            kwargs.update(quant_min=case["quant_min"], quant_max=case["quant_max"])
        obs = observe(HistogramObserver(**kwargs), *case["batches"])
        what = f"golden {case['dtype']} {case['qscheme']} bins={case['bins']}"
        assert_bit_exact(obs.histogram, case["histogram"], what)
        assert_bit_exact(obs.min_val, case["min_val"], what)
        assert_bit_exact(obs.max_val, case["max_val"], what)
        scale, zero_point = obs.calculate_qparams()
        assert_bit_exact(scale, case["scale"], what)
        assert_bit_exact(zero_point, case["zero_point"], what)


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bins": 0}, "bins must be a positive integer"),
        ({"bins": 2.5}, "bins must be a positive integer"),
        ({"bins": True}, "bins must be a positive integer"),
        ({"is_dynamic": True}, "does not support is_dynamic=True"),
        ({"qscheme": torch.per_channel_affine}, "qscheme must be one of"),
        ({"dtype": torch.float32}, "dtype must be one of"),
        ({"quant_min": 0}, "quant_min and quant_max must be given together"),
        ({"eps": 0.0}, "eps must be a positive finite number"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HistogramObserver(**kwargs)


def test_nan_input_is_rejected():
    obs = HistogramObserver(bins=4)
    with pytest.raises(ValueError, match="HistogramObserver got NaN in its input of shape \\(3,\\)"):
        obs(torch.tensor([0.0, math.nan, 1.0]))
