"""The compile report: every candidate tried, why it was kept or not, and how it measured. Also report.json."""

from typing import Any, Literal

from pydantic import Field

from edgekit.manifest import Metrics
from edgekit.schema import Precision, StrictModel

Status = Literal["chosen", "passed", "rejected", "failed", "skipped", "unverified"]


class CandidateReport(StrictModel):
    backend: str
    precision: Precision
    status: Status
    reason: str = ""
    build_seconds: float | None = None
    rank: int | None = Field(None, description="1 is the chosen candidate; only passing candidates are ranked")
    metrics: Metrics | None = None
    details: dict[str, Any] = Field(default_factory=dict, description="Backend facts, e.g. NPU/CPU op placement")


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
    reference: ReferenceReport
    candidates: list[CandidateReport]
    bundle: str | None = None
