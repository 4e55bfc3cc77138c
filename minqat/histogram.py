r"""HistogramObserver: a running histogram and an L2-optimal clipping range (torch's PTQ default).

torch.ao's default post-training activation observer. Where ``MinMaxObserver`` quantizes the full
observed range, this observer keeps a histogram of everything it has seen and, when asked for
qparams, *clips* outliers: it searches for the sub-range ``[new_min, new_max]`` whose uniform
quantization has the smallest L2 error over the histogram, then computes the qparams of that range
with :func:`minqat.qparams.calculate_qparams`. The search is caffe2's
``NormMinimization::NonlinearQuantizationParamsSearch``.

Step by step (the same torch ops in the same order as ``torch.ao.quantization.HistogramObserver``):

1. **First batch**: ``min_val, max_val = aminmax(x)``; ``histogram = histc(x, bins, min_val, max_val)``.
2. **Later batches**: the range grows to ``new_min = min(min_val, min(x))``, ``new_max = max(...)``; the
   batch is histogrammed over the new range. If the range changed, the old histogram is re-binned into
   it: each old bin is split into ``upsample_rate = 16`` equal parts whose mid-points are assigned to
   the new bins (:func:`upscale_histogram`); an old histogram of a single value (``min == max``) is
   moved to that value's new bin. The two histograms are added.
3. **Search** (:func:`non_linear_param_search`): cumulative sums ``cSum``; in steps of ``1e-5`` of the
   total mass, move the lower quantile ``alpha`` up or the upper one ``beta`` down (whichever side
   frees more bins), and stop at the first move that increases the L2 error
   (:func:`quantization_error`). ``new_min = min_val + bin_width * start_bin``,
   ``new_max = min_val + bin_width * (end_bin + 1)``.
4. ``(scale, zero_point) = calculate_qparams(new_min, new_max, ...)`` (numerics.md §3.3).

The L2 error of quantizing the mass of one source bin (density ``d`` = count / width) onto
``dst_nbins = 2**bits`` destination bins of width ``w`` centred at ``c_k``, with the values spread
uniformly over the source bin, is the integral ``d * ∫ (x - c_k)^2 dx = d * (e^3 - b^3) / 3`` over each
piece ``[b, e]`` (relative to ``c_k``) of the source bin inside destination bin ``k``; e.g. a histogram
whose bins coincide with the destination bins has error ``count * w^2 / 12``.

Host synchronisation: like torch's, this observer reads tensor values on the host (the ±inf test,
the range comparison, the search loop). It is a calibration tool for post-training quantization,
not meant to run inside a training step; on an accelerator every call synchronises.

Parity: histogram, ``min_val``/``max_val`` and qparams are bit-identical to torch.ao's for float32
inputs (tests/test_histogram.py). Differences, all at the boundary: bad arguments raise ``ValueError``
(torch asserts or raises ``NotImplementedError``); NaN in the input raises ``ValueError`` (torch fails
inside ``histc`` or later); inputs are cast to float32 (the buffer dtype) before anything else; the
search finds its quantile bins by bisection instead of torch's linear scans (same bins: ``cSum`` is
non-decreasing), which makes ``calculate_qparams`` far faster.

>>> obs = HistogramObserver(bins=64)
>>> _ = obs(torch.linspace(-1.0, 3.0, 1001))
>>> obs.min_val, obs.max_val
(tensor(-1.), tensor(3.))
>>> scale, zero_point = obs.calculate_qparams()
>>> zero_point  # clipped to [-1, 2.9375]: MinMaxObserver would give 64
tensor([65], dtype=torch.int32)
"""
from __future__ import annotations

import bisect
import math
import numbers
import warnings

import numpy as np
import torch
from torch import nn

from .observers import UniformQuantizationObserverBase
from .qparams import FLOAT32_EPS, PER_TENSOR_QSCHEMES, calculate_qparams

__all__ = [
    "HistogramObserver",
    "upscale_histogram",
    "combine_histograms",
    "quantization_error",
    "non_linear_param_search",
]


# ---------------------------------------------------------------------------------------------------
# step 2: merging a histogram into a wider range
# ---------------------------------------------------------------------------------------------------


def upscale_histogram(histogram: torch.Tensor, orig_min: torch.Tensor, orig_max: torch.Tensor,
                      update_min: torch.Tensor, update_max: torch.Tensor, upsample_rate: int = 16) -> torch.Tensor:
    """Re-bin ``histogram`` (over ``[orig_min, orig_max]``) into the same number of bins over the
    wider ``[update_min, update_max]``: split each bin into ``upsample_rate`` parts of equal mass and
    put each part into the new bin that holds its mid-point.

    >>> upscale_histogram(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor(0.0), torch.tensor(4.0),
    ...                   torch.tensor(0.0), torch.tensor(8.0))
    tensor([3., 7., 0., 0.])
    """
    bins = histogram.numel()
    histogram = histogram.repeat_interleave(upsample_rate) / upsample_rate  # (bins * rate,)
    bin_size = (orig_max - orig_min) / (bins * upsample_rate)
    mid_points = torch.linspace(float(orig_min), float(orig_max), bins * upsample_rate + 1,
                                dtype=torch.float32, device=histogram.device)[:-1] + 0.5 * bin_size
    boundaries = torch.linspace(float(update_min), float(update_max), bins + 1, dtype=torch.float32,
                                device=histogram.device)  # (bins + 1,)
    new_bin = torch.bucketize(mid_points, boundaries, right=True) - 1
    new_bin = new_bin.clamp(0, bins - 1)  # mid-points pushed past an edge by rounding
    return torch.bincount(new_bin, weights=histogram, minlength=bins)


def combine_histograms(orig_hist: torch.Tensor, orig_min: torch.Tensor, orig_max: torch.Tensor,
                       update_hist: torch.Tensor, update_min: torch.Tensor, update_max: torch.Tensor,
                       upsample_rate: int = 16) -> torch.Tensor:
    """``update_hist`` (over ``[update_min, update_max]``) plus ``orig_hist`` moved into that range,
    which must contain ``[orig_min, orig_max]``.

    >>> combine_histograms(torch.tensor([0.0, 0.0, 3.0, 0.0]), torch.tensor(2.0), torch.tensor(2.0),
    ...                    torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor(0.0), torch.tensor(4.0))
    tensor([1., 0., 3., 1.])
    """
    if bool((update_min == orig_min) & (update_max == orig_max)):
        return orig_hist + update_hist
    if bool(orig_min == orig_max):  # a single value: all its mass goes to the bin holding it
        bin_value = torch.sum(orig_hist)
        moved = torch.histc(orig_min, bins=orig_hist.numel(), min=float(update_min), max=float(update_max))
        return moved * bin_value + update_hist
    moved = upscale_histogram(orig_hist, orig_min, orig_max, update_min, update_max, upsample_rate)
    return update_hist + moved


# ---------------------------------------------------------------------------------------------------
# step 3: the L2 search
# ---------------------------------------------------------------------------------------------------


def _l2_norm(delta_begin: torch.Tensor, delta_end: torch.Tensor, density: torch.Tensor) -> torch.Tensor:
    """``density * ∫_{begin}^{end} x^2 dx = density * (end^3 - begin^3) / 3``."""
    norm = (delta_end * delta_end * delta_end - delta_begin * delta_begin * delta_begin) / 3
    return density * norm


def quantization_error(histogram: torch.Tensor, bin_width: float, start_bin: int, end_bin: int,
                       dst_nbins: int) -> float:
    """L2 error of quantizing ``histogram`` with source bins ``start_bin..end_bin`` mapped onto
    ``dst_nbins`` equal destination bins (values outside are clipped to the first/last one).

    ``bin_width`` is the source bin width as a Python float (torch.ao computes it in double from the
    ``.item()`` of min and max). Each source bin contributes three pieces: from its begin to the end
    of its destination bin, the whole destination bins it spans, and from the begin of its last
    destination bin to its end (:func:`_l2_norm` of each, in float32 like torch.ao).

    >>> quantization_error(torch.ones(256), 1.0, 0, 255, 256)  # 256 values, step 1: 256 / 12
    21.333330154418945
    """
    bins = histogram.numel()
    device = histogram.device
    dst_bin_width = bin_width * (end_bin - start_bin + 1) / dst_nbins
    if dst_bin_width == 0.0:
        return 0.0
    src_bin = torch.arange(bins, device=device)
    src_bin_begin = (src_bin - start_bin) * bin_width  # distances from the first destination bin
    src_bin_end = src_bin_begin + bin_width
    # the destination bins holding each source bin's begin and end (clipped to the range)
    dst_bin_of_begin = torch.clamp(torch.div(src_bin_begin, dst_bin_width, rounding_mode="floor"), 0, dst_nbins - 1)
    dst_bin_of_begin_center = (dst_bin_of_begin + 0.5) * dst_bin_width
    dst_bin_of_end = torch.clamp(torch.div(src_bin_end, dst_bin_width, rounding_mode="floor"), 0, dst_nbins - 1)
    dst_bin_of_end_center = dst_bin_of_end * dst_bin_width + dst_bin_width / 2
    density = histogram / bin_width
    half = dst_bin_width / 2
    norm = torch.zeros(bins, device=device)
    # the three pieces, added in torch.ao's order (float32 sums are not associative)
    norm += _l2_norm(src_bin_begin - dst_bin_of_begin_center, torch.ones(bins, device=device) * half, density)
    norm += (dst_bin_of_end - dst_bin_of_begin - 1) * _l2_norm(torch.tensor(-half, device=device),
                                                           torch.tensor(half, device=device), density)
    norm += _l2_norm(torch.tensor(-half, device=device), src_bin_end - dst_bin_of_end_center, density)
    return norm.sum().item()


def _fl32(v: float) -> float:
    """``v`` rounded to float32 (torch compares a float32 tensor with a Python float in float32)."""
    return float(np.float32(v))


def non_linear_param_search(histogram: torch.Tensor, min_val: torch.Tensor, max_val: torch.Tensor,
                            dst_nbins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipping range ``(new_min, new_max)`` (0-d tensors) that approximately minimises the L2
    quantization error of ``histogram`` over ``[min_val, max_val]`` (see the module docstring).

    The first change of range is always kept, even if it raises the error: the best error so far
    starts at +inf, not at the error of the full range (as in torch.ao).

    >>> histogram = torch.tensor([100.0, 100.0, 100.0, 100.0, 100.0, 100.0, 0.0, 1.0])  # an outlier
    >>> non_linear_param_search(histogram, torch.tensor(0.0), torch.tensor(8.0), 256)  # clips bin 7
    (tensor(0.), tensor(7.))
    """
    bins = histogram.numel()
    bin_width = (max_val - min_val) / bins  # 0-d float32
    bin_width_double = (max_val.item() - min_val.item()) / bins  # torch.ao's error uses this one
    total = torch.sum(histogram).item()
    c_sum = torch.cumsum(histogram, dim=0).tolist()  # non-decreasing: the scans below are bisections
    stepsize = 1e-5  # granularity of the quantiles
    alpha, beta = 0.0, 1.0  # lower / upper quantile
    start_bin, end_bin = 0, bins - 1
    norm_min = math.inf
    while alpha < beta:
        if start_bin == end_bin:  # nothing left to move (torch.ao idles on until alpha >= beta)
            break
        next_alpha, next_beta = alpha + stepsize, beta - stepsize
        # l: first bin in [start_bin, end_bin] with c_sum >= next_alpha * total (else end_bin);
        # r: last bin in [start_bin, end_bin] with c_sum <= next_beta * total (else start_bin).
        left = min(end_bin, max(start_bin, bisect.bisect_left(c_sum, _fl32(next_alpha * total))))
        right = max(start_bin, min(end_bin, bisect.bisect_right(c_sum, _fl32(next_beta * total)) - 1))
        next_start_bin, next_end_bin = start_bin, end_bin
        if (left - start_bin) > (end_bin - right):  # move the side that frees more bins
            next_start_bin, alpha = left, next_alpha
        else:
            next_end_bin, beta = right, next_beta
        if next_start_bin == start_bin and next_end_bin == end_bin:
            continue
        norm = quantization_error(histogram, bin_width_double, next_start_bin, next_end_bin, dst_nbins)
        if norm > norm_min:
            break
        norm_min, start_bin, end_bin = norm, next_start_bin, next_end_bin
    new_min = min_val + bin_width * start_bin
    new_max = min_val + bin_width * (end_bin + 1)
    return new_min, new_max


# ---------------------------------------------------------------------------------------------------
# the module
# ---------------------------------------------------------------------------------------------------


class HistogramObserver(UniformQuantizationObserverBase):
    """Running histogram of all values seen; qparams of the L2-optimal clipping range (per tensor).

    Buffers (torch.ao's names, order and shapes, so state dicts interchange): ``eps`` (1,),
    ``histogram`` (bins,), ``min_val`` and ``max_val`` (0-d, +inf / -inf until the first batch).
    ``dst_nbins = 2**bits`` of ``dtype`` (256 for 8-bit, also with ``reduce_range``) is the number of
    quantization levels the search assumes. ±inf values in the input are ignored with a warning
    (torch.ao does the same); NaN raises ``ValueError``.

    >>> obs = HistogramObserver(bins=16, dtype=torch.int8, qscheme=torch.per_tensor_symmetric)
    >>> _ = obs(torch.tensor([-1.0, 0.0, 0.5, 1.0]))
    >>> obs.calculate_qparams()  # no outlier to clip: scale = 1 / 127.5
    (tensor([0.0078]), tensor([0]))
    """

    _qschemes = PER_TENSOR_QSCHEMES
    histogram: torch.Tensor

    def __init__(
        self,
        bins: int = 2048,
        dtype: torch.dtype = torch.uint8,
        qscheme: torch.qscheme = torch.per_tensor_affine,
        reduce_range: bool = False,
        quant_min: int | None = None,
        quant_max: int | None = None,
        factory_kwargs: dict | None = None,
        eps: float = FLOAT32_EPS,
        is_dynamic: bool = False,
    ) -> None:
        if isinstance(bins, bool) or not isinstance(bins, numbers.Integral) or bins < 1:
            raise ValueError(f"bins must be a positive integer, got {bins!r}")
        if is_dynamic:
            raise ValueError("HistogramObserver does not support is_dynamic=True (dynamic quantization)")
        super().__init__(dtype, qscheme, reduce_range, quant_min, quant_max, factory_kwargs, eps, is_dynamic)
        factory_kwargs = nn.factory_kwargs(factory_kwargs)
        self.bins = int(bins)
        self.register_buffer("histogram", torch.zeros(self.bins, **factory_kwargs))  # (bins,)
        self.register_buffer("min_val", torch.tensor(float("inf"), **factory_kwargs))  # ()
        self.register_buffer("max_val", torch.tensor(float("-inf"), **factory_kwargs))  # ()
        self.dst_nbins = 2 ** torch.iinfo(self.dtype).bits
        self.upsample_rate = 16  # sub-bins per bin when re-binning, reduces the re-binning error

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        """Add ``x_orig`` to the histogram (widening its range if needed); return it unchanged."""
        if x_orig.numel() == 0:
            return x_orig
        x = x_orig.detach().to(self.min_val.dtype)
        x_min, x_max = torch.aminmax(x)
        if bool(torch.isnan(x_min) | torch.isnan(x_max)):
            raise ValueError(f"HistogramObserver got NaN in its input of shape {tuple(x_orig.shape)}")
        if bool((x_min == -math.inf) | (x_max == math.inf)):
            warnings.warn("HistogramObserver: ignoring +-inf values in the input", stacklevel=2)
            x = x[x.abs() != math.inf]
            if x.numel() == 0:
                return x_orig
            x_min, x_max = torch.aminmax(x)
        if bool((self.min_val == math.inf) | (self.max_val == -math.inf)):
            self.min_val.copy_(x_min)
            self.max_val.copy_(x_max)
            self.histogram.copy_(torch.histc(x, self.bins, min=float(x_min), max=float(x_max)))
        else:
            self._add_batch(x, x_min, x_max)
        return x_orig

    def _add_batch(self, x: torch.Tensor, x_min: torch.Tensor, x_max: torch.Tensor) -> None:
        # argument order as in torch.ao: it decides which zero wins in min(-0.0, 0.0)
        new_min, new_max = torch.min(self.min_val, x_min), torch.max(self.max_val, x_max)
        update_hist = torch.histc(x, self.bins, min=float(new_min), max=float(new_max))
        if bool((new_min == self.min_val) & (new_max == self.max_val)):
            self.histogram.copy_(self.histogram + update_hist)
            return
        combined = combine_histograms(self.histogram, self.min_val, self.max_val, update_hist, new_min,
                                      new_max, self.upsample_rate)
        self.histogram.copy_(combined)
        self.min_val.copy_(new_min)
        self.max_val.copy_(new_max)

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` of the L2-optimal clipping range (shape [1] each).

        Never observed: warns and returns ``scale = [1.0]``, ``zero_point = [0]`` like torch.ao.
        """
        if bool((self.min_val == math.inf) & (self.max_val == -math.inf)):
            warnings.warn("must run observer before calling calculate_qparams. Returning default values.",
                          stacklevel=2)
            device = self.min_val.device
            return torch.ones(1, device=device), torch.zeros(1, dtype=torch.int64, device=device)
        if self.histogram.numel() != self.bins:
            raise ValueError(f"histogram has {self.histogram.numel()} bins, the observer was built with {self.bins}")
        new_min, new_max = non_linear_param_search(self.histogram, self.min_val, self.max_val, self.dst_nbins)
        return calculate_qparams(new_min, new_max, self.quant_min, self.quant_max, self.qscheme, self.dtype,
                                 self.eps, self.has_customized_qrange)

    def reset_min_max_vals(self) -> None:
        """Forget everything observed: empty histogram, ``min_val``/``max_val`` back to +inf / -inf."""
        self.histogram.zero_()
        self.min_val.fill_(math.inf)
        self.max_val.fill_(-math.inf)

    def extra_repr(self) -> str:
        return f"bins={self.bins}, {super().extra_repr()}"
