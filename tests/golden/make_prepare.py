"""Record torch.ao's prepared models into tests/golden/prepare.pt (run: python tests/golden/make_prepare.py).

Replayed by tests/test_prepare.py without torch.ao:

* ``structures``: for the residual ``Net`` of tests/test_prepare.py, after torch.ao's
  ``fuse_modules_qat + prepare_qat`` (QAT, default mapping plus the 1-d conv entries minqat maps
  by default) and after ``prepare`` (PTQ): the module tree (dotted name, class name), the
  ``state_dict`` keys with shapes and dtypes, and where the forward (pre-)hooks are.
* ``tutorials``: the issue's QM2 tutorial flow (quant -> conv -> bn -> relu -> dequant,
  ``fuse_modules_qat``, ``prepare_qat``, 3 SGD steps) per backend: the float initial weights, the
  batches, torch.ao's output at every step and its final prepared ``state_dict``; recorded with
  ``torch.set_num_threads(1)`` because torch's conv weight gradient is summed in an order that depends
  on the thread count (measured here: 1 thread vs 2 differ in the last bits of the trained weight).
  ``probe_grad`` is the plain float model's conv weight gradient on the first batch: the replay
  recomputes it to detect a CPU whose kernels sum in another order (then it skips, see the test).

Deterministic (fixed seeds); needs torch with torch.ao.quantization.
"""
from __future__ import annotations

import pathlib
import sys
import warnings

import torch

warnings.simplefilter("ignore")
ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import torch.ao.nn.quantized as tnnq  # noqa: E402
import torch.ao.quantization as tq  # noqa: E402

from tests.test_prepare import (  # noqa: E402
    NET_GROUPS,
    Net,
    _hooks,
    _probe_grad,
    _qm2,
    _state,
    _torch_mapping_with_conv1d,
    _tree,
    _tutorial,
)

OUT = pathlib.Path(__file__).with_name("prepare.pt")


def _structure(model) -> dict:
    state = [(key, shape, str(dtype)) for key, shape, dtype in _state(model)]
    return {"tree": _tree(model), "state": state, "hooks": _hooks(model)}


def structures() -> dict:
    out = {}
    for backend in ("fbgemm", "qnnpack"):
        torch.manual_seed(0)
        model = Net(tq.QuantStub, tq.DeQuantStub, tnnq.FloatFunctional).train()
        model.qconfig = tq.get_default_qat_qconfig(backend)
        fused = tq.fuse_modules_qat(model, NET_GROUPS)
        out[f"qat-{backend}"] = _structure(tq.prepare_qat(fused, mapping=_torch_mapping_with_conv1d()))
        model = Net(tq.QuantStub, tq.DeQuantStub, tnnq.FloatFunctional).eval()
        model.qconfig = tq.get_default_qconfig(backend)
        out[f"ptq-{backend}"] = _structure(tq.prepare(model))
    return out


def tutorials() -> dict:
    out = {}
    for backend in ("fbgemm", "x86", "qnnpack"):
        torch.manual_seed(0)
        model = _qm2(tq.QuantStub, tq.DeQuantStub)
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        gen = torch.Generator().manual_seed(1)
        batches = [(torch.randn(4, 1, 5, 5, generator=gen) * 3, torch.randn(4, 1, 5, 5, generator=gen))
                   for _ in range(3)]
        probe = _probe_grad(model, batches[0])
        prepared, outputs = _tutorial(model, tq.get_default_qat_qconfig(backend), tq.fuse_modules_qat,
                                      tq.prepare_qat, batches)
        out[backend] = {"initial": initial, "batches": batches, "outputs": torch.stack(outputs),
                        "final": {k: v.clone() for k, v in prepared.state_dict().items()}, "probe_grad": probe}
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.save({"torch_version": str(torch.__version__), "structures": structures(), "tutorials": tutorials()}, OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")
