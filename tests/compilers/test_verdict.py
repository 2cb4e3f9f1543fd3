"""Verdicts that respect sample size: intervals, no rejection decided by one flipped sample, the minimum hold-out,
--eval-data, and a way forward when nothing passes."""

import json

import numpy as np
import onnx
import pytest
from helpers import compile_args
from onnx import TensorProto, helper, numpy_helper

from edgekit.compile.measure import compare
from edgekit.compile.verdict import Budget, judge, paired_drop_interval, wilson_interval

BUDGET = Budget(max_accuracy_drop=1.0, min_cosine=0.999)


def scores(classes: list[int], width: int = 3) -> np.ndarray:
    return np.eye(width, dtype=np.float32)[classes]


def verdict_of(reference: list[int], candidate: list[int], labels=None):
    ref, got = [scores(reference)], [scores(candidate)]
    return judge(ref, got, None if labels is None else np.asarray(labels), compare(ref, got), ["y"], BUDGET)


def test_one_flip_in_five_samples_does_not_reject():
    judgement = verdict_of([0, 1, 2, 0, 1], [0, 1, 2, 0, 2])
    assert judgement.reason is None
    assert judgement.verdict.top1_disagreements == 1 and judgement.verdict.sample_points == 20
    low, high = judgement.verdict.top1_agreement_ci
    assert low < 0.8 < high


def test_two_flips_in_five_samples_reject_and_say_how_to_accept():
    judgement = verdict_of([0, 1, 2, 0, 1], [1, 1, 2, 0, 2])
    assert "top-1 differs from fp32 on 40.00% of 5 samples" in judgement.reason
    assert judgement.accept_with == "--max-accuracy-drop 40.0"
    assert judgement.miss == pytest.approx(39.0)


def test_accuracy_drop_with_labels_counts_discordant_pairs():
    labels = [0] * 100
    reference = [0] * 100
    candidate = [1] * 3 + [0] * 97  # 3 lost, 0 gained: 3.0 points, 2.0 with one forgiven
    judgement = verdict_of(reference, candidate, labels)
    assert judgement.verdict.accuracy_drop_points == pytest.approx(3.0)
    assert "top-1 accuracy drops 3.00 points" in judgement.reason
    low, high = judgement.verdict.accuracy_drop_ci
    assert low < 3.0 < high
    assert verdict_of(reference, [1] * 2 + [0] * 98, labels).reason is None  # 2.0 points, 1.0 forgiven: passes


def test_intervals():
    low, high = wilson_interval(50, 50)
    assert high == pytest.approx(1.0) and 0.9 < low < 0.95
    assert paired_drop_interval(0, 0, 100) == (0.0, 0.0)


def test_integer_outputs_are_compared_exactly():
    reference = [np.array([3, 1, 2], np.int64), np.array([[0.1, 0.9]], np.float32)]
    candidate = [np.array([3, 1, 0], np.int64), np.array([[0.1, 0.9]], np.float32)]
    agreement = compare(reference, candidate)
    assert agreement.outputs[0].exact == pytest.approx(2 / 3) and agreement.outputs[0].cosine is None
    assert agreement.top1_agreement == pytest.approx(2 / 3)  # a label output is the classifier's prediction
    assert agreement.cosine == pytest.approx(1.0)


def test_cosine_verdict_suggests_the_flag():
    ref = [np.array([1.0, 0.0], np.float32)]
    got = [np.array([1.0, 0.1], np.float32)]
    judgement = judge(ref, got, None, compare(ref, got), ["y"], BUDGET)
    assert judgement.reason.startswith("cosine 0.99504")
    assert judgement.accept_with == "--min-cosine 0.995"


def linear_classifier(path, weight: np.ndarray):
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"], name="fc")],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", weight.shape[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", weight.shape[1]])],
        [numpy_helper.from_array(weight.astype(np.float32), "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_few_samples_are_all_used_with_a_warning(cli, tmp_path):
    rng = np.random.default_rng(0)
    model = linear_classifier(tmp_path / "m.onnx", rng.standard_normal((8, 4)))
    data = tmp_path / "few.npz"
    np.savez(data, x=rng.standard_normal((24, 8)).astype(np.float32))
    result = cli(*compile_args(model, "x86-64-avx2", "--precision", "fp32", "--backend", "onnxruntime",
                               "--calibration", data, "--json", out=tmp_path / "m.ekb"))  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["data"] == "all calibration samples (24 samples)"
    assert any("too few to hold 50 out" in w for w in report["warnings"])
    assert any("no candidate is rejected on a single flipped sample" in w for w in report["warnings"])


def test_eval_data_judges_and_holds_out_at_least_fifty(cli, tmp_path):
    rng = np.random.default_rng(1)
    model = linear_classifier(tmp_path / "m.onnx", rng.standard_normal((8, 4)))
    calibration, evaluation = tmp_path / "calib.npz", tmp_path / "eval.npz"
    np.savez(calibration, x=rng.standard_normal((120, 8)).astype(np.float32))
    np.savez(evaluation, x=rng.standard_normal((30, 8)).astype(np.float32), labels=rng.integers(0, 4, 30))
    base = ["--precision", "fp32", "--backend", "onnxruntime", "--calibration", calibration, "--json"]
    split = json.loads(cli(*compile_args(model, "x86-64-avx2", *base, out=tmp_path / "a.ekb")).stdout)
    assert split["data"] == "held-out calibration split (50 samples)"  # 20% of 120 is 24: raised to 50
    judged = json.loads(cli(*compile_args(model, "x86-64-avx2", *base, "--eval-data", evaluation,
                                          out=tmp_path / "b.ekb")).stdout)  # fmt: skip
    assert judged["data"] == "evaluation set (30 samples)"
    assert judged["reference"]["accuracy"] is not None


def test_nothing_passing_names_the_closest_candidate_and_the_flag(cli, tmp_path):
    rng = np.random.default_rng(2)
    model = linear_classifier(tmp_path / "m.onnx", rng.standard_normal((8, 1)))  # one output: judged by cosine
    data = tmp_path / "calib.npz"
    np.savez(data, x=rng.standard_normal((120, 8)).astype(np.float32))
    # fp16 weights give cosine ~0.9999999: an impossible bar leaves it the closest, with the flag that accepts it.
    result = cli(*compile_args(model, "x86-64-avx2", "--precision", "fp16", "--calibration", data,
                               "--min-cosine", "0.99999999999", out=tmp_path / "m.ekb"))  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "the closest is openvino fp16" in result.stderr
    assert "Accept it with --min-cosine 0.9999" in result.stderr
    assert "Traceback" not in result.output


def test_ctc_style_sequence_of_distributions_is_judged_per_step():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((2, 40, 30))
    probabilities = (np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)).astype(np.float32)
    flipped = probabilities.copy()
    flipped[0, 0] = flipped[0, 0][::-1]  # one step of 80 reads another character
    agreement = compare([probabilities], [flipped])
    assert agreement.top1_agreement == pytest.approx(79 / 80)
    judgement = judge([probabilities], [flipped], None, agreement, ["y"], BUDGET)
    assert judgement.verdict.samples == 80 and judgement.reason is None
    raw = rng.standard_normal((2, 40, 30)).astype(np.float32)  # not distributions (e.g. a detector's boxes)
    assert compare([raw], [raw]).top1_agreement is None


def test_collapsed_classifier_scores_are_rejected_although_top1_agrees():
    reference = [np.array([[0.9, 0.1, 0.0], [0.8, 0.1, 0.1]], np.float32)]
    constant = [np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], np.float32)]  # argmax 0 everywhere, as fp32's
    judgement = judge(reference, constant, None, compare(reference, constant), ["y"], BUDGET)
    assert "no longer resemble fp32's" in judgement.reason


def test_a_label_returned_as_float_is_compared_as_a_label():
    from edgekit.compile.measure import like_reference

    reference = [np.array([3, 1, 2], np.int64)]
    candidate = like_reference(reference, [np.array([3.0, 1.0, 0.0], np.float32)])
    assert candidate[0].dtype == np.int64
    judgement = judge(reference, candidate, None, compare(reference, candidate), ["label"], BUDGET)
    assert judgement.verdict.top1_disagreements == 1 and judgement.verdict.output_exact == {"label": 2 / 3}
