"""``python -m minqat demo``: quantization-aware training on real data, end to end, cross-checked.

On scikit-learn's bundled handwritten digits (1,797 real 8x8 images, no download), with a fixed seed:

1. train a small CNN -- ``QuantStub`` -> conv-BN-ReLU -> conv-BN-ReLU -> linear -> ``DeQuantStub`` -- in float;
2. for each bit setting (default 8, 4 and 2 bits): post-training quantization (``fuse_modules``,
   ``prepare``, calibration, ``convert``) and quantization-aware training (``fuse_modules_qat``,
   ``prepare_qat``, fine-tuning with BN statistics and then observers frozen at stated epochs,
   ``convert``); the int8 models run on minqat's integer kernels;
3. where torch.ao is importable, the same flow through torch.ao from the same weights and batches,
   and the agreement of the two int8 models, logit by logit.

The files follow the flow: ``data.py`` (digits, batches) -> ``model.py`` (the network, the qconfigs per
bit setting, the minqat / torch.ao switch) -> ``flow.py`` (train, PTQ, QAT, convert, evaluate, agreement)
-> ``run.py`` (the whole demo) -> ``report.py`` (JSON and tables), ``plots.py`` (``--out``),
``progress.py`` (tqdm bars or plain lines).

scikit-learn, tqdm and matplotlib form the ``demo`` extra and are imported only when the demo runs.
"""
from __future__ import annotations

from .data import INSTALL_HINT, MissingExtra
from .run import DemoConfig, onnx_hook, run_demo

__all__ = ["DemoConfig", "run_demo", "onnx_hook", "MissingExtra", "INSTALL_HINT"]
