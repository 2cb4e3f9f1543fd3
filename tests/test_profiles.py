import json
from pathlib import Path

import pytest
from helpers import assert_user_error

from edgekit.errors import BadInput
from edgekit.profiles import builtin_profile_names, load_profile, load_profile_file

REQUIRED = {
    "x86-64-avx2",
    "x86-64-avx512",
    "rpi4",
    "rpi5",
    "jetson-nano",
    "jetson-orin-nano",
    "intel-core-ultra-npu",
    "ethos-u55",
}


def test_every_required_profile_ships_and_validates():
    assert set(builtin_profile_names()) >= REQUIRED
    for name in builtin_profile_names():
        profile = load_profile(name)
        assert profile.name == name
        assert profile.candidates and profile.runtime_packages


@pytest.mark.parametrize(
    ("name", "cpu", "accel_arch"),
    [
        ("rpi4", "cortex-a72", None),
        ("rpi5", "cortex-a76", None),
        ("jetson-nano", "cortex-a57", "sm_53"),
        ("jetson-orin-nano", "cortex-a78ae", "sm_87"),
        ("ethos-u55", "cortex-m55", "ethos-u55-128"),
    ],
)
def test_profiles_describe_their_hardware(name, cpu, accel_arch):
    profile = load_profile(name)
    assert profile.cpu.model == cpu
    assert profile.accelerator.arch == accel_arch


def test_profiles_list_and_show(cli):
    listing = cli("profiles", "list")
    assert listing.exit_code == 0
    for name in REQUIRED:
        assert name in listing.stdout
    shown = cli("profiles", "show", "jetson-orin-nano", "--json")
    assert shown.exit_code == 0 and '"arch":"sm_87"' in shown.stdout.replace(" ", "")


def test_unknown_profile_is_a_clear_usage_error(cli, small_cnn_model):
    assert_user_error(cli("compile", small_cnn_model, "--profile", "rpi9"), "unknown profile 'rpi9'", "rpi4")


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


GOOD = load_profile("rpi4").model_dump(mode="json")


def test_malformed_yaml_names_file_and_line(tmp_path, cli, small_cnn_model):
    path = write(tmp_path, "board", "name: board\ncpu: {arch: aarch64\n  model: [\n")
    result = cli("compile", small_cnn_model, "--profile", path)
    assert_user_error(result, str(path), "malformed YAML", "line")


def test_invalid_field_names_file_and_field(tmp_path, cli, small_cnn_model):
    import yaml

    data = {**GOOD, "name": "board", "candidates": [{"backend": "onnxruntime", "precision": "int4"}]}
    path = write(tmp_path, "board", yaml.safe_dump(data))
    assert_user_error(cli("compile", small_cnn_model, "--profile", path), str(path), "candidates.0.precision")


def test_unknown_field_is_rejected_not_ignored(tmp_path):
    import yaml

    data = {**GOOD, "name": "board", "memroy": {"ram_mb": 1}}
    with pytest.raises(BadInput, match="memroy"):
        load_profile_file(write(tmp_path, "board", yaml.safe_dump(data)))


def test_profile_name_must_match_file(tmp_path):
    import yaml

    with pytest.raises(BadInput, match="must match the file name"):
        load_profile_file(write(tmp_path, "other", yaml.safe_dump({**GOOD, "name": "board"})))


def test_bad_backend_options_name_the_candidate(tmp_path, cli, small_cnn_model):
    import yaml

    data = {
        **GOOD,
        "name": "board",
        "candidates": [{"backend": "onnxruntime", "precision": "fp32", "options": {"per_chanel": True}}],
    }
    path = write(tmp_path, "board", yaml.safe_dump(data))
    assert_user_error(cli("compile", small_cnn_model, "--profile", path), "candidate #1", "per_chanel")


@pytest.mark.parametrize(
    ("option", "fragments"),
    [
        ("tune_trials=8", ["expected BACKEND.NAME=VALUE"]),
        ("tvmm.tune_trials=8", ["no backend 'tvmm'", "onnxruntime"]),
        ("onnxruntime.per_chanel=true", ["no option 'per_chanel'", "per_channel"]),
        ("openvino.preset=fast", ["backend 'openvino'", "preset", "performance"]),
        ("tvm.tune_trials=many", ["backend 'tvm'", "tune_trials"]),
    ],
)
def test_bad_backend_option_flags_are_usage_errors(cli, small_cnn_model, option, fragments):
    assert_user_error(cli("compile", small_cnn_model, "--profile", "x86-64-avx2", "--option", option), *fragments)


def test_backend_option_flag_reaches_the_backend(tmp_path, cli, small_cnn_model):
    """--option overrides the profile candidate's own value, and lands in what the backend writes: here the
    execution providers the bundle asks the device's ONNX Runtime for."""
    out = tmp_path / "m.ekb"
    providers = "onnxruntime.execution_providers=[XnnpackExecutionProvider, CPUExecutionProvider]"
    result = cli("compile", small_cnn_model, "-p", "x86-64-avx2", "--backend", "onnxruntime", "--precision", "fp32",
                 "--bench-seconds", "0.02", "-o", out, "--option", providers)  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = json.loads(cli("inspect", out, "--json").stdout)
    assert manifest["target"]["execution_providers"] == ["XnnpackExecutionProvider", "CPUExecutionProvider"]


def test_deprecated_tune_trials_flag_is_the_tvm_option(cli, small_cnn_model):
    """edgekit 0.1's --tune-trials still parses, as tvm.tune_trials (a bad value is that option's error)."""
    result = cli("compile", small_cnn_model, "-p", "x86-64-avx2", "--tune-trials", "-1")
    assert result.exit_code == 2 and "Traceback" not in result.output
    notice, error = result.stderr.strip().splitlines()
    assert "deprecated" in notice and "--option tvm.tune_trials" in notice
    assert error.startswith("error: --option: backend 'tvm': tune_trials") and "greater than or equal to 0" in error


def test_code_built_for_an_isa_the_host_lacks_does_not_run_here(monkeypatch) -> None:
    """An AVX-512 TVM build on a host without AVX-512 dies of an illegal instruction (seen on an AMD EPYC CI host):
    such a profile is the host's architecture but not a CPU the host can run code compiled for."""
    from edgekit import profiles

    avx512 = load_profile("x86-64-avx512")
    monkeypatch.setattr(profiles, "host_arch", lambda: "x86_64")
    monkeypatch.setattr(profiles, "host_isa", lambda: frozenset({"sse4_2", "avx", "avx2", "fma"}))
    assert avx512.runs_on_this_host() and not avx512.host_can_run()
    assert avx512.isa_missing_here() == ["avx512f", "avx512bw", "avx512vl", "avx512vnni"]
    monkeypatch.setattr(profiles, "host_isa", lambda: frozenset({"sse4_2", "avx", "avx2", "fma", "avx512f",
                                                                 "avx512bw", "avx512vl", "avx512_vnni"}))  # fmt: skip
    assert avx512.host_can_run()
    monkeypatch.setattr(profiles, "host_isa", lambda: None)  # a host that does not say: taken as able
    assert avx512.host_can_run()
