"""ONNX Runtime adapter: runs `.onnx` artifacts with the execution providers the bundle asks for."""

from pathlib import Path
from typing import Any

import numpy as np

from edgekit.agents.runtimes import Runtime

CPU = "CPUExecutionProvider"


class OrtSession:
    def __init__(self, session, device: str) -> None:
        self._session = session
        self.device = device

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._session.run(None, feeds)


class OnnxRuntime(Runtime):
    name = "onnxruntime"
    module = "onnxruntime"
    install = 'pip install "edgekit[agent]" (or: pip install onnxruntime)'

    def load(self, model: Path, target: dict[str, Any], threads: int | None = None) -> OrtSession:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # Portable optimisations were applied offline; 'all' adds the layout ones that must match this machine.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        available = set(ort.get_available_providers())
        wanted = target.get("execution_providers", [CPU])
        providers = [p for p in wanted if p in available] or [CPU]
        session = ort.InferenceSession(str(model), options, providers=providers)
        return OrtSession(session, f"onnxruntime {session.get_providers()[0]}")
