"""`edgekit compile`: model → checked fp32 model → candidates → verified against fp32 → signed bundle."""

import contextlib
import dataclasses
import logging
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgekit import __version__
from edgekit.agents.runtimes import Session, get_runtime, run_batches
from edgekit.bundle import file_entries, write_bundle
from edgekit.compile.calibration import load_samples, synthetic_samples
from edgekit.compile.device import (
    DeviceMeasurements,
    DeviceMeasurer,
    FleetTrialTimer,
    TrialBundles,
    measure_candidates,
)
from edgekit.compile.drift import drift_reference
from edgekit.compile.intake import PreparedModel, prepare_model
from edgekit.compile.labels import check_labels_fit, read_labels
from edgekit.compile.measure import compare, like_reference, measure_latency, peak_memory, predictions
from edgekit.compile.mixed import compute_layers, keep_float_rounds, rank_sensitive_nodes
from edgekit.compile.report import CandidateReport, CompileReport, ReferenceReport
from edgekit.compile.verdict import Budget, Judgement, judge
from edgekit.compilers import Backend, BackendOptions, BuildRequest, BuildResult, HostStandIn, TrialTimer, backends
from edgekit.drift import DriftReference
from edgekit.errors import BadInput, OperationFailed
from edgekit.manifest import Manifest, Metrics, SelfTest
from edgekit.profiles import Candidate, Preprocessing, Profile, host_arch
from edgekit.progress import NoProgress, Progress
from edgekit.samples import SampleSet, resolve_preprocessing
from edgekit.schema import Precision
from edgekit.selftest import expected_tolerance, write_vectors
from edgekit.signing import default_signing_key, key_id, load_private_key

log = logging.getLogger(__name__)

SYNTHETIC_SAMPLES = 16
EMULATED_FEEDS = 8  # each emulated run costs ~20 s of qemu start-up plus slow inference
PRECISION_PREFERENCE = ("int8", "fp16", "fp32")
SELFTEST_BATCHES = 4
# Fewer held-out samples than this resolve top-1 in steps of more than 2 points; with fewer than twice as many in
# all, every sample both calibrates and verifies (the report warns).
MIN_HOLDOUT = 50


@dataclass(frozen=True)
class CompileRequest:
    model: Path
    profile: Profile
    out: Path
    precision: Precision | None = None
    backend: str = "auto"
    calibration: Path | None = None
    eval_data: Path | None = None  # a separate evaluation set: then all of --calibration calibrates
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    input_values: dict[str, list[float]] = field(default_factory=dict)  # inputs frozen to constants
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    sign_key: Path | None = None
    name: str | None = None
    version: str = "0.1.0"
    holdout_fraction: float = 0.2
    max_accuracy_drop: float = 1.0  # top-1 points, for classifiers
    min_cosine: float = 0.999  # for other outputs
    bench_seconds: float = 2.0
    mixed_seconds: float = 600.0  # what all mixed-precision rounds of one compile may take; 0: none are tried
    threads: int | None = None
    # Per-backend option overrides (`--option BACKEND.NAME=VALUE`), over the profile candidates' own.
    backend_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    verify_emulated: bool = (
        False  # also run the device artifact under emulation where its backend can (Backend.emulate)
    )
    labels: Path | None = None  # class names (--labels), stored as Manifest.labels
    measurer: DeviceMeasurer | None = None  # --measure-on: rank by what a fleet device measured (compile/device.py)


class CompileFailed(OperationFailed):
    """No candidate passed; carries the report so the CLI can still show what each candidate measured."""

    def __init__(self, message: str, report: CompileReport) -> None:
        super().__init__(message)
        self.report = report


class DoesNotFit(CompileFailed):
    """Every candidate built, and none fits the device's memory: a refusal that names the limit (exit 2)."""

    exit_code = 2


@dataclass
class _Plan:
    candidate: Candidate
    backend: Backend | None
    skip: str | None = None
    options: BackendOptions | None = None


@dataclass
class _Built:
    plan: _Plan
    result: BuildResult
    outdir: Path
    report: CandidateReport
    outputs: list[np.ndarray] = field(default_factory=list)
    judgement: Judgement | None = None

    def add_reason(self, more: str) -> "_Built":
        """Append to the report's reason: why mixed precision was not tried, or how far it got."""
        self.report = self.report.model_copy(update={"reason": f"{self.report.reason}; {more}"})
        return self


def plan_candidates(request: CompileRequest) -> list[_Plan]:
    """The profile's candidates narrowed by --precision/--backend, each with its backend or why it is skipped."""
    known = backends()
    profile = request.profile
    if request.backend != "auto" and request.backend not in known:
        raise BadInput(f"--backend {request.backend}: unknown backend (known: auto, {', '.join(sorted(known))})")
    wanted = [
        c
        for c in profile.candidates
        if (request.precision in (None, c.precision)) and request.backend in ("auto", c.backend)
    ]
    if not wanted and request.backend != "auto":
        # A backend the profile does not list: try it at the asked precision, or at each it builds.
        offered = (
            [request.precision]
            if request.precision
            else [p for p in PRECISION_PREFERENCE if p in known[request.backend].precisions]
        )
        wanted = [Candidate(backend=request.backend, precision=p) for p in offered]
    if not wanted:
        listed = ", ".join(f"{c.backend}/{c.precision}" for c in profile.candidates)
        raise BadInput(f"profile {profile.name} has no {request.precision} candidate (it lists: {listed})")
    if request.precision == "int8" and request.calibration is None:
        raise BadInput(
            "--precision int8 needs calibration data: pass --calibration DIR (images) or FILE.npz; "
            "edgekit never quantizes with random data"
        )
    return [_plan_one(request, index, candidate, known) for index, candidate in enumerate(wanted)]


def _plan_one(request: CompileRequest, index: int, candidate: Candidate, known: dict[str, type[Backend]]) -> _Plan:
    backend_class = known.get(candidate.backend)
    if backend_class is None:
        return _Plan(candidate, None, f"this edgekit has no '{candidate.backend}' backend")
    if not backend_class.available():
        return _Plan(
            candidate,
            None,
            f"needs Python package '{backend_class.module}' (pip install 'edgekit[{backend_class.extra}]')",
        )
    backend = backend_class()
    settings = {**candidate.options, **request.backend_options.get(candidate.backend, {})}
    options = backend.parse_options(settings, f"profile {request.profile.name}: candidate #{index + 1}")
    reason = backend.unsupported_reason(request.profile, candidate.precision)
    if reason is None and candidate.precision == "int8" and request.calibration is None:
        reason = "int8 needs --calibration data"
    return _Plan(candidate, backend, reason, options)


def _bundle_name(request: CompileRequest) -> str:
    return request.name or re.sub(r"[^A-Za-z0-9._-]", "-", request.model.stem).lstrip("._-") or "model"


@dataclass(frozen=True)
class _Samples:
    calibration: SampleSet | None
    held_out: SampleSet
    data: str  # Metrics.data: which samples verify
    warning: str | None = None


def _load_samples(request: CompileRequest, model: PreparedModel) -> _Samples:
    """Calibration and verification samples: --eval-data when given; else a held-out split of --calibration with at
    least MIN_HOLDOUT samples; with too few for that, all of them do both, and the report says so."""
    batch = model.batch_size
    if request.calibration is None:
        synthetic = synthetic_samples(model.inputs, SYNTHETIC_SAMPLES * batch, model.value_hints)
        return _Samples(None, synthetic, "synthetic")
    samples = load_samples(request.calibration, model.inputs, request.preprocessing)
    if request.eval_data is not None:
        held_out = load_samples(request.eval_data, model.inputs, request.preprocessing)
        result = _Samples(samples, held_out, "evaluation set")
    elif len(samples) >= 2 * MIN_HOLDOUT:
        calibration, held_out = samples.split(request.holdout_fraction, minimum=MIN_HOLDOUT)
        result = _Samples(calibration, held_out, "held-out calibration split")
    else:
        warning = (
            f"{request.calibration}: {len(samples)} samples are too few to hold {MIN_HOLDOUT} out, so every candidate "
            f"is verified on all of them, including those it was calibrated on; give {2 * MIN_HOLDOUT} or more, or "
            "--eval-data, for an independent verdict"
        )
        result = _Samples(samples, samples, "all calibration samples", warning)
    for name, part in (("calibration", result.calibration), ("verification", result.held_out)):
        if len(part) < batch:
            raise BadInput(f"{request.calibration}: {len(part)} {name} samples are too few for batch size {batch}")
    return result


def _data_description(samples: _Samples, request: CompileRequest) -> str:
    """The report's `data`: which samples verified, and where they came from when the .npz says (a hub dataset's
    export names itself in its `source` array, edgekit.compile.calibration)."""
    counted = f"{samples.data} ({len(samples.held_out)} samples)"
    calibration = samples.calibration
    named = calibration is not None and calibration.origin != str(request.calibration)
    return f"{counted} of {calibration.origin}" if named else counted


class _Verifier:
    """Runs sessions on the held-out feeds and turns them into Metrics against the fp32 reference."""

    def __init__(self, request: CompileRequest, model: PreparedModel, held_out: SampleSet, data: str) -> None:
        self.request, self.model, self.data = request, model, data
        batch = model.batch_size
        self.feeds = list(held_out.batches(batch))
        self.labels = held_out.batch_labels(batch)
        self.budget = Budget(request.max_accuracy_drop, request.min_cosine)
        self.reference_session = get_runtime("onnxruntime").load(model.path, {}, request.threads)
        self.reference_outputs = run_batches(self.reference_session, self.feeds)
        latency = self.latency(self.reference_session)
        self.reference = ReferenceReport(
            latency_p50_ms=latency.p50_ms,
            latency_p95_ms=latency.p95_ms,
            model_bytes=model.path.stat().st_size,
            param_bytes=model.param_bytes,
            accuracy=self.accuracy(self.reference_outputs),
        )

    def latency(self, session: Session):
        return measure_latency(lambda: session.run(self.feeds[0]), max_seconds=self.request.bench_seconds)

    def accuracy(self, outputs: list[np.ndarray]) -> float | None:
        classes = predictions(outputs[0])
        if self.labels is None or classes is None or len(classes) != len(self.labels):
            return None
        return float(np.mean(classes == self.labels))

    def verify(self, built: _Built) -> tuple[Metrics, Judgement]:
        """The candidate's figures against the reference, and its accuracy verdict (sample-size aware:
        edgekit/compile/verdict.py)."""
        stand_in = built.result.host_stand_in
        with peak_memory() as peak:
            session = _session(built, self.request.threads)
            built.outputs = like_reference(self.reference_outputs, run_batches(session, self.feeds))
        agreement = compare(self.reference_outputs, built.outputs)
        names = [spec.name for spec in self.model.outputs]
        judgement = judge(self.reference_outputs, built.outputs, self.labels, agreement, names, self.budget)
        latency = self.latency(session)
        metrics = Metrics(
            verified_on=self._where(session, built.result, stand_in),
            samples=len(self.feeds) * self.model.batch_size,
            data=self.data,
            max_abs_error=agreement.max_abs_error,
            cosine=agreement.cosine,
            top1_agreement=agreement.top1_agreement,
            accuracy=self.accuracy(built.outputs),
            reference_accuracy=self.reference.accuracy,
            latency_p50_ms=latency.p50_ms,
            latency_p95_ms=latency.p95_ms,
            throughput_per_s=latency.throughput_per_s * self.model.batch_size,
            peak_memory_mb=peak.megabytes,
            model_bytes=sum(p.stat().st_size for p in built.outdir.rglob("*") if p.is_file()),
            param_bytes=built.result.param_bytes,
            reference_model_bytes=self.reference.model_bytes,
            reference_param_bytes=self.reference.param_bytes,
        )
        return metrics, judgement

    def _where(self, session: Session, result: BuildResult, stand_in: HostStandIn | None) -> str:
        """Say exactly what ran, and what about the device it does not show."""
        where = f"host {host_arch()} {session.device}"
        if stand_in is not None:
            return f"{where}: {stand_in.note}"
        if not self.request.profile.runs_on_this_host():
            return f"{where} (stand-in for the {self.request.profile.cpu.arch} device)"
        asked = result.target.get("device")
        if asked and asked.split(":")[-1].split(",")[0] not in session.device:
            return f"{where} (the device asks for {asked}; not present here)"
        return where

    def emulate(self, built: _Built) -> dict[str, Any] | None:
        """Run the device artifact itself on the first held-out feeds, when its backend can emulate the device."""
        assert built.plan.backend is not None, "only built plans are emulated"
        feeds = self.feeds[:EMULATED_FEEDS]
        outputs = built.plan.backend.emulate(built.result, self.request.profile, feeds)
        if outputs is None:
            return None
        count = len(outputs[0])
        agreement = compare([o[:count] for o in self.reference_outputs], outputs)
        return {"samples": count, "max_abs_error": agreement.max_abs_error, "cosine": agreement.cosine,
                "top1_agreement": agreement.top1_agreement}  # fmt: skip


def _session(built: _Built, threads: int | None) -> Session:
    """A session on what verification runs for a candidate: its artifact, or the host stand-in for it."""
    run = built.result.host_stand_in or built.result
    return get_runtime(run.runtime).load(run.entrypoint, run.target, threads)


class _Candidates:
    """Builds each planned candidate, verifies it against fp32, and rescues int8 ones that miss the budget with
    mixed precision. A failing backend or runtime becomes a failed candidate in the report; the others go on."""

    def __init__(self, request: CompileRequest, model: PreparedModel, samples: _Samples, verifier: _Verifier,
                 workdir: Path, progress: Progress, trial_timer: TrialTimer | None = None) -> None:  # fmt: skip
        self.request, self.model, self.samples, self.verifier = request, model, samples, verifier
        self.workdir, self.progress, self.trial_timer = workdir, progress, trial_timer
        self._ranking: list[str] | str | None = None  # layer names by sensitivity, or why they are unknown
        self._int8_passed = False
        self._mixed_spent = 0.0  # seconds of mixed-precision ranking and rebuilds so far

    def build_and_verify(self, plan: _Plan, index: int) -> _Built | CandidateReport:
        candidate = plan.candidate
        report = CandidateReport(backend=candidate.backend, precision=candidate.precision, status="passed")
        outcome = self._attempt(plan, f"{index:02d}-{candidate.backend}-{candidate.precision}", report)
        if isinstance(outcome, _Built) and self._rescuable(outcome):
            # Mixed precision rescues int8 that would be missing; rounds on a large detector take minutes each.
            why_not = "an earlier int8 candidate passed" if self._int8_passed else self._budget_spent()
            if why_not:
                return outcome.add_reason(f"mixed precision not tried: {why_not}")
            outcome = self._rescue(outcome, index)
        if isinstance(outcome, _Built) and candidate.precision == "int8" and outcome.report.status == "passed":
            self._int8_passed = True
        return outcome

    def _attempt(self, plan: _Plan, folder: str, report: CandidateReport, keep_float: frozenset[str] = frozenset(),
                 int8_only: frozenset[str] | None = None) -> _Built | CandidateReport:  # fmt: skip
        candidate = plan.candidate
        outdir = self.workdir / folder / "artifacts"
        started = time.perf_counter()
        try:
            result = self._build(plan, outdir, keep_float, int8_only)
        except BadInput as error:
            if self.request.backend != "auto":
                raise  # the one backend the user asked for cannot take this model: their input, exit 2
            log.warning("%s %s cannot build this model (%s); trying the next candidate",
                        candidate.backend, candidate.precision, error)  # fmt: skip
            return report.model_copy(update={"status": "failed", "reason": f"build: {_one_line(error)}"})
        except Exception as error:
            log.debug("build failed", exc_info=True)
            return report.model_copy(update={"status": "failed", "reason": f"build: {_one_line(error)}"})
        built = _Built(plan, result, outdir, report.model_copy(update={"build_seconds": time.perf_counter() - started}))
        try:
            with self.progress.task(f"{candidate.backend} {candidate.precision}: verifying against fp32", total=1):
                metrics, built.judgement = self.verifier.verify(built)
        except Exception as error:
            log.debug("verification failed", exc_info=True)
            return built.report.model_copy(update={"status": "failed", "reason": f"run: {_one_line(error)}"})
        problems = [p for p in (built.judgement.reason, *result.unfit) if p]
        details = dict(result.details)
        if self.request.verify_emulated:
            metrics = self._emulate(built, metrics, details, problems)
        built.report = built.report.model_copy(
            update={
                "metrics": metrics,
                "verdict": built.judgement.verdict,
                "details": details,
                "status": "rejected" if problems else "passed",
                "reason": "; ".join(problems),
            }
        )
        return built

    def _build(self, plan: _Plan, outdir: Path, keep_float: frozenset[str],
               int8_only: frozenset[str] | None) -> BuildResult:  # fmt: skip
        assert plan.backend is not None and plan.options is not None, "skipped plans are never built"
        build_request = BuildRequest(
            model=self.model,
            profile=self.request.profile,
            precision=plan.candidate.precision,
            calibration=self.samples.calibration,
            options=plan.options,
            outdir=outdir,
            progress=self.progress,
            keep_float=keep_float,
            int8_only=int8_only,
            trial_timer=self.trial_timer,
        )
        # Libraries print their own progress; stdout is reserved for the report (--json).
        with contextlib.redirect_stdout(sys.stderr):
            result = plan.backend.build(build_request)
        _remove_intermediates(outdir, result.entrypoint)
        return result

    def _emulate(self, built: _Built, metrics: Metrics, details: dict, problems: list[str]) -> Metrics:
        emulated = self.verifier.emulate(built)
        if emulated is None:
            return metrics
        details["emulated_aarch64"] = emulated
        if emulated["cosine"] < self.request.min_cosine:
            problems.append(f"emulated aarch64 output cosine {emulated['cosine']:.5f} < {self.request.min_cosine}")
        return metrics.model_copy(
            update={"verified_on": f"{metrics.verified_on}; the aarch64 .so itself ran under qemu-user on "
                    f"{emulated['samples']} samples, max|err| {emulated['max_abs_error']:.2e} vs fp32"}
        )  # fmt: skip

    def _rescuable(self, built: _Built) -> bool:
        """int8 that misses only the accuracy budget, from a backend that can keep named layers in float."""
        backend = built.plan.backend
        return (
            built.plan.candidate.precision == "int8"
            and built.report.status == "rejected"
            and built.judgement is not None
            and built.judgement.reason is not None
            and not built.result.unfit
            and backend is not None
            and backend.keeps_float
        )

    def _budget_spent(self, running_since: float | None = None) -> str | None:
        """Why no more mixed-precision rounds may start (counting a rescue under way since `running_since`)."""
        running = time.perf_counter() - running_since if running_since is not None else 0.0
        if self._mixed_spent + running < self.request.mixed_seconds:
            return None
        return f"its {self.request.mixed_seconds:.0f} s budget is spent (--mixed-seconds)"

    def _rescue(self, plain: _Built, index: int) -> _Built:
        """Keep the most sensitive layers in float and rebuild, in growing rounds, until the budget holds."""
        started = time.perf_counter()
        try:
            return self._rescue_rounds(plain, index, started)
        finally:
            self._mixed_spent += time.perf_counter() - started

    def _rescue_rounds(self, plain: _Built, index: int, started: float) -> _Built:
        ranking = self._sensitivity()
        if isinstance(ranking, str):
            return plain.add_reason(f"mixed precision not tried: {ranking}")
        candidate = plain.plan.candidate
        tried = plain
        for number, layers in enumerate(keep_float_rounds(ranking, compute_layers(self.model)), 1):
            spent = self._budget_spent(started)
            if spent:
                return tried.add_reason(f"mixed precision stopped before round {number}: {spent}")
            folder = f"{index:02d}-{candidate.backend}-{candidate.precision}-mixed{number}"
            report = CandidateReport(backend=candidate.backend, precision=candidate.precision, status="passed")
            attempt = self._attempt(plain.plan, folder, report, frozenset(layers), frozenset(ranking) - set(layers))
            if not isinstance(attempt, _Built):
                return tried.add_reason(
                    f"mixed precision round {number} ({len(layers)} layers in float) failed: {attempt.reason}"
                )
            tried = attempt
            tried.report = tried.report.model_copy(
                update={"details": {**tried.report.details, "mixed_precision": _mixed_facts(plain, tried, layers,
                                                                                           ranking, number)}}
            )  # fmt: skip
            if tried.report.status == "passed":
                return tried
        if tried is plain:
            return plain
        facts = tried.report.details["mixed_precision"]
        return tried.add_reason(
            f"still outside the budget with {facts['float_layers']} of {facts['quantized_layers']} layers in float "
            f"({facts['rounds']} rounds)"
        )

    def _sensitivity(self) -> list[str] | str:
        """Layers by quantization sensitivity (computed once per compile), or why they cannot be ranked."""
        if self._ranking is None:
            self._ranking = self._rank_layers()
        return self._ranking

    def _rank_layers(self) -> list[str] | str:
        from edgekit.compilers.onnxruntime import OrtOptions, quantize_qdq

        assert self.samples.calibration is not None, "int8 candidates are built only with calibration data"
        outdir = self.workdir / "sensitivity"
        request = BuildRequest(
            model=self.model, profile=self.request.profile, precision="int8", calibration=self.samples.calibration,
            options=OrtOptions(), outdir=outdir, progress=self.progress,
        )  # fmt: skip
        try:
            with contextlib.redirect_stdout(sys.stderr):
                qdq = quantize_qdq(request, who="mixed precision")
            with self.progress.task("mixed precision: ranking layers by quantization error", total=1):
                ranking = rank_sensitive_nodes(self.model, qdq, self.samples.calibration)
        except Exception as error:  # the ranking is an aid; without it the candidate keeps its plain-int8 verdict
            log.debug("sensitivity ranking failed", exc_info=True)
            return f"layer sensitivity could not be measured ({_one_line(error)})"
        return ranking or "no quantized layer to keep in float"


def _mixed_facts(plain: _Built, mixed: _Built, layers: list[str], ranking: list[str], rounds: int) -> dict:
    """What keeping layers in float cost against plain int8: the report's 'mixed_precision' entry."""
    before, after = plain.report.metrics, mixed.report.metrics
    return {
        "float_layers": len(layers),
        "quantized_layers": len(ranking),
        "keep_float": layers,
        "rounds": rounds,
        "int8_reason": plain.report.reason,
        "latency_vs_int8": after.latency_p50_ms / before.latency_p50_ms
        if before and after and before.latency_p50_ms and after.latency_p50_ms
        else None,
        "size_vs_int8": after.model_bytes / before.model_bytes if before and after and before.model_bytes else None,
    }


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _remove_intermediates(artifacts: Path, entrypoint: Path) -> None:
    """Keep only the entrypoint and its companions (e.g. model.bin beside model.xml)."""
    keep = {entrypoint.name, entrypoint.with_suffix(".bin").name}
    for path in artifacts.iterdir():
        if path.name not in keep:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _rank(built: list[_Built], profile: Profile, measured: DeviceMeasurements | None = None) -> str:
    """Rank the passing candidates (rank 1 is chosen), tell each loser why it lost, and return the basis: what a
    fleet device measured when it measured them all, else the host's p50 where the host is the device's kind, else
    the profile's order."""
    passed = [b for b in built if b.report.status == "passed"]
    on_device = measured is not None and measured.measured_on is not None
    native = profile.runs_on_this_host() and profile.accelerator.kind == "none"
    if on_device:
        assert measured is not None and measured.measured_on is not None
        passed.sort(key=lambda b: b.report.device.p50_ms if b.report.device else float("inf"))
        basis = f"fastest p50 measured on {measured.measured_on.describe()} within the accuracy budget"
    elif native:
        passed.sort(key=lambda b: b.report.metrics.latency_p50_ms)
        basis = "fastest host p50 within the accuracy budget (this host has the device's CPU architecture)"
    else:
        missing = f"{profile.accelerator.kind} {profile.accelerator.arch}" if profile.accelerator.kind != "none" else ""
        hardware = missing or f"{profile.cpu.arch} CPU"
        basis = (
            f"profile order within the accuracy budget: this {host_arch()} host has no {hardware}, "
            "so device latency was not measured"
        )
    if measured is not None and measured.failure:
        basis = f"{basis}; measuring on the fleet failed ({measured.failure}), so this order decided"
    for rank, b in enumerate(passed, 1):
        update: dict = {"rank": rank, "status": "chosen" if rank == 1 else "passed"}
        if rank > 1:
            update["reason"] = _lost_because(b.report, passed[0].report, "device" if on_device else
                                             "host" if native else "order")  # fmt: skip
        b.report = b.report.model_copy(update=update)
    return basis


def _lost_because(loser: CandidateReport, winner: CandidateReport, basis: str) -> str:
    who = f"{winner.backend} {winner.precision}"
    if basis == "device" and loser.device and winner.device:
        return f"slower on the device: p50 {loser.device.p50_ms:.3f} ms vs {who} {winner.device.p50_ms:.3f} ms"
    if basis == "host" and loser.metrics and winner.metrics:
        return f"slower: p50 {loser.metrics.latency_p50_ms:.3f} ms vs {who} {winner.metrics.latency_p50_ms:.3f} ms"
    return f"after {who} in the profile's order"


def _measure_on_device(
    request: CompileRequest,
    model: PreparedModel,
    built: list[_Built],
    verifier: _Verifier,
    workdir: Path,
    labels: list[str] | None,
    progress: Progress,
) -> DeviceMeasurements | None:
    """With --measure-on: every passing candidate packaged as a signed bundle of its own and timed on the device;
    each candidate's report gets the device's numbers."""
    passed = [b for b in built if b.report.status == "passed"]
    if request.measurer is None or not passed:
        return None
    bundles = []
    base = request.version.split("+")[0]
    for index, b in enumerate(passed):
        version = f"{base}+bench.{index}.{b.plan.candidate.backend}.{b.plan.candidate.precision}"
        candidate = dataclasses.replace(request, out=workdir / "measure" / f"{index}.ekb", version=version)
        candidate.out.parent.mkdir(parents=True, exist_ok=True)
        _package(candidate, model, b, verifier, None, workdir / "measure" / str(index), labels, None)
        bundles.append(candidate.out)

    def label(index: int) -> str:
        return f"{passed[index].plan.candidate.backend} {passed[index].plan.candidate.precision}"

    with progress.task(f"measuring {len(passed)} candidates on {request.measurer.target}", total=len(passed)) as step:
        measured = measure_candidates(request.measurer, bundles, label, lambda: step(1))
    for b, result in zip(passed, measured.results, strict=False):
        b.report = b.report.model_copy(update={"device": result})
    return measured


def _package(
    request: CompileRequest,
    model: PreparedModel,
    chosen: _Built,
    verifier: _Verifier,
    report: CompileReport | None,
    workdir: Path,
    labels: list[str] | None,
    drift: DriftReference | None,
) -> Manifest:
    root = workdir / "bundle"
    shutil.copytree(chosen.outdir, root / "artifacts")
    feeds = verifier.feeds[:SELFTEST_BATCHES]
    count = len(feeds) * model.batch_size
    # Every feed adds the same number of rows to an output (run_batches joins them), so the first feeds' share is:
    expected = [o[: len(o) // len(verifier.feeds) * len(feeds)] for o in chosen.outputs]
    write_vectors(root / "selftest" / "vectors.npz", feeds, expected, model.inputs)
    if report is not None:  # a candidate measured on a device (--measure-on) carries none
        (root / "report.json").write_text(report.model_dump_json(indent=2))
    metrics = chosen.report.metrics
    atol, rtol = expected_tolerance(expected, metrics.max_abs_error if metrics and chosen.plan.candidate.precision
                                    == "int8" else None)  # fmt: skip
    private_key = _signing_key(request)
    image_input = model.inputs[0].layout in ("NCHW", "NHWC")
    manifest = Manifest(
        name=_bundle_name(request),
        version=request.version,
        created=datetime.now(timezone.utc),
        profile=request.profile.name,
        backend=chosen.plan.candidate.backend,
        precision=chosen.plan.candidate.precision,
        runtime=chosen.result.runtime,
        target=chosen.result.target,
        entrypoint=f"artifacts/{chosen.result.entrypoint.name}",
        inputs=model.inputs,
        outputs=model.outputs,
        preprocessing=resolve_preprocessing(request.preprocessing, model.inputs[0]) if image_input else None,
        files=file_entries(root),
        compiler={"edgekit": __version__, **chosen.plan.backend.versions()},
        verification=chosen.report.metrics,
        build_details=chosen.report.details,
        selftest=SelfTest(file="selftest/vectors.npz", count=count, atol=atol, rtol=rtol),
        signing_key_id=key_id(private_key.public_key()),
        labels=labels,
        drift_reference=drift,
    )
    write_bundle(root, manifest, private_key, request.out)
    return manifest


def _signing_key(request: CompileRequest) -> Ed25519PrivateKey:
    key_path = request.sign_key
    if key_path is None:
        key_path, created = default_signing_key()
        if created:
            log.warning("created a signing key at %s (public key beside it); pass --sign-key for your own", key_path)
    return load_private_key(key_path)


def _trial_timer(request: CompileRequest, model: PreparedModel, workdir: Path) -> FleetTrialTimer | None:
    """With --measure-on: TVM tuning trials for a CPU this host is not are timed on that device."""
    if request.measurer is None:
        return None
    bundles = TrialBundles(_bundle_name(request), request.profile.name, model.inputs, model.outputs,
                           _signing_key(request), workdir / "trials")  # fmt: skip
    return FleetTrialTimer(request.measurer, bundles)


def compile_model(request: CompileRequest, progress: Progress | None = None) -> tuple[CompileReport, Manifest]:
    """Build every planned candidate, verify each against fp32, bundle the best. Raises CompileFailed if none pass."""
    progress = progress or NoProgress()
    plans = plan_candidates(request)
    labels = read_labels(request.labels) if request.labels else None
    with tempfile.TemporaryDirectory(prefix="edgekit-compile-") as scratch:
        workdir = Path(scratch)
        with progress.task("checking and simplifying the model", total=1):
            model = prepare_model(
                request.model, workdir, request.input_shapes, request.profile.batch_size, request.input_values
            )
        if request.labels and labels:
            check_labels_fit(request.labels, labels, model.outputs)
        samples = _load_samples(request, model)
        with progress.task("fp32 reference (onnxruntime)", total=1):
            verifier = _Verifier(request, model, samples.held_out, samples.data)
        candidates = _Candidates(request, model, samples, verifier, workdir, progress,
                                 _trial_timer(request, model, workdir))  # fmt: skip
        outcomes: list[_Built | CandidateReport] = []
        for index, plan in enumerate(plans):
            if plan.skip:
                c = plan.candidate
                outcomes.append(
                    CandidateReport(backend=c.backend, precision=c.precision, status="skipped", reason=plan.skip)
                )
                continue
            outcomes.append(candidates.build_and_verify(plan, index))
        built = [o for o in outcomes if isinstance(o, _Built)]
        measured = _measure_on_device(request, model, built, verifier, workdir, labels, progress)
        ranking = _rank(built, request.profile, measured)
        chosen = next((b for b in built if b.report.status == "chosen"), None)
        report = CompileReport(
            model=str(request.model),
            profile=request.profile.name,
            host=f"{host_arch()}",
            data=_data_description(samples, request),
            ranking=ranking,
            measured_on=measured.measured_on.__dict__ if measured and measured.measured_on else None,
            reference=verifier.reference,
            candidates=[o.report if isinstance(o, _Built) else o for o in outcomes],
            warnings=_warnings(model, samples, request),
        )
        if chosen is None:
            raise _failure(built, len(outcomes), request, report)
        with progress.task("drift reference", total=1):
            drift, drift_note = drift_reference(model.inputs, samples.held_out, chosen.outputs, samples.calibration,
                                                _session(chosen, request.threads),
                                                synthetic=samples.data == "synthetic")  # fmt: skip
        report = report.model_copy(update={"bundle": str(request.out), "drift_reference": drift_note})
        manifest = _package(request, model, chosen, verifier, report, workdir, labels, drift)
    return report, manifest


def _warnings(model: PreparedModel, samples: _Samples, request: CompileRequest) -> list[str]:
    notes = [*model.notes, *([samples.warning] if samples.warning else [])]
    resolution = 100 / len(samples.held_out)
    if samples.data != "synthetic" and resolution > request.max_accuracy_drop:
        notes.append(
            f"{len(samples.held_out)} verification samples: one sample is {resolution:.1f} top-1 points, more than "
            f"the {request.max_accuracy_drop}-point budget, so no candidate is rejected on a single flipped sample"
        )
    return notes


def _failure(built: list[_Built], planned: int, request: CompileRequest, report: CompileReport) -> CompileFailed:
    """A refusal naming the device limit when every candidate built but none fits; else what came closest."""
    if built and len(built) == planned and all(b.result.unfit for b in built):
        limits = "; ".join(sorted({limit for b in built for limit in b.result.unfit}))
        return DoesNotFit(
            f"{request.model.name} does not fit {request.profile.name}: {limits} (every candidate). Use a profile "
            "with more memory, a smaller input (--input-shape) or a smaller model",
            report,
        )
    return CompileFailed(_way_forward(built, request), report)


def _way_forward(built: list[_Built], request: CompileRequest) -> str:
    """Why nothing passed, naming the closest candidate, by how much it missed, and the flag that accepts it."""
    missed = [b for b in built if b.judgement is not None and b.judgement.miss is not None and not b.result.unfit]
    if not missed:
        return "no candidate built and passed verification; see the table for each one's reason"
    closest = min(missed, key=lambda b: b.judgement.miss)
    candidate, judgement = closest.plan.candidate, closest.judgement
    mixed = closest.report.details.get("mixed_precision")
    tried = f", even with {mixed['float_layers']} layers kept in float" if mixed else ""
    floats = "" if candidate.precision != "int8" else ", or build without int8 (--precision fp32 or fp16)"
    return (
        f"no candidate passed; the closest is {candidate.backend} {candidate.precision}{tried}: {judgement.reason}. "
        f"Accept it with {judgement.accept_with}{floats}"
    )
