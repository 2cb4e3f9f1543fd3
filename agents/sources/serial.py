"""A sensor on a serial port: `serial:/dev/ttyUSB0?baud=115200&format=csv&window=64&hop=32`.

The device writes lines of numbers (CSV `0.1,0.2,3`, or JSON `[0.1, 0.2]` / `{"values": [...]}`); values are
buffered and cut into windows of `window` values that advance by `hop`, each one a frame.
"""

import json
import time
from typing import Any, Literal

import numpy as np
from pydantic import Field

from edgekit.agents.sources import (
    Frame,
    Source,
    SourceConfig,
    SourceContext,
    SourceUnavailable,
    checked_values,
    json_values,
)
from edgekit.errors import BadInput

# A device that never sends a newline must not grow the buffer without bound.
MAX_LINE = 64 * 1024


class SerialConfig(SourceConfig):
    kind: Literal["serial"]
    path: str = Field(min_length=1, description="The port: /dev/ttyUSB0, COM3")
    baud: int = Field(115200, gt=0)
    format: Literal["csv", "json"] = "csv"
    window: int | None = Field(None, gt=0, description="Values per frame; unset: the model input's item size")
    hop: int | None = Field(None, gt=0, description="Values to advance between frames; unset: window (no overlap)")


class SerialSource(Source):
    kind = name = "serial"
    config_class = SerialConfig
    drop_policy = "none"
    config: SerialConfig

    def __init__(self, config: SerialConfig, context: SourceContext) -> None:
        super().__init__(config, context)
        self.window = config.window or int(np.prod(context.input.shape[1:]))
        self.hop = config.hop or self.window
        if self.hop > self.window:
            raise BadInput(f"serial {config.path}: hop {self.hop} is larger than window {self.window}")
        self.malformed = 0
        self._port: Any = None
        self._pending = b""
        self._values: list[float] = []

    def open(self) -> None:
        import serial

        self.close()
        try:
            self._port = serial.Serial(self.config.path, self.config.baud, timeout=0)
        except (serial.SerialException, OSError) as error:
            raise SourceUnavailable(f"serial {self.config.path}: {error}") from None
        self._pending = b""
        self._values = []

    def read(self, timeout: float) -> Frame | None:
        if self._port is None:
            raise SourceUnavailable(f"serial {self.config.path}: not open")
        deadline = time.monotonic() + timeout
        while len(self._values) < self.window:
            line = self._pop_line()
            if line is not None:
                self._add_line(line)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._receive(remaining)
        frame = Frame(np.array(self._values[: self.window], np.float32), "values", meta={"malformed": self.malformed})
        del self._values[: self.hop]
        return frame

    def close(self) -> None:
        if self._port is not None:
            self._port.close()
            self._port = None

    def _receive(self, timeout: float) -> None:
        import serial

        try:
            self._port.timeout = timeout
            # One byte waits up to `timeout`; whatever else has arrived comes with it.
            self._pending += self._port.read(max(1, self._port.in_waiting))
        except (serial.SerialException, OSError) as error:
            raise SourceUnavailable(f"serial {self.config.path}: {error}") from None

    def _pop_line(self) -> bytes | None:
        line, newline, rest = self._pending.partition(b"\n")
        if newline:
            self._pending = rest
            return line
        if len(self._pending) > MAX_LINE:
            self._pending = b""
            self.malformed += 1
        return None

    def _add_line(self, line: bytes) -> None:
        if not line.strip():
            return
        values = _parse_line(line, self.config.format)
        if values is None:
            self.malformed += 1
        else:
            self._values.extend(values)


def _parse_line(line: bytes, fmt: str) -> list[float] | None:
    """The line's values, or None when it is not a line of numbers in `fmt`."""
    try:
        text = line.decode()
        return checked_values([float(v) for v in text.split(",")]) if fmt == "csv" else json_values(json.loads(text))
    except ValueError:
        return None
