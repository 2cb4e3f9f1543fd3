"""Runtime adapters: load a bundle's artifact and run it. One module per runtime, discovered at first use.

The compiler's verifier uses these same adapters on the host, so what is verified is what the device runs.
"""

import ctypes
import math
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from edgekit.errors import BadInput, OperationFailed
from edgekit.plugins import discover, installed

RELEASE_INTERVAL_S = 10.0


class Session(Protocol):
    device: str

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs in the model's output order."""


def run_batches(session: Session, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """Run every feed and join each output along its first axis (scalar outputs become one value per feed)."""
    per_feed = [session.run(feed) for feed in feeds]
    return [np.concatenate([np.atleast_1d(outputs[i]) for outputs in per_feed]) for i in range(len(per_feed[0]))]


class Runtime(ABC):
    name: ClassVar[str]
    module: ClassVar[str]  # import name of the wrapped library
    install: ClassVar[str]  # what makes it importable, for the error a device without it gets

    @classmethod
    def available(cls) -> bool:
        return installed(cls.module)

    @abstractmethod
    def load(self, model: Path, target: dict[str, Any], threads: int | None = None) -> Session:
        """Load an artifact for the device named in `target`, falling back to what this machine has."""


@cache
def runtimes() -> dict[str, type[Runtime]]:
    return discover(sys.modules[__name__], Runtime)


def get_runtime(name: str) -> Runtime:
    known = runtimes()
    if name not in known:
        raise BadInput(f"unknown runtime '{name}' (known: {', '.join(sorted(known))})")
    runtime = known[name]
    if not runtime.available():
        raise OperationFailed(
            f"runtime '{name}' needs the Python package '{runtime.module}', which is not installed: {runtime.install}"
        )
    return runtime()


def release_freed_memory() -> None:
    """Give the heap memory that is free again back to the OS (glibc's malloc_trim; nothing where there is none).

    glibc keeps what a program frees for its next allocations. Loading a model frees much of what it took (ONNX
    Runtime parses the protobuf and rewrites the graph: MobileNetV2 leaves ~15 MiB free but resident), and an agent
    that loads a model once and runs it for months would carry that along the whole time. At most one pass every
    RELEASE_INTERVAL_S: a process that runs many agents (edgekit fleet simulate) switches them all within seconds,
    and each pass walks the whole heap."""
    _release()


class _Release:
    def __init__(self) -> None:
        self._trim: Callable[[int], int] | None = getattr(ctypes.CDLL(None), "malloc_trim", None)
        self._lock = threading.Lock()
        self._last = -math.inf

    @property
    def available(self) -> bool:
        return self._trim is not None

    def __call__(self) -> None:
        if self._trim is None or time.monotonic() - self._last < RELEASE_INTERVAL_S:
            return
        if not self._lock.acquire(blocking=False):
            return  # another thread is releasing right now
        try:
            self._trim(0)
            self._last = time.monotonic()
        finally:
            self._lock.release()


_release = _Release()
