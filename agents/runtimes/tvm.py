"""TVM adapter: loads a compiled `.so` with the TVM runtime and runs its Relax VM `main`."""

from pathlib import Path
from typing import Any

import numpy as np

from edgekit.agents.runtimes import Runtime


class TvmSession:
    def __init__(self, vm, device, label: str) -> None:
        self._main = vm["main"]
        self._device = device
        self.device = label

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import tvm

        result = self._main(*(tvm.runtime.tensor(array, device=self._device) for array in feeds.values()))
        outputs = [result] if hasattr(result, "numpy") else list(result)
        return [output.numpy() for output in outputs]


class TvmRuntime(Runtime):
    name = "tvm"
    module = "tvm"
    install = "pip install apache-tvm==0.25.0 apache-tvm-ffi==0.1.12"

    def load(self, model: Path, target: dict[str, Any], threads: int | None = None) -> TvmSession:
        import tvm
        from tvm import relax

        device = tvm.cuda(0) if target.get("device") == "cuda" else tvm.cpu(0)
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(model)), device)
        return TvmSession(vm, device, f"tvm {'cuda' if target.get('device') == 'cuda' else 'cpu'}")
