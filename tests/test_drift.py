"""Drift statistics (edgekit.drift, edgekit.agents.drift): PSI, the reference sketch and its bounds, the window."""

import json

import numpy as np
import pytest
from pydantic import ValidationError

from edgekit.agents.drift import DriftMonitor
from edgekit.drift import (
    LARGE,
    MAX_FEATURES,
    MODERATE,
    DriftReference,
    build_reference,
    confidences,
    psi,
    sample_features,
)
from edgekit.manifest import Manifest

REFERENCE_JSON_LIMIT = 8 * 1024


def images(count: int, seed: int, brightness: float = 0.4, contrast: float = 0.2) -> np.ndarray:
    """NCHW image-like samples whose per-image brightness and contrast vary, as photos' do."""
    rng = np.random.default_rng(seed)
    level = rng.normal(brightness, 0.1, (count, 3, 1, 1))
    spread = rng.uniform(contrast / 2, contrast, (count, 1, 1, 1))
    return (level + spread * rng.standard_normal((count, 3, 16, 16))).astype(np.float32)


def logits(count: int, seed: int, sharpness: float = 3.0) -> np.ndarray:
    return (sharpness * np.random.default_rng(seed).standard_normal((count, 10))).astype(np.float32)


def reference_of(samples: np.ndarray, outputs: np.ndarray | None = None) -> DriftReference:
    return build_reference({"input": samples}, {"input": "NCHW"}, outputs)


def windowed_score(reference: DriftReference, samples: np.ndarray, outputs: np.ndarray | None = None) -> float:
    """The agent's score after feeding `samples` one inference at a time, as feeds of batch 1."""
    monitor = DriftMonitor(reference)
    for i in range(len(samples)):
        monitor.observe({"input": samples[i : i + 1]}, [outputs[i : i + 1]] if outputs is not None else [])
    stats = monitor.stats()
    assert stats is not None and stats.samples == min(len(samples), monitor.window)
    return stats.score


def test_psi_is_zero_for_identical_binnings_and_grows_with_the_shift():
    uniform = [0.1] * 10
    assert psi(uniform, uniform) == 0
    slight = [0.12, 0.08, *[0.1] * 8]
    moved = [0.3, 0.3, 0.2, 0.1, 0.1, 0, 0, 0, 0, 0]
    assert 0 < psi(uniform, slight) < MODERATE < LARGE < psi(uniform, moved)
    assert psi(uniform, moved) == pytest.approx(psi(moved, uniform))  # symmetric, unlike KL
    assert np.isfinite(psi(uniform, moved))  # empty bins count as epsilon, not ln(0)


def test_live_inputs_from_the_reference_distribution_score_low_and_shifted_ones_high():
    reference = reference_of(images(1000, seed=1), logits(1000, seed=2))
    assert [f.name for f in reference.features] == ["confidence"] + [
        f"input.{s}[{c}]" for c in range(3) for s in ("mean", "std")
    ]
    same = windowed_score(reference, images(200, seed=3), logits(200, seed=4))
    darker = windowed_score(reference, images(200, seed=3, brightness=0.3), logits(200, seed=4))
    # Inverted images move the mean only because these average 0.4: mid-grey ones (0.5) would keep their means and
    # spreads, and only the outputs would show the change.
    inverted = windowed_score(reference, 1 - images(200, seed=3), logits(200, seed=4))
    unsure = windowed_score(reference, images(200, seed=3), logits(200, seed=4, sharpness=0.5))
    print(f"PSI same {same:.3f}, darker {darker:.3f}, inverted {inverted:.3f}, unsure outputs {unsure:.3f}")
    assert same < MODERATE
    assert min(darker, inverted, unsure) > LARGE


def test_the_reference_stays_small_however_wide_the_model():
    rng = np.random.default_rng(0)
    inputs = {f"in{i}": rng.random((300, 64), dtype=np.float32) for i in range(12)}  # 24 features offered
    inputs["image"] = images(300, seed=5)
    layouts = {name: "NC" for name in inputs} | {"image": "NCHW"}
    reference = build_reference(inputs, layouts, logits(300, seed=6), bins=20)
    size = len(reference.model_dump_json())
    print(f"{len(reference.features)} features, {size} bytes of JSON")
    assert len(reference.features) == MAX_FEATURES and reference.features[0].name == "confidence"
    assert size < REFERENCE_JSON_LIMIT
    assert set(reference.channel_axes) == {f.input for f in reference.features if f.input}


def test_channels_last_images_get_the_same_features_as_channels_first():
    first = images(200, seed=24)
    last = np.ascontiguousarray(first.transpose(0, 2, 3, 1))
    nchw = build_reference({"input": first}, {"input": "NCHW"})
    nhwc = build_reference({"input": last}, {"input": "NHWC"})
    assert nhwc.channel_axes == {"input": 2} and nchw.channel_axes == {"input": 0}
    assert [(f.name, f.channel, f.fractions) for f in nhwc.features] == [
        (f.name, f.channel, f.fractions) for f in nchw.features
    ]
    for a, b in zip(nhwc.features, nchw.features, strict=True):  # float32 sums in another order: last digit
        assert a.edges == pytest.approx(b.edges, rel=1e-5)


def test_feature_maps_wider_than_colour_get_whole_sample_features():
    maps = np.random.default_rng(0).random((100, 32, 4, 4), dtype=np.float32)
    reference = build_reference({"maps": maps}, {"maps": "NCHW"})
    assert [f.name for f in reference.features] == ["maps.mean", "maps.std"]
    assert reference.channel_axes == {"maps": None}


def test_a_feature_piled_on_one_value_gets_merged_bins():
    saturated = np.zeros((200, 10), dtype=np.float32)
    saturated[:, 0] = 1.0  # a model ending in softmax, always sure: confidence 1.0 every time
    reference = reference_of(images(1000, seed=7), np.tile(saturated, (5, 1)))
    confidence = reference.features[0]
    assert confidence.edges == [1.0] and len(confidence.fractions) == 2
    assert windowed_score(reference, images(200, seed=8), saturated) < MODERATE


def test_confidence_is_the_top_probability_of_logits_or_of_a_softmax_output():
    raw = logits(5, seed=9)
    probabilities = np.exp(raw) / np.exp(raw).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(confidences(raw), probabilities.max(axis=1), rtol=1e-6)
    np.testing.assert_allclose(confidences(probabilities), probabilities.max(axis=1), rtol=1e-6)
    assert confidences(np.zeros((5, 1), dtype=np.float32)) is None  # one class: no confidence to speak of
    assert confidences(np.zeros((5, 4, 6), dtype=np.float32)) is None  # boxes


def test_too_few_samples_build_no_reference():
    with pytest.raises(ValueError, match="49 samples: a drift reference needs at least 50"):
        reference_of(images(49, seed=10))


def bad(reference: DriftReference, **change) -> dict:
    data = json.loads(reference.model_dump_json())
    data["features"][1].update(change)
    return data


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"edges": [0.5, 0.4, *[0.6 + i / 10 for i in range(7)]]}, "edges must be finite and strictly ascending"),
        ({"edges": [float("nan")] * 9}, "edges must be finite and strictly ascending"),
        ({"fractions": [0.5, 0.5]}, "edges need"),
        ({"input": "other"}, "input 'other' is not in channel_axes"),
        ({"input": None}, "a confidence feature reads the output"),
        ({"channel": 7}, "channel"),
    ],
)
def test_bad_references_are_refused_naming_the_feature(change, message):
    reference = reference_of(images(100, seed=11), logits(100, seed=12))
    with pytest.raises(ValidationError, match=message):
        DriftReference.model_validate(bad(reference, **change))


def test_fractions_that_do_not_sum_to_one_are_refused():
    reference = reference_of(images(100, seed=13))
    feature = json.loads(reference.model_dump_json())["features"][0]
    feature["fractions"] = [f * 2 for f in feature["fractions"]][: len(feature["fractions"])]
    data = json.loads(reference.model_dump_json()) | {"features": [feature]}
    with pytest.raises(ValidationError, match=r"input\.mean\[0\]: fractions must each be in \(0, 1\] and sum to 1"):
        DriftReference.model_validate(data)


def test_too_many_features_are_refused():
    reference = reference_of(images(100, seed=14))
    data = json.loads(reference.model_dump_json())
    data["features"] = data["features"] * 3  # 18
    with pytest.raises(ValidationError, match="at most 16 items"):
        DriftReference.model_validate(data)


def test_the_window_slides_and_counts_only_the_last_inputs():
    reference = reference_of(images(1000, seed=15))
    monitor = DriftMonitor(reference)
    for sample in 1 - images(500, seed=16):  # long drifted, then back to normal for exactly one window
        monitor.observe({"input": sample[None]}, [])
    drifted = monitor.stats()
    for sample in images(200, seed=17):
        monitor.observe({"input": sample[None]}, [])
    recovered = monitor.stats()
    assert drifted is not None and recovered is not None
    assert drifted.score > LARGE and recovered.score < MODERATE and recovered.samples == 200
    assert monitor._counts.sum(axis=1).tolist() == [200] * len(reference.features)


def test_no_figure_before_the_window_fills_without_a_reference_or_for_unreadable_inputs():
    reference = reference_of(images(100, seed=18))
    monitor = DriftMonitor(reference, window=50)
    for sample in images(49, seed=19):
        monitor.observe({"input": sample[None]}, [])
    assert monitor.stats() is None
    monitor.observe({"other": images(1, seed=20)}, [])  # a frame made for another model: not counted
    monitor.observe({"input": np.zeros(3, dtype=np.float32)}, [])  # one the statistics fail on: counted as skipped
    assert monitor.skipped == 2 and monitor.stats() is None
    monitor.observe({"input": images(1, seed=21)}, [])
    assert monitor.stats() is not None
    assert DriftMonitor(None).stats() is None
    assert sample_features(reference, {"input": np.zeros((1, 3, 16, 16), dtype=np.int32)}, None) is None


def test_the_manifest_carries_a_reference_and_leaves_the_field_out_without_one():
    reference = reference_of(images(100, seed=22), logits(100, seed=23))
    manifest = _minimal_manifest()
    with_reference = manifest.model_copy(update={"drift_reference": reference})
    parsed = Manifest.model_validate_json(with_reference.model_dump_json())
    assert parsed.drift_reference == reference
    written = json.loads(manifest.model_dump_json())
    # A 0.1 agent refuses any field it does not know, null ones too (docs/protocol.md, "Compatibility").
    assert "drift_reference" not in written and "labels" not in written


def _minimal_manifest() -> Manifest:
    return Manifest.model_validate(
        {
            "name": "m", "version": "1.0.0", "created": "2026-01-01T00:00:00Z", "profile": "x86-64-avx2",
            "backend": "onnxruntime", "precision": "fp32", "runtime": "onnxruntime", "target": {},
            "entrypoint": "artifacts/model.onnx", "inputs": [{"name": "input", "shape": [1, 3, 16, 16],
            "dtype": "float32", "layout": "NCHW"}], "outputs": [{"name": "logits", "shape": [1, 10],
            "dtype": "float32", "layout": "NC"}], "files": [], "compiler": {},
            "verification": {"verified_on": "host", "model_bytes": 1, "param_bytes": 1, "reference_model_bytes": 1,
            "reference_param_bytes": 1}, "selftest": {"file": "selftest/vectors.npz", "count": 1, "atol": 0,
            "rtol": 0}, "signing_key_id": "k",
        }
    )  # fmt: skip
