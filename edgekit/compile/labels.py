"""Class names for `edgekit compile --labels`: read from a text or JSON file, checked against the model's output."""

import json
import unicodedata
from pathlib import Path
from typing import Any

from edgekit.agents.postprocess import infer_task
from edgekit.errors import BadInput
from edgekit.manifest import TensorSpec

MAX_NAME = 128


def read_labels(path: Path) -> list[str]:
    """Names in class order from `labels.txt` (one per line) or JSON (a list, or {"0": name, ...} for 0..N-1)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput(f"--labels {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise BadInput(f"--labels {path}: cannot be read as UTF-8 text ({error})") from None
    names = _from_json(path, text) if path.suffix.lower() == ".json" else _from_lines(path, text)
    if not names:
        raise BadInput(f"--labels {path}: no class names in it; expected one name per line or a JSON list")
    for index, name in enumerate(names):
        _check_name(path, index, name)
    return names


def _from_lines(path: Path, text: str) -> list[str]:
    lines = text.splitlines()
    while lines and not lines[-1].strip():  # a final newline (or a few) is how text files end, not a class
        lines.pop()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise BadInput(f"--labels {path}: line {number} is blank; expected one class name per line")
    return [line.strip() for line in lines]


def _from_json(path: Path, text: str) -> list[str]:
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as error:
        raise BadInput(f"--labels {path}: not valid JSON ({error})") from None
    if isinstance(data, dict):
        return _from_index_object(path, data)
    if not isinstance(data, list) or not all(isinstance(name, str) for name in data):
        raise BadInput(f'--labels {path}: expected a JSON list of names or an object {{"0": "name", ...}}')
    return data


def _from_index_object(path: Path, data: dict[str, Any]) -> list[str]:
    """{"0": "cat", "1": "dog"}: every index from 0 to N-1, each once, each a name."""
    expected = [str(index) for index in range(len(data))]
    missing = [key for key in expected if key not in data]
    if missing:
        extra = sorted(set(data) - set(expected))
        raise BadInput(f"--labels {path}: index {missing[0]} has no name; expected the keys 0 to {len(data) - 1}"
                       f" (found {', '.join(repr(k) for k in extra[:3])} instead)")  # fmt: skip
    names = [data[key] for key in expected]
    wrong = next((key for key, name in zip(expected, names, strict=True) if not isinstance(name, str)), None)
    if wrong is not None:
        raise BadInput(f"--labels {path}: index {wrong} is {json.dumps(data[wrong])}; expected a name (a string)")
    return names


def _check_name(path: Path, index: int, name: str) -> None:
    if not name.strip():
        raise BadInput(f"--labels {path}: class {index} has an empty name")
    if len(name) > MAX_NAME:
        raise BadInput(f"--labels {path}: class {index}'s name is {len(name)} characters; at most {MAX_NAME}")
    if any(unicodedata.category(char) == "Cc" for char in name):
        raise BadInput(f"--labels {path}: class {index}'s name {name[:40]!r} has a control character")


def check_labels_fit(path: Path, names: list[str], outputs: list[TensorSpec]) -> None:
    """A classifier needs exactly one name per class. A detector's class indices are values in its output, not
    known before it runs, so any number of names is taken. Other outputs have no classes to name."""
    shape = outputs[0].shape
    task = infer_task([shape])
    if task == "classifier" and len(names) != shape[1]:
        raise BadInput(f"--labels {path}: {len(names)} names, but the model's output {outputs[0].name} "
                       f"{shape} has {shape[1]} classes; expected {shape[1]} names")  # fmt: skip
    if task == "raw":
        raise BadInput(f"--labels {path}: the model's output {outputs[0].name} {shape} is neither a classifier's "
                       "(1, classes) nor a detector's (1, boxes, x1 y1 x2 y2 score class), so it has no classes "
                       "to name")  # fmt: skip
