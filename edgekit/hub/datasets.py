"""Datasets of inputs captured on devices (docs/datasets.md): sample uploads in, stored samples out.

`SampleIngest` takes the `samples` topic's chunks from ingest's writer thread (`edgekit.hub.ingest`): each chunk is
validated (header, its hash, its place in the sample) and kept in `sample_chunks` until the sample is complete, so
a hub restart loses nothing; then the whole sample's sha256 is checked, it is stored in the dataset named after its
bundle (`name` of `name@version`), the dataset's retention limit applied (oldest dropped, counted), and the device
told on `samples/ack`. A sample the dataset already has is acknowledged again and not stored twice.

Refused, counted in ingest's `invalid` and never stored: a malformed chunk, a hash that does not match, a sample
from a device the hub does not know, a bundle name that is not a valid dataset name (path-like).

The rest is for the API and CLI: listing, labels, purge, and the `.npz` export that `edgekit compile --calibration`
takes: arrays named after the model's inputs (made from the samples exactly as the device fed them), `labels` when
every exported sample has one, and `source`, which the compile report names as its data.
"""

import hashlib
import io
import logging
import re
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from edgekit.errors import BadInput
from edgekit.hub.db import AuditEntry, BundleRecord, Dataset, DatasetSample, Device, SampleChunk, dialect_insert
from edgekit.protocol import (
    SAMPLE_CHUNK_BYTES,
    PayloadRejected,
    SampleAck,
    SampleHeader,
    Topic,
    decode_sample,
    device_topic,
    encode,
)

log = logging.getLogger(__name__)

DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DEFAULT_MAX_SAMPLES = 10_000  # a dataset's retention limits, as a new dataset gets them
DEFAULT_MAX_BYTES = 1024**3
STALE_CHUNKS_S = 7 * 86_400  # chunks of a sample that was never completed are dropped after a week
Publish = Callable[[str, bytes], None]


def check_dataset_name(name: str) -> str:
    """`name` when it is a dataset name: letters, digits, . _ - (no path: no slash, no '..')."""
    if not DATASET_NAME.fullmatch(name) or ".." in name:
        raise BadInput(f"dataset name '{name}': expected 1-64 letters, digits, . _ - starting with a letter or digit "
                       "(a bundle's name), not a path")  # fmt: skip
    return name


def dataset_of(bundle_label: str) -> str:
    """The dataset a sample goes to: its bundle's name (docs/datasets.md)."""
    return check_dataset_name(bundle_label.rpartition("@")[0] or bundle_label)


class SampleRefused(Exception):
    """A chunk ingest counts invalid; `reason` is its category in the ingest stats."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class SampleIngest:
    def __init__(self, sessions: sessionmaker, publish: Publish) -> None:
        self._sessions = sessions
        self._publish = publish
        self.stored = 0
        self.duplicates = 0

    def receive(self, device_id: str, payload: bytes) -> str | None:
        """Handle one chunk; None when it was taken, else the reason it was refused (for ingest's stats)."""
        try:
            header, data = decode_sample(payload)
            _check_chunk(header, data)
            dataset = self._dataset(header)
            with self._sessions.begin() as session:
                if session.get(Device, device_id) is None:
                    raise SampleRefused("samples: unknown device", f"no device '{device_id}'")
                done = self._take(session, device_id, dataset, header, data)
        except PayloadRejected as error:
            log.debug("samples from %s: %s", device_id, error)
            return "samples: invalid"
        except SQLAlchemyError as error:  # e.g. two hub replicas completing one sample at once: the device resends
            log.warning("sample chunk from %s not stored: %s", device_id, error)
            return "samples: not stored (database)"
        except SampleRefused as error:
            log.warning("sample from %s refused: %s", device_id, error)
            if error.reason == "samples: bad hash":
                self._forget(device_id, payload_sample(payload))
            if error.reason != "samples: unknown device":  # an unknown device is not told anything
                self._ack(device_id, payload_sample(payload), str(error))
            return error.reason
        if done:
            self._ack(device_id, header.sample)
        return None

    def _dataset(self, header: SampleHeader) -> str:
        try:
            return dataset_of(header.meta.bundle)
        except BadInput as error:
            raise SampleRefused("samples: bad dataset name", str(error)) from None

    def _take(self, session: Session, device_id: str, dataset: str, header: SampleHeader, data: bytes) -> bool:
        """Keep the chunk; store the sample once every chunk is here. Whether the sample is stored (now or before)."""
        if session.get(DatasetSample, (dataset, header.sample)) is not None:
            self.duplicates += 1
            return True
        row = {"device_id": device_id, "sample": header.sample, "index": header.index, "total": header.total,
               "received": time.time(), "data": data}  # fmt: skip
        session.execute(dialect_insert(session)(SampleChunk).on_conflict_do_nothing(), [row])
        chunks = select(SampleChunk).where(SampleChunk.device_id == device_id, SampleChunk.sample == header.sample)
        parts = {chunk.index: chunk.data for chunk in session.scalars(chunks)}
        if len(parts) < header.total:
            return False
        whole = b"".join(parts[index] for index in range(header.total))
        session.execute(delete(SampleChunk).where(SampleChunk.device_id == device_id,
                                                  SampleChunk.sample == header.sample))  # fmt: skip
        if hashlib.sha256(whole).hexdigest() != header.sample or len(whole) != header.size:
            raise SampleRefused("samples: bad hash", f"sample {header.sample}: its bytes do not match its sha256")
        self._store(session, device_id, dataset, header, whole)
        return True

    def _store(self, session: Session, device_id: str, dataset: str, header: SampleHeader, whole: bytes) -> None:
        meta = header.meta
        session.execute(dialect_insert(session)(Dataset).on_conflict_do_nothing(),
                        [{"name": dataset, "created": time.time(), "samples": 0, "stored_bytes": 0, "dropped": 0,
                          "max_samples": DEFAULT_MAX_SAMPLES, "max_bytes": DEFAULT_MAX_BYTES}])  # fmt: skip
        session.add(DatasetSample(dataset=dataset, sha256=header.sample, device_id=device_id, ts=meta.ts,
                                  received=time.time(), bundle=meta.bundle, bundle_id=meta.bundle_id,
                                  input_name=meta.input, format=meta.format, reason=meta.reason, output=meta.output,
                                  size=len(whole), data=whole))  # fmt: skip
        record = session.get(Dataset, dataset, with_for_update=True)
        record.samples += 1
        record.stored_bytes += len(whole)
        session.flush()
        _apply_retention(session, record)
        session.execute(delete(SampleChunk).where(SampleChunk.received < time.time() - STALE_CHUNKS_S))
        self.stored += 1

    def _forget(self, device_id: str, sample: str | None) -> None:
        """The chunks kept of a sample that turned out not to match its sha256: the device drops it on the ack."""
        with self._sessions.begin() as session:
            session.execute(delete(SampleChunk).where(SampleChunk.device_id == device_id,
                                                      SampleChunk.sample == sample))  # fmt: skip

    def _ack(self, device_id: str, sample: str | None, error: str | None = None) -> None:
        if sample is not None:
            ack = SampleAck(sample=sample, error=error[:400] if error else None)
            self._publish(device_topic(device_id, Topic.SAMPLES_ACK), encode(ack))


def payload_sample(payload: bytes) -> str | None:
    """The sample id of a chunk whose header validated, for a refusal's ack."""
    try:
        return decode_sample(payload)[0].sample
    except PayloadRejected:
        return None


def _check_chunk(header: SampleHeader, data: bytes) -> None:
    """The chunk's hash, and its length where it sits in the sample: a sample is cut in SAMPLE_CHUNK_BYTES pieces."""
    if hashlib.sha256(data).hexdigest() != header.sha256:
        raise SampleRefused("samples: bad hash", f"chunk {header.index} of {header.sample}: its data do not match")
    total = -(-header.size // SAMPLE_CHUNK_BYTES)
    expected = min(SAMPLE_CHUNK_BYTES, header.size - header.index * SAMPLE_CHUNK_BYTES)
    if header.total != total or header.index >= total or len(data) != expected:
        raise PayloadRejected(f"chunk {header.index}/{header.total} of {header.size} bytes: {len(data)} bytes "
                              f"where {expected} were expected")  # fmt: skip


def _apply_retention(session: Session, dataset: Dataset) -> None:
    """Drop the oldest samples while the dataset is over its count or byte limit (the newest always stays)."""
    while dataset.samples > 1 and (dataset.samples > dataset.max_samples or dataset.stored_bytes > dataset.max_bytes):
        oldest = session.execute(
            select(DatasetSample.sha256, DatasetSample.size).where(DatasetSample.dataset == dataset.name)
            .order_by(DatasetSample.received, DatasetSample.sha256).limit(1)
        ).one()  # fmt: skip
        session.execute(delete(DatasetSample).where(DatasetSample.dataset == dataset.name,
                                                    DatasetSample.sha256 == oldest.sha256))  # fmt: skip
        dataset.samples -= 1
        dataset.stored_bytes -= oldest.size
        dataset.dropped += 1


# ---- the API's and the CLI's side --------------------------------------------------------------------------------


def dataset_or_none(session: Session, name: str) -> Dataset | None:
    return session.get(Dataset, check_dataset_name(name))


def set_label(session: Session, dataset: str, sha256: str, label: int | None, actor: str) -> DatasetSample | None:
    """Label a sample (None: remove its label), audited; None when there is no such sample."""
    sample = session.get(DatasetSample, (check_dataset_name(dataset), sha256))
    if sample is None:
        return None
    sample.label, sample.labelled_by = label, actor if label is not None else None
    session.add(AuditEntry(ts=time.time(), actor=actor, action="dataset.label",
                           detail={"dataset": dataset, "sample": sha256, "label": label}))  # fmt: skip
    return sample


def purge(session: Session, name: str, actor: str) -> int | None:
    """Delete a dataset and every sample's bytes, audited; how many samples went, None when there is no dataset."""
    dataset = dataset_or_none(session, name)
    if dataset is None:
        return None
    removed = session.execute(delete(DatasetSample).where(DatasetSample.dataset == name)).rowcount
    session.delete(dataset)
    session.add(AuditEntry(ts=time.time(), actor=actor, action="dataset.purge",
                           detail={"dataset": name, "samples": removed}))  # fmt: skip
    return removed


def export_npz(session: Session, name: str) -> tuple[bytes, int]:
    """The dataset as an .npz `edgekit compile --calibration` takes (module docstring), and how many samples it has.
    BadInput when it has none, or its bundle is not in the hub (the model's inputs are needed to name the arrays)."""
    samples = list(session.scalars(select(DatasetSample).where(DatasetSample.dataset == name)
                                   .order_by(DatasetSample.received, DatasetSample.sha256)))  # fmt: skip
    if not samples:
        raise BadInput(f"dataset '{name}' has no samples to export")
    newest = samples[-1]
    bundle = session.get(BundleRecord, newest.bundle_id)
    if bundle is None:
        raise BadInput(f"dataset '{name}': its bundle {newest.bundle} is not in the hub (push it to export)")
    kept = [sample for sample in samples if sample.bundle_id == newest.bundle_id]
    arrays = _model_inputs(kept, bundle.manifest)
    devices = len({sample.device_id for sample in kept})
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    arrays["source"] = _text(f"hub dataset {name}: {len(kept)} field samples of {newest.bundle} from {devices} "
                             f"device(s), exported {stamp}")  # fmt: skip
    if all(sample.label is not None for sample in kept):
        arrays["labels"] = _labels(kept)
    buffer = io.BytesIO()
    _save(buffer, arrays)
    return buffer.getvalue(), len(kept)


def _model_inputs(samples: list[DatasetSample], manifest: dict[str, Any]) -> dict[str, Any]:
    """Each sample as the device fed it to the model: the first input's array, stacked on the batch axis."""
    import numpy as np

    from edgekit.manifest import Manifest
    from edgekit.samples import image_input

    parsed = Manifest.model_validate(manifest)
    spec = parsed.inputs[0]
    items = []
    for sample in samples:
        if sample.format == "png":
            items.append(image_input(_decode_png(sample.data), spec, parsed.preprocessing))
        else:
            items.append(np.load(io.BytesIO(sample.data), allow_pickle=False).reshape(spec.shape))
    return {spec.name: np.concatenate(items, axis=spec.batch_axis or 0)}


def _decode_png(data: bytes) -> Any:
    import cv2
    import numpy as np

    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def _text(value: str) -> Any:
    import numpy as np

    return np.array(value)


def _labels(samples: list[DatasetSample]) -> Any:
    import numpy as np

    return np.array([sample.label for sample in samples], np.int64)


def _save(buffer: io.BytesIO, arrays: dict[str, Any]) -> None:
    import numpy as np

    np.savez(buffer, **arrays)


def dataset_counts(session: Session) -> dict[str, int]:
    """Labelled samples per dataset."""
    query = select(DatasetSample.dataset, func.count()).where(DatasetSample.label.is_not(None))
    return dict(session.execute(query.group_by(DatasetSample.dataset)).all())
