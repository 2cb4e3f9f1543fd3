"""A folder of images played as a clip: `folder:images/?fps=5&loop=false`, sorted by path, subfolders included.

Images are decoded as calibration decoded them (gray for a one-channel input), so the device sees the same pixels.
"""

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from edgekit.agents.sources import (
    Frame,
    Pacer,
    Source,
    SourceConfig,
    SourceContext,
    SourceExhausted,
    SourceUnavailable,
    imread_flag,
)
from edgekit.samples import IMAGE_SUFFIXES

log = logging.getLogger(__name__)


class FolderConfig(SourceConfig):
    kind: Literal["folder"]
    path: str = Field(min_length=1, description="A folder of images (the suffixes calibration accepts)")
    fps: float = Field(10.0, gt=0, description="Images per second")
    loop: bool = Field(True, description="Start again after the last image")


class FolderSource(Source):
    kind = name = "folder"
    config_class = FolderConfig
    drop_policy = "latest"
    config: FolderConfig

    def __init__(self, config: FolderConfig, context: SourceContext) -> None:
        super().__init__(config, context)
        self._files: list[Path] = []
        self._position = 0
        self._pacer: Pacer | None = None
        self.undecodable: set[str] = set()

    def open(self) -> None:
        folder = Path(self.config.path)
        if not folder.is_dir():
            raise SourceUnavailable(f"folder {folder}: not found")
        self._files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self._files:
            raise SourceUnavailable(f"folder {folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self._position = 0
        self._pacer = Pacer(self.config.fps)

    def read(self, timeout: float) -> Frame | None:
        if self._pacer is None:
            raise SourceUnavailable(f"folder {self.config.path}: not open")
        if not self._pacer.wait(timeout):
            return None
        # At most one pass: a folder whose every image is undecodable must not spin forever.
        for _ in range(len(self._files)):
            file = self._next_file()
            image = self._decode(file)
            if image is not None:
                return Frame(image, "image", meta={"file": self._relative(file)})
        raise SourceUnavailable(f"folder {self.config.path}: no decodable image")

    def close(self) -> None:
        self._pacer = None

    def _next_file(self) -> Path:
        if self._position == len(self._files):
            if not self.config.loop:
                raise SourceExhausted(f"folder {self.config.path}: all {len(self._files)} images delivered")
            self._position = 0
        file = self._files[self._position]
        self._position += 1
        return file

    def _decode(self, file: Path) -> Any:
        import cv2

        image = cv2.imread(str(file), imread_flag(self.context.input))
        if image is None and self._relative(file) not in self.undecodable:
            self.undecodable.add(self._relative(file))
            log.warning("folder %s: skipping %s (cannot decode)", self.config.path, self._relative(file))
        return image

    def _relative(self, file: Path) -> str:
        return file.relative_to(self.config.path).as_posix()
