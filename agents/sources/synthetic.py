"""Generated input shaped like the model's: `synthetic:?fps=5&seed=0`. For the fleet simulator, benchmarks and
demos — it exercises the whole agent (preprocessing, inference, results) without a camera or sensor."""

from typing import Any, Literal

import numpy as np
from pydantic import Field

from edgekit.agents.sources import Frame, Pacer, Source, SourceConfig, SourceContext, SourceUnavailable

POOL = 16


class SyntheticConfig(SourceConfig):
    kind: Literal["synthetic"]
    fps: float = Field(5.0, gt=0, le=10_000, description="Frames per second")
    seed: int = Field(0, ge=0)


class SyntheticSource(Source):
    kind = name = "synthetic"
    config_class = SyntheticConfig
    drop_policy = "latest"
    config: SyntheticConfig

    def __init__(self, config: SyntheticConfig, context: SourceContext) -> None:
        super().__init__(config, context)
        self._rng = np.random.default_rng(config.seed)
        self._pacer: Pacer | None = None
        self._pool: list[np.ndarray] = []
        self._count = 0

    @classmethod
    def from_spec(cls, target: str, options: dict[str, str]) -> dict[str, Any]:
        return dict(options)

    def open(self) -> None:
        # A few frames made once and cycled: generating a fresh random image per frame would cost more CPU than
        # many models, and a simulator or benchmark must measure the agent, not its input.
        self._pool = [self._make() for _ in range(POOL)]
        self._pacer = Pacer(self.config.fps)

    def read(self, timeout: float) -> Frame | None:
        if self._pacer is None:
            raise SourceUnavailable("synthetic source: not open")
        if not self._pacer.wait(timeout):
            return None
        self._count += 1
        return Frame(self._pool[self._count % POOL], self._kind(), meta={"frame": self._count})

    def close(self) -> None:
        self._pacer = None

    def _kind(self) -> Literal["image", "values"]:
        return "image" if self.context.input.layout in ("NCHW", "NHWC") else "values"

    def _make(self) -> np.ndarray:
        spec = self.context.input
        if self._kind() == "image":
            height, width = (spec.shape[2], spec.shape[3]) if spec.layout == "NCHW" else (spec.shape[1], spec.shape[2])
            return self._rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        return self._rng.random(int(np.prod(spec.shape[1:])), dtype=np.float32)
