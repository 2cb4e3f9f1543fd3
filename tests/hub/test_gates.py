"""Health gates (edgekit.hub.gates): parsing with clear refusals, per-device measurements from the health blocks
devices send, and per-wave evaluation, including the p95 noise floor."""

import pytest

from edgekit.errors import BadInput
from edgekit.hub.gates import (
    DEFAULT_GATES,
    class_shift,
    evaluate,
    failed_gates,
    model_measurement,
    parse_gate,
    parse_gates,
    shadow_measurement,
)

BUNDLE = "b" * 64


@pytest.mark.parametrize("text", ["agreement>=0.98", "p95<=1.2x", "errors<=0.01", "shift<=0.3", " p95 <= 2x "])
def test_gates_parse_and_print_back(text: str) -> None:
    assert str(parse_gate(text)) == text.replace(" ", "")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("accuracy>=0.9", "METRIC one of agreement"),
        ("agreement=0.9", "METRIC>=VALUE"),
        ("p95<=1.2", "p95 takes a factor"),
        ("agreement>=0.9x", "agreement takes a plain number"),
        ("agreement>=1.5", "a fraction from 0 to 1"),
        ("errors<=-1", "METRIC>=VALUE"),
    ],
)
def test_bad_gates_are_refused_naming_what_was_expected(text: str, fragment: str) -> None:
    with pytest.raises(BadInput, match=fragment) as error:
        parse_gate(text)
    assert text in str(error.value)


def test_defaults_apply_with_a_shadow_only_and_agreement_needs_one() -> None:
    assert [str(g) for g in parse_gates(None, shadow=True)] == list(DEFAULT_GATES)
    assert parse_gates(None, shadow=False) == []
    with pytest.raises(BadInput, match="needs a shadow phase"):
        parse_gates(["agreement>=0.9"], shadow=False)


def test_a_device_counts_once_it_measured_enough_of_the_right_bundle() -> None:
    shadow = {"bundle": BUNDLE, "samples": 40, "agreement": 0.9, "errors": 2, "latency_p95_ms": 6.0,
              "active_p95_ms": 3.0, "latency_p50_ms": 2.0, "active_p50_ms": 1.0, "threads": 1,
              "active_threads": 4}  # fmt: skip
    assert shadow_measurement({"shadow": shadow}, BUNDLE, 50) is None
    assert shadow_measurement({"shadow": shadow}, "c" * 64, 10) is None
    measured = shadow_measurement({"shadow": shadow}, BUNDLE, 40)
    assert measured == {"samples": 40, "agreement": 0.9, "errors": 2, "error_rate": round(2 / 42, 6), "p95": 2.0,
                        "p95_delta_ms": 3.0, "p50": 2.0, "p50_delta_ms": 1.0, "thread_factor": 4.0}  # fmt: skip
    model = {"bundle": BUNDLE, "inferences": 100, "errors": 0, "latency_p95_ms": 4.0, "classes": {"1": 50, "2": 50}}
    baseline = {"latency_p95_ms": 2.0, "classes": {"1": 100}}
    measured = model_measurement({"model": model}, baseline, BUNDLE, 100)
    assert measured["p95"] == 2.0 and measured["shift"] == 0.5 and measured["error_rate"] == 0
    assert model_measurement({"model": model}, None, BUNDLE, 100)["p95"] is None  # no baseline: no ratio


def test_class_shift_is_the_total_variation_distance() -> None:
    assert class_shift({"1": 10, "2": 10}, {"1": 5, "2": 5}) == 0
    assert class_shift({"1": 10}, {"2": 3}) == 1
    assert class_shift({"1": 3, "other": 1}, {"1": 1, "other": 3}) == 0.5
    assert class_shift({}, {"1": 1}) is None


def test_a_wave_is_judged_on_weighted_means_totals_and_the_median_device() -> None:
    gates = parse_gates(["agreement>=0.95", "p95<=1.5x", "errors<=0.01"], shadow=True)
    devices = [
        {"samples": 100, "agreement": 1.0, "errors": 0, "p95": 1.1, "p95_delta_ms": 3.0},
        {"samples": 300, "agreement": 0.9, "errors": 1, "p95": 9.0, "p95_delta_ms": 80.0},
        {"samples": 100, "agreement": 1.0, "errors": 0, "p95": 1.2, "p95_delta_ms": 4.0},
    ]
    results = {r["gate"]: r for r in evaluate(gates, "shadow", 0, devices)}
    assert results["agreement>=0.95"]["value"] == 0.94 and not results["agreement>=0.95"]["passed"]
    assert results["p95<=1.5x"]["value"] == 1.2 and results["p95<=1.5x"]["passed"]  # one slow device is not the wave
    assert results["errors<=0.01"]["value"] == round(1 / 501, 6) and results["errors<=0.01"]["passed"]
    assert failed_gates(list(results.values())) == (
        "health gate in the shadow phase: agreement>=0.95 failed: measured 0.94 on 3 devices"
    )


def test_p95_within_the_noise_floor_passes_and_an_unmeasured_gate_says_so() -> None:
    gates = parse_gates(["p95<=1.5x", "shift<=0.3"], shadow=False)
    tiny = [{"samples": 50, "errors": 0, "p95": 4.0, "p95_delta_ms": 0.6, "shift": None}]
    results = {r["gate"]: r for r in evaluate(gates, "waves", 1, tiny)}
    assert results["p95<=1.5x"]["passed"] and "scheduling noise" in results["p95<=1.5x"]["note"]
    assert results["shift<=0.3"]["value"] is None and results["shift<=0.3"]["passed"]
    assert "not applied" in results["shift<=0.3"]["note"]
    slow = [{"samples": 50, "errors": 0, "p95": 4.0, "p95_delta_ms": 12.0, "p50": 3.0, "p50_delta_ms": 8.0,
             "shift": 0.0}]  # fmt: skip
    assert (
        failed_gates(evaluate(gates, "waves", 1, slow))
        == "health gate in wave 1: p95<=1.5x failed: measured 4 on 1 devices"
    )


def test_a_slow_tail_with_an_unmoved_median_is_the_load_not_the_bundle() -> None:
    """Measured on five agents beside two busy processes: the same model's p95 went 3.5 -> 7.4 ms, its p50 did not
    move; a slower bundle moves both."""
    gates = parse_gates(["p95<=1.5x"], shadow=False)
    loaded = [{"samples": 30, "errors": 0, "p95": 2.1, "p95_delta_ms": 3.9, "p50": 0.85, "p50_delta_ms": -0.05}]
    result = evaluate(gates, "waves", 0, loaded)[0]
    assert result["passed"] and "the device's load" in result["note"]
    small_but_slower = [{"samples": 30, "errors": 0, "p95": 2.1, "p95_delta_ms": 3.9, "p50": 1.6, "p50_delta_ms": 0.4}]
    assert evaluate(gates, "waves", 0, small_but_slower)[0]["passed"]  # +0.4 ms at the median: within 0.5 ms
    slower = [{"samples": 30, "errors": 0, "p95": 2.1, "p95_delta_ms": 3.9, "p50": 1.6, "p50_delta_ms": 0.9}]
    assert not evaluate(gates, "waves", 0, slower)[0]["passed"]


def test_the_shadow_phase_allows_for_the_threads_the_shadow_lacks() -> None:
    """The shadow runs on one thread beside an active bundle on four: 2.5x slower at the median may be as fast once
    active (the canary's wave measures that); 5x may not."""
    gates = parse_gates(["p95<=1.5x"], shadow=True)
    same_model = [{"samples": 50, "errors": 0, "agreement": 1.0, "p95": 2.6, "p95_delta_ms": 16.0, "p50": 2.5,
                   "p50_delta_ms": 15.0, "thread_factor": 4.0}]  # fmt: skip
    result = evaluate(gates, "shadow", 0, same_model)[0]
    assert result["passed"] and "widened to 6x" in result["note"], result
    too_slow = [{**same_model[0], "p95": 7.0, "p50": 7.0, "p50_delta_ms": 60.0}]
    assert not evaluate(gates, "shadow", 0, too_slow)[0]["passed"]
