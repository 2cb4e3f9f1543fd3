"""`/api/datasets`: datasets of inputs captured on devices (edgekit.hub.datasets, docs/datasets.md) — list, samples
(with their bytes for thumbnails and a sensor window's values for a small plot), labels, export and purge."""

import io
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from edgekit.errors import BadInput
from edgekit.hub import datasets
from edgekit.hub.auth import Operator
from edgekit.hub.db import Dataset, DatasetSample
from edgekit.hub.deps import Sessions
from edgekit.hub.routes import unprocessable

router = APIRouter()
PLOT_POINTS = 256  # a sensor window's preview: at most this many values


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    created: float
    samples: int
    stored_bytes: int
    dropped: int = Field(description="Samples removed by retention, oldest first")
    max_samples: int
    max_bytes: int
    labelled: int = 0


class SampleOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    sha256: str
    device_id: str
    ts: float = Field(description="When the source gave it (device clock)")
    received: float
    bundle: str
    input_name: str
    format: str = Field(description="png: the image the source gave; npy: a sensor window")
    reason: str
    output: dict[str, Any]
    size: int
    label: int | None
    labelled_by: str | None


class LabelIn(BaseModel):
    label: int | None = Field(ge=0, le=1_000_000, description="The class index; null removes the label")


class Purged(BaseModel):
    dataset: str
    samples: int


def _name(name: str) -> str:
    try:
        return datasets.check_dataset_name(name)
    except BadInput as error:
        raise unprocessable(["path", "name"], str(error)) from None


def _dataset_or_404(session: Session, name: str) -> Dataset:
    dataset = session.get(Dataset, _name(name))
    if dataset is None:
        raise HTTPException(status_code=404, detail=f"no dataset '{name}'")
    return dataset


def _sample_or_404(session: Session, name: str, sha256: str) -> DatasetSample:
    sample = session.get(DatasetSample, (_name(name), sha256))
    if sample is None:
        raise HTTPException(status_code=404, detail=f"no sample {sha256} in dataset '{name}'")
    return sample


@router.get("/datasets", response_model=list[DatasetOut])
def list_datasets(sessions: Sessions) -> list[DatasetOut]:
    with sessions() as session:
        labelled = datasets.dataset_counts(session)
        rows = session.scalars(select(Dataset).order_by(Dataset.name))
        return [DatasetOut.model_validate(row).model_copy(update={"labelled": labelled.get(row.name, 0)})
                for row in rows]  # fmt: skip


@router.get("/datasets/{name}/samples", response_model=list[SampleOut])
def list_samples(
    sessions: Sessions,
    name: str,
    limit: Annotated[int, Query(ge=1, le=1000, description="The newest N")] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[DatasetSample]:
    """The dataset's samples, newest first (without their bytes: `…/data`)."""
    with sessions() as session:
        _dataset_or_404(session, name)
        query = select(DatasetSample).where(DatasetSample.dataset == name)
        return list(session.scalars(query.order_by(DatasetSample.received.desc()).limit(limit).offset(offset)))


@router.get("/datasets/{name}/samples/{sha256}/data")
def sample_data(sessions: Sessions, name: str, sha256: str) -> Response:
    """The sample's bytes as the device sent them: a PNG image or an .npy array."""
    with sessions() as session:
        sample = _sample_or_404(session, name, sha256)
        media = "image/png" if sample.format == "png" else "application/octet-stream"
        return Response(sample.data, media_type=media, headers={"Cache-Control": "private, max-age=86400"})


@router.get("/datasets/{name}/samples/{sha256}/values", response_model=list[float])
def sample_values(sessions: Sessions, name: str, sha256: str) -> list[float]:
    """A sensor window's values, at most PLOT_POINTS of them (evenly picked), for a small plot."""
    import numpy as np

    with sessions() as session:
        sample = _sample_or_404(session, name, sha256)
        if sample.format != "npy":
            raise unprocessable(["path", "sha256"], f"sample {sha256} is an image ({sample.format}), not values")
        values = np.load(io.BytesIO(sample.data), allow_pickle=False).astype(np.float64).ravel()
    if len(values) > PLOT_POINTS:
        values = values[np.linspace(0, len(values) - 1, PLOT_POINTS).astype(int)]
    return [float(v) if np.isfinite(v) else 0.0 for v in values]


@router.put("/datasets/{name}/samples/{sha256}/label", response_model=SampleOut)
def put_label(sessions: Sessions, name: str, sha256: str, body: LabelIn, actor: Operator) -> DatasetSample:
    with sessions.begin() as session:
        _sample_or_404(session, name, sha256)
        return datasets.set_label(session, name, sha256, body.label, actor)


@router.get("/datasets/{name}/export")
def export(sessions: Sessions, name: str) -> Response:
    """The dataset as an .npz for `edgekit compile --calibration` (docs/datasets.md)."""
    with sessions() as session:
        _dataset_or_404(session, name)
        try:
            data, count = datasets.export_npz(session, name)
        except BadInput as error:
            raise unprocessable(["path", "name"], str(error)) from None
    headers = {"Content-Disposition": f'attachment; filename="{name}.npz"', "X-Edgekit-Samples": str(count)}
    return Response(data, media_type="application/octet-stream", headers=headers)


@router.delete("/datasets/{name}", response_model=Purged)
def purge(sessions: Sessions, name: str, actor: Operator) -> Purged:
    """Delete the dataset and every sample's bytes (audited)."""
    with sessions.begin() as session:
        _dataset_or_404(session, name)
        return Purged(dataset=name, samples=datasets.purge(session, name, actor) or 0)
