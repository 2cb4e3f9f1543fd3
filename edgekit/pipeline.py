"""`edgekit compile`: model → checked fp32 model → candidates → verified against fp32 → signed bundle."""

import contextlib
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

from edgekit import __version__
from edgekit.agents.runtimes import Session, get_runtime
from edgekit.bundle import file_entries, write_bundle
from edgekit.calibration import SampleSet, load_samples, resolve_preprocessing, synthetic_samples
from edgekit.compilers import Backend, BackendOptions, BuildRequest, BuildResult, HostStandIn, backends
from edgekit.errors import BadInput, OperationFailed
from edgekit.intake import PreparedModel, prepare_model
from edgekit.manifest import Manifest, Metrics, SelfTest
from edgekit.measure import compare, is_classifier_output, measure_latency, peak_memory, run_batches
from edgekit.profiles import Candidate, Preprocessing, Profile, host_arch
from edgekit.progress import NoProgress, Progress
from edgekit.report import CandidateReport, CompileReport, ReferenceReport
from edgekit.schema import Precision
from edgekit.selftest import expected_tolerance, write_vectors
from edgekit.signing import default_signing_key, key_id, load_private_key

log = logging.getLogger(__name__)

SYNTHETIC_SAMPLES = 16
EMULATED_FEEDS = 8  # each emulated run costs ~20 s of qemu start-up plus slow inference
PRECISION_PREFERENCE = ("int8", "fp16", "fp32")
SELFTEST_BATCHES = 4


@dataclass(frozen=True)
class CompileRequest:
    model: Path
    profile: Profile
    out: Path
    precision: Precision | None = None
    backend: str = "auto"
    calibration: Path | None = None
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    sign_key: Path | None = None
    name: str | None = None
    version: str = "0.1.0"
    holdout_fraction: float = 0.2
    max_accuracy_drop: float = 1.0  # top-1 points, for classifiers
    min_cosine: float = 0.999  # for other outputs
    bench_seconds: float = 2.0
    threads: int | None = None
    backend_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # CLI overrides, e.g. TVM tune_trials
    verify_emulated: bool = False  # also run aarch64 TVM libraries under qemu-user (edgekit.emulation)


class CompileFailed(OperationFailed):
    """No candidate passed; carries the report so the CLI can still show what each candidate measured."""

    def __init__(self, message: str, report: CompileReport) -> None:
        super().__init__(message)
        self.report = report


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


def _load_samples(request: CompileRequest, model: PreparedModel) -> tuple[SampleSet | None, SampleSet, str]:
    """(calibration, held-out, description of the held-out data)."""
    if request.calibration is None:
        return None, synthetic_samples(model.inputs, SYNTHETIC_SAMPLES * model.inputs[0].shape[0]), "synthetic"
    samples = load_samples(request.calibration, model.inputs, request.preprocessing)
    calibration, held_out = samples.split(request.holdout_fraction)
    batch = model.inputs[0].shape[0]
    if len(held_out) < batch or len(calibration) < batch:
        raise BadInput(f"{request.calibration}: {len(samples)} samples are too few for batch size {batch}")
    return calibration, held_out, "held-out calibration split"


class _Verifier:
    """Runs sessions on the held-out feeds and turns them into Metrics against the fp32 reference."""

    def __init__(self, request: CompileRequest, model: PreparedModel, held_out: SampleSet, data: str) -> None:
        self.request, self.model, self.data = request, model, data
        batch = model.inputs[0].shape[0]
        self.feeds = list(held_out.batches(batch))
        self.labels = held_out.batch_labels(batch)
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
        if self.labels is None or not is_classifier_output(outputs[0]):
            return None
        return float(np.mean(outputs[0].argmax(axis=1) == self.labels))

    def verify(self, built: _Built) -> Metrics:
        stand_in = built.result.host_stand_in
        run = stand_in or built.result
        with peak_memory() as peak:
            session = get_runtime(run.runtime).load(run.entrypoint, run.target, self.request.threads)
            built.outputs = run_batches(session, self.feeds)
        agreement = compare(self.reference_outputs, built.outputs)
        latency = self.latency(session)
        return Metrics(
            verified_on=self._where(session, built.result, stand_in),
            samples=sum(len(next(iter(f.values()))) for f in self.feeds),
            data=self.data,
            max_abs_error=agreement.max_abs_error,
            cosine=agreement.cosine,
            top1_agreement=agreement.top1_agreement,
            accuracy=self.accuracy(built.outputs),
            reference_accuracy=self.reference.accuracy,
            latency_p50_ms=latency.p50_ms,
            latency_p95_ms=latency.p95_ms,
            throughput_per_s=latency.throughput_per_s * self.model.inputs[0].shape[0],
            peak_memory_mb=peak.megabytes,
            model_bytes=sum(p.stat().st_size for p in built.outdir.rglob("*") if p.is_file()),
            param_bytes=built.result.param_bytes,
            reference_model_bytes=self.reference.model_bytes,
            reference_param_bytes=self.reference.param_bytes,
        )

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
        """Run an aarch64 TVM library itself under qemu-user on the first held-out feeds, if it is one."""
        from edgekit import emulation

        result = built.result
        if result.runtime != "tvm" or self.request.profile.cpu.arch != "aarch64" or host_arch() == "aarch64":
            return None
        feeds = self.feeds[:EMULATED_FEEDS]
        outputs = emulation.run_tvm_library(result.entrypoint, feeds)
        count = sum(len(next(iter(f.values()))) for f in feeds)
        agreement = compare([o[:count] for o in self.reference_outputs], outputs)
        return {"samples": count, "max_abs_error": agreement.max_abs_error, "cosine": agreement.cosine,
                "top1_agreement": agreement.top1_agreement}  # fmt: skip

    def gate(self, metrics: Metrics) -> str | None:
        """Why a candidate is outside the accuracy budget, or None."""
        budget = self.request.max_accuracy_drop
        if metrics.top1_agreement is not None:
            if metrics.accuracy is not None and metrics.reference_accuracy is not None:
                drop = (metrics.reference_accuracy - metrics.accuracy) * 100
                return f"top-1 accuracy drops {drop:.2f} points (budget {budget})" if _over(drop, budget) else None
            disagree = (1 - metrics.top1_agreement) * 100
            return (
                f"top-1 differs from fp32 on {disagree:.2f}% of samples (budget {budget})"
                if _over(disagree, budget)
                else None
            )
        if metrics.cosine is not None and metrics.cosine < self.request.min_cosine:
            return f"cosine {metrics.cosine:.5f} < {self.request.min_cosine}"
        return None


def _build(
    plan: _Plan,
    request: CompileRequest,
    model: PreparedModel,
    calibration: SampleSet | None,
    outdir: Path,
    progress: Progress,
) -> BuildResult:
    assert plan.backend is not None and plan.options is not None, "skipped plans are never built"
    build_request = BuildRequest(
        model=model,
        profile=request.profile,
        precision=plan.candidate.precision,
        calibration=calibration,
        options=plan.options,
        outdir=outdir,
        progress=progress,
    )
    # Libraries print their own progress; stdout is reserved for the report (--json).
    with contextlib.redirect_stdout(sys.stderr):
        result = plan.backend.build(build_request)
    _remove_intermediates(outdir, result.entrypoint)
    return result


def _build_and_verify(
    plan: _Plan,
    index: int,
    request: CompileRequest,
    model: PreparedModel,
    calibration: SampleSet | None,
    verifier: _Verifier,
    workdir: Path,
    progress: Progress,
) -> _Built | CandidateReport:
    """A failing backend or runtime becomes a failed candidate in the report; the other candidates go on."""
    candidate = plan.candidate
    report = CandidateReport(backend=candidate.backend, precision=candidate.precision, status="passed")
    outdir = workdir / f"{index:02d}-{candidate.backend}-{candidate.precision}" / "artifacts"
    started = time.perf_counter()
    try:
        result = _build(plan, request, model, calibration, outdir, progress)
    except BadInput as error:
        if request.backend != "auto":
            raise  # the one backend the user asked for cannot take this model: their input, exit 2
        log.warning(
            "%s %s cannot build this model (%s); trying the next candidate",
            candidate.backend,
            candidate.precision,
            error,
        )
        return report.model_copy(update={"status": "failed", "reason": f"build: {_one_line(error)}"})
    except Exception as error:
        log.debug("build failed", exc_info=True)
        return report.model_copy(update={"status": "failed", "reason": f"build: {_one_line(error)}"})
    built = _Built(plan, result, outdir, report.model_copy(update={"build_seconds": time.perf_counter() - started}))
    try:
        with progress.task(f"{candidate.backend} {candidate.precision}: verifying against fp32", total=1):
            metrics = verifier.verify(built)
    except Exception as error:
        log.debug("verification failed", exc_info=True)
        return built.report.model_copy(update={"status": "failed", "reason": f"run: {_one_line(error)}"})
    problems = [p for p in (verifier.gate(metrics), *result.unfit) if p]
    details = dict(result.details)
    if request.verify_emulated:
        emulated = verifier.emulate(built)
        if emulated is not None:
            details["emulated_aarch64"] = emulated
            metrics = metrics.model_copy(
                update={"verified_on": f"{metrics.verified_on}; the aarch64 .so itself ran under qemu-user on "
                        f"{emulated['samples']} samples, max|err| {emulated['max_abs_error']:.2e} vs fp32"}
            )  # fmt: skip
            if emulated["cosine"] < request.min_cosine:
                problems.append(f"emulated aarch64 output cosine {emulated['cosine']:.5f} < {request.min_cosine}")
    built.report = built.report.model_copy(
        update={
            "metrics": metrics,
            "details": details,
            "status": "rejected" if problems else "passed",
            "reason": "; ".join(problems),
        }
    )
    return built


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _remove_intermediates(artifacts: Path, entrypoint: Path) -> None:
    """Keep only the entrypoint and its companions (e.g. model.bin beside model.xml)."""
    keep = {entrypoint.name, entrypoint.with_suffix(".bin").name}
    for path in artifacts.iterdir():
        if path.name not in keep:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _rank(built: list[_Built], profile: Profile) -> str:
    """Rank the passing candidates (rank 1 is chosen), tell each loser why it lost, and return the basis."""
    passed = [b for b in built if b.report.status == "passed"]
    native = profile.runs_on_this_host() and profile.accelerator.kind == "none"
    if native:
        passed.sort(key=lambda b: b.report.metrics.latency_p50_ms)
        basis = "fastest host p50 within the accuracy budget (this host has the device's CPU architecture)"
    else:
        missing = f"{profile.accelerator.kind} {profile.accelerator.arch}" if profile.accelerator.kind != "none" else ""
        hardware = missing or f"{profile.cpu.arch} CPU"
        basis = (
            f"profile order within the accuracy budget: this {host_arch()} host has no {hardware}, "
            "so device latency was not measured"
        )
    for rank, b in enumerate(passed, 1):
        update: dict = {"rank": rank, "status": "chosen" if rank == 1 else "passed"}
        if rank > 1:
            winner = passed[0].report
            update["reason"] = (
                f"slower: p50 {b.report.metrics.latency_p50_ms:.3f} ms vs {winner.backend} {winner.precision} "
                f"{winner.metrics.latency_p50_ms:.3f} ms"
                if native
                else f"after {winner.backend} {winner.precision} in the profile's order"
            )
        b.report = b.report.model_copy(update=update)
    return basis


def _package(
    request: CompileRequest,
    model: PreparedModel,
    chosen: _Built,
    verifier: _Verifier,
    report: CompileReport,
    workdir: Path,
) -> Manifest:
    root = workdir / "bundle"
    shutil.copytree(chosen.outdir, root / "artifacts")
    feeds = verifier.feeds[:SELFTEST_BATCHES]
    count = sum(len(next(iter(f.values()))) for f in feeds)
    expected = [o[:count] for o in chosen.outputs]
    write_vectors(root / "selftest" / "vectors.npz", feeds, expected)
    (root / "report.json").write_text(report.model_dump_json(indent=2))
    atol, rtol = expected_tolerance(expected)
    key_path = request.sign_key
    if key_path is None:
        key_path, created = default_signing_key()
        if created:
            log.warning("created a signing key at %s (public key beside it); pass --sign-key for your own", key_path)
    private_key = load_private_key(key_path)
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
    )
    write_bundle(root, manifest, private_key, request.out)
    return manifest


def compile_model(request: CompileRequest, progress: Progress | None = None) -> tuple[CompileReport, Manifest]:
    """Build every planned candidate, verify each against fp32, bundle the best. Raises CompileFailed if none pass."""
    progress = progress or NoProgress()
    plans = plan_candidates(request)
    with tempfile.TemporaryDirectory(prefix="edgekit-compile-") as scratch:
        workdir = Path(scratch)
        with progress.task("checking and simplifying the model", total=1):
            model = prepare_model(request.model, workdir, request.input_shapes, request.profile.batch_size)
        calibration, held_out, data = _load_samples(request, model)
        with progress.task("fp32 reference (onnxruntime)", total=1):
            verifier = _Verifier(request, model, held_out, data)
        outcomes: list[_Built | CandidateReport] = []
        for index, plan in enumerate(plans):
            if plan.skip:
                c = plan.candidate
                outcomes.append(
                    CandidateReport(backend=c.backend, precision=c.precision, status="skipped", reason=plan.skip)
                )
                continue
            outcomes.append(_build_and_verify(plan, index, request, model, calibration, verifier, workdir, progress))
        built = [o for o in outcomes if isinstance(o, _Built)]
        ranking = _rank(built, request.profile)
        chosen = next((b for b in built if b.report.status == "chosen"), None)
        report = CompileReport(
            model=str(request.model),
            profile=request.profile.name,
            host=f"{host_arch()}",
            data=f"{data} ({len(held_out)} samples)",
            ranking=ranking,
            reference=verifier.reference,
            candidates=[o.report if isinstance(o, _Built) else o for o in outcomes],
        )
        if chosen is None:
            raise CompileFailed(
                "no candidate built and passed verification; see the table for each one's reason", report
            )
        report = report.model_copy(update={"bundle": str(request.out)})
        manifest = _package(request, model, chosen, verifier, report, workdir)
    return report, manifest


def _over(points: float, budget: float) -> bool:
    """Whether a loss in percentage points exceeds the budget; exactly at the budget passes even when the float
    arithmetic lands a hair above it (99.0 - 98.0 on 200 samples is 1.0000000000000009)."""
    return points > budget + 1e-9
