"""A video file or stream through OpenCV: `video:clip.mp4`, `video:rtsp://camera/stream?loop=false`.

Files are paced to their frame rate (or `fps`) and loop by default; streams are paced by their sender.
"""

import math
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field

from edgekit.agents.sources import (
    Frame,
    Pacer,
    Source,
    SourceConfig,
    SourceContext,
    SourceExhausted,
    SourceUnavailable,
)

DEFAULT_FPS = 30.0


class VideoConfig(SourceConfig):
    kind: Literal["video"]
    path: str = Field(min_length=1, description="A file path, or an rtsp:// or http(s):// URL")
    loop: bool | None = Field(None, description="Start again at the end; unset: true for files, false for streams")
    fps: float | None = Field(None, gt=0, description="Pace a file to this rate; unset: the file's own rate")

    @property
    def is_stream(self) -> bool:
        return "://" in self.path


class VideoSource(Source):
    kind = name = "video"
    config_class = VideoConfig
    drop_policy = "latest"
    config: VideoConfig

    def __init__(self, config: VideoConfig, context: SourceContext) -> None:
        super().__init__(config, context)
        self._capture: Any = None
        self._pacer: Pacer | None = None
        self._index = 0
        self._where = _without_credentials(config.path)
        self._file = self._where if config.is_stream else Path(config.path).name
        self._loop = config.loop if config.loop is not None else not config.is_stream

    def open(self) -> None:
        if not self.config.is_stream and not Path(self.config.path).is_file():
            raise SourceUnavailable(f"video {self.config.path}: file not found")
        self._reopen()
        if not self.config.is_stream:
            self._pacer = Pacer(self.config.fps or _file_fps(self._capture))

    def read(self, timeout: float) -> Frame | None:
        if self._capture is None:
            raise SourceUnavailable(f"video {self._where}: not open")
        # A stream is paced by its sender (VideoCapture.read cannot honour `timeout`); a file by the pacer.
        if self._pacer is not None and not self._pacer.wait(timeout):
            return None
        ok, image = self._capture.read()
        if not ok:
            image = self._restart()
        frame = Frame(image, "image", meta={"frame": self._index, "file": self._file})
        self._index += 1
        return frame

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None

    def _reopen(self) -> None:
        import cv2

        self.close()
        capture = cv2.VideoCapture(self.config.path)
        if not capture.isOpened():
            capture.release()
            raise SourceUnavailable(f"video {self._where}: cannot open")
        self._capture = capture
        self._index = 0

    def _restart(self) -> Any:
        """The first image after the end: from the start again when looping, else the end is reported."""
        if not self._loop:
            if self.config.is_stream:
                # OpenCV cannot tell a stream that ended from one that dropped; the agent reconnects with backoff.
                raise SourceUnavailable(f"video {self._where}: stream ended or lost")
            raise SourceExhausted(f"video {self._where}: end of file")
        # Reopening rather than seeking to 0: seeking is inexact for some codecs and impossible on streams.
        self._reopen()
        ok, image = self._capture.read()
        if not ok:
            raise SourceUnavailable(f"video {self._where}: no frame after reopening")
        return image


def _file_fps(capture: Any) -> float:
    import cv2

    fps = capture.get(cv2.CAP_PROP_FPS)
    # Containers without a rate report 0 or nonsense (some report 90000, the RTP clock).
    return fps if math.isfinite(fps) and 0 < fps <= 1000 else DEFAULT_FPS


def _without_credentials(path: str) -> str:
    """A URL's password must not reach messages or frame metadata, which the agent publishes."""
    if "://" not in path:
        return path
    parts = urlsplit(path)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=host))
