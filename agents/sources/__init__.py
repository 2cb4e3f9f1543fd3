"""Input sources: where the agent's frames come from. One module per kind, discovered at first use.

A source is named on the command line by a spec string (`video:clip.mp4`, `camera:0`, `folder:images/`,
`serial:/dev/ttyUSB0?baud=115200`, `mqtt:`), or in `config/desired` by the same string or a JSON object with
`kind`. Each module declares its own pydantic config; together they form one discriminated union on `kind`.
Heavy libraries (OpenCV, pyserial) are imported when a source opens, not at discovery.
"""

import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Annotated, Any, ClassVar, Literal, Union
from urllib.parse import parse_qsl

import numpy as np
from pydantic import Field, TypeAdapter, ValidationError

from edgekit.errors import BadInput
from edgekit.manifest import TensorSpec
from edgekit.plugins import discover
from edgekit.schema import StrictModel, describe_validation_error

DropPolicy = Literal["latest", "none"]
FLOAT32_MAX = float(np.finfo(np.float32).max)


class SourceUnavailable(Exception):
    """The source cannot deliver now (camera unplugged, port gone); the agent retries with backoff."""


class SourceExhausted(Exception):
    """A finite source (a video file without `loop`) has delivered everything."""


@dataclass
class Frame:
    """One unit of input: an image (uint8 HWC, BGR or gray, as OpenCV decodes) or a numeric window (float32)."""

    data: np.ndarray
    kind: Literal["image", "values"]
    ts: float = field(default_factory=time.time)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class SourceContext:
    """What a source may need from the agent: the model input it feeds and a way to receive MQTT messages."""

    device_id: str
    input: TensorSpec
    subscribe: Callable[[str, Callable[[bytes], None]], None] | None = None


class SourceConfig(StrictModel):
    kind: str


class Source(ABC):
    kind: ClassVar[str]
    name: ClassVar[str]  # = kind: edgekit.plugins.discover keys plugins by `name`
    config_class: ClassVar[type[SourceConfig]]
    # latest: a slow model skips stale frames (video); none: every sample is kept, up to the queue bound (sensors).
    drop_policy: ClassVar[DropPolicy] = "latest"

    def __init__(self, config: SourceConfig, context: SourceContext) -> None:
        self.config = config
        self.context = context

    @classmethod
    def from_spec(cls, target: str, options: dict[str, str]) -> dict[str, Any]:
        """Config fields from the part after `kind:` and the `?key=value` options of a spec string."""
        return {"path": target, **options}

    @abstractmethod
    def open(self) -> None:
        """Acquire the device or file; raises SourceUnavailable when it is not there."""

    @abstractmethod
    def read(self, timeout: float) -> Frame | None:
        """The next frame, or None when none arrived within `timeout` seconds.

        Raises SourceUnavailable when the source was lost and SourceExhausted when a finite source ended."""

    @abstractmethod
    def close(self) -> None:
        """Release the device or file; safe to call more than once."""


@cache
def sources() -> dict[str, type[Source]]:
    return discover(sys.modules[__name__], Source)


@cache
def _config_adapter() -> TypeAdapter:
    configs = tuple(source.config_class for source in sources().values())
    return TypeAdapter(Annotated[Union[configs], Field(discriminator="kind")])


def parse_source(spec: str | dict[str, Any]) -> SourceConfig:
    """A spec string or JSON object → the kind's validated config; BadInput names the kind or field."""
    if isinstance(spec, str):
        kind, sep, rest = spec.partition(":")
        if not sep or kind not in sources():
            raise BadInput(f"source '{spec}': expected KIND:TARGET with KIND one of {', '.join(sorted(sources()))}")
        target, _, query = rest.partition("?")
        spec = {"kind": kind, **sources()[kind].from_spec(target, dict(parse_qsl(query)))}
    try:
        return _config_adapter().validate_python(spec)
    except ValidationError as error:
        raise BadInput(f"source {spec}: {describe_validation_error(error)}") from None


class Pacer:
    """Releases a recorded source's frames at `fps`, so a file plays at its own speed, not as fast as it decodes."""

    def __init__(self, fps: float) -> None:
        self.period = 1.0 / fps
        self._due = time.monotonic()

    def wait(self, timeout: float) -> bool:
        """Sleep until the next frame is due; False, after sleeping `timeout`, when it is not due by then."""
        delay = self._due - time.monotonic()
        if delay > timeout:
            time.sleep(max(timeout, 0.0))
            return False
        time.sleep(max(delay, 0.0))
        now = time.monotonic()
        # On time: keep the cadence without drift. Late (slow reader): restart it, rather than burst to catch up.
        self._due = self._due + self.period if now - self._due < self.period else now + self.period
        return True


def checked_values(values: list[float]) -> list[float]:
    """`values` unchanged; ValueError for NaN, inf or a number float32 cannot hold."""
    # Such values come from a glitching sensor or sender and would silently poison the model's output.
    if not all(abs(v) <= FLOAT32_MAX for v in values):
        raise ValueError("values must be finite float32 numbers")
    return values


def json_values(data: Any) -> list[float]:
    """The numbers of a parsed JSON `[...]` or `{"values": [...]}` (serial lines, MQTT payloads); else ValueError."""
    if isinstance(data, dict):
        data = data.get("values")
    # JSON true/false arrive as bool, which is an int subclass.
    numbers = isinstance(data, list) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in data)
    if not numbers or not data:
        raise ValueError('expected a list of numbers or {"values": [...]}')
    try:
        return checked_values([float(v) for v in data])
    except OverflowError:
        raise ValueError("values must be finite float32 numbers") from None


def create_source(config: SourceConfig, context: SourceContext) -> Source:
    return sources()[config.kind](config, context)


def imread_flag(spec: TensorSpec) -> int:
    """How to decode an image file for this input: gray for one channel, as calibration read its images."""
    import cv2

    # A decoder's own gray conversion (libpng's, JPEG's luma) differs from converting BGR afterwards.
    channels = {"NCHW": spec.shape[1:2], "NHWC": spec.shape[3:4]}.get(spec.layout)
    return cv2.IMREAD_GRAYSCALE if channels == [1] else cv2.IMREAD_COLOR


def to_feeds(frame: Frame, spec: TensorSpec, preprocessing) -> dict[str, np.ndarray]:
    """Turn a frame into the model's input exactly as compile's calibration did; ValueError when it cannot fit."""
    from edgekit.samples import image_input

    if frame.kind == "image":
        return {spec.name: image_input(frame.data, spec, preprocessing)}
    item_size = int(np.prod(spec.shape[1:]))
    if frame.data.size != item_size:
        raise ValueError(f"a window of {frame.data.size} values cannot feed input '{spec.name}' {spec.shape}")
    return {spec.name: frame.data.reshape([1, *spec.shape[1:]]).astype(spec.dtype)}
