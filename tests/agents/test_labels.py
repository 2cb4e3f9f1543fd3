"""Results name their classes from the active bundle's labels; an index the labels do not cover, and every result of
a bundle without labels, carries the index alone, as before."""

import json
from pathlib import Path

import numpy as np
import pytest
from agent_helpers import sequenced
from brokers import Subscriber, publish_many, wait_until
from helpers import compile_bundle

from edgekit.agents.postprocess import postprocess
from edgekit.protocol import Result, Thresholds, device_topic, encode

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def named_digits_bundle(digits: Path, signing_keys: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("named-digits")
    labels = folder / "labels.txt"
    labels.write_text("\n".join(DIGIT_NAMES) + "\n")
    return compile_bundle(digits, digits / "calibration.npz", signing_keys[0], "1.0.0", folder / "digits.ekb",
                          "digits", "--labels", str(labels))  # fmt: skip


def test_a_real_agent_names_each_result_from_its_bundle(mosquitto, start_agent, named_digits_bundle, digits):
    with Subscriber(mosquitto.url, "edgekit/v1/dev-1/#") as sub:
        start_agent(mosquitto, bundle=named_digits_bundle, source="mqtt:")
        sub.wait_count(1, "edgekit/v1/dev-1/status", timeout=10)  # online: it takes inputs from now on
        test = np.load(digits / "test.npz")
        images, truth = test["image"][:10], test["labels"][:10]
        inputs = [json.dumps({"values": image.ravel().tolist()}) for image in images]
        publish_many(mosquitto.url, [(device_topic("dev-1", "input"), payload) for payload in inputs])
        distinct = lambda: sequenced(sub.messages("edgekit/v1/dev-1/results"), Result)  # noqa: E731
        wait_until(lambda: len(distinct()) >= 10, 30, "10 distinct results")
    results = distinct()[:10]
    for result in results:
        assert [score.name for score in result.top] == [DIGIT_NAMES[score.label] for score in result.top]
    named = [result.top[0].name for result in results]
    assert sum(name == DIGIT_NAMES[t] for name, t in zip(named, truth, strict=True)) >= 9


LOGITS = [np.array([[0.1, 3.0, 0.2, 2.0]], np.float32)]  # class 1 first, then 3


def test_an_index_past_the_labels_has_no_name_and_no_error():
    top = postprocess("classifier", LOGITS, Thresholds(top_k=2), ["a", "b", "c"])["top"]
    assert [(s.label, s.name) for s in top] == [(1, "b"), (3, None)]


def test_detections_are_named_and_a_negative_class_is_not_wrapped_around():
    rows = np.array([[[0, 0, 10, 10, 0.9, 1], [20, 20, 30, 30, 0.8, -1], [40, 40, 50, 50, 0.7, 5]]], np.float32)
    found = postprocess("detector", [rows], Thresholds(), ["person", "car"])["detections"]
    assert [(d.label, d.name) for d in found] == [(1, "car"), (-1, None), (5, None)]


def test_results_of_a_bundle_without_labels_are_sent_as_before():
    fields = postprocess("classifier", LOGITS, Thresholds(top_k=2))
    payload = encode(Result(seq=1, ts=1.0, frame_ts=1.0, bundle="m@1.0.0", latency_ms=1.0, task="classifier",
                            **fields))  # fmt: skip
    assert b'"name"' not in payload
    top = json.loads(payload)["top"]
    assert [score["label"] for score in top] == [1, 3] and all(set(score) == {"label", "score"} for score in top)
