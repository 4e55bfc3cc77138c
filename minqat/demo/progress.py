"""Epoch progress of the demo's training runs: tqdm bars on a terminal, plain lines otherwise.

A bar per run (``float``, ``minqat QAT 4-bit``, ``torch.ao QAT 4-bit``, ...) when the stream is a
terminal and tqdm (the ``demo`` extra) is installed; one line per epoch otherwise, so logs stay readable.

>>> import io
>>> out = io.StringIO()
>>> progress = EpochProgress(out)
>>> progress("float", 1, 2, {"loss": 0.5, "train_accuracy": 0.9, "test_accuracy": 0.875})
>>> out.getvalue()
'float                  epoch  1/2   loss 0.5000   train 90.00%   test 87.50%\\n'
"""
from __future__ import annotations

__all__ = ["EpochProgress"]


class EpochProgress:
    """Callable ``(run, epoch, epochs, metrics)`` after every epoch of every training run."""

    def __init__(self, stream):
        self.stream = stream
        self._bar = None
        self._tqdm = None
        if getattr(stream, "isatty", lambda: False)():
            try:
                from tqdm import tqdm
            except ImportError:  # the demo extra is partly installed: plain lines
                tqdm = None
            self._tqdm = tqdm

    def __call__(self, run: str, epoch: int, epochs: int, metrics: dict) -> None:
        summary = (f"loss {metrics['loss']:.4f}   train {metrics['train_accuracy']:.2%}   "
                   f"test {metrics['test_accuracy']:.2%}")
        if self._tqdm is None:
            print(f"{run:<22} epoch {epoch:>2}/{epochs:<3} {summary}", file=self.stream, flush=True)
            return
        if self._bar is None:
            self._bar = self._tqdm(total=epochs, desc=f"{run:<18}", unit="epoch", file=self.stream,
                                   dynamic_ncols=True, leave=True)
        self._bar.set_postfix_str(summary, refresh=False)
        self._bar.update(1)
        if epoch == epochs:
            self._bar.close()
            self._bar = None
