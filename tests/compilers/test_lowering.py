"""Intake lowers ai.onnx.ml and com.microsoft ops to standard ONNX, exactly as ONNX Runtime computes them."""

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekit.compile import lowering
from edgekit.compile.intake import prepare_model

ML_OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)]


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16).astype(np.float32), y


def export(estimator, x: np.ndarray, path: Path, y=None) -> Path:
    """`estimator` fitted on x (and y) and exported by skl2onnx with tensor outputs (no ZipMap)."""
    from skl2onnx import to_onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings of deliberately short fits
        estimator.fit(x, y)
    options = {id(estimator): {"zipmap": False}} if hasattr(estimator, "predict_proba") else None
    onnx.save(to_onnx(estimator, x[:1], options=options, target_opset={"": 17, "ai.onnx.ml": 3}), str(path))
    return path


def assert_lowered(path: Path, tmp_path: Path, rows: np.ndarray) -> list[str]:
    """Intake's model has only standard ops and gives ONNX Runtime's outputs for the original on every row: integers
    exactly (where the original's scores have no tie for the top), floats within 1e-4; returns intake's notes."""
    tmp_path.mkdir(exist_ok=True)
    prepared = prepare_model(path, tmp_path)
    model = onnx.load(str(prepared.path))
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}, prepared.notes
    original = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    lowered = ort.InferenceSession(str(prepared.path), providers=["CPUExecutionProvider"])
    name = original.get_inputs()[0].name
    for row in rows:
        want, got = original.run(None, {name: row[None]}), lowered.run(None, {name: row[None]})
        tied = any(a.ndim == 2 and a.shape[1] > 1 and np.diff(np.sort(a[0])[-2:])[0] < 1e-6 for a in want)
        for a, b in zip(want, got, strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype
            if a.dtype.kind == "f":
                np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
            elif not tied:
                np.testing.assert_array_equal(b, a)
    return prepared.notes


def lowered_to(notes: list[str], op_type: str) -> bool:
    return any(f" {op_type}" in note and "lowered to" in note and "could not" not in note for note in notes)


def test_logistic_regression_multiclass_and_binary(tmp_path, digits):
    from sklearn.linear_model import LogisticRegression

    x, y = digits
    multi = export(LogisticRegression(max_iter=50), x[:600], tmp_path / "multi.onnx", y[:600])
    notes = assert_lowered(multi, tmp_path / "m", np.concatenate([x[600:700], 10 * x[700:720] - 5]))
    assert lowered_to(notes, "LinearClassifier") and lowered_to(notes, "Normalizer")
    binary = export(LogisticRegression(max_iter=50), x[:600], tmp_path / "binary.onnx", y[:600] % 2)
    assert_lowered(binary, tmp_path / "b", x[600:700])


def linear_classifier(path: Path, **attributes) -> Path:
    node = helper.make_node("LinearClassifier", ["X"], ["label", "scores"], name="linear", domain="ai.onnx.ml",
                            **attributes)  # fmt: skip
    graph = helper.make_graph(
        [node], "linear",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", None])],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=ML_OPSETS), str(path))
    return path


def test_linear_classifier_with_one_score_column_is_onnx_runtimes_binary_case(tmp_path):
    """One coefficient row: label 7 where the score s is above 0, else 3; ONNX Runtime writes [1 - σ(s), σ(s)] for
    LOGISTIC and [1 - s, s] for the other post_transforms."""
    rows = np.random.default_rng(0).standard_normal((40, 3)).astype(np.float32)
    for transform in ("LOGISTIC", "SOFTMAX"):
        path = linear_classifier(tmp_path / f"{transform}.onnx", coefficients=[0.5, -1.0, 2.0], intercepts=[0.25],
                                 classlabels_ints=[3, 7], post_transform=transform)  # fmt: skip
        assert_lowered(path, tmp_path / transform, rows)


def test_string_class_labels_stay_and_are_noted(tmp_path):
    path = linear_classifier(tmp_path / "strings.onnx", coefficients=[0.5, -1.0, 2.0, 1.0, 1.0, 1.0],
                             intercepts=[0.0, 1.0], classlabels_strings=["cat", "dog"])  # fmt: skip
    model = onnx.load(str(path))
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.STRING
    onnx.save(model, str(path))
    prepared = prepare_model(path, tmp_path)
    assert [node.op_type for node in onnx.load(str(prepared.path)).graph.node] == ["LinearClassifier"]
    assert any("LinearClassifier could not be lowered" in note and "string class labels" in note
               for note in prepared.notes), prepared.notes  # fmt: skip


def test_mlp_label_lookup_becomes_a_gather(tmp_path, digits):
    from sklearn.neural_network import MLPClassifier

    x, y = digits
    path = export(MLPClassifier((16,), max_iter=30, random_state=0), x[:600], tmp_path / "mlp.onnx", y[:600])
    notes = assert_lowered(path, tmp_path, x[600:680])
    assert lowered_to(notes, "ArrayFeatureExtractor")


def test_random_forests_and_boosting(tmp_path, digits):
    """Multiclass and binary forests (votes summed, binary: weights for class 0 only, label where above 0.5) and
    binary and multiclass gradient boosting (signed weights, base values, LOGISTIC and SOFTMAX)."""
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier

    x, y = digits
    rows = np.concatenate([x[600:700], 4 * x[700:720]])
    for name, estimator, labels in [
        ("forest", RandomForestClassifier(4, max_depth=4, random_state=0), y[:600]),
        ("forest2", RandomForestClassifier(3, max_depth=3, random_state=0), y[:600] % 2),
        ("boost2", GradientBoostingClassifier(n_estimators=3, max_depth=2, random_state=0), y[:600] % 2),
        ("boost3", GradientBoostingClassifier(n_estimators=2, max_depth=2, random_state=0), y[:600] % 3),
    ]:
        notes = assert_lowered(export(estimator, x[:600], tmp_path / f"{name}.onnx", labels), tmp_path / name, rows)
        assert lowered_to(notes, "TreeEnsembleClassifier"), (name, notes)


def test_regressors_and_preprocessing(tmp_path, digits):
    """StandardScaler (Scaler), Normalizer (L2) and LinearRegression (LinearRegressor) in a pipeline; a forest
    regressor (TreeEnsembleRegressor)."""
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.linear_model import LinearRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    x, y = digits
    pipeline = make_pipeline(StandardScaler(), Normalizer(), LinearRegression())
    notes = assert_lowered(export(pipeline, x[:600], tmp_path / "linear.onnx", y[:600]), tmp_path / "l", x[600:660])
    assert all(lowered_to(notes, op) for op in ("Scaler", "Normalizer", "LinearRegressor")), notes
    forest = RandomForestRegressor(3, max_depth=3, random_state=0)
    notes = assert_lowered(export(forest, x[:600], tmp_path / "forest.onnx", y[:600]), tmp_path / "f", x[600:660])
    assert lowered_to(notes, "TreeEnsembleRegressor")


def test_every_branch_mode_on_values_at_the_thresholds(tmp_path):
    """A hand-made tree over integer-valued features fed exactly its thresholds: LT/LEQ/GT/GTE/EQ/NEQ differ only
    there."""
    modes = ["BRANCH_LT", "BRANCH_LEQ", "BRANCH_GT", "BRANCH_GTE", "BRANCH_EQ", "BRANCH_NEQ", "LEAF", "LEAF",
             "LEAF", "LEAF", "LEAF", "LEAF", "LEAF"]  # fmt: skip
    # node 0 → (1, 2); 1 → (3, 4); 2 → (5, 6); 3 → (7, 8); 4 → (9, 10); 5 → (11, 12); 6 is a leaf
    true_ids, false_ids = [1, 3, 5, 7, 9, 11] + [0] * 7, [2, 4, 6, 8, 10, 12] + [0] * 7
    leaves = list(range(6, 13))
    node = helper.make_node(
        "TreeEnsembleClassifier", ["X"], ["label", "scores"], name="tree", domain="ai.onnx.ml",
        nodes_treeids=[0] * 13, nodes_nodeids=list(range(13)), nodes_modes=modes,
        nodes_featureids=[0, 1, 2, 0, 1, 2] + [0] * 7, nodes_values=[1.0, 2.0, 1.0, 0.0, 1.0, 2.0] + [0.0] * 7,
        nodes_truenodeids=true_ids, nodes_falsenodeids=false_ids,
        class_treeids=[0] * 21, class_nodeids=[n for n in leaves for _ in range(3)], class_ids=[0, 1, 2] * 7,
        class_weights=[float((leaf * 7 + k * 3) % 5) for leaf in leaves for k in range(3)],
        classlabels_int64s=[10, 20, 30], post_transform="SOFTMAX",
    )  # fmt: skip
    graph = helper.make_graph(
        [node], "tree",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3])],
    )  # fmt: skip
    path = tmp_path / "tree.onnx"
    onnx.save(helper.make_model(graph, opset_imports=ML_OPSETS), str(path))
    grid = np.stack(np.meshgrid(*[np.arange(-1, 4)] * 3, indexing="ij"), -1).reshape(-1, 3).astype(np.float32)
    assert_lowered(path, tmp_path, grid)


def test_regressor_with_missing_values_several_targets_and_softmax_zero(tmp_path):
    """NaN takes the true branch where nodes_missing_value_tracks_true says so; a single-leaf tree adds a constant;
    AVERAGE divides by the tree count; SOFTMAX_ZERO leaves zero scores out of the softmax."""
    node = helper.make_node(
        "TreeEnsembleRegressor", ["X"], ["Y"], name="trees", domain="ai.onnx.ml", n_targets=2,
        aggregate_function="AVERAGE", post_transform="SOFTMAX_ZERO", base_values=[0.5, -0.5],
        nodes_treeids=[0, 0, 0, 1, 1, 1, 2], nodes_nodeids=[0, 1, 2, 0, 1, 2, 0],
        nodes_modes=["BRANCH_LT", "LEAF", "LEAF", "BRANCH_GTE", "LEAF", "LEAF", "LEAF"],
        nodes_featureids=[0, 0, 0, 2, 0, 0, 0], nodes_values=[0.1, 0, 0, -0.3, 0, 0, 0],
        nodes_truenodeids=[1, 0, 0, 1, 0, 0, 0], nodes_falsenodeids=[2, 0, 0, 2, 0, 0, 0],
        nodes_missing_value_tracks_true=[1, 0, 0, 0, 0, 0, 0],
        target_treeids=[0, 0, 0, 1, 1, 2], target_nodeids=[1, 2, 2, 1, 2, 0], target_ids=[0, 0, 1, 1, 0, 1],
        target_weights=[1.5, -2.0, 0.5, 3.0, 0.25, 0.75],
    )  # fmt: skip
    graph = helper.make_graph(
        [node], "trees",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 2])],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=ML_OPSETS), str(path := tmp_path / "trees.onnx"))
    rows = np.random.default_rng(0).standard_normal((30, 3)).astype(np.float32)
    rows[::4, 0] = np.nan
    assert lowered_to(assert_lowered(path, tmp_path, rows), "TreeEnsembleRegressor")


def fused_model(path: Path) -> Path:
    """ONNX Runtime's fusions: Conv+Relu, Conv+HardSigmoid with parameters, Conv+Add(Z)+Clip, Gemm+LeakyRelu."""
    rng = np.random.default_rng(0)
    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("FusedConv", ["x", "w1", "b1"], ["a"], name="conv1", domain="com.microsoft",
                         activation="Relu", **conv),
        helper.make_node("FusedConv", ["a", "w2", "b2"], ["b"], name="conv2", domain="com.microsoft",
                         activation="HardSigmoid", activation_params=[0.2, 0.5], **conv),
        helper.make_node("FusedConv", ["b", "w2", "", "a"], ["c"], name="conv3", domain="com.microsoft",
                         activation="Clip", activation_params=[0.0, 6.0], **conv),
        helper.make_node("GlobalAveragePool", ["c"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("FusedGemm", ["flat", "fc", "fc_b"], ["y"], name="fc", domain="com.microsoft",
                         activation="LeakyRelu", activation_alpha=0.1, transB=1),
    ]  # fmt: skip
    weights = {"w1": (4, 3, 3, 3), "b1": (4,), "w2": (4, 4, 3, 3), "b2": (4,), "fc": (5, 4), "fc_b": (5,)}
    graph = helper.make_graph(
        nodes, "fused",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in weights.items()],
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path


def test_onnx_runtime_fusions_become_their_standard_ops(tmp_path):
    path = fused_model(tmp_path / "fused.onnx")
    notes = assert_lowered(path, tmp_path, np.random.default_rng(1).standard_normal((8, 3, 8, 8), np.float32))
    assert lowered_to(notes, "FusedConv") and lowered_to(notes, "FusedGemm")
    nodes = {node.name: node.op_type for node in onnx.load(str(tmp_path / "model.fp32.onnx")).graph.node}
    assert {"conv1", "conv2", "conv3", "fc"} <= set(nodes), "the Conv and Gemm keep the fused node's name"


def test_a_lowering_that_differs_from_onnx_runtime_is_not_kept(tmp_path, monkeypatch):
    def wrong(node, b):
        b.output(0, b.op("Relu", [node.input[0]]))  # Sigmoid would be right

    monkeypatch.setitem(lowering.LOWERINGS, ("com.microsoft", "FusedConv"), wrong)
    model = tiny_fused(tmp_path / "fused.onnx")
    prepared = prepare_model(model, tmp_path)
    assert [node.op_type for node in onnx.load(str(prepared.path)).graph.node] == ["FusedConv"]
    assert any("FusedConv could not be lowered" in note and "differs by up to" in note for note in prepared.notes)


def tiny_fused(path: Path) -> Path:
    node = helper.make_node("FusedConv", ["x", "w"], ["y"], name="conv", domain="com.microsoft",
                            activation="Sigmoid", kernel_shape=[1, 1])  # fmt: skip
    graph = helper.make_graph(
        [node], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
        [numpy_helper.from_array(np.eye(2, dtype=np.float32).reshape(2, 2, 1, 1), "w")],
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path
