"""A local camera through OpenCV: `camera:0` (the index), optional `width`, `height`, `fps` requests."""

from typing import Any, Literal

from pydantic import Field

from edgekit.agents.sources import Frame, Source, SourceConfig, SourceContext, SourceUnavailable


class CameraConfig(SourceConfig):
    kind: Literal["camera"]
    index: int = Field(0, ge=0, description="OpenCV device index: 0 is /dev/video0 on Linux")
    width: int | None = Field(None, gt=0, description="Requested capture width; the driver may pick another")
    height: int | None = Field(None, gt=0, description="Requested capture height; the driver may pick another")
    fps: float | None = Field(None, gt=0, description="Requested capture rate; the driver may pick another")


class CameraSource(Source):
    kind = name = "camera"
    config_class = CameraConfig
    drop_policy = "latest"
    config: CameraConfig

    def __init__(self, config: CameraConfig, context: SourceContext) -> None:
        super().__init__(config, context)
        self._capture: Any = None
        self._count = 0

    @classmethod
    def from_spec(cls, target: str, options: dict[str, str]) -> dict[str, Any]:
        return {"index": target or 0, **options}

    def open(self) -> None:
        import cv2

        self.close()
        capture = cv2.VideoCapture(self.config.index)
        if not capture.isOpened():
            capture.release()
            raise SourceUnavailable(f"camera {self.config.index}: not found / cannot open")
        requests = {
            cv2.CAP_PROP_FRAME_WIDTH: self.config.width,
            cv2.CAP_PROP_FRAME_HEIGHT: self.config.height,
            cv2.CAP_PROP_FPS: self.config.fps,
        }
        for prop, value in requests.items():
            if value is not None:
                capture.set(prop, value)
        self._capture = capture

    def read(self, timeout: float) -> Frame | None:
        # The driver paces a camera and VideoCapture.read cannot be interrupted, so `timeout` is not needed here:
        # a live camera delivers within one frame period, and a stalled one fails the read.
        if self._capture is None:
            raise SourceUnavailable(f"camera {self.config.index}: not open")
        ok, image = self._capture.read()
        if not ok:
            raise SourceUnavailable(f"camera {self.config.index}: read failed (unplugged?)")
        frame = Frame(image, "image", meta={"frame": self._count})
        self._count += 1
        return frame

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None
