"""Inputs sent to the device over the agent's own MQTT link: `mqtt:` reads `edgekit/v1/<device_id>/input`.

A payload is JSON numbers (`[0.1, 0.2]` or `{"values": [...]}`) or an encoded image (JPEG, PNG, ...).
"""

import contextlib
import json
import queue
import threading
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
    imread_flag,
    json_values,
)
from edgekit.protocol import Topic, device_topic

DEFAULT_MAX_BYTES = 4 * 1024 * 1024


class MqttConfig(SourceConfig):
    kind: Literal["mqtt"]
    topic: str = Field(Topic.INPUT, pattern=r"^[^#+]+$", description="Suffix under edgekit/v1/<device_id>/")
    max_bytes: int = Field(DEFAULT_MAX_BYTES, gt=0, description="Larger payloads are refused unread")
    queue: int = Field(64, gt=0, description="Messages held until read; beyond it the oldest is discarded")


class MqttSource(Source):
    kind = name = "mqtt"
    config_class = MqttConfig
    drop_policy = "none"
    config: MqttConfig

    def __init__(self, config: MqttConfig, context: SourceContext) -> None:
        super().__init__(config, context)
        self.topic = device_topic(context.device_id, config.topic)
        self.malformed = 0
        self.dropped = 0
        self._queue: queue.Queue[bytes] = queue.Queue(config.queue)
        # The callback runs on the MQTT network thread, read() on the agent's; both count malformed payloads.
        self._lock = threading.Lock()
        self._open = False
        self._subscribed = False

    @classmethod
    def from_spec(cls, target: str, options: dict[str, str]) -> dict[str, Any]:
        return {"topic": target or Topic.INPUT, **options}

    def open(self) -> None:
        if self.context.subscribe is None:
            raise SourceUnavailable(f"mqtt {self.topic}: the agent has no broker connection to subscribe with")
        # The context offers no unsubscribe: subscribe once, and let close() make the callback ignore messages.
        if not self._subscribed:
            self.context.subscribe(self.topic, self._on_message)
            self._subscribed = True
        self._open = True

    def read(self, timeout: float) -> Frame | None:
        if not self._open:
            raise SourceUnavailable(f"mqtt {self.topic}: not open")
        deadline = time.monotonic() + timeout
        while True:
            try:
                payload = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                return None
            frame = self._decode(payload)
            if frame is not None:
                return frame
            self._count_malformed()

    def close(self) -> None:
        self._open = False
        while not self._queue.empty():
            self._queue.get_nowait()

    def _on_message(self, payload: bytes) -> None:
        # Decoding waits for read(): the network thread also carries commands and bundle transfers.
        if not self._open:
            return
        if len(payload) > self.config.max_bytes:
            self._count_malformed()
            return
        while True:
            try:
                self._queue.put_nowait(payload)
                return
            except queue.Full:
                self._discard_oldest()

    def _discard_oldest(self) -> None:
        with contextlib.suppress(queue.Empty):
            self._queue.get_nowait()
            self.dropped += 1

    def _count_malformed(self) -> None:
        with self._lock:
            self.malformed += 1

    def _decode(self, payload: bytes) -> Frame | None:
        meta = {"malformed": self.malformed, "dropped": self.dropped}
        try:
            data = json.loads(payload)
        except ValueError:
            return self._decode_image(payload, meta)
        try:
            return Frame(np.array(json_values(data), np.float32), "values", meta=meta)
        except ValueError:
            return None

    def _decode_image(self, payload: bytes, meta: dict[str, Any]) -> Frame | None:
        import cv2

        image = cv2.imdecode(np.frombuffer(payload, np.uint8), imread_flag(self.context.input))
        return None if image is None else Frame(image, "image", meta=meta)
