"""Pydantic base and helpers shared by every schema (profiles, manifests, payloads)."""

from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from edgekit.errors import BadInput

Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")


class StrictModel(BaseModel):
    """Rejects unknown fields so a typo in a YAML or JSON file is reported, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def describe_validation_error(error: ValidationError) -> str:
    """One line per failing field: `candidates.1.precision: Input should be 'fp32', 'fp16' or 'int8'`."""
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


Model = TypeVar("Model", bound=BaseModel)


def validate_file(model: type[Model], data: object, source: Path | str) -> Model:
    """Validate already-parsed data, turning a ValidationError into a BadInput naming the file and field."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise BadInput(f"{source}: {describe_validation_error(error)}") from None
