"""The device agent: runs the active bundle on its source, reports over MQTT, converges to the desired state.

Threads: MQTT network + outbox drain (link), source + inference (runner), telemetry, and one control thread
that applies desired states in order. Everything the hub must not miss goes through the on-disk outbox.

`Agent` is the life cycle around the parts: the desired state (queued, persisted, converged to), the config it
applies, the messages it queues. Updates are the `Updater`'s (updater.py), telemetry the `TelemetryLoop`'s
(telemetry.py). The link to the hub and the way bundles are fetched are injected (`Link`, `BundleFetcher`); by
default MQTT (`MqttLink`) and chunks over it (`ChunkFetcher`); `MemoryLink` (memory.py) runs it without a broker.
"""

import logging
import math
import queue
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import Field, model_validator

from edgekit import __version__
from edgekit.agents.bench import run_job
from edgekit.agents.bundles import BundleStore, write_atomically
from edgekit.agents.capture import Capture, Spool, Uploader
from edgekit.agents.configure import ConfigRefused, check_config, keep_previous
from edgekit.agents.http_fetch import HttpFetcher
from edgekit.agents.link import Link, MqttLink
from edgekit.agents.runner import Runner
from edgekit.agents.runtimes import runtimes
from edgekit.agents.sources import parse_source
from edgekit.agents.store import Outbox, StoreClosed, StoreFull
from edgekit.agents.telemetry import TelemetryLoop
from edgekit.agents.transfer import (
    DEADLINE_BASE_S,
    DEADLINE_MIN_RATE,
    DEFAULT_RETRIES,
    BundleFetcher,
    ChunkFetcher,
)
from edgekit.agents.trust import DeviceTrust
from edgekit.agents.updater import Updater
from edgekit.errors import EdgekitError
from edgekit.mqtt import Backoff, TlsFiles, parse_broker_url
from edgekit.protocol import (
    DEFAULT_MAX_PAYLOAD,
    DEVICE_ID,
    ConfigState,
    DesiredState,
    Event,
    PayloadRejected,
    ReportedState,
    Result,
    Sequenced,
    Status,
    Telemetry,
    Topic,
    device_topic,
    encode,
)
from edgekit.schema import StrictModel
from edgekit.trust import BenchStatement, Untrusted, decode_chain

log = logging.getLogger(__name__)

OVERFLOW_EVENT_INTERVAL_S = 10.0


class AgentSettings(StrictModel):
    device_id: str = Field(pattern=DEVICE_ID)
    broker: str = Field(description="mqtt:// or mqtts:// URL; unused when the Agent is given its link")
    data_dir: Path
    trust_key: Path | None = Field(None, description="Ed25519 public key bundles must be signed with")
    hub_key: Path | None = Field(None, description="Ed25519 public key of the hub, which signs desired states")
    trust_version: int = Field(0, ge=0, description="The trust root version hub_key and trust_key are from")
    source: str | dict[str, Any] | None = Field(None, description="Used until config/desired names one")
    bundle: Path | None = Field(None, description="A bundle file to install and run at start-up")
    profile: str | None = None
    tls: TlsFiles | None = None
    threads: int | None = Field(None, ge=1)
    max_payload: int = Field(DEFAULT_MAX_PAYLOAD, ge=1024)
    outbox_max: int = Field(100_000, ge=10)
    telemetry_s: float = Field(5.0, gt=0)
    health_timeout_s: float = Field(120.0, gt=0)
    update_deadline_s: float | None = Field(
        None, gt=0, description="Seconds of downloading an update may take, summed over restarts; unset: "
        f"{DEADLINE_BASE_S:g} s plus the bundle at {DEADLINE_MIN_RATE // 1024} KiB/s"
    )  # fmt: skip
    update_retries: int = Field(DEFAULT_RETRIES, ge=0, description="Retries in a row without a good chunk")
    backoff: Backoff = Backoff()

    @model_validator(mode="after")
    def _bundle_needs_trust(self) -> "AgentSettings":
        if self.bundle is not None and self.trust_key is None:
            raise ValueError("--bundle needs --trust-key: the agent only runs bundles it can verify")
        return self


class Agent:
    def __init__(self, settings: AgentSettings, link: Link | None = None, fetcher: BundleFetcher | None = None) -> None:
        """`link` and `fetcher` default to MQTT to `settings.broker` and bundle chunks over that link."""
        self.settings = settings
        self.device_id = settings.device_id
        data = settings.data_dir
        data.mkdir(parents=True, exist_ok=True)
        self._state_path = data / "state.json"
        self.outbox = Outbox(data / "outbox.sqlite", settings.outbox_max)
        self.store = BundleStore(data)
        self.rejected_payloads = 0
        self._overflow_quiet = 0.0
        self._applied_rev = -1
        self._desired: DesiredState | None = None
        self._config: ConfigState | None = None  # what became of the last desired state's configuration
        self._jobs: queue.Queue[_Job | BenchStatement | None] = queue.Queue()  # for the control thread
        self.trust = DeviceTrust(data, settings.hub_key, settings.trust_key, settings.trust_version)
        self._parked: bytes | None = None  # the last desired state signed by a key this device may learn next
        self._stop = threading.Event()
        self._stopped = False
        self._threads: list[threading.Thread] = []
        self.link = link if link is not None else self._mqtt_link()
        self.runner = Runner(self.device_id, self._emit_result, self.report, self._subscribe_input)
        self.capture = self.runner.capture = Capture(Spool(data / "spool.sqlite"), self.report)
        if fetcher is None:
            chunks = ChunkFetcher(self.link, self.device_id, data / "downloads", self._reject)
            fetcher = HttpFetcher(chunks, data / "downloads", settings.tls.ca if settings.tls else None)
        self.updater = Updater(self.store, self.runner, fetcher, self, self._stop, self.trust.bundle_keys,
                               settings.threads, settings.health_timeout_s, settings.update_deadline_s,
                               settings.update_retries)  # fmt: skip
        self.telemetry = TelemetryLoop(self.runner, self.outbox, lambda: self.rejected_payloads)
        self.uploader = Uploader(self.capture.spool, self.link, self.outbox, self.device_id, self._stop)

    def _mqtt_link(self) -> MqttLink:
        settings = self.settings
        link = MqttLink(
            parse_broker_url(settings.broker),
            client_id=f"edgekit-{self.device_id}",
            will=(self._topic(Topic.STATUS), encode(Status(state="offline"))),
            tls_files=settings.tls,
            backoff=settings.backoff,
        )
        link.watch_downlink(self._topic(Topic.PROBE))
        return link

    # ---- outgoing -------------------------------------------------------------------------------------------

    def _topic(self, name: str) -> str:
        return device_topic(self.device_id, name)

    def _emit(self, kind: str, qos: int, payload: type[Sequenced], fields: dict[str, Any]) -> int:
        """Queue one sequenced message; the outbox assigns its seq inside the write transaction."""

        def build(seq: int) -> bytes:
            return encode(payload(seq=seq, ts=time.time(), **fields))

        overflows = self.outbox.overflows
        try:
            seq, dropped = self.outbox.append(kind, self._topic(kind), qos, build)
        except StoreFull as error:  # a full disk must not stop the inference or telemetry thread
            log.error("%s", error)
            return 0
        except StoreClosed:  # a thread still finishing while the agent stops: the log has the message
            log.debug("agent stopped: %s message not queued", kind)
            return 0
        if dropped:
            log.warning("outbox full: dropped %d oldest messages", dropped)
        if self.outbox.overflows > overflows and kind != Topic.EVENTS and time.monotonic() >= self._overflow_quiet:
            self._overflow_quiet = time.monotonic() + OVERFLOW_EVENT_INTERVAL_S  # one event per interval, no flood
            self.report("store.overflow", "disk full: dropped the oldest queued messages", level="warning",
                        dropped=dropped, total_dropped=self.outbox.dropped, not_queued=self.outbox.lost)  # fmt: skip
        self.link.notify()
        return seq

    def report(self, type: str, message: str, level: str = "info", **data: Any) -> None:
        """Queue an event; also logged, so a device without a broker still has a trail."""
        log.log(logging.WARNING if level != "info" else logging.INFO, "%s: %s", type, message)
        self._emit(Topic.EVENTS, 1, Event, {"type": type, "level": level, "message": message, "data": data})

    def _emit_result(self, fields: dict[str, Any], qos: int) -> None:
        self._emit(Topic.RESULTS, qos, Result, fields)

    def _emit_telemetry(self, fields: dict[str, Any]) -> None:
        self._emit(Topic.TELEMETRY, 1, Telemetry, fields)

    def _status(self) -> Status:
        model = self.runner.model
        return Status(
            state="online",
            agent_version=__version__,
            profile=self.settings.profile,
            runtimes=sorted(name for name, rt in runtimes().items() if rt.available()),
            bundle=model.bundle.ref if model else None,
        )

    def _reported(self) -> ReportedState:
        desired = self._desired
        model = self.runner.model
        record = self.store.record()
        previous = self.store.get(record.previous).ref if record.previous and self.store.has(record.previous) else None
        source = self.runner.source_config
        return ReportedState(
            rev=self._applied_rev,
            bundle=model.bundle.ref if model else None,
            previous_bundle=previous,
            source=source.model_dump() if source else None,
            task=desired.task if desired else "auto",
            thresholds=desired.thresholds if desired else DesiredState(rev=0).thresholds,
            rates=desired.rates if desired else DesiredState(rev=0).rates,
            update=self.updater.state,
            shadow=self.updater.shadow_state,
            config=self._config,
        )

    def publish_state(self) -> None:
        self.link.publish_state(self._topic(Topic.STATUS), encode(self._status()))
        self.publish_reported()

    def publish_reported(self) -> None:
        self.link.publish_state(self._topic(Topic.REPORTED), encode(self._reported()))

    # ---- incoming -------------------------------------------------------------------------------------------

    def _subscribe_input(self, topic: str, callback) -> None:
        self.link.subscribe(topic, lambda _topic, payload: callback(payload))

    def _reject(self, topic: str, reason: str, size: int) -> None:
        self.rejected_payloads += 1
        self.report("payload.rejected", f"{topic}: {reason}", level="warning", topic=topic, bytes=size)

    def _on_desired(self, topic: str, payload: bytes) -> None:
        if not payload:
            return  # a retained desired state being cleared
        try:
            statement = self.trust.open_desired(payload, self.device_id, self.settings.max_payload)
        except PayloadRejected as error:
            self._reject(topic, str(error), len(payload))
            return
        except Untrusted as error:
            self._parked = payload  # the root that trusts its key may be on its way (config/trust)
            self.report("config.rejected", f"desired state refused: {error}", level="error")
            return
        self._jobs.put(_Job(statement.desired, statement.expires))

    def _on_bench(self, topic: str, payload: bytes) -> None:
        try:
            statement = self.trust.open_bench(payload, self.device_id, self.settings.max_payload)
        except PayloadRejected as error:
            self._reject(topic, str(error), len(payload))
        except Untrusted as error:
            self.report("bench.failed", f"benchmark job refused: {error}", level="error", reason=str(error))
        else:
            self._jobs.put(statement)

    def _on_trust(self, topic: str, payload: bytes) -> None:
        if not payload:
            return
        try:
            root = self.trust.accept(decode_chain(payload))
        except Untrusted as error:
            self.report("trust.rejected", f"{topic}: {error}; keeping {self.trust.describe()}", level="error")
            return
        if root is None:
            return
        self.report("trust.updated", f"now trusting {root.describe()}", version=root.version)
        parked, self._parked = self._parked, None
        if parked is not None:
            self._on_desired(self._topic(Topic.DESIRED), parked)

    # ---- life cycle -----------------------------------------------------------------------------------------

    def start(self) -> None:
        self._restore()
        # Trust first: a broker sends retained messages in the order of the subscriptions, and a desired state
        # may be signed by the key the newest root introduces.
        self.link.subscribe(self._topic(Topic.TRUST), self._on_trust)
        self.link.subscribe(self._topic(Topic.DESIRED), self._on_desired)
        self.link.subscribe(self._topic(Topic.BENCH), self._on_bench)
        self.runner.start()
        self.uploader.start()
        self.link.start(self.outbox, on_connect=self.publish_state)
        telemetry = lambda: self.telemetry.run(self._stop, self._telemetry_interval, self._emit_telemetry)  # noqa: E731
        for target, name in ((self._control, "control"), (telemetry, "telemetry")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        active = self.runner.model
        self.report("agent.started", f"agent {__version__} started", bundle=active.bundle.label if active else None)

    def stop(self) -> None:
        """Stop cleanly: publish `offline`, flush what can be flushed; safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        self.report("agent.stopping", "agent stopping")
        self._stop.set()
        self._jobs.put(None)
        self.runner.stop()
        for thread in self._threads:
            thread.join(timeout=10)
        self._flush(timeout=3)
        self.link.stop(goodbye=(self._topic(Topic.STATUS), encode(Status(state="offline"))))
        self.uploader.join(timeout=5)
        self.outbox.close()
        self.capture.spool.close()

    def _flush(self, timeout: float) -> None:
        """Give queued messages a moment to leave; whatever stays is sent after the next start."""
        deadline = time.monotonic() + timeout
        while self.link.connected and self.outbox.depth() and time.monotonic() < deadline:
            time.sleep(0.05)

    def run_forever(self) -> None:
        self.start()
        try:
            self._stop.wait()
        finally:
            if not self._stop.is_set():
                self.stop()

    def _restore(self) -> None:
        """Come back exactly where we were: the active bundle (finishing a health check that a crash cut short),
        the last desired state, and an interrupted update."""
        self._load_state()
        if self.settings.source and not (self._desired and self._desired.source):
            self.runner.use_source(parse_source(self.settings.source))
        if self._desired:
            self._apply_config(self._desired)
        if self.settings.bundle:
            self.updater.install_local(self.settings.bundle)
        self.updater.activate_recorded(self._health_checks())
        if self._desired and self._desired.rev > self._applied_rev:
            self._jobs.put(_Job(self._desired, math.inf))  # accepted before it was saved: it does not expire

    def _load_state(self) -> None:
        try:
            state = _SavedState.model_validate_json(self._state_path.read_bytes())
        except (OSError, ValueError):
            return
        self._applied_rev, self._desired, self._config = state.applied_rev, state.desired, state.config

    def _save_state(self) -> None:
        state = _SavedState(applied_rev=self._applied_rev, desired=self._desired, config=self._config)
        write_atomically(self._state_path, state.model_dump_json().encode())

    def _health_checks(self) -> int:
        return self._desired.health_checks if self._desired else DesiredState(rev=0).health_checks

    # ---- control --------------------------------------------------------------------------------------------

    def _control(self) -> None:
        if self._desired is not None and self._desired.rev == self._applied_rev:
            self._resume_shadow(self._desired)
        while (job := self._jobs.get()) is not None:
            if isinstance(job, BenchStatement):
                self._bench(job)
                continue
            desired = job.desired
            if desired.rev == self._applied_rev:
                # The hub sends a rev again when it saw no sign of it: the report it missed goes out once more. Not
                # the status: a hub signs the desired state again for a device that says `online`.
                self.publish_reported()
                continue
            if desired.rev < self._applied_rev:
                continue  # a stale reorder or a replay: already converged
            if time.time() > job.expires:
                self.report("config.rejected", f"desired state rev {desired.rev} refused: it expired at "
                            f"{_utc(job.expires)} (replayed, or held back; the hub signs it again when the device "
                            "connects)", level="error", rev=desired.rev)  # fmt: skip
                continue
            try:
                self._converge(desired)
            except Exception as error:  # the control thread must survive anything a payload can cause
                log.exception("applying desired rev %s failed", desired.rev)
                self.report("config.rejected", f"rev {desired.rev}: {error}", level="error")

    def _converge(self, desired: DesiredState) -> None:
        if self._desired is not None and desired.rev < self._desired.rev:
            return
        self._desired = self._checked_config(desired)
        self._save_state()
        self._apply_config(self._desired)
        desired, model = self._desired, self.runner.model
        if desired.bundle and (model is None or model.bundle.id != desired.bundle.id):
            self.updater.update(desired.bundle, desired.health_checks, desired.rev)
        self.updater.set_shadow(desired.shadow, desired.rev)
        self._applied_rev = desired.rev
        self._save_state()
        self.publish_state()
        self.report("config.applied", f"converged to rev {desired.rev}", rev=desired.rev)

    def _bench(self, statement: BenchStatement) -> None:
        job = statement.job
        if time.time() > statement.expires:
            self.report("bench.failed", f"benchmark job {job.id} expired at {_utc(statement.expires)}", level="error",
                        job=job.id, bundle=job.bundle.id, reason="expired before the device took it")  # fmt: skip
            return
        # The hub judges a restart against this event: an agent.started after it means the job's run is gone.
        self.report("bench.started", f"benchmark job {job.id} ({job.bundle.name}@{job.bundle.version}) taken",
                    job=job.id, bundle=job.bundle.id)  # fmt: skip
        try:
            run_job(job, self.updater, self.runner, self.report)
        except Exception as error:  # the control thread must survive anything a payload can cause
            log.exception("benchmark job %s failed", job.id)
            self.report("bench.failed", f"benchmark job {job.id}: {error}", level="error", job=job.id,
                        bundle=job.bundle.id, reason=str(error))  # fmt: skip

    def _checked_config(self, desired: DesiredState) -> DesiredState:
        """`desired`, or, when its configuration cannot be applied here, `desired` with the configuration the device
        has now (the refusal reported, and kept for the reported state)."""
        try:
            check_config(desired, self.runner, self.device_id)
        except ConfigRefused as error:
            self._config = ConfigState(state="refused", rev=desired.rev, detail=str(error)[:2000])
            self.report("config.rejected", f"rev {desired.rev}: {error}; keeping the previous configuration",
                        level="error", rev=desired.rev)  # fmt: skip
            return keep_previous(desired, self._desired)
        self._config = ConfigState(state="applied", rev=desired.rev)
        return desired

    def _apply_config(self, desired: DesiredState) -> None:
        self.runner.configure(desired.task, desired.thresholds, desired.rates)
        self.capture.use(desired.capture)
        if desired.source is not None:
            try:
                self.runner.use_source(parse_source(desired.source))
            except EdgekitError as error:
                self.report("config.rejected", f"source: {error}", level="error", rev=desired.rev)

    def _resume_shadow(self, desired: DesiredState) -> None:
        """The shadow of the desired state converged to before a restart, back beside the active model (from the
        installed copy: a shadow only downloads again when a crash cut its download short)."""
        try:
            self.updater.set_shadow(desired.shadow, desired.rev)
        except Exception as error:  # the control thread must survive anything a payload can cause
            log.exception("resuming the shadow failed")
            self.report("config.rejected", f"shadow: {error}", level="error")

    def _telemetry_interval(self) -> float:
        """The desired state's rate when it sets one, else the command line's."""
        desired = self._desired
        return (desired.rates.telemetry_s if desired else None) or self.settings.telemetry_s


class _Job(NamedTuple):
    desired: DesiredState
    expires: float


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


class _SavedState(StrictModel):
    applied_rev: int = -1
    desired: DesiredState | None = None
    config: ConfigState | None = None
