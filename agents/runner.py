"""The inference loop: a source thread fills a bounded queue, a worker runs the model and emits results.

Video sources keep only the latest frame (a slow model skips stale frames, counted as dropped); sensor sources
keep every sample up to the queue bound, then drop the oldest (counted). A lost source is retried with backoff
and reported as an event, never a crash.
"""

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgekit.agents.bundles import Installed
from edgekit.agents.drift import DriftMonitor
from edgekit.agents.postprocess import Task, infer_task, outputs_are_sane, postprocess
from edgekit.agents.runtimes import Session, release_freed_memory
from edgekit.agents.sources import (
    Frame,
    SourceConfig,
    SourceContext,
    SourceExhausted,
    SourceUnavailable,
    create_source,
    to_feeds,
)
from edgekit.agents.stats import InferenceStats, ModelHealth
from edgekit.errors import EdgekitError
from edgekit.manifest import TensorSpec
from edgekit.mqtt import Backoff
from edgekit.protocol import Rates, Thresholds

if TYPE_CHECKING:
    from edgekit.agents.capture import Capture
    from edgekit.agents.shadow import Shadow

log = logging.getLogger(__name__)

SENSOR_QUEUE = 1024
ERROR_EVENT_INTERVAL_S = 10.0

Report = Callable[..., None]  # report(event_type, message, level="info", **data)


@dataclass(frozen=True)
class LoadedModel:
    bundle: Installed
    session: Session


class HealthCheck:
    """The first `needed` inferences after a switch must all succeed with finite outputs."""

    def __init__(self, needed: int) -> None:
        self.needed = needed
        self.passed = 0
        self.failure: str | None = None
        self.done = threading.Event()

    def record(self, failure: str | None) -> None:
        if self.done.is_set():
            return
        if failure:
            self.failure = failure
            self.done.set()
        else:
            self.passed += 1
            if self.passed >= self.needed:
                self.done.set()


class Runner:
    def __init__(
        self,
        device_id: str,
        emit_result: Callable[[dict[str, Any], int], None],
        report: Report,
        subscribe: Callable[[str, Callable[[bytes], None]], None] | None,
    ) -> None:
        self.device_id = device_id
        self._emit_result = emit_result
        self._report = report
        self._subscribe = subscribe
        self.stats = InferenceStats()
        self.dropped = 0
        self._lock = threading.Lock()
        self._model: LoadedModel | None = None
        self._settled: LoadedModel | None = None  # the model whose first inference freed what loading it left
        self._health: HealthCheck | None = None
        self._task_setting = "auto"
        self._thresholds = Thresholds()
        self._rates = Rates()
        self._source_config: SourceConfig | None = None
        self._source_thread: threading.Thread | None = None
        self._source_stop = threading.Event()
        # Each frame with the model input its source made it for: after a switch to a model with another input,
        # frames made for the old one may still be queued or in hand, and must not reach (and fail) the new one.
        self._frames: queue.Queue[tuple[TensorSpec, Frame]] = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._work, name="inference", daemon=True)
        self._last_error_event = 0.0
        self._errors_since_event = 0
        self.model_health: ModelHealth | None = None
        self._shadow: Shadow | None = None
        self.drift = DriftMonitor(None)  # the active bundle's input drift (edgekit.agents.drift)
        self.capture: Capture | None = None  # keeps inputs the hub's capture policy asks for (agents/capture.py)
        self.latency_tap: Callable[[float], None] | None = None  # sees each live latency (agents/bench.py)

    @property
    def model(self) -> LoadedModel | None:
        return self._model

    @property
    def source_config(self) -> SourceConfig | None:
        return self._source_config

    @property
    def queue_depth(self) -> int:
        return self._frames.qsize()

    def start(self) -> None:
        self._worker.start()

    def stop(self) -> None:
        self._stop.set()
        self._stop_source()
        self._worker.join(timeout=5)

    def configure(self, task: str, thresholds: Thresholds, rates: Rates) -> None:
        self._task_setting, self._thresholds, self._rates = task, thresholds, rates

    def use_model(self, model: LoadedModel, health_checks: int | None = None) -> HealthCheck | None:
        """Switch models between two inferences; with `health_checks`, watch the next ones."""
        with self._lock:
            previous_input = self._model.bundle.manifest.inputs[0] if self._model else None
            self._model = model
            self._health = HealthCheck(health_checks) if health_checks else None
            health = self._health
            self.model_health = ModelHealth(model.bundle.id)
            self.drift = DriftMonitor.for_bundle(model.bundle)
            self._shadow = None  # it was compared with the model before; the agent starts it again if still wanted
        if self._source_config and previous_input != model.bundle.manifest.inputs[0]:
            self._restart_source()  # e.g. a serial window size follows the model's input
        return health

    @property
    def shadow(self) -> "Shadow | None":
        return self._shadow

    def use_shadow(self, shadow: "Shadow | None") -> None:
        """Run `shadow` beside the active model from the next inference on (None: no shadow)."""
        self._shadow = shadow

    def unload(self) -> None:
        """Stop inferring: no model, and its source closed (nothing to feed); use_model starts both again."""
        with self._lock:
            self._model, self._health, self.model_health, self._shadow = None, None, None, None
            self.drift = DriftMonitor(None)
        self._stop_source()

    def use_source(self, config: SourceConfig | None) -> None:
        if config == self._source_config and (config is None or self._source_thread):
            return
        self._source_config = config
        self._restart_source()

    def _restart_source(self) -> None:
        self._stop_source()
        if self._source_config is None or self._model is None:
            return
        self._source_stop = threading.Event()
        bound = 1 if self._source_kind_drops() else SENSOR_QUEUE
        self._frames = queue.Queue(maxsize=bound)
        self._source_thread = threading.Thread(
            target=self._read_source, args=(self._source_config, self._source_stop), name="source", daemon=True
        )
        self._source_thread.start()

    def _source_kind_drops(self) -> bool:
        from edgekit.agents.sources import sources

        return sources()[self._source_config.kind].drop_policy == "latest"

    def _stop_source(self) -> None:
        if self._source_thread:
            self._source_stop.set()
            self._source_thread.join(timeout=5)
            self._source_thread = None

    def _read_source(self, config: SourceConfig, stop: threading.Event) -> None:
        context = SourceContext(self.device_id, self._model.bundle.manifest.inputs[0], self._subscribe)
        try:
            source = create_source(config, context)
        except EdgekitError as error:  # e.g. a serial window that does not fit the model
            self._report("source.error", str(error), level="error", source=config.kind)
            return
        delays = Backoff(initial_s=1.0, max_s=30.0).delays()
        failing = False
        while not stop.is_set():
            try:
                source.open()
                if failing:
                    self._report("source.recovered", f"source {config.kind} is back", source=config.kind)
                    failing = False
                delays = Backoff(initial_s=1.0, max_s=30.0).delays()
                self._pump(source, stop, context.input)
            except SourceExhausted:
                self._report("source.error", f"source {config.kind} has ended", level="warning", source=config.kind)
                break
            except SourceUnavailable as error:
                if not failing:
                    # The message, not the config: a stream URL may carry a password.
                    self._report("source.error", str(error), level="warning", source=config.kind)
                failing = True
                stop.wait(next(delays))
            finally:
                source.close()

    def _pump(self, source, stop: threading.Event, made_for: TensorSpec) -> None:
        while not stop.is_set():
            frame = source.read(timeout=0.2)
            if frame is not None:
                self._enqueue((made_for, frame))

    def _enqueue(self, item: tuple[TensorSpec, Frame]) -> None:
        frames = self._frames
        while True:
            try:
                frames.put_nowait(item)
                return
            except queue.Full:
                try:
                    frames.get_nowait()
                    self.dropped += 1
                except queue.Empty:
                    pass

    def _work(self) -> None:
        next_allowed = 0.0
        while not self._stop.is_set():
            # Wait out the rate cap before taking a frame, so a latest-wins queue hands over the newest one, not
            # one that aged a whole period here; an interruptible wait, so a low cap cannot delay stop().
            if self._rates.max_fps and self._stop.wait(max(0.0, next_allowed - time.monotonic())):
                break
            try:
                made_for, frame = self._frames.get(timeout=0.2)
            except queue.Empty:
                continue
            if self._rates.max_fps:
                next_allowed = time.monotonic() + 1.0 / self._rates.max_fps
            with self._lock:
                model, health = self._model, self._health
            if model is None or made_for != model.bundle.manifest.inputs[0]:
                self.dropped += 1  # no model yet, or a frame made for the previous model's input
                continue
            failure = self._infer(model, frame)
            if health:
                health.record(failure)
            if model is not self._settled:
                self._settled = model
                # Once its first run sized the runtime's buffers: what loading it, its self-test and the model
                # before it freed goes back to the OS instead of staying resident for as long as it runs.
                release_freed_memory()

    def _infer(self, model: LoadedModel, frame: Frame) -> str | None:
        manifest = model.bundle.manifest
        try:
            feeds = to_feeds(frame, manifest.inputs[0], manifest.preprocessing)
            started = time.perf_counter()
            outputs = model.session.run(feeds)
            latency = time.perf_counter() - started
        except Exception as error:  # a bad frame or a broken model must not stop the loop
            return self._inference_failed(model, f"{type(error).__name__}: {error}")
        if not outputs_are_sane(outputs):
            return self._inference_failed(model, "the model produced NaN or infinite outputs")
        self.stats.record(latency)
        if (tap := self.latency_tap) is not None:
            tap(latency)
        task = self.task_of(model)
        result = {
            "frame_ts": frame.ts,
            "bundle": model.bundle.label,
            "latency_ms": round(latency * 1000, 3),
            "task": task,
            "source": frame.meta,
            **postprocess(task, outputs, self._thresholds, manifest.labels),
        }
        self._emit_result(result, self._rates.results_qos)
        self._observe(model, frame, feeds, outputs, latency, result)
        return None

    def _observe(self, model: LoadedModel, frame: Frame, feeds: dict[str, Any], outputs: list[Any], latency: float,
                 result: dict[str, Any]) -> None:  # fmt: skip
        """After the result went out: the model's health record, and the shadow's turn on the same input."""
        health, shadow = self.model_health, self._shadow
        if health is not None and health.bundle_id == model.bundle.id:
            health.record(latency, _top(result))
        if shadow is not None and shadow.active_id == model.bundle.id:
            shadow.offer(frame, feeds, outputs, latency, self._thresholds)
        if (drift := self.drift).bundle_id == model.bundle.id:
            drift.observe(feeds, outputs)
        if self.capture is not None:
            self.capture.consider(model, frame, feeds, result, shadow)

    def task_of(self, model: LoadedModel) -> Task:
        if self._task_setting != "auto":
            return self._task_setting
        return infer_task([o.shape for o in model.bundle.manifest.outputs])

    def _inference_failed(self, model: LoadedModel, reason: str) -> str:
        """Report the first failure, then at most one summary per interval, so a broken stream cannot flood."""
        health = self.model_health
        if health is not None and health.bundle_id == model.bundle.id:
            health.record_error()
        self._errors_since_event += 1
        now = time.monotonic()
        if now - self._last_error_event >= ERROR_EVENT_INTERVAL_S:
            self._report("inference.error", reason, level="error", bundle=model.bundle.label,
                         failures=self._errors_since_event)  # fmt: skip
            self._last_error_event, self._errors_since_event = now, 0
        return reason


def _top(result: dict[str, Any]) -> tuple[int, float] | None:
    """(class, score) of a result's best class or box, for the model's health record; None for raw outputs."""
    best = (result.get("top") or result.get("detections") or [None])[0]
    return (best.label, best.score) if best is not None else None
