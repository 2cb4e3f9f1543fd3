"""Mixed precision: an int8 candidate that misses the accuracy budget is rebuilt with its most quantization-sensitive
layers in float, and the report says which layers and what that cost."""

import json

import numpy as np
import onnx
from helpers import compile_args
from onnx import TensorProto, helper, numpy_helper

from edgekit.compile.intake import prepare_model
from edgekit.compile.mixed import keep_float_rounds, rank_sensitive_nodes
from edgekit.samples import SampleSet


def outlier_classifier(path):
    """x[:, 0] spikes to ±1000 and is ignored by the model (its weights are 0); the class comes from the other,
    unit-scale features. Per-tensor int8 on x spends its 256 steps on the spikes and rounds the rest to 0, so
    plain int8 guesses; keeping the first MatMul in float (x stays float) restores it."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 32)).astype(np.float32)
    w1[0] = 0.0
    w2 = rng.standard_normal((32, 4)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["logits"], name="fc2"),
        ],
        "outliers",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def outlier_data(path, count: int = 200):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((count, 16)).astype(np.float32)
    x[:, 0] = rng.choice([-1000.0, 1000.0], count)
    np.savez(path, x=x)
    return path


def test_rounds_grow():
    ranked = [f"n{i}" for i in range(50)]
    rounds = keep_float_rounds(ranked)
    assert [len(r) for r in rounds] == [2, 6, 15, 30] and rounds[0] == ["n0", "n1"]
    assert keep_float_rounds(["a", "b"]) == [["a"]]


def test_the_last_round_keeps_most_compute_layers_in_float():
    """A ranking in which elementwise ops crowd out the convolutions: the four layer-count rounds keep none of them
    in float; the last keeps 6 of the 10, with every op ranked above the sixth."""
    ranked = [f"mul{i}" for i in range(40)] + [f"conv{i}" for i in range(10)]
    rounds = keep_float_rounds(ranked, frozenset(f"conv{i}" for i in range(10)))
    assert [len(r) for r in rounds] == [2, 6, 15, 30, 46] and rounds[-1][-1] == "conv5"
    convs_first = ranked[40:] + ranked[:40]  # the fourth round already holds 6 convolutions: nothing to add
    assert len(keep_float_rounds(convs_first, frozenset(ranked[40:]))) == 4
    assert keep_float_rounds(ranked) == rounds[:4]  # no compute layers known: the layer-count rounds alone


def quantize(model, samples, tmp_path):
    from edgekit.compilers import BuildRequest
    from edgekit.compilers.onnxruntime import OrtOptions, quantize_qdq
    from edgekit.profiles import load_profile
    from edgekit.progress import NoProgress

    request = BuildRequest(model, load_profile("x86-64-avx512"), "int8", samples, OrtOptions(), tmp_path / "q",
                           NoProgress())  # fmt: skip
    return quantize_qdq(request)


def test_sensitivity_ranks_the_layer_fed_by_outliers_first(tmp_path):
    model = prepare_model(outlier_classifier(tmp_path / "m.onnx"), tmp_path)
    data = np.load(outlier_data(tmp_path / "d.npz"))
    samples = SampleSet({"x": data["x"]}, None, "test", {"x": 0})
    assert rank_sensitive_nodes(model, quantize(model, samples, tmp_path), samples)[0] == "fc1"


def sign_model(path):
    """Two outputs: the sign of x @ wa (a dominant feature makes wa's int8 steps coarse: a large local error the
    output barely sees) and x @ wb itself (a small local error, all of it visible)."""
    rng = np.random.default_rng(0)
    wa = rng.standard_normal((16, 8)).astype(np.float32)
    wa[0] *= 50
    wb = rng.standard_normal((16, 8)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "wa"], ["a"], name="squashed"),
            helper.make_node("Sign", ["a"], ["s"], name="sign"),
            helper.make_node("MatMul", ["x", "wb"], ["b"], name="seen"),
        ],
        "signs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 8]) for n in ("s", "b")],
        [numpy_helper.from_array(wa, "wa"), numpy_helper.from_array(wb, "wb")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_sensitivity_is_measured_at_the_outputs(tmp_path, monkeypatch):
    from edgekit.compile import mixed

    model = prepare_model(sign_model(tmp_path / "m.onnx"), tmp_path)
    samples = SampleSet({"x": np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32)}, None, "t",
                        {"x": 0})  # fmt: skip
    qdq = quantize(model, samples, tmp_path)
    ranking = rank_sensitive_nodes(model, qdq, samples)
    assert ranking.index("seen") < ranking.index("squashed")
    monkeypatch.setattr(mixed, "END_TO_END_SECONDS", -1.0)  # the local ranking alone is misled by wa's coarse steps
    local = rank_sensitive_nodes(model, qdq, samples)
    assert local.index("squashed") < local.index("seen")


def test_mixed_precision_rescues_int8_that_plain_int8_fails(cli, tmp_path):
    model, data = outlier_classifier(tmp_path / "m.onnx"), outlier_data(tmp_path / "d.npz")
    result = cli(*compile_args(model, "x86-64-avx512", "--precision", "int8", "--backend", "onnxruntime",
                               "--calibration", data, "--json", out=tmp_path / "m.ekb"))  # fmt: skip
    assert result.exit_code == 0, result.output
    chosen = json.loads(result.stdout)["candidates"][0]
    mixed = chosen["details"]["mixed_precision"]
    assert chosen["status"] == "chosen" and mixed["keep_float"] == ["fc1"]
    assert "fp32" in mixed["int8_reason"]  # plain int8 was rejected (its scores collapse), and says why
    assert chosen["metrics"]["top1_agreement"] >= 0.97  # plain int8 was far outside the budget
    assert mixed["latency_vs_int8"] > 0 and mixed["size_vs_int8"] > 1  # fc1's weights stay fp32
    shown = cli("compile", model, "-p", "x86-64-avx512", "--precision", "int8", "--backend", "onnxruntime",
                "--calibration", data, "--bench-seconds", "0.05", "-o", tmp_path / "n.ekb")  # fmt: skip
    assert "onnxruntime int8 mixed" in shown.stdout and "1 of 2 quantized layers kept in float" in shown.stdout


def test_no_rescue_once_an_int8_candidate_passed(cli, tmp_path):
    """Two ONNX Runtime int8 candidates, both failing plain: the first is rescued; the second keeps its plain-int8
    verdict, since the compile already has int8 (rounds on a large detector take minutes each)."""
    import yaml

    from edgekit.profiles import load_profile

    twice = load_profile("x86-64-avx512").model_dump(mode="json") | {"name": "twice"}
    twice["candidates"] = [{"backend": "onnxruntime", "precision": "int8", "options": {"per_channel": flag}}
                           for flag in (True, False)]  # fmt: skip
    profile = tmp_path / "twice.yaml"
    profile.write_text(yaml.safe_dump(twice))
    model, data = outlier_classifier(tmp_path / "m.onnx"), outlier_data(tmp_path / "d.npz")
    result = cli(*compile_args(model, profile, "--calibration", data, "--json", out=tmp_path / "m.ekb"))
    assert result.exit_code == 0, result.output
    first, second = json.loads(result.stdout)["candidates"]
    assert first["status"] == "chosen" and "mixed_precision" in first["details"]
    assert second["status"] == "rejected" and "mixed_precision" not in second["details"]
    assert second["reason"].endswith("mixed precision not tried: an earlier int8 candidate passed")


def test_mixed_precision_stays_within_its_time_budget(cli, tmp_path):
    model, data = outlier_classifier(tmp_path / "m.onnx"), outlier_data(tmp_path / "d.npz")
    args = compile_args(model, "x86-64-avx512", "--precision", "int8", "--backend", "onnxruntime", "--calibration",
                        data, "--json", out=tmp_path / "m.ekb")  # fmt: skip
    result = cli(*args, "--mixed-seconds", "0")
    assert result.exit_code == 1, result.output
    (candidate,) = json.loads(result.stdout)["candidates"]
    assert candidate["status"] == "rejected" and "mixed_precision" not in candidate["details"]
    assert candidate["reason"].endswith("mixed precision not tried: its 0 s budget is spent (--mixed-seconds)")
    ranked_only = cli(*args, "--mixed-seconds", "0.001")  # the ranking alone takes longer
    (candidate,) = json.loads(ranked_only.stdout)["candidates"]
    assert "mixed precision stopped before round 1: its 0 s budget is spent" in candidate["reason"]
