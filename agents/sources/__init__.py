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

    @property
    def name(self) -> str:
        return self.config.kind


@cache
def sources() -> dict[str, type[Source]]:
    found = discover(sys.modules[__name__], Source)
    return {source.kind: source for source in found.values()}


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


def create_source(config: SourceConfig, context: SourceContext) -> Source:
    return sources()[config.kind](config, context)


def to_feeds(frame: Frame, spec: TensorSpec, preprocessing) -> dict[str, np.ndarray]:
    """Turn a frame into the model's input exactly as compile's calibration did; ValueError when it cannot fit."""
    from edgekit.calibration import preprocess_image, resolve_preprocessing

    if frame.kind == "image":
        if spec.layout not in ("NCHW", "NHWC"):
            raise ValueError(f"an image frame cannot feed input '{spec.name}' {spec.shape} (layout {spec.layout})")
        height, width = (spec.shape[2], spec.shape[3]) if spec.layout == "NCHW" else (spec.shape[1], spec.shape[2])
        prep = resolve_preprocessing(preprocessing, spec)
        image = frame.data
        if prep.color == "gray" and image.ndim == 3:
            image = image.mean(axis=2).astype(np.uint8)
        elif prep.color != "gray" and image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        item = preprocess_image(image, height, width, prep)
        if spec.layout == "NCHW":
            item = item.transpose(2, 0, 1)
        return {spec.name: np.ascontiguousarray(item[None], dtype=spec.dtype)}
    item_size = int(np.prod(spec.shape[1:]))
    if frame.data.size != item_size:
        raise ValueError(f"a window of {frame.data.size} values cannot feed input '{spec.name}' {spec.shape}")
    return {spec.name: frame.data.reshape([1, *spec.shape[1:]]).astype(spec.dtype)}
