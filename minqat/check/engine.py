"""torch's quantized engine, pinned for the torch.ao side of a cross-check (``check``, the demo, ``bench/``).

torch.ao packs an int8 model's weights for, and runs it on, ``torch.backends.quantized.engine``; minqat's
kernels reproduce fbgemm's arithmetic (numerics.md §6.8, §7.1), while the default ``x86`` engine runs convs on
oneDNN (§7.3). Only the oracle side reads this setting: minqat's own kernels never do.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["quantized_engine"]


@contextlib.contextmanager
def quantized_engine(name: str = "fbgemm"):
    """Set ``torch.backends.quantized.engine = name`` for the block, then restore the previous engine.

    >>> with quantized_engine(torch.backends.quantized.engine):   # a no-op round trip
    ...     pass
    """
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous
