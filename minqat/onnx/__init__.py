"""ONNX export of int8 models, checked by ONNX Runtime bit for bit.

* ``export_onnx(model, example_input, path, opset=21)`` writes a QDQ graph (``minqat.onnx.export``) of a
  converted int8 model -- or of a prepared QAT model in eval mode, through ``convert(consistent=True)``;
* ``set_requantization(model, "onnxruntime")`` makes minqat's int8 modules compute what ONNX Runtime's integer
  kernels compute for that graph (``minqat.kernels.onnxruntime``);
* ``run_onnxruntime`` / ``run_reference`` / ``compare`` / ``evaluate_onnxruntime`` run the graph and compare
  (``minqat.onnx.runtime``).

The ``onnx`` and ``onnxruntime`` packages are optional (``pip install 'minqat[onnx]'``): they are imported
when a function needs them.
"""
from .export import export_onnx
from .runtime import compare, evaluate_onnxruntime, run_onnxruntime, run_reference, set_requantization
from .trace import ExportError

__all__ = ["export_onnx", "set_requantization", "run_onnxruntime", "run_reference", "compare",
           "evaluate_onnxruntime", "ExportError"]
