"""Which elements torch's CPU kernels run in their vector loop, and which in the scalar loop that finishes.

torch's quantized elementwise kernels (``quantized::add``, ``cat``, the pooling kernels) round differently in
their vectorised loop and in the scalar loop that handles the remainder (``minqat.kernels.elementwise``), so
reproducing them bit for bit needs to know, element by element, which loop ran. That is a fixed function of the
shape, the memory layout and the thread count, computed here:

* ``add`` walks the output in memory order (TensorIterator) and runs whole blocks of ``ADD_BLOCK = 64``
  elements in its vector loop, per row piece and per thread chunk (:func:`vector_lane_mask`,
  :func:`all_vector_lanes`);
* the NHWC ``cat`` / pooling kernels run whole vectors of channels (:func:`channel_lane_mask`, with
  :func:`float_lanes` = ``Vectorized<float>::size()``).

>>> ones = lambda *s: torch.ones(s, dtype=torch.uint8)
>>> int(vector_lane_mask(ones(130), ones(130)).sum())     # two blocks of 64, then 2 scalar elements
128
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ADD_BLOCK", "GRAIN_SIZE", "vector_lane_mask", "all_vector_lanes", "channel_lane_mask", "float_lanes",
           "suggest_memory_format"]

ADD_BLOCK = 64  # elements per vector-loop step of torch's qadd (AVX2 and AVX-512 alike, measured)
GRAIN_SIZE = 32768  # at::internal::GRAIN_SIZE: below it TensorIterator runs one chunk on one thread


def suggest_memory_format(x: Tensor) -> torch.memory_format:
    """torch's ``suggest_memory_format``: channels-last for a 4-D tensor whose strides are NHWC-like.

    c10's ``is_channels_last_strides_2d``: strides must grow along C, W, H, N (ambiguous cases are NCHW).
    """
    if x.dim() != 4 or x.stride(1) == 0:
        return torch.contiguous_format
    smallest = 0
    for d in (1, 3, 2, 0):
        if x.shape[d] == 0 or x.stride(d) < smallest or (d == 0 and smallest == x.stride(1)):
            return torch.contiguous_format
        smallest = x.stride(d) * (x.shape[d] if x.shape[d] > 1 else 1)
    return torch.channels_last


def float_lanes() -> int:
    """``Vectorized<float>::size()`` of torch's CPU kernels: 16 with AVX-512, 8 with AVX2."""
    return 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8


def channel_lane_mask(channels: int, lanes: int, device=None) -> Tensor:
    """``(1, C, 1, 1)`` mask of the channels an NHWC kernel handles in whole vectors: ``c < C // lanes * lanes``."""
    c = torch.arange(channels, device=device)
    return (c < channels // lanes * lanes).view(1, channels, 1, 1)


def _output_order(x: Tensor) -> list[int]:
    """Dims from outermost to innermost in the memory of an output laid out like torch lays out ``x``'s result."""
    return [0, 2, 3, 1] if suggest_memory_format(x) == torch.channels_last else list(range(x.dim()))


def _rows_and_chunks(a: Tensor, b: Tensor, num_threads: int | None) -> tuple[list[int], int, int, int]:
    """``(order, run, n, chunk)`` of TensorIterator's walk over ``add``'s output (see ``vector_lane_mask``)."""
    order = _output_order(a)
    run = 1
    for d in reversed(order):
        if a.shape[d] == 1:
            continue
        if a.stride(d) != run or b.stride(d) != run:
            break
        run *= a.shape[d]
    n = a.numel()
    threads = torch.get_num_threads() if num_threads is None else num_threads
    chunk = n if n < GRAIN_SIZE or threads == 1 else -(-n // min(threads, -(-n // GRAIN_SIZE)))
    return order, run, n, chunk


def all_vector_lanes(a: Tensor, b: Tensor, num_threads: int | None = None) -> bool:
    """True when ``vector_lane_mask`` is all True: every row and chunk boundary falls on a whole block.

    Rows of ``run`` elements and chunks of ``chunk`` elements cut the walk into pieces whose lengths are
    all multiples of ``ADD_BLOCK`` exactly when ``run`` and ``chunk`` are (``n`` is a multiple of ``run``).
    """
    _, run, n, chunk = _rows_and_chunks(a, b, num_threads)
    return n > 0 and run % ADD_BLOCK == 0 and chunk % ADD_BLOCK == 0


def vector_lane_mask(a: Tensor, b: Tensor, num_threads: int | None = None) -> Tensor:
    """Where torch's ``quantized::add`` uses its vector loop (True) or its scalar loop (False).

    TensorIterator walks the output in memory order. Innermost dims along which ``a`` and ``b`` are contiguous
    in that order merge into rows of ``run`` elements (``run = 1``: element by element). From ``GRAIN_SIZE``
    elements on, with ``T > 1`` threads, the walk is cut into ``min(T, ceil(n / GRAIN_SIZE))`` equal chunks
    (``at::parallel_for``). Each row piece inside a chunk runs whole blocks of ``ADD_BLOCK`` elements in the
    vector loop and its remainder in the scalar loop.
    """
    order, run, n, chunk = _rows_and_chunks(a, b, num_threads)
    position = torch.arange(n, device=a.device)
    row_start, chunk_start = position // run * run, position // max(chunk, 1) * chunk
    start = torch.maximum(row_start, chunk_start)
    end = torch.minimum(row_start + run, chunk_start + chunk)
    in_vector = position - start < (end - start) // ADD_BLOCK * ADD_BLOCK
    return in_vector.view([a.shape[d] for d in order]).permute(sorted(range(a.dim()), key=order.__getitem__))
