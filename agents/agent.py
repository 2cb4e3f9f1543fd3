"""The device agent: runs the active bundle on its source, reports over MQTT, converges to the desired state.

Threads: MQTT network + outbox drain (link), source + inference (runner), telemetry, and one control thread
that applies desired states in order. Everything the hub must not miss goes through the on-disk outbox.
"""

import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from edgekit import __version__
from edgekit.agents.bundles import ActiveRecord, BundleStore, Installed, semver_key, write_atomically
from edgekit.agents.link import Link
from edgekit.agents.runner import HealthCheck, LoadedModel, Runner
from edgekit.agents.runtimes import get_runtime, runtimes
from edgekit.agents.sources import parse_source
from edgekit.agents.stats import HostVitals
from edgekit.agents.store import Outbox, StoreFull
from edgekit.agents.transfer import Download
from edgekit.errors import EdgekitError
from edgekit.mqtt import Backoff, TlsFiles, parse_broker_url
from edgekit.protocol import (
    DEFAULT_MAX_PAYLOAD,
    DEVICE_ID,
    BundleRef,
    ChunkRequest,
    DesiredBundle,
    DesiredState,
    Event,
    PayloadRejected,
    ReportedState,
    Result,
    Sequenced,
    Status,
    Telemetry,
    Topic,
    UpdateState,
    decode,
    decode_chunk,
    device_topic,
    encode,
)
from edgekit.schema import StrictModel
from edgekit.selftest import run_selftest

log = logging.getLogger(__name__)

CHUNK_MAX_PAYLOAD = 4 * 1024 * 1024 + 4096
OVERFLOW_EVENT_INTERVAL_S = 10.0


class AgentSettings(StrictModel):
    device_id: str = Field(pattern=DEVICE_ID)
    broker: str
    data_dir: Path
    trust_key: Path | None = Field(None, description="Ed25519 public key bundles must be signed with")
    source: str | dict[str, Any] | None = Field(None, description="Used until config/desired names one")
    bundle: Path | None = Field(None, description="A bundle file to install and run at start-up")
    profile: str | None = None
    tls: TlsFiles | None = None
    threads: int | None = Field(None, ge=1)
    max_payload: int = Field(DEFAULT_MAX_PAYLOAD, ge=1024)
    outbox_max: int = Field(100_000, ge=10)
    telemetry_s: float = Field(5.0, gt=0)
    health_timeout_s: float = Field(120.0, gt=0)
    backoff: Backoff = Backoff()

    @model_validator(mode="after")
    def _bundle_needs_trust(self) -> "AgentSettings":
        if self.bundle is not None and self.trust_key is None:
            raise ValueError("--bundle needs --trust-key: the agent only runs bundles it can verify")
        return self


class UpdateFailed(Exception):
    def __init__(self, phase: str, reason: str) -> None:
        super().__init__(reason)
        self.phase = phase


class Agent:
    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.device_id = settings.device_id
        data = settings.data_dir
        data.mkdir(parents=True, exist_ok=True)
        self._state_path = data / "state.json"
        self.outbox = Outbox(data / "outbox.sqlite", settings.outbox_max)
        self.store = BundleStore(data)
        self._trust_key = self._load_trust_key()
        self.rejected_payloads = 0
        self._overflow_quiet = 0.0
        self._applied_rev = -1
        self._desired: DesiredState | None = None
        self._update_state = UpdateState(state="idle")
        self._download: Download | None = None
        self._jobs: queue.Queue[DesiredState | None] = queue.Queue()
        self._stop = threading.Event()
        self._stopped = False
        self._threads: list[threading.Thread] = []
        self.link = Link(
            parse_broker_url(settings.broker),
            client_id=f"edgekit-{self.device_id}",
            outbox=self.outbox,
            will=(self._topic(Topic.STATUS), encode(Status(state="offline"))),
            on_connect=self._on_connect,
            tls_files=settings.tls,
            backoff=settings.backoff,
        )
        self.runner = Runner(self.device_id, self._emit_result, self.report, self._subscribe_input)
        self._vitals = HostVitals()

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
            update=self._update_state,
        )

    def publish_state(self) -> None:
        self.link.publish_state(self._topic(Topic.STATUS), encode(self._status()))
        self.link.publish_state(self._topic(Topic.REPORTED), encode(self._reported()))

    # ---- incoming -------------------------------------------------------------------------------------------

    def _on_connect(self) -> None:
        self.publish_state()

    def _subscribe_input(self, topic: str, callback) -> None:
        self.link.subscribe(topic, lambda _topic, payload: callback(payload))

    def _reject(self, topic: str, reason: str, size: int) -> None:
        self.rejected_payloads += 1
        self.report("payload.rejected", f"{topic}: {reason}", level="warning", topic=topic, bytes=size)

    def _on_desired(self, topic: str, payload: bytes) -> None:
        try:
            desired = decode(DesiredState, payload, self.settings.max_payload)
        except PayloadRejected as error:
            self._reject(topic, str(error), len(payload))
            return
        self._jobs.put(desired)

    def _on_chunk(self, topic: str, payload: bytes) -> None:
        try:
            header, data = decode_chunk(payload, CHUNK_MAX_PAYLOAD)
        except PayloadRejected as error:
            self._reject(topic, str(error), len(payload))
            return
        download = self._download
        if download is None or header.bundle != download.ref.id:
            reason = f"chunk {header.index} of bundle {header.bundle[:12]}: no such transfer running"
            self._reject(topic, reason, len(payload))
            return
        problem = download.on_chunk(header, data)
        if problem:
            self._reject(topic, problem, len(payload))

    # ---- life cycle -----------------------------------------------------------------------------------------

    def start(self) -> None:
        self._restore()
        self.link.subscribe(self._topic(Topic.DESIRED), self._on_desired)
        self.link.subscribe(self._topic(Topic.TRANSFER_CHUNK), self._on_chunk)
        self.runner.start()
        self.link.start()
        for target, name in ((self._control, "control"), (self._telemetry, "telemetry")):
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
        self.outbox.close()

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

    def _load_trust_key(self):
        from edgekit.signing import load_public_key

        return load_public_key(self.settings.trust_key) if self.settings.trust_key else None

    def _restore(self) -> None:
        """Come back exactly where we were: the active bundle (finishing a health check that a crash cut short),
        the last desired state, and an interrupted update."""
        self._load_state()
        if self.settings.source and not (self._desired and self._desired.source):
            self.runner.use_source(parse_source(self.settings.source))
        if self._desired:
            self._apply_config(self._desired)
        if self.settings.bundle:
            self._install_local(self.settings.bundle)
        self._activate_recorded()
        if self._desired and self._desired.rev > self._applied_rev:
            self._jobs.put(self._desired)

    def _load_state(self) -> None:
        try:
            state = _SavedState.model_validate_json(self._state_path.read_bytes())
        except (OSError, ValueError):
            return
        self._applied_rev, self._desired = state.applied_rev, state.desired

    def _save_state(self) -> None:
        state = _SavedState(applied_rev=self._applied_rev, desired=self._desired)
        write_atomically(self._state_path, state.model_dump_json().encode())

    def _install_local(self, bundle_file: Path) -> None:
        """`--bundle FILE`: the bundle to start with, verified exactly like an update (needs --trust-key) and made
        active, unless an installed bundle already is: the systemd unit passes --bundle on every start, and a
        restart after an update (or a crash in its health check) must come back on what active.json names."""
        record = self.store.record()
        if record.active and self.store.has(record.active):
            log.info("--bundle %s not installed: bundle %s is already active", bundle_file, record.active[:12])
            return
        installed = self.store.install(bundle_file, self._trust_key)
        if record.active != installed.id:
            self.store.set_record(ActiveRecord(active=installed.id, previous=record.active))

    def _activate_recorded(self) -> None:
        record = self.store.record()
        for candidate, trial in ((record.active, record.trial), (record.previous, False)):
            if not candidate or not self.store.has(candidate):
                continue
            try:
                model = self._load(self.store.get(candidate))
            except UpdateFailed as error:
                self.report("update.failed", f"cannot load bundle {candidate[:12]}: {error}", level="error")
                continue
            if candidate != record.active:
                self.store.set_record(ActiveRecord(active=candidate, previous=record.active))
                self.report("update.rolled_back", f"fell back to {model.bundle.label}", level="error")
            health = self.runner.use_model(model, self._health_checks() if trial else None)
            if health:
                threading.Thread(target=self._finish_trial, args=(model, health), daemon=True).start()
            return

    def _health_checks(self) -> int:
        return self._desired.health_checks if self._desired else DesiredState(rev=0).health_checks

    # ---- control --------------------------------------------------------------------------------------------

    def _control(self) -> None:
        while (desired := self._jobs.get()) is not None:
            if desired.rev <= self._applied_rev:
                continue  # a repeat or a stale reorder: already converged
            try:
                self._converge(desired)
            except Exception as error:  # the control thread must survive anything a payload can cause
                log.exception("applying desired rev %s failed", desired.rev)
                self.report("config.rejected", f"rev {desired.rev}: {error}", level="error")

    def _converge(self, desired: DesiredState) -> None:
        if self._desired is not None and desired.rev < self._desired.rev:
            return
        self._desired = desired
        self._save_state()
        self._apply_config(desired)
        model = self.runner.model
        if desired.bundle and (model is None or model.bundle.id != desired.bundle.id):
            self._update(desired)
        self._applied_rev = desired.rev
        self._save_state()
        self.publish_state()
        self.report("config.applied", f"converged to rev {desired.rev}", rev=desired.rev)

    def _apply_config(self, desired: DesiredState) -> None:
        self.runner.configure(desired.task, desired.thresholds, desired.rates)
        if desired.source is not None:
            try:
                self.runner.use_source(parse_source(desired.source))
            except EdgekitError as error:
                self.report("config.rejected", f"source: {error}", level="error", rev=desired.rev)

    # ---- updates --------------------------------------------------------------------------------------------

    def _set_update(self, state: str, bundle: str | None, detail: str = "") -> None:
        self._update_state = UpdateState(state=state, bundle=bundle, detail=detail)
        self.link.publish_state(self._topic(Topic.REPORTED), encode(self._reported()))

    def _update(self, desired: DesiredState) -> None:
        target = desired.bundle
        current = self.runner.model
        try:
            self._check_version(target, current)
            self.report("update.started", f"updating to {target.name}@{target.version}", bundle=target.id)
            bundle_file = self._fetch(target)
            self._set_update("verifying", target.id)
            candidate = self._verify(target, bundle_file)
            self._set_update("testing", target.id)
            model = self._self_test(candidate)
        except UpdateFailed as error:
            kind = "update.refused" if error.phase == "refused" else "update.failed"
            self.report(kind, str(error), level="error", bundle=target.id, version=target.version)
            self._set_update(error.phase, target.id, str(error))
            return
        self._switch(model, current)

    def _check_version(self, target: DesiredBundle, current: LoadedModel | None) -> None:
        if current is None or target.allow_downgrade:
            return
        if semver_key(target.version) < semver_key(current.bundle.manifest.version):
            raise UpdateFailed(
                "refused",
                f"version downgrade from {current.bundle.manifest.version} to {target.version} refused "
                "(set allow_downgrade in the desired bundle to force it)",
            )

    def _fetch(self, target: BundleRef) -> Path | None:
        """The bundle file, downloaded (resuming a partial one) unless it is already installed."""
        if self.store.has(target.id):
            return None
        self._set_update("downloading", target.id)
        download = Download(self.settings.data_dir / "downloads", target, self._request_chunks)
        self._download = download
        if download.resumed_from:
            self.report("update.progress", f"resuming download at chunk {download.resumed_from}/{download.total}",
                        bundle=target.id, received=download.received_bytes)  # fmt: skip
        download.start()
        reported = 0
        while not download.finished.wait(1.0):
            if self._stop.is_set():
                raise UpdateFailed("failed", "agent stopping during download")
            download.poke()
            quarter = 4 * download.received_bytes // target.size
            if quarter > reported:
                reported = quarter
                self.report("update.progress", f"downloaded {25 * quarter}%", bundle=target.id,
                            received=download.received_bytes)  # fmt: skip
        self._download = None
        if download.error:
            raise UpdateFailed("failed", download.error)
        self.report("update.downloaded", f"{target.size} bytes received, sha256 verified", bundle=target.id)
        return download.done_path

    def _request_chunks(self, request: ChunkRequest) -> bool:
        return self.link.publish_direct(self._topic(Topic.TRANSFER_REQUEST), encode(request))

    def _verify(self, target: BundleRef, bundle_file: Path | None) -> Installed:
        if bundle_file is None:
            return self.store.get(target.id)
        if self._trust_key is None:
            raise UpdateFailed("refused", "no trust key configured (--trust-key): refusing unverifiable bundles")
        try:
            installed = self.store.install(bundle_file, self._trust_key, expected_id=target.id)
        except EdgekitError as error:
            raise UpdateFailed("refused", f"verification failed: {error}") from None
        finally:
            bundle_file.unlink(missing_ok=True)
        manifest = installed.manifest
        if (manifest.name, manifest.version) != (target.name, target.version):
            self.store.prune(self._kept_bundles())
            raise UpdateFailed(
                "refused",
                f"the bundle is {manifest.name}@{manifest.version}, desired state says {target.name}@{target.version}",
            )
        return installed

    def _load(self, installed: Installed) -> LoadedModel:
        manifest = installed.manifest
        try:
            runtime = get_runtime(manifest.runtime)
            session = runtime.load(installed.root / manifest.entrypoint, manifest.target, self.settings.threads)
        except EdgekitError as error:
            raise UpdateFailed("refused", str(error)) from None
        except Exception as error:
            raise UpdateFailed("refused", f"{manifest.runtime} cannot load {manifest.entrypoint}: {error}") from None
        return LoadedModel(installed, session)

    def _self_test(self, installed: Installed) -> LoadedModel:
        model = self._load(installed)
        try:
            outcome = run_selftest(model.session, installed.root, installed.manifest)
        except Exception as error:
            outcome_ok, detail = False, f"{type(error).__name__}: {error}"
        else:
            outcome_ok, detail = outcome.passed, outcome.detail
        self.report("update.selftest", f"self-test {'passed' if outcome_ok else 'failed'}: {detail}",
                    level="info" if outcome_ok else "error", bundle=installed.id, passed=outcome_ok)  # fmt: skip
        if not outcome_ok:
            self.store.prune(self._kept_bundles())
            raise UpdateFailed("refused", f"self-test failed: {detail}")
        return model

    def _kept_bundles(self) -> set[str]:
        record = self.store.record()
        return {b for b in (record.active, record.previous) if b}

    def _switch(self, model: LoadedModel, current: LoadedModel | None) -> None:
        previous = current.bundle.id if current else None
        self._set_update("switching", model.bundle.id)
        self.store.set_record(ActiveRecord(active=model.bundle.id, previous=previous, trial=True))
        health = self.runner.use_model(model, self._health_checks())
        self.report("update.activated", f"now running {model.bundle.label}", bundle=model.bundle.id, previous=previous)
        self.publish_state()
        self._finish_trial(model, health)

    def _finish_trial(self, model: LoadedModel, health: HealthCheck) -> None:
        """Keep the new bundle if its first inferences are healthy, otherwise go back to the previous one."""
        health.done.wait(self.settings.health_timeout_s)
        if self._stop.is_set() and not health.done.is_set():
            return  # the trial resumes after the restart
        record = self.store.record()
        if health.failure is None:
            self.store.set_record(ActiveRecord(active=model.bundle.id, previous=record.previous))
            self.store.prune({model.bundle.id, record.previous} - {None})
            detail = f"{health.passed} inferences ok"
            if not health.done.is_set():
                detail += f" (fewer than {health.needed} inputs arrived in {self.settings.health_timeout_s:g} s)"
            self.report("update.healthy", f"{model.bundle.label}: {detail}", bundle=model.bundle.id)
            self._set_update("healthy", model.bundle.id, detail)
            return
        self._roll_back(model, record, health.failure)

    def _roll_back(self, model: LoadedModel, record: ActiveRecord, reason: str) -> None:
        previous = self.store.get(record.previous) if record.previous and self.store.has(record.previous) else None
        restored = None
        if previous is not None:
            try:
                restored = self._load(previous)
            except UpdateFailed as error:
                reason += f"; the previous bundle cannot be loaded either: {error}"
        if restored:
            self.store.set_record(ActiveRecord(active=previous.id, previous=None))
            self.runner.use_model(restored)
        self.store.prune({previous.id} if previous else set())
        back = restored.bundle.label if restored else "no bundle"
        self.report("update.rolled_back", f"{model.bundle.label} failed its health check ({reason}); back to {back}",
                    level="error", bundle=model.bundle.id, reason=reason)  # fmt: skip
        self._set_update("rolled_back", model.bundle.id, reason)

    # ---- telemetry ------------------------------------------------------------------------------------------

    def _telemetry(self) -> None:
        while not self._stop.wait(self._telemetry_interval()):
            self._emit(Topic.TELEMETRY, 1, Telemetry, self._telemetry_fields())

    def _telemetry_interval(self) -> float:
        """The desired state's rate when it sets one, else the command line's."""
        desired = self._desired
        return (desired.rates.telemetry_s if desired else None) or self.settings.telemetry_s

    def _telemetry_fields(self) -> dict[str, Any]:
        p50, p95, fps, count = self.runner.stats.take()
        model = self.runner.model
        return {
            "latency_p50_ms": p50,
            "latency_p95_ms": p95,
            "fps": fps,
            "inferences": count,
            "cpu_percent": self._vitals.cpu_percent(),
            "memory_mb": self._vitals.memory_mb(),
            "temperature_c": self._vitals.temperature_c(),
            "queue_depth": self.runner.queue_depth,
            "dropped_frames": self.runner.dropped,
            "store_depth": self.outbox.depth(),
            "store_dropped": self.outbox.dropped,
            "rejected_payloads": self.rejected_payloads,
            "bundle": model.bundle.label if model else None,
        }


class _SavedState(StrictModel):
    applied_rev: int = -1
    desired: DesiredState | None = None
