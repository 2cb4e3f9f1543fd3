"""LiteRT adapter: runs `.tflite` with `ai-edge-litert` or the older `tflite-runtime`, whichever is installed.

Integer-quantized inputs and outputs are (de)quantized here with each tensor's scale and zero point, so callers
always exchange float32 tensors in the ONNX model's layout and order.
"""

import os
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.agents.runtimes import Runtime
from edgekit.plugins import installed


def interpreter_module():
    if installed("ai_edge_litert"):
        from ai_edge_litert import interpreter
    else:
        from tflite_runtime import interpreter
    return interpreter


def _is_quantized(detail: dict) -> bool:
    """An integer tensor with a scale carries quantized reals; one without (scale 0) carries integers as they are,
    e.g. a classifier's int64 label or a scalar sample rate."""
    return detail["dtype"] != np.float32 and detail["quantization"][0] != 0


def _quantize(array: np.ndarray, detail: dict) -> np.ndarray:
    if not _is_quantized(detail):
        return array.astype(detail["dtype"], copy=False)
    scale, zero_point = detail["quantization"]
    info = np.iinfo(detail["dtype"])
    return np.clip(np.round(array / scale + zero_point), info.min, info.max).astype(detail["dtype"])


def _dequantize(array: np.ndarray, detail: dict) -> np.ndarray:
    if not _is_quantized(detail):
        return array
    scale, zero_point = detail["quantization"]
    return (array.astype(np.float32) - zero_point) * scale


class LiteSession:
    def __init__(self, interpreter, device: str, output_transpose: list[list[int] | None] | None = None) -> None:
        self._interpreter = interpreter
        self._inputs = interpreter.get_input_details()
        self._outputs = interpreter.get_output_details()
        # Per output, the permutation back to the ONNX layout where onnx2tf left it channels-last.
        self._transpose = output_transpose or [None] * len(self._outputs)
        self.device = device

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        # onnx2tf keeps the ONNX input/output order; names are not kept without flatc, so match by position.
        for detail, array in zip(self._inputs, feeds.values(), strict=True):
            self._interpreter.set_tensor(detail["index"], _quantize(array, detail))
        self._interpreter.invoke()
        outputs = [_dequantize(self._interpreter.get_tensor(d["index"]), d) for d in self._outputs]
        return [o if perm is None else np.transpose(o, perm) for o, perm in zip(outputs, self._transpose, strict=True)]


class LiteRt(Runtime):
    name = "litert"
    module = "ai_edge_litert"
    install = "pip install ai-edge-litert (or tflite-runtime)"

    @classmethod
    def available(cls) -> bool:
        return installed("ai_edge_litert") or installed("tflite_runtime")

    def load(self, model: Path, target: dict[str, Any], threads: int | None = None) -> LiteSession:
        module = interpreter_module()
        options = {"model_path": str(model), "num_threads": threads or os.cpu_count()}
        interpreter, device = module.Interpreter(**options), "litert XNNPACK CPU"
        try:
            interpreter.allocate_tensors()
        except RuntimeError as error:
            if "XNNPACK" not in str(error):
                raise
            # XNNPACK refuses some graphs it claimed (e.g. a large int8 ResNet-50's node 144); the builtin kernels
            # run every op, only slower.
            resolver = module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
            interpreter = module.Interpreter(**options, experimental_op_resolver_type=resolver)
            interpreter.allocate_tensors()
            device = "litert builtin CPU kernels (XNNPACK refused this graph)"
        return LiteSession(interpreter, device, target.get("output_transpose"))
