"""Bundle updates on the device: fetch → verify → self-test → switch → health check → keep or roll back.

Every phase that fails leaves the device on a bundle it can run, says why in an event (`update.failed`,
`update.refused` or `update.rolled_back`) and shows the outcome in `config/reported` (`UpdateState`):

- fetching fails (server error, sha256 mismatch, agent stopping, the update's download deadline or retry budget
  spent) → `failed`; the old bundle keeps running, and like every outcome it converges the rev, so the next
  desired state is taken;
- the bundle cannot be trusted or is not what the desired state names, the runtime cannot load it, its self-test
  fails, or it is a downgrade that was not allowed → `refused`; the old bundle keeps running;
- its first inferences on the device's real input fail → `rolled_back` to the previous bundle (or to none when
  the previous one cannot be loaded either).
"""

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgekit.agents.bundles import ActiveRecord, BundleStore, Installed, semver_key
from edgekit.agents.runner import HealthCheck, LoadedModel, Runner
from edgekit.agents.runtimes import get_runtime
from edgekit.agents.shadow import Shadow
from edgekit.agents.transfer import (
    DEFAULT_RETRIES,
    Base,
    BundleFetcher,
    FetchFailed,
    FetchLimits,
    default_deadline_s,
)
from edgekit.delta import supported as delta_supported
from edgekit.errors import EdgekitError
from edgekit.protocol import BundleRef, DesiredBundle, DesiredShadow, ShadowState, UpdatePhase, UpdateState
from edgekit.selftest import run_selftest

log = logging.getLogger(__name__)
HEALTH_POLL_S = 0.2
SHADOW_THREADS = 1
Phase = Callable[..., None]  # phase(state, bundle_id, detail=""): an update's (or a shadow's) progress


class UpdateFailed(Exception):
    def __init__(self, phase: Literal["refused", "failed"], reason: str) -> None:
        super().__init__(reason)
        self.phase = phase


class UpdateHost(Protocol):
    """What the updater needs of the agent around it: events, and `config/reported` kept current."""

    def report(self, type: str, message: str, level: str = "info", **data: Any) -> None: ...

    def publish_state(self) -> None:
        """Status and reported state: after a switch both name another bundle."""

    def publish_reported(self) -> None:
        """The reported state alone, for a new update phase."""


class Updater:
    def __init__(
        self,
        store: BundleStore,
        runner: Runner,
        fetcher: BundleFetcher,
        host: UpdateHost,
        stopping: threading.Event,
        bundle_keys: Callable[[], list[Ed25519PublicKey]],
        threads: int | None = None,
        health_timeout_s: float = 120.0,
        deadline_s: float | None = None,
        retries: int = DEFAULT_RETRIES,
    ) -> None:
        """`bundle_keys` gives the keys a bundle may be signed with now (they change when the hub rotates them);
        `deadline_s` and `retries` bound each update's download (None: a deadline from the bundle's size)."""
        self.store = store
        self.runner = runner
        self.fetcher = fetcher
        self._host = host
        self._stopping = stopping
        self._bundle_keys = bundle_keys
        self._threads = threads
        self._health_timeout_s = health_timeout_s
        self._deadline_s = deadline_s
        self._retries = retries
        self.state = UpdateState(state="idle")
        self.shadow_state: ShadowState | None = None

    def _set_phase(self, phase: UpdatePhase, bundle: str | None, detail: str = "") -> None:
        self.state = UpdateState(state=phase, bundle=bundle, detail=detail)
        self._host.publish_reported()

    # ---- at start-up ----------------------------------------------------------------------------------------

    def install_local(self, bundle_file: Path) -> None:
        """`--bundle FILE`: the bundle to start with, verified exactly like an update (needs --trust-key) and made
        active, unless an installed bundle already is: the systemd unit passes --bundle on every start, and a
        restart after an update (or a crash in its health check) must come back on what active.json names."""
        record = self.store.record()
        if record.active and self.store.has(record.active):
            log.info("--bundle %s not installed: bundle %s is already active", bundle_file, record.active[:12])
            return
        installed = self.store.install(bundle_file, self._bundle_keys())
        if record.active != installed.id:
            self.store.set_record(ActiveRecord(active=installed.id, previous=record.active))

    def activate_recorded(self, health_checks: int) -> None:
        """Run what active.json names, falling back to the previous bundle when it cannot be loaded; a health
        check that a crash cut short starts again (in its own thread) and decides as after a switch."""
        record = self.store.record()
        for candidate, trial in ((record.active, record.trial), (record.previous, False)):
            if not candidate or not self.store.has(candidate):
                continue
            try:
                model = self._load(self.store.get(candidate))
            except UpdateFailed as error:
                self._host.report("update.failed", f"cannot load bundle {candidate[:12]}: {error}", level="error")
                continue
            if candidate != record.active:
                self.store.set_record(ActiveRecord(active=candidate, previous=record.active))
                self._host.report("update.rolled_back", f"fell back to {model.bundle.label}", level="error")
            health = self.runner.use_model(model, health_checks if trial else None)
            if health:
                threading.Thread(target=self._finish_trial, args=(model, health), daemon=True).start()
            return

    # ---- an update ------------------------------------------------------------------------------------------

    def update(self, target: DesiredBundle, health_checks: int, rev: int) -> None:
        """Go to `target` as desired state `rev` asks, or stay on the current bundle and say why; returns once the
        outcome is known."""
        current = self.runner.model
        try:
            self._check_version(target, current)
            self._host.report("update.started", f"updating to {target.name}@{target.version}", bundle=target.id)
            model = self._prepare(target, rev, current, self._set_phase)
        except UpdateFailed as error:
            self.store.prune(self._kept_bundles())  # a refused candidate leaves nothing behind
            kind = "update.refused" if error.phase == "refused" else "update.failed"
            self._host.report(kind, str(error), level="error", bundle=target.id, version=target.version)
            self._set_phase(error.phase, target.id, str(error))
            return
        self._switch(model, current, health_checks)

    def _prepare(self, target: DesiredBundle, rev: int, current: LoadedModel | None, phase: Phase,
                 threads: int | None = None) -> LoadedModel:  # fmt: skip
        """`target` fetched (unless installed), verified and self-tested: loaded (with `threads`, default the
        agent's), ready to run."""
        self._check_verifiable(target)
        bundle_file = self._fetch(target, rev, current, phase)
        phase("verifying", target.id)
        candidate = self._verify(target, bundle_file)
        phase("testing", target.id)
        return self._self_test(candidate, threads)

    @property
    def threads(self) -> int | None:
        return self._threads

    def prepare_candidate(self, target: DesiredBundle, attempt: int) -> LoadedModel:
        """`target` fetched, verified and self-tested like an update, and loaded, but not activated: a benchmark
        job's candidate (edgekit.agents.bench). `release_candidates` removes it from the store again."""
        return self._prepare(target, attempt, self.runner.model, lambda *_: None)

    def install_candidate(self, target: DesiredBundle, attempt: int) -> Installed:
        """`target` fetched and verified (signature, hashes) into the store, not loaded: a bundle of TVM tuning
        trials, which has no model to self-test. `release_candidates` removes it again."""
        self._check_verifiable(target)
        return self._verify(target, self._fetch(target, attempt, self.runner.model, lambda *_: None))

    def release_candidates(self) -> None:
        """Remove what `prepare_candidate` installed, unless it is the active, previous or shadow bundle."""
        self.store.prune(self._kept_bundles())

    def _check_version(self, target: DesiredBundle, current: LoadedModel | None) -> None:
        if current is None or target.allow_downgrade:
            return
        if semver_key(target.version) < semver_key(current.bundle.manifest.version):
            raise UpdateFailed(
                "refused",
                f"version downgrade from {current.bundle.manifest.version} to {target.version} refused "
                "(set allow_downgrade in the desired bundle to force it)",
            )

    def _check_verifiable(self, target: BundleRef) -> None:
        """Refuse before downloading what could never be verified."""
        if not self._bundle_keys() and not self.store.has(target.id):
            raise UpdateFailed("refused", "no trust key configured (--trust-key): refusing unverifiable bundles")

    def _limits(self, target: BundleRef, rev: int) -> FetchLimits:
        deadline_s = self._deadline_s if self._deadline_s is not None else default_deadline_s(target.size)
        return FetchLimits(attempt=rev, deadline_s=deadline_s, retries=self._retries)

    def _fetch(self, target: BundleRef, rev: int, current: LoadedModel | None, phase: Phase) -> Path | None:
        """The bundle file, fetched (as a delta from the running bundle of the same model, else resuming a partial
        download) unless it is already installed."""
        if self.store.has(target.id):
            return None
        phase("downloading", target.id)
        limits = self._limits(target, rev)
        try:
            fetched = self.fetcher.fetch(
                target, self._host.report, self._stopping, limits, self._delta_base(target, current)
            )
        except FetchFailed as error:
            raise UpdateFailed("failed", str(error)) from None
        how = f"a {fetched.received}-byte delta" if fetched.via == "delta" else f"{fetched.received} bytes"
        self._host.report("update.downloaded", f"{how} received over {fetched.transport.upper()}, the "
                          f"{target.size}-byte bundle's sha256 verified", bundle=target.id, via=fetched.via,
                          received=fetched.received, transport=fetched.transport)  # fmt: skip
        return fetched.path

    def _delta_base(self, target: BundleRef, current: LoadedModel | None) -> Base | None:
        """The running bundle as a delta's base when it is of the target's model and its .ekb can be rebuilt."""
        if current is None or current.bundle.manifest.name != target.name or not delta_supported():
            return None
        data = self.store.repack(current.bundle)
        return Base(current.bundle.id, data) if data is not None else None

    def _verify(self, target: BundleRef, bundle_file: Path | None) -> Installed:
        if bundle_file is None:
            return self.store.get(target.id)
        try:
            installed = self.store.install(bundle_file, self._bundle_keys(), expected_id=target.id)
        except EdgekitError as error:
            raise UpdateFailed("refused", f"verification failed: {error}") from None
        finally:
            bundle_file.unlink(missing_ok=True)
        manifest = installed.manifest
        if (manifest.name, manifest.version) != (target.name, target.version):
            raise UpdateFailed(
                "refused",
                f"the bundle is {manifest.name}@{manifest.version}, desired state says {target.name}@{target.version}",
            )
        return installed

    def _load(self, installed: Installed, threads: int | None = None) -> LoadedModel:
        manifest = installed.manifest
        try:
            runtime = get_runtime(manifest.runtime)
            session = runtime.load(installed.root / manifest.entrypoint, manifest.target, threads or self._threads)
        except EdgekitError as error:
            raise UpdateFailed("refused", str(error)) from None
        except Exception as error:
            raise UpdateFailed("refused", f"{manifest.runtime} cannot load {manifest.entrypoint}: {error}") from None
        return LoadedModel(installed, session)

    def _self_test(self, installed: Installed, threads: int | None = None) -> LoadedModel:
        model = self._load(installed, threads)
        try:
            outcome = run_selftest(model.session, installed.root, installed.manifest)
        except Exception as error:
            outcome_ok, detail = False, f"{type(error).__name__}: {error}"
        else:
            outcome_ok, detail = outcome.passed, outcome.detail
        self._host.report("update.selftest", f"self-test {'passed' if outcome_ok else 'failed'}: {detail}",
                          level="info" if outcome_ok else "error", bundle=installed.id, passed=outcome_ok)  # fmt: skip
        if not outcome_ok:
            raise UpdateFailed("refused", f"self-test failed: {detail}")
        return model

    def _kept_bundles(self) -> set[str]:
        record = self.store.record()
        return {b for b in (record.active, record.previous, record.shadow) if b}

    # ---- the shadow -----------------------------------------------------------------------------------------

    def set_shadow(self, wanted: DesiredShadow | None, rev: int) -> None:
        """Run `wanted` beside the active model (prepared like an update, never switched to), or no shadow; a
        shadow that cannot be prepared is refused (`shadow_state`) and the active model runs on alone."""
        active, running = self.runner.model, self.runner.shadow
        if wanted is None or active is None:
            if running is not None or self.shadow_state is not None:
                self.runner.use_shadow(None)
                self._keep_shadow(None)
                self.shadow_state = None
                self._host.publish_reported()
            return
        if running and (running.model.bundle.id, running.active_id) == (wanted.bundle.id, active.bundle.id):
            running.every_n, running.budget = wanted.every_n, wanted.budget
            return
        self.runner.use_shadow(None)
        ref = BundleRef.model_validate(wanted.bundle.model_dump(include={"id", "name", "version", "size"}))

        def phase(state: UpdatePhase, _bundle: str, detail: str = "") -> None:
            self.shadow_state = ShadowState(state="preparing", bundle=ref, detail=detail or state)
            self._host.publish_reported()

        try:
            # One thread: a runtime's worker pool spins between runs, and a second pool spinning beside the active
            # model's slowed it by 1.8x at full load (benchmarks/shadow_bench.py).
            model = self._prepare(wanted.bundle, rev, active, phase, threads=SHADOW_THREADS)
        except UpdateFailed as error:
            self._keep_shadow(None)
            self.shadow_state = ShadowState(state=error.phase, bundle=ref, detail=str(error))
            kind = "update.refused" if error.phase == "refused" else "update.failed"
            self._host.report(kind, f"shadow {wanted.bundle.name}@{wanted.bundle.version}: {error}", level="error",
                              bundle=wanted.bundle.id, shadow=True)  # fmt: skip
            self._host.publish_reported()
            return
        self._keep_shadow(model.bundle.id)
        task = self.runner.task_of(active)
        self.runner.use_shadow(Shadow(model, active.bundle.manifest, active.bundle.id, task, wanted.every_n,
                                      wanted.budget, SHADOW_THREADS, self._threads or os.cpu_count() or 1))  # fmt: skip
        self.shadow_state = ShadowState(state="running", bundle=ref, detail=f"compared with {active.bundle.label}")
        self._host.report("update.selftest", f"shadow {model.bundle.label} runs beside {active.bundle.label}",
                          bundle=model.bundle.id, passed=True, shadow=True)  # fmt: skip
        self._host.publish_reported()

    def _keep_shadow(self, bundle_id: str | None) -> None:
        record = self.store.record()
        if record.shadow != bundle_id:
            self.store.set_record(record.model_copy(update={"shadow": bundle_id}))
            self.store.prune(self._kept_bundles())

    # ---- after the switch -----------------------------------------------------------------------------------

    def _switch(self, model: LoadedModel, current: LoadedModel | None, health_checks: int) -> None:
        previous = current.bundle.id if current else None
        self._set_phase("switching", model.bundle.id)
        self.store.set_record(ActiveRecord(active=model.bundle.id, previous=previous, trial=True))
        health = self.runner.use_model(model, health_checks)
        self._host.report("update.activated", f"now running {model.bundle.label}", bundle=model.bundle.id,
                          previous=previous)  # fmt: skip
        self._host.publish_state()
        self._finish_trial(model, health)

    def _wait_for_health(self, health: HealthCheck) -> None:
        """Until the health check is decided, its timeout passes, or the agent stops (which must not wait out a
        health check that has no input: stop() would give up on this thread and close the outbox under it)."""
        deadline = time.monotonic() + self._health_timeout_s
        while not health.done.wait(HEALTH_POLL_S):
            if self._stopping.is_set() or time.monotonic() >= deadline:
                return

    def _finish_trial(self, model: LoadedModel, health: HealthCheck) -> None:
        """Keep the new bundle if its first inferences are healthy, otherwise go back to the previous one."""
        self._wait_for_health(health)
        if self._stopping.is_set() and not health.done.is_set():
            return  # the trial resumes after the restart
        record = self.store.record()
        if health.failure is None:
            self.store.set_record(ActiveRecord(active=model.bundle.id, previous=record.previous))
            self.store.prune({model.bundle.id, record.previous} - {None})
            detail = f"{health.passed} inferences ok"
            if not health.done.is_set():
                detail += f" (fewer than {health.needed} inputs arrived in {self._health_timeout_s:g} s)"
            self._host.report("update.healthy", f"{model.bundle.label}: {detail}", bundle=model.bundle.id)
            self._set_phase("healthy", model.bundle.id, detail)
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
        else:  # a model that failed its health check must not go on serving results
            self.store.set_record(ActiveRecord())
            self.runner.unload()
        self.store.prune({previous.id} if previous else set())
        back = restored.bundle.label if restored else "no bundle"
        self._host.report("update.rolled_back", f"{model.bundle.label} failed its health check ({reason}); "
                          f"back to {back}", level="error", bundle=model.bundle.id, reason=reason)  # fmt: skip
        self._set_phase("rolled_back", model.bundle.id, reason)
