"""The MQTT contract between agents and the hub: topic names and every payload's schema.

Payloads are JSON with `schema_version` (the protocol's major version); consumers validate with these models and
reject (and report) what does not validate, but ignore — and count — fields they do not know, which a newer sender
may add (`edgekit.schema.WireModel`). Bundle chunks are the one binary payload: a small validated JSON header, then
raw bytes (docs/protocol.md).
"""

import re
import struct
import time
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator

from edgekit.schema import WireModel, describe_validation_error, unknown

PREFIX = "edgekit/v1"
DEVICE_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
SHA256 = r"^[0-9a-f]{64}$"
# A payload larger than this is refused before it is parsed (chunks have their own bound).
DEFAULT_MAX_PAYLOAD = 256 * 1024
CHUNK_MAGIC = b"EKC1"
# Revs fit a signed 64-bit column. A device reports its own rev, so the hub must be able to refuse one it cannot
# go above (MAX_REV itself) rather than derive MAX_REV + 1 from it.
MAX_REV = 2**63 - 1
# Bumped only for a change an older receiver cannot ignore; added fields are not one (docs/protocol.md).
PROTOCOL_MAJOR = 1
# What this version reads: the current major and, once there is one, the previous, so a fleet can upgrade in steps.
SUPPORTED_MAJORS = (1,)
# No edge bundle comes near it; a bound keeps a made-up size from deriving an absurd download deadline.
MAX_BUNDLE_SIZE = 16 * 1024**3


class Topic:
    """Topic names under `edgekit/v1/<device_id>/`; `device_topic` builds them, `parse_topic` splits them."""

    STATUS = "status"
    TELEMETRY = "telemetry"
    RESULTS = "results"
    EVENTS = "events"
    DESIRED = "config/desired"
    TRUST = "config/trust"
    REPORTED = "config/reported"
    TRANSFER_REQUEST = "transfer/request"
    TRANSFER_CHUNK = "transfer/chunk"
    INPUT = "input"
    PROBE = "link/probe"  # the agent's own echo: its subscriptions still deliver (edgekit.agents.link)
    SAMPLES = "samples"  # captured inputs, in chunks (encode_sample; docs/datasets.md)
    SAMPLES_ACK = "samples/ack"  # hub → device: a sample is stored (or refused): the device may delete it
    BENCH = "bench/job"  # hub → device, signed: measure a candidate bundle without activating it (docs/measure.md)


def device_topic(device_id: str, name: str) -> str:
    return f"{PREFIX}/{device_id}/{name}"


def parse_topic(topic: str) -> tuple[str, str] | None:
    """(device_id, name) for a topic under the prefix, else None."""
    head = PREFIX + "/"
    if not topic.startswith(head):
        return None
    device_id, sep, name = topic[len(head) :].partition("/")
    return (device_id, name) if sep and device_id else None


class Payload(WireModel):
    schema_version: int = Field(PROTOCOL_MAJOR, strict=True, description="The protocol's major version")

    @field_validator("schema_version")
    @classmethod
    def _known_major(cls, major: int) -> int:
        if major not in SUPPORTED_MAJORS:
            speaks = ", ".join(map(str, SUPPORTED_MAJORS))
            raise ValueError(f"protocol major version {major}: this edgekit speaks {speaks} (upgrade this side)")
        return major


class PayloadRejected(ValueError):
    """A payload that does not match its schema; the message says which field and why."""


def decode(model: type[Payload], data: bytes, max_bytes: int = DEFAULT_MAX_PAYLOAD) -> Any:
    """Validate a JSON payload; oversized ones are refused unread."""
    if len(data) > max_bytes:
        raise PayloadRejected(f"payload of {len(data)} bytes is over the {max_bytes}-byte maximum; not read")
    try:
        payload = model.model_validate_json(data)
    except ValidationError as error:
        raise PayloadRejected(describe_validation_error(error)) from None
    unknown.note(payload)
    return payload


def encode(payload: Payload) -> bytes:
    return payload.model_dump_json(exclude_none=True).encode()


class BundleRef(WireModel):
    """A bundle as devices and the hub name it: the sha256 of the .ekb file is its id."""

    id: str = Field(pattern=SHA256)
    name: str
    version: str
    size: int = Field(ge=1, le=MAX_BUNDLE_SIZE)


class Status(Payload):
    state: Literal["online", "offline"]
    ts: float = Field(default_factory=time.time)
    agent_version: str | None = None
    profile: str | None = None
    runtimes: list[str] = []
    bundle: BundleRef | None = None


class Sequenced(Payload):
    """Every device → hub message after `status` carries a per-device seq so the hub can drop duplicates."""

    seq: int = Field(ge=1)
    ts: float


# The health blocks are stored as JSON, which has no NaN or infinity (PostgreSQL refuses them): refused on ingest.
FINITE = ConfigDict(allow_inf_nan=False)


class Disagreement(WireModel):
    """One input on which the shadow bundle and the active one disagreed: each side's answer, named when labelled."""

    active: str = Field(max_length=160)
    shadow: str = Field(max_length=160)


class ShadowStats(WireModel):
    """The shadow bundle run on a sample of live inputs beside the active one, since the shadow started."""

    model_config = FINITE

    bundle: str = Field(pattern=SHA256, description="The shadow bundle's id")
    active: str = Field(pattern=SHA256, description="The bundle it is compared with")
    metric: Literal["top1", "boxes", "cosine"] = Field(
        description="top1: same top class; boxes: detections matched by IoU and class; cosine: raw outputs"
    )
    samples: int = Field(0, ge=0, description="Inputs both ran on")
    agreement: float | None = Field(None, ge=0, le=1, description="Mean agreement over the samples")
    errors: int = Field(0, ge=0, description="Samples the shadow failed on (exception, NaN)")
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    active_p50_ms: float | None = Field(None, description="The active bundle on the same samples")
    active_p95_ms: float | None = None
    threads: int | None = Field(None, ge=1, description="Threads the shadow's runtime runs on")
    active_threads: int | None = Field(None, ge=1, description="Threads the active bundle's runtime may use")
    budget_skipped: int = Field(0, ge=0, description="Inputs not shadowed because the CPU budget was spent")
    disagreements: list[Disagreement] = Field([], max_length=8, description="The most recent ones")


class ModelStats(WireModel):
    """The active bundle since it became active: what health gates compare with the bundle before it."""

    model_config = FINITE

    bundle: str = Field(pattern=SHA256)
    since: float = Field(description="When it became active (device clock)")
    inferences: int = Field(0, ge=0)
    errors: int = Field(0, ge=0)
    latency_p50_ms: float | None = Field(None, description="Over the most recent inferences (a bounded window)")
    latency_p95_ms: float | None = None
    classes: dict[str, int] = Field(
        {}, max_length=65, description="Top-1 class index → count; the rarest past 64 summed under 'other'"
    )
    mean_confidence: float | None = Field(None, description="Mean top-1 score (classifiers) or detection score")


class DriftStats(WireModel):
    """How far the live inputs have moved from the bundle's calibration data (edgekit.drift)."""

    model_config = FINITE

    score: float = Field(ge=0, description="Population stability index, the highest over the features")
    samples: int = Field(ge=0, description="Inputs in the live window")
    feature: str = Field(max_length=64, description="The feature with the highest score")


class Telemetry(Sequenced):
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    fps: float = 0.0
    inferences: int = 0
    cpu_percent: float | None = None
    memory_mb: float | None = None
    temperature_c: float | None = None
    queue_depth: int = 0
    dropped_frames: int = 0
    store_depth: int = 0
    store_dropped: int = 0
    rejected_payloads: int = 0
    bundle: str | None = Field(None, description="name@version of the active bundle")
    model: ModelStats | None = None
    shadow: ShadowStats | None = None
    drift: DriftStats | None = None
    capture: "CaptureStats | None" = None


class Detection(WireModel):
    box: list[float] = Field(min_length=4, max_length=4, description="x1, y1, x2, y2")
    score: float
    label: int
    name: str | None = Field(None, description="The class name, from the bundle's labels; absent without them")


class Score(WireModel):
    label: int
    score: float
    name: str | None = Field(None, description="The class name, from the bundle's labels; absent without them")


class Result(Sequenced):
    frame_ts: float
    bundle: str
    latency_ms: float
    task: Literal["classifier", "detector", "raw"]
    top: list[Score] | None = None
    detections: list[Detection] | None = None
    values: list[float] | None = None
    source: dict[str, Any] = {}


EventType = Literal[
    "agent.started",
    "agent.stopping",
    "source.error",
    "source.recovered",
    "payload.rejected",
    "store.overflow",
    "config.applied",
    "config.rejected",
    "update.started",
    "update.progress",
    "update.downloaded",
    "update.refused",
    "update.selftest",
    "update.activated",
    "update.healthy",
    "update.rolled_back",
    "update.failed",
    "inference.error",
    "trust.updated",
    "trust.rejected",
    "sample.captured",
    "capture.dropped",
    "bench.started",
    "bench.result",
    "bench.failed",
]


class Event(Sequenced):
    type: EventType
    level: Literal["info", "warning", "error"] = "info"
    message: str
    data: dict[str, Any] = {}


class Thresholds(WireModel):
    score: float = Field(0.5, ge=0, le=1, description="Detections below this score are dropped")
    top_k: int = Field(5, ge=1, le=100)
    iou: float = Field(0.5, ge=0, le=1, description="NMS overlap for detectors")


class Rates(WireModel):
    telemetry_s: float | None = Field(None, gt=0, le=3600, description="Unset: the agent's own --telemetry-s")
    max_fps: float | None = Field(None, gt=0, description="Cap on inferences per second; unset: as fast as frames come")
    results_qos: Literal[0, 1] = 1


# HTTP downloads (`GET /dl/{bundle}?…&base=ID`): headers that mark a response as a delta from the bundle `base`.
DELTA_BASE_HEADER = "X-Edgekit-Delta-Base"
DELTA_SHA256_HEADER = "X-Edgekit-Delta-Sha256"


# Agents refuse a desired state with a field they do not know (docs/protocol.md "Compatibility"), so the hub sends
# a newer field only to devices whose status names a version that takes it: download links (`DesiredBundle.urls`)
# from 0.2, a shadow bundle (`DesiredState.shadow`) from 0.3.
DOWNLOAD_LINKS_SINCE = (0, 2)
SHADOW_SINCE = (0, 3)
CAPTURE_SINCE = (0, 4)
BENCH_SINCE = (0, 5)  # agents that take benchmark jobs (bench/job)


def agent_takes(agent_version: str | None, since: tuple[int, int]) -> bool:
    """Whether an agent of `agent_version` (from its status) is `since` or newer."""
    match = re.match(r"(\d+)\.(\d+)", agent_version or "")
    return match is not None and (int(match[1]), int(match[2])) >= since


class DesiredBundle(BundleRef):
    allow_downgrade: bool = False
    # HTTP(S) download links, tried in order before chunks over MQTT (edgekit.hub.downloads); none: chunks only.
    # None, not []: left out of the payload, which a 0.1 agent then accepts.
    urls: list[Annotated[str, Field(max_length=2048, pattern=r"^https?://")]] | None = Field(None, max_length=8)


class DesiredShadow(WireModel):
    """A bundle to run beside the active one on a sample of live inputs, compared but never switched to."""

    bundle: DesiredBundle
    every_n: int = Field(1, ge=1, le=10_000, description="Shadow at most every Nth input")
    budget: float = Field(
        0.25, gt=0, le=4, description="Shadow inference time at most this fraction of the active model's time"
    )


class DesiredState(Payload):
    """What the hub wants a device to run; `rev` orders updates so stale or repeated ones are no-ops."""

    # Strict and bounded: "1", true or a 500-digit rev would otherwise be applied, and an absurd rev would make
    # every later (sane) desired state look stale.
    rev: int = Field(ge=0, le=MAX_REV, strict=True)
    bundle: DesiredBundle | None = None
    source: str | dict[str, Any] | None = None
    task: Literal["auto", "classifier", "detector", "raw"] = "auto"
    thresholds: Thresholds = Thresholds()
    rates: Rates = Rates()
    health_checks: int = Field(20, ge=1, le=10_000, description="Inferences that must succeed after a switch")
    # Sent only to agents that take it (`agent_takes(version, SHADOW_SINCE)`): a 0.1 or 0.2 agent refuses it.
    shadow: DesiredShadow | None = None
    # Sent only to agents that take it (`agent_takes(version, CAPTURE_SINCE)`); None: capture off (the default).
    capture: "CapturePolicy | None" = None


class BenchJob(WireModel):
    """A candidate bundle for the device to verify like an update and time without activating it (`edgekit bench`,
    `edgekit compile --measure-on`); the device answers with a `bench.result` or `bench.failed` event whose data
    is a `BenchResult` or names the job and why."""

    id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    bundle: DesiredBundle
    mode: Literal["bundle", "tvm-trials"] = Field(
        "bundle", description="bundle: time the model; tvm-trials: time each TVM tuning trial library the bundle "
        "lists (TRIALS_KEY in its build details), answered with a TrialResult"
    )  # fmt: skip
    seconds: float = Field(5.0, gt=0, le=600, description="How long to time the candidate, after its warm-up runs")
    warmup: int = Field(3, ge=0, le=1000)
    number: int = Field(3, ge=1, le=1000, description="tvm-trials: runs per timing")
    repeat: int = Field(1, ge=1, le=100, description="tvm-trials: timings per trial")


TRIALS_KEY = "tvm_trials"  # Manifest.build_details of a trial bundle: a list of TrialSpec


class TrialSpec(WireModel):
    """One MetaSchedule trial in a trial bundle: a TVM library (its entry function is the scheduled task) and its
    arguments as MetaSchedule describes them, `["TENSOR", dtype, shape]`."""

    file: str = Field(max_length=200)
    args: list[tuple[Literal["TENSOR"], str, list[int]]] = Field(max_length=64)


class TrialTiming(WireModel):
    secs: list[float] | None = Field(None, max_length=100, description="Seconds per run, one per timing")
    error: str | None = Field(None, max_length=2000)


class TrialResult(WireModel):
    """What a device measured of a trial bundle (`BenchJob.mode` tvm-trials): one timing per TrialSpec, in order."""

    job: str
    bundle: str = Field(pattern=SHA256)
    trials: list[TrialTiming] = Field(max_length=4096)
    machine: str = ""
    cpu: str = ""


class BenchResult(WireModel):
    """What a device measured of a candidate bundle: the `data` of its `bench.result` event."""

    model_config = FINITE

    job: str
    bundle: str = Field(pattern=SHA256)
    runs: int = Field(ge=1)
    p50_ms: float
    p95_ms: float
    throughput: float = Field(description="Inferences per second over the timed runs, one after another")
    threads: int | None = Field(None, description="The runtime threads the candidate ran on (the agent's)")
    peak_rss_mib: float | None = Field(None, description="The agent's largest RSS while the candidate ran")
    added_rss_mib: float | None = Field(None, description="Over the agent's RSS before the candidate was loaded")
    machine: str = Field("", description="platform.machine(): aarch64, x86_64")
    cpu: str = Field("", description="The CPU's model name (or part) and how many cores")
    temperature_c: float | None = Field(None, description="The hottest thermal zone after the runs")
    throttled: bool | None = Field(None, description="The firmware says the CPU is throttled (Raspberry Pi); None: "
                                   "no such flag on this device")  # fmt: skip
    live_p50_before_ms: float | None = Field(None, description="The live model's p50 before the job")
    live_p50_during_ms: float | None = Field(None, description="... while the candidate ran (lower priority)")
    live_p50_after_ms: float | None = None


# The desired state's configuration, which the hub sets per device or group (edgekit.hub.config) and an agent takes
# all or nothing (edgekit.agents.configure); the rest of a desired state is the rollout's (bundle, shadow, checks).
CONFIG_FIELDS = tuple(name for name in ("source", "task", "thresholds", "rates", "capture")
                      if name in DesiredState.model_fields)  # fmt: skip

UpdatePhase = Literal[
    "idle", "downloading", "verifying", "testing", "switching", "healthy", "refused", "rolled_back", "failed"
]


class UpdateState(WireModel):
    state: UpdatePhase
    bundle: str | None = Field(None, description="sha256 of the bundle this update is about")
    detail: str = ""


ShadowPhase = Literal["preparing", "running", "refused", "failed"]


class ShadowState(WireModel):
    state: ShadowPhase
    bundle: BundleRef
    detail: str = ""


class ConfigState(WireModel):
    """What became of the configuration (source, task, thresholds, rates) of the desired state `rev`: refused ones
    leave the device on its previous configuration, the rest of that desired state (bundle, shadow) applied."""

    state: Literal["applied", "refused"]
    rev: int = Field(ge=0, le=MAX_REV, strict=True)
    detail: str = Field("", max_length=2000)


class ReportedState(Payload):
    # Bounded and strict like DesiredState.rev: the hub derives the next desired rev from it.
    rev: int = Field(ge=-1, le=MAX_REV, strict=True, description="The desired rev last converged to; -1 before any")
    ts: float = Field(default_factory=time.time)
    bundle: BundleRef | None = None
    previous_bundle: BundleRef | None = None
    source: dict[str, Any] | None = None
    task: str = "auto"
    thresholds: Thresholds = Thresholds()
    rates: Rates = Rates()
    update: UpdateState = UpdateState(state="idle")
    shadow: ShadowState | None = None
    config: ConfigState | None = Field(None, description="Set by agents from 0.4 on")


class ChunkRequest(Payload):
    """Device → server: send `count` chunks of the bundle starting at `index`."""

    bundle: str = Field(pattern=SHA256)
    index: int = Field(ge=0)
    count: int = Field(ge=1, le=64)
    chunk_size: int = Field(ge=1024, le=4 * 1024 * 1024)
    base: str | None = Field(
        None, pattern=SHA256, description="A bundle the device holds: send the delta from it to `bundle` instead"
    )


class ChunkHeader(Payload):
    bundle: str = Field(pattern=SHA256)
    index: int = Field(ge=0)
    total: int = Field(ge=1)
    size: int = Field(ge=1, le=MAX_BUNDLE_SIZE, description="Bundle size in bytes (the delta's, for a delta)")
    sha256: str = Field(pattern=SHA256, description="Of this chunk's data")
    error: str | None = Field(None, description="Set (and no data) when the server cannot serve the bundle")
    base: str | None = Field(
        None, pattern=SHA256, description="Echoes a request's `base`: a delta's chunk (`size`: the delta's) or error"
    )
    delta_sha256: str | None = Field(None, pattern=SHA256, description="Of the whole delta, on a delta's chunks")


def _encode_framed(magic: bytes, header: WireModel, data: bytes) -> bytes:
    """The binary payloads' frame: 4 magic bytes, the JSON header's length (u32, big-endian), the header, the data."""
    head = header.model_dump_json(exclude_none=True).encode()
    return magic + struct.pack(">I", len(head)) + head + data


def _decode_framed(payload: bytes, magic: bytes, model: type[Any], what: str, header_name: str,
                   max_header: int) -> tuple[Any, bytes]:  # fmt: skip
    """Header and data of a `_encode_framed` payload; PayloadRejected naming `what` (e.g. "bundle chunk") and why."""
    if len(payload) < 8 or payload[:4] != magic:
        raise PayloadRejected(f"not a {what}: expected the {magic.decode()} magic and a header length")
    (length,) = struct.unpack(">I", payload[4:8])
    if length > min(len(payload) - 8, max_header):
        raise PayloadRejected(f"{header_name} length {length} does not fit the {len(payload)}-byte payload")
    try:
        header = model.model_validate_json(payload[8 : 8 + length])
    except ValidationError as error:
        raise PayloadRejected(f"{header_name}: {describe_validation_error(error)}") from None
    return header, payload[8 + length :]


def encode_chunk(header: ChunkHeader, data: bytes) -> bytes:
    return _encode_framed(CHUNK_MAGIC, header, data)


def decode_chunk(payload: bytes, max_bytes: int) -> tuple[ChunkHeader, bytes]:
    if len(payload) > max_bytes:
        raise PayloadRejected(f"chunk of {len(payload)} bytes is over the {max_bytes}-byte maximum; not read")
    return _decode_framed(payload, CHUNK_MAGIC, ChunkHeader, "bundle chunk", "chunk header", 4096)


# ---- sample capture (docs/datasets.md): the agent's captured inputs, uploaded in chunks ------------------------------

SAMPLE_MAGIC = b"EKS1"
MAX_SAMPLE_BYTES = 4 * 1024 * 1024  # one captured input, encoded (PNG or .npy)
SAMPLE_CHUNK_BYTES = 64 * 1024  # well under every broker's default maximum packet size
MAX_SAMPLE_HEADER = 16 * 1024


class CapturePolicy(WireModel):
    """Which of its inputs a device keeps for the hub's datasets, and how many; absent from the desired state: none."""

    below_confidence: float | None = Field(None, gt=0, le=1, description="Capture when the top score is below it")
    on_disagreement: bool = Field(False, description="Capture when the shadow bundle disagrees with the active one")
    random_rate: float = Field(0.0, ge=0, le=1, description="Capture this fraction of all inputs at random")
    max_per_day: int = Field(100, ge=1, le=100_000, description="Samples captured per UTC day, at most")
    max_bytes_per_day: int = Field(50 * 1024**2, ge=1024, le=10 * 1024**3, description="Bytes captured per UTC day")
    max_sample_bytes: int = Field(1024**2, ge=1024, le=MAX_SAMPLE_BYTES, description="A larger input is not kept")


class CaptureStats(WireModel):
    """The agent's capture spool (agents/capture.py), counted since it was created."""

    captured: int = Field(0, ge=0)
    uploaded: int = Field(0, ge=0, description="Acknowledged as stored by the hub")
    refused: int = Field(0, ge=0, description="Refused by the hub (its reason is in the agent's log)")
    dropped: int = Field(0, ge=0, description="Spooled but dropped, oldest first, to respect the spool's bound")
    spooled: int = Field(0, ge=0, description="Waiting to be uploaded")
    spool_bytes: int = Field(0, ge=0)


SampleReason = Literal["low_confidence", "disagreement", "random"]


class SampleMeta(WireModel):
    """What a captured input is: sent with every chunk, so the hub can file it whichever chunk comes first."""

    ts: float = Field(description="When the source gave the input (device clock)")
    bundle: str = Field(max_length=160, description="name@version of the active bundle")
    bundle_id: str = Field(pattern=SHA256)
    input: str = Field(max_length=128, description="The model input it fed")
    format: Literal["png", "npy"] = Field(description="png: the image the source gave; npy: a sensor window")
    reason: SampleReason
    output: dict[str, Any] = Field({}, description="The result's summary (top, detections or values)")


class SampleHeader(Payload):
    sample: str = Field(pattern=SHA256, description="sha256 of the whole sample: its id")
    index: int = Field(ge=0)
    total: int = Field(ge=1, le=MAX_SAMPLE_BYTES // 1024)
    size: int = Field(ge=1, le=MAX_SAMPLE_BYTES, description="The whole sample's bytes")
    sha256: str = Field(pattern=SHA256, description="Of this chunk's data")
    meta: SampleMeta


class SampleAck(Payload):
    """Hub → device: `sample` is stored (or was refused, with `error`): the device deletes it from its spool."""

    sample: str = Field(pattern=SHA256)
    error: str | None = Field(None, max_length=400)


def encode_sample(header: SampleHeader, data: bytes) -> bytes:
    return _encode_framed(SAMPLE_MAGIC, header, data)


def decode_sample(payload: bytes) -> tuple[SampleHeader, bytes]:
    """A sample chunk's header and data; PayloadRejected (saying why) when it is not a valid one."""
    if len(payload) > SAMPLE_CHUNK_BYTES + MAX_SAMPLE_HEADER + 8:
        raise PayloadRejected(f"sample chunk of {len(payload)} bytes is over the maximum; not read")
    return _decode_framed(payload, SAMPLE_MAGIC, SampleHeader, "sample chunk", "sample header", MAX_SAMPLE_HEADER)


Telemetry.model_rebuild()
DesiredState.model_rebuild()
