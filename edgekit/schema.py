"""Pydantic base and helpers shared by every schema (profiles, manifests, payloads)."""

import functools
import logging
import threading
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError

from edgekit.errors import BadInput

log = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")


class StrictModel(BaseModel):
    """Rejects unknown fields so a typo in a YAML or JSON file is reported, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class WireModel(BaseModel):
    """What another version of edgekit may have written (MQTT payloads, bundle manifests): as strict about the types
    of the fields it knows, but tolerant of fields it does not — a newer sender's additions — so a fleet need not
    be upgraded in lockstep. `UnknownFields.note` counts and logs them; breaking changes bump the major version
    instead (docs/protocol.md, "Compatibility")."""

    model_config = ConfigDict(extra="allow", frozen=True)


def unknown_fields(model: BaseModel, prefix: str = "") -> list[str]:
    """Dotted paths of the fields `model` (and the models in it) did not know."""
    extra = model.__pydantic_extra__
    found = [prefix + name for name in extra] if extra else []
    for name in _fields_with_models(type(model)):
        value = getattr(model, name)
        if value is None:  # the usual case, and isinstance against a model class is slow
            continue
        for item in value if isinstance(value, list) else (value,):
            if isinstance(item, BaseModel):
                found += unknown_fields(item, f"{prefix}{name}.")
    return found


@functools.cache
def _fields_with_models(model_type: type[BaseModel]) -> tuple[str, ...]:
    """The fields whose values may be models or lists of them: the only ones `unknown_fields` looks into. Worked out
    once per type: the hub walks every payload it receives, most of whose fields are numbers."""
    return tuple(name for name, field in model_type.model_fields.items() if _may_hold_model(field.annotation))


def _may_hold_model(annotation: object) -> bool:
    origin = get_origin(annotation)
    if origin is Literal:
        return False
    if origin is Annotated:
        return _may_hold_model(get_args(annotation)[0])
    if annotation is Any:
        return True
    if args := get_args(annotation):
        return any(_may_hold_model(arg) for arg in args)
    if isinstance(annotation, type):
        return issubclass(annotation, (BaseModel, list, tuple, set, frozenset, dict))  # a bare list may hold any
    return True  # a forward reference, a type variable: it may be anything


class UnknownFields:
    """How often each unknown field was seen, by `Model.path`; each is logged once, not per message."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def note(self, model: BaseModel) -> None:
        fields = unknown_fields(model)
        if not fields:
            return
        kind = type(model).__name__
        with self._lock:
            new = [field for field in fields if f"{kind}.{field}" not in self.counts]
            self.counts.update(f"{kind}.{field}" for field in fields)
        if new:
            log.warning("%s: ignoring fields this version does not know: %s (from a newer edgekit?)", kind,
                        ", ".join(new))  # fmt: skip


# One per process: the agent's log and the hub's /metrics read it.
unknown = UnknownFields()


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
