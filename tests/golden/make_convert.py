"""Record torch.ao's converted int8 models into tests/golden/convert.pt (run: python tests/golden/make_convert.py).

Replayed by tests/test_convert.py (``test_golden_converted_models``) without torch.ao. For each model of
``GOLDEN_MODELS`` (the tutorial's QM2, two small ResNets, a chain with a ``FloatFunctional.cat`` block):

* ``prepared``: torch.ao's prepared ``state_dict`` after ``fuse_modules_qat + prepare_qat`` and two SGD
  steps, in eval mode (loads into minqat's prepared twin with ``strict=True``);
* ``modules``: for every int8 module of torch.ao's converted model (engine ``fbgemm``), what minqat's twin
  must hold, under minqat's attribute names: ``weight_int``, ``weight_scale`` (float32), ``weight_zero_point``,
  ``bias_float``, ``scale``, ``zero_point`` (Quantize: its ``(1,)`` buffers);
* ``x``, ``output``: an input whose Quantize integers lie in [0, 127] and torch.ao's float output;
* ``layers``: every module's int8 output (``int_repr``, scale, zero point) on ``x`` (Identity modules, the
  fused-away BN / ReLU, left out: they repeat their input).

Plain tensors, floats and ints only (no quantized tensors). Deterministic (fixed seeds, one thread);
needs torch with torch.ao.quantization.
"""
from __future__ import annotations

import pathlib
import sys
import warnings

import torch

warnings.simplefilter("ignore")
ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import torch.ao.quantization as tq  # noqa: E402

from tests.test_convert import (  # noqa: E402
    GOLDEN_MODELS,
    float_models,
    quantizable_input,
    record,
    train_torch_ao,
)
from tests.test_quantized_modules import quantized_engine, torch_weight_parts  # noqa: E402

OUT = pathlib.Path(__file__).with_name("convert.pt")


def _expected_module(mod) -> dict:
    parts = {}
    if callable(getattr(mod, "weight", None)):
        w_int, w_scale, w_zp = torch_weight_parts(mod)
        assert torch.equal(w_scale.float().double(), w_scale), "weight scales must be float32 values"
        parts.update(weight_int=w_int, weight_scale=w_scale.float(), weight_zero_point=w_zp)
        if mod.bias() is not None:
            parts["bias_float"] = mod.bias().detach().clone()
    if isinstance(mod.scale, torch.Tensor):  # Quantize
        parts.update(scale=mod.scale.clone(), zero_point=mod.zero_point.clone())
    else:
        parts.update(scale=float(mod.scale), zero_point=int(mod.zero_point))
    return parts


def converted(name: str) -> dict:
    build, qconfig_name, input_shape, classes = GOLDEN_MODELS[name]
    _, float_theirs = float_models(build, seed=0)
    prepared = train_torch_ao(float_theirs, qconfig_name, input_shape, classes, seed=0)
    state = {key: value.clone() for key, value in prepared.state_dict().items()}
    with quantized_engine("fbgemm"):
        int8 = tq.convert(prepared)
        x = quantizable_input(int8, (2,) + tuple(input_shape[1:]), seed=1)
        outputs = record(int8)
        output = int8(x)
    modules_by_name = dict(int8.named_modules())
    layers = {key: {"int_repr": out.int_repr().contiguous(), "scale": out.q_scale(), "zero_point": out.q_zero_point()}
              for key, out in outputs.items() if isinstance(out, torch.Tensor) and out.is_quantized
              and type(modules_by_name[key]) is not torch.nn.Identity}  # an Identity repeats its input
    modules = {key: _expected_module(mod) for key, mod in int8.named_modules() if hasattr(mod, "scale")}
    return {"prepared": state, "modules": modules, "x": x, "output": output, "layers": layers}


def main() -> None:
    torch.set_num_threads(1)
    torch.save({name: converted(name) for name in sorted(GOLDEN_MODELS)}, OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
