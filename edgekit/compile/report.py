"""The compile report: every candidate tried, why it was kept or not, and how it measured. Also report.json."""

from typing import Any, Literal

from pydantic import Field

from edgekit.manifest import Metrics
from edgekit.protocol import BenchResult
from edgekit.schema import Precision, StrictModel

Status = Literal["chosen", "passed", "rejected", "failed", "skipped", "unverified"]


class Verdict(StrictModel):
    """Sample-size figures behind a candidate's accuracy verdict (edgekit/compile/verdict.py)."""

    samples: int
    sample_points: float | None = Field(None, description="What one sample is worth, in top-1 points (100/n)")
    top1_disagreements: int | None = None
    top1_agreement_ci: tuple[float, float] | None = Field(None, description="95% Wilson interval")
    accuracy_drop_points: float | None = None
    accuracy_drop_ci: tuple[float, float] | None = Field(None, description="95% interval, points")
    output_cosine: dict[str, float] = Field(default_factory=dict)
    output_snr_db: dict[str, float] = Field(default_factory=dict)
    output_exact: dict[str, float] = Field(default_factory=dict, description="Integer outputs: fraction equal")


class CandidateReport(StrictModel):
    backend: str
    precision: Precision
    status: Status
    reason: str = ""
    build_seconds: float | None = None
    rank: int | None = Field(None, description="1 is the chosen candidate; only passing candidates are ranked")
    metrics: Metrics | None = None
    verdict: Verdict | None = None
    details: dict[str, Any] = Field(default_factory=dict, description="Backend facts, e.g. NPU/CPU op placement")
    device: BenchResult | None = Field(None, description="What the --measure-on device measured of it")


class ReferenceReport(StrictModel):
    """The fp32 ONNX Runtime run every candidate is compared with."""

    latency_p50_ms: float
    latency_p95_ms: float
    model_bytes: int
    param_bytes: int
    accuracy: float | None = None


class CompileReport(StrictModel):
    model: str
    profile: str
    host: str
    data: str
    ranking: str = Field("", description="How passing candidates were ranked, and what could not be measured")
    measured_on: dict[str, str] | None = Field(
        None, description="The fleet device the candidates were ranked on (--measure-on): device, machine, cpu"
    )
    reference: ReferenceReport
    candidates: list[CandidateReport]
    warnings: list[str] = Field(default_factory=list, description="What the user should know about this verdict")
    drift_reference: str = Field("", description="What the bundle's drift reference sketches, or why it has none")
    bundle: str | None = None
