"""The bundle manifest: what a device needs to trust, load, feed and self-test a compiled model."""

from datetime import datetime
from typing import Any, Literal

from pydantic import Field, SerializationInfo, SerializerFunctionWrapHandler, field_validator, model_serializer

from edgekit.drift import DriftReference
from edgekit.profiles import Preprocessing
from edgekit.protocol import PROTOCOL_MAJOR, SUPPORTED_MAJORS
from edgekit.schema import Precision, WireModel

SEMVER = r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$"
Layout = Literal["NCHW", "NHWC", "NC", "other"]
ADDED_SINCE_0_1 = ("labels", "drift_reference")  # optional manifest fields a 0.1 agent does not know


class TensorSpec(WireModel):
    name: str
    shape: list[int]
    dtype: str = Field(description="numpy dtype name, e.g. float32")
    layout: Layout = "other"
    batch_axis: int | None = Field(
        0, ge=0, description="Which dim is the batch (e.g. 1 for an RNN state [2, batch, 128]); None: not batched"
    )

    @model_serializer(mode="wrap")
    def _omit_default_batch_axis(
        self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
    ) -> dict[str, Any]:
        # Written only where it says something: manifests of axis-0 models stay readable by earlier agents,
        # which know no batch_axis field.
        data: dict[str, Any] = handler(self)
        if self.batch_axis == 0:
            data.pop("batch_axis", None)
        return data


class FileEntry(WireModel):
    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class Metrics(WireModel):
    """How one candidate compares with the fp32 ONNX Runtime reference on held-out samples."""

    verified_on: str = Field(description="Where the candidate ran, e.g. 'host x86_64 CPU', or why it did not")
    samples: int = 0
    data: Literal["held-out calibration split", "evaluation set", "all calibration samples", "synthetic", "none"] = (
        "none"
    )
    max_abs_error: float | None = None
    cosine: float | None = None
    top1_agreement: float | None = Field(None, description="Fraction of samples whose argmax matches; classifiers")
    accuracy: float | None = Field(None, description="Top-1 accuracy against labels, when labels were given")
    reference_accuracy: float | None = None
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    throughput_per_s: float | None = None
    peak_memory_mb: float | None = None
    model_bytes: int
    param_bytes: int
    reference_model_bytes: int
    reference_param_bytes: int

    @property
    def compression_ratio(self) -> float | None:
        """fp32 weight bytes over this candidate's; None for a model without weights."""
        return (
            self.reference_param_bytes / self.param_bytes if self.param_bytes and self.reference_param_bytes else None
        )


class SelfTest(WireModel):
    """Inputs and expected outputs the device checks before it activates the bundle."""

    file: str
    count: int = Field(ge=1)
    atol: float = Field(ge=0)
    rtol: float = Field(ge=0)


class Manifest(WireModel):
    """Tolerant of fields a newer compiler adds (counted and logged); `preprocessing` is the profile's own schema and
    stays strict (docs/bundle.md)."""

    # The bundle format's major version, numbered like the protocol's.
    schema_version: int = Field(PROTOCOL_MAJOR, strict=True)

    @field_validator("schema_version")
    @classmethod
    def _known_major(cls, major: int) -> int:
        if major not in SUPPORTED_MAJORS:
            raise ValueError(f"bundle format version {major}: this edgekit reads {SUPPORTED_MAJORS[-1]} (upgrade it)")
        return major

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = Field(pattern=SEMVER)
    created: datetime
    profile: str
    backend: str
    precision: Precision
    runtime: str = Field(description="Runtime adapter key on the device, e.g. onnxruntime")
    target: dict[str, Any] = Field(description="Backend-specific target, e.g. execution providers or device")
    entrypoint: str = Field(description="Main artifact, relative to the bundle root")
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    preprocessing: Preprocessing | None = None
    files: list[FileEntry]
    compiler: dict[str, str] = Field(description="Versions of edgekit and every tool that produced the artifacts")
    verification: Metrics
    build_details: dict[str, Any] = Field(default_factory=dict, description="Backend facts, e.g. NPU op placement")
    selftest: SelfTest
    signing_key_id: str
    labels: list[str] | None = Field(
        None, min_length=1, description="Class names: class index i is labels[i] (edgekit compile --labels)"
    )
    drift_reference: DriftReference | None = Field(
        None, description="A sketch of the calibration inputs the agent scores live inputs against (edgekit.drift)"
    )

    @model_serializer(mode="wrap")
    def _omit_absent_additions(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict[str, Any]:
        # Fields added since 0.1 are written only when set: a 0.1 agent refuses any field it does not know, even a
        # null one, and so still takes the bundles that do without them.
        data: dict[str, Any] = handler(self)
        for name in ADDED_SINCE_0_1:
            if data.get(name, ...) is None:
                data.pop(name)
        return data
