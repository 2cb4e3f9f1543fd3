"""The real-model corpus itself (benchmarks/zoo_corpus.py), without compiling anything: every model file is
there, loads in ONNX Runtime, its generated calibration .npz feeds it, and its labels mean what they say.
`make zoo` compiles the corpus."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SAMPLES = 3
LABELLED_SAMPLES = 24


def _load_corpus():
    spec = importlib.util.spec_from_file_location("zoo_corpus", REPO / "benchmarks" / "zoo_corpus.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["zoo_corpus"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


zoo = _load_corpus()


def _slow(model) -> bool:
    """Models built by training (scikit-learn) or by normalising every layer on photos (the IR 3 classics):
    ~1 min each on 2 busy cores the first time (cached under .cache/zoo after)."""
    return isinstance(model.source, zoo.SklearnExport) or model.key.startswith("light_")


def _cases(models):
    return [pytest.param(m, id=m.key, marks=[pytest.mark.slow] if _slow(m) else []) for m in models]


def _model_path(model) -> Path:
    try:
        return model.model_path()
    except zoo.MissingPackage as missing:
        pytest.skip(f"{missing.distribution} is not installed (make install fetches it)")


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _with_batch_axis(item: np.ndarray, dims: list) -> np.ndarray:
    """Put back the batch axis the .npz layout leaves out, where the model's fixed dims allow it."""
    if item.ndim == len(dims):
        return item
    for axis in range(len(dims)):
        shape = (*item.shape[:axis], 1, *item.shape[axis:])
        if all(not isinstance(d, int) or d in (0, size) for d, size in zip(dims, shape, strict=True)):
            return item.reshape(shape)
    raise AssertionError(f"item of shape {item.shape} does not fit input dims {dims}")


def _feed(session, arrays: dict[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
    return {i.name: _with_batch_axis(np.asarray(arrays[i.name][index]), i.shape) for i in session.get_inputs()}


def test_corpus_is_large_and_varied_enough():
    kinds = " ".join(m.kind for m in zoo.CORPUS)
    assert len(zoo.CORPUS) >= 17
    assert len({m.key for m in zoo.CORPUS}) == len(zoo.CORPUS)
    for kind in ("detector", "recognizer", "voice activity", "scikit-learn", "IR 3", "ONNX Runtime"):
        assert kind in kinds


@pytest.mark.parametrize("model", _cases(zoo.CORPUS))
def test_model_loads_and_its_generated_data_feeds_it(model, tmp_path: Path):
    session = _session(_model_path(model))
    generated = tmp_path / f"{model.key}.npz"
    np.savez(generated, **model.data(SAMPLES))
    arrays = dict(np.load(generated))
    labels = arrays.pop("labels", None)
    assert set(arrays) == {i.name for i in session.get_inputs()}
    assert all(len(a) == SAMPLES for a in arrays.values())
    for index in range(2):
        outputs = session.run(None, _feed(session, arrays, index))
        tensors = [np.asarray(o, dtype=np.float64) for o in outputs if isinstance(o, np.ndarray)]
        assert tensors and all(np.isfinite(t).all() for t in tensors)
    if labels is not None:
        assert labels.shape == (SAMPLES,) and labels.dtype.kind == "i"


LABELLED = [m for m in zoo.CORPUS if "labels" in m.data(1)]


@pytest.mark.parametrize("model", _cases(LABELLED))
def test_labels_agree_with_the_models_own_predictions(model):
    """The labels (rotation direction, digits split) are the ones the pretrained model was trained to give."""
    session = _session(_model_path(model))
    arrays = model.data(LABELLED_SAMPLES)
    labels = arrays.pop("labels")
    predicted = []
    for index in range(LABELLED_SAMPLES):
        first = np.asarray(session.run(None, _feed(session, arrays, index))[0])
        predicted.append(int(first.ravel()[0]) if first.dtype.kind == "i" else int(first.ravel().argmax()))
    assert np.mean(np.asarray(predicted) == labels) >= 0.6


@pytest.mark.slow
@pytest.mark.parametrize("model", [m for m in zoo.CORPUS if m.key.startswith("light_")], ids=lambda m: m.key)
def test_ir3_classics_keep_their_format_and_answer_differently_per_image(model):
    """Weights materialised, structure kept (IR 3, opset 9, weights also graph inputs), and no longer the
    constant output the shipped ConstantOfShape weights give."""
    import onnx

    path = _model_path(model)
    proto = onnx.load(str(path))
    assert proto.ir_version == 3
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 9)]
    assert {i.name for i in proto.graph.initializer} <= {i.name for i in proto.graph.input}
    assert not any(n.op_type == "ConstantOfShape" for n in proto.graph.node)
    session = _session(path)
    arrays = model.data(8)
    top1 = {int(np.asarray(session.run(None, _feed(session, arrays, i))[0]).argmax()) for i in range(8)}
    assert len(top1) >= 2
