"""`--backend auto`: every candidate the profile allows is built and verified; the winner is the fastest within
the accuracy budget on a native host, the profile's preference elsewhere; every loser says why it lost."""

import json


def test_auto_on_avx512_picks_fastest_within_budget(cli, digits, tmp_path):
    calibration = digits / "calibration.npz"
    result = cli("compile", digits / "digits.onnx", "-p", "x86-64-avx512", "--calibration", calibration,
                 "--bench-seconds", "0.3", "-o", tmp_path / "auto.ekb", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    candidates = report["candidates"]
    built = {(c["backend"], c["precision"]) for c in candidates if c["metrics"]}
    assert {("openvino", "int8"), ("onnxruntime", "int8"), ("tflite", "int8"), ("onnxruntime", "fp32")} <= built
    within = [c for c in candidates if c["status"] in ("chosen", "passed")]
    for c in within:
        m = c["metrics"]
        # Within the budget, or over it by no more than one sample (no single flip decides a verdict).
        assert (m["reference_accuracy"] - m["accuracy"]) * 100 <= 1.0 + 100 / m["samples"] + 1e-9
    chosen = next(c for c in candidates if c["status"] == "chosen")
    assert chosen["rank"] == 1
    assert chosen["metrics"]["latency_p50_ms"] == min(c["metrics"]["latency_p50_ms"] for c in within)
    for c in within:
        if c is not chosen:
            assert c["reason"].startswith("slower: p50") and c["rank"] > 1
    for c in candidates:
        if c["status"] in ("rejected", "failed", "skipped"):
            assert c["reason"] and c["rank"] is None
    assert report["ranking"].startswith("fastest host p50 within the accuracy budget")


def test_auto_on_a_foreign_device_follows_the_profile_and_says_what_was_not_measured(cli, digits, tmp_path):
    result = cli("compile", digits / "digits.onnx", "-p", "rpi5", "--calibration", digits / "calibration.npz",
                 "--bench-seconds", "0.05", "-o", tmp_path / "rpi.ekb", "--json")  # fmt: skip
    report = json.loads(result.stdout)
    assert "device latency was not measured" in report["ranking"]
    ranked = sorted((c for c in report["candidates"] if c["rank"]), key=lambda c: c["rank"])
    order = [(c["backend"], c["precision"]) for c in report["candidates"]]
    assert [order.index((c["backend"], c["precision"])) for c in ranked] == sorted(
        order.index((c["backend"], c["precision"])) for c in ranked
    )
    assert ranked[0]["status"] == "chosen"
    assert all("in the profile's order" in c["reason"] for c in ranked[1:])


def test_intel_npu_build_says_it_was_verified_on_the_cpu(cli, digits, tmp_path):
    result = cli("compile", digits / "digits.onnx", "-p", "intel-core-ultra-npu", "--precision", "int8",
                 "--calibration", digits / "calibration.npz", "--bench-seconds", "0.05", "-o", tmp_path / "npu.ekb",
                 "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    chosen = json.loads(result.stdout)["candidates"][0]
    assert chosen["backend"] == "openvino" and chosen["status"] == "chosen"
    assert "openvino CPU" in chosen["metrics"]["verified_on"]
    assert "the device asks for AUTO:NPU,GPU,CPU" in chosen["metrics"]["verified_on"]
    manifest = json.loads(cli("inspect", tmp_path / "npu.ekb", "--json").stdout)
    assert manifest["target"] == {"device": "AUTO:NPU,GPU,CPU"}
