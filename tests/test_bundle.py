"""`edgekit verify` rejects every kind of damage, naming what failed (exit 1); a good bundle passes (exit 0)."""

import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from helpers import assert_user_error

from edgekit.signing import generate_keypair


@pytest.fixture(scope="module")
def signed(tmp_path_factory, small_cnn_model) -> tuple[Path, Path]:
    """(bundle, public key): an fp32 bundle of the small CNN signed with a fresh key."""
    from typer.testing import CliRunner

    from edgekit.cli import app

    work = tmp_path_factory.mktemp("signed")
    private, public = generate_keypair(work / "keys")
    bundle = work / "cnn.ekb"
    result = CliRunner().invoke(
        app,
        [
            "compile",
            str(small_cnn_model),
            "--profile",
            "x86-64-avx2",
            "--backend",
            "onnxruntime",
            "--precision",
            "fp32",
            "--sign-key",
            str(private),
            "--bench-seconds",
            "0.1",
            "-o",
            str(bundle),
        ],
    )
    assert result.exit_code == 0, result.output
    return bundle, public


@pytest.fixture
def copy(signed, tmp_path) -> Path:
    target = tmp_path / "copy.ekb"
    shutil.copy(signed[0], target)
    return target


def flip_byte_in_member(bundle: Path, member_name: str, offset: int = 100) -> None:
    with tarfile.open(bundle) as tar:
        member = tar.getmember(member_name)
    position = member.offset_data + min(offset, member.size - 1)
    data = bytearray(bundle.read_bytes())
    data[position] ^= 0x01
    bundle.write_bytes(bytes(data))


def test_good_bundle_verifies(cli, signed):
    bundle, public = signed
    result = cli("verify", bundle, "--trust-key", public)
    assert result.exit_code == 0, result.output
    assert "OK" in result.stdout


def test_flipped_artifact_byte_is_rejected(cli, signed, copy):
    flip_byte_in_member(copy, "artifacts/model.onnx")
    result = cli("verify", copy, "--trust-key", signed[1])
    assert result.exit_code == 1
    assert "artifacts/model.onnx sha256 does not match" in result.stderr


def test_flipped_manifest_byte_is_rejected(cli, signed, copy):
    flip_byte_in_member(copy, "manifest.json", offset=40)
    result = cli("verify", copy, "--trust-key", signed[1])
    assert result.exit_code == 1
    assert "signature check failed" in result.stderr


def test_signature_by_another_key_is_rejected(cli, signed, tmp_path):
    _, other_public = generate_keypair(tmp_path / "other")
    result = cli("verify", signed[0], "--trust-key", other_public)
    assert result.exit_code == 1
    assert "not signed by a trusted key" in result.stderr


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_truncated_bundle_is_rejected(cli, signed, copy, keep):
    data = copy.read_bytes()
    copy.write_bytes(data[: int(len(data) * keep)])
    result = cli("verify", copy, "--trust-key", signed[1])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert any(word in result.stderr for word in ("truncated", "missing file", "does not match"))


def rewrite_without(bundle: Path, target: Path, skip: str, extra: tuple[str, bytes] | None = None) -> None:
    with tarfile.open(bundle) as src, tarfile.open(target, "w") as dst:
        for member in src.getmembers():
            if member.name != skip:
                dst.addfile(member, src.extractfile(member))
        if extra:
            info = tarfile.TarInfo(extra[0])
            info.size = len(extra[1])
            dst.addfile(info, io.BytesIO(extra[1]))


@pytest.mark.parametrize(
    ("skip", "extra", "message"),
    [
        ("selftest/vectors.npz", None, "missing file selftest/vectors.npz"),
        ("", ("artifacts/payload.so", b"\x7fELF"), "not listed in the manifest: artifacts/payload.so"),
        ("", ("../escape.txt", b"x"), "unsafe member rejected"),
    ],
    ids=["missing-file", "unlisted-file", "path-traversal"],
)
def test_repacked_bundle_is_rejected(cli, signed, tmp_path, skip, extra, message):
    damaged = tmp_path / "damaged.ekb"
    rewrite_without(signed[0], damaged, skip, extra)
    result = cli("verify", damaged, "--trust-key", signed[1])
    assert result.exit_code == 1
    assert message in result.stderr
    assert not (tmp_path / "escape.txt").exists()


def test_garbage_file_is_not_a_bundle(cli, signed, tmp_path):
    garbage = tmp_path / "garbage.ekb"
    garbage.write_bytes(b"this is not a tar file" * 50)
    result = cli("verify", garbage, "--trust-key", signed[1])
    assert result.exit_code == 1
    assert "not an edgekit bundle" in result.stderr


def test_missing_bundle_and_bad_key_are_usage_errors(cli, signed, tmp_path):
    assert_user_error(cli("verify", tmp_path / "nope.ekb", "--trust-key", signed[1]), "no such bundle")
    bad_key = tmp_path / "bad.pub"
    bad_key.write_text("not a key")
    assert_user_error(cli("verify", signed[0], "--trust-key", bad_key), "not a PEM public key")


def test_inspect_shows_manifest(cli, signed):
    result = cli("inspect", signed[0])
    assert result.exit_code == 0
    for fragment in ("x86-64-avx2", "onnxruntime fp32", "artifacts/model.onnx", "self-test"):
        assert fragment in result.stdout
    as_json = cli("inspect", signed[0], "--json")
    import json

    manifest = json.loads(as_json.stdout)
    assert manifest["backend"] == "onnxruntime" and manifest["inputs"][0]["shape"] == [1, 3, 32, 32]


def test_bench_runs_bundle_selftest_and_model(cli, signed, small_cnn_model):
    import json

    bundle = json.loads(cli("bench", signed[0], "--seconds", "0.2", "--json").stdout)
    assert bundle["selftest"].startswith("passed") and bundle["latency_p50_ms"] > 0
    assert bundle["latency_p95_ms"] >= bundle["latency_p50_ms"]
    model = json.loads(cli("bench", small_cnn_model, "--seconds", "0.2", "--json").stdout)
    assert model["runtime"] == "onnxruntime" and model["throughput_per_s"] > 0


def test_keys_generate_refuses_to_overwrite(cli, tmp_path):
    first = cli("keys", "generate", tmp_path / "k")
    assert first.exit_code == 0
    assert (tmp_path / "k" / "edgekit.key").stat().st_mode & 0o777 == 0o600
    assert_user_error(cli("keys", "generate", tmp_path / "k"), "already exists")


def test_interrupted_write_leaves_no_bundle(monkeypatch, tmp_path, signed):
    """Ctrl-C while the bundle is being written: neither the bundle nor a partial file remains."""
    import edgekit.bundle as bundle_module
    from edgekit.bundle import open_bundle, write_bundle
    from edgekit.signing import load_private_key

    root = tmp_path / "root"
    manifest = open_bundle(signed[0], root, trust_key=None)
    calls = []

    def interrupt_on_second(tar, name, data):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        original(tar, name, data)

    original = bundle_module.add_member
    monkeypatch.setattr(bundle_module, "add_member", interrupt_on_second)
    out = tmp_path / "out.ekb"
    key = generate_keypair(tmp_path / "k")[0]
    with pytest.raises(KeyboardInterrupt):
        write_bundle(root, manifest, load_private_key(key), out)
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_ctrl_c_during_compile_exits_130_and_leaves_nothing(tmp_path, small_cnn_model, small_cnn_calibration):
    import signal
    import subprocess
    import sys
    import time

    edgekit = Path(sys.executable).with_name("edgekit")
    out = tmp_path / "never.ekb"
    scratch = tmp_path / "scratch"  # the compile's temporary folder goes here (TMPDIR), to be watched
    scratch.mkdir()
    command = [edgekit, "compile", small_cnn_model, "-p", "x86-64-avx2", "--calibration", small_cnn_calibration]
    process = subprocess.Popen([*command, "-o", out], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "TMPDIR": str(scratch)})  # fmt: skip
    deadline = time.monotonic() + 120
    # The first candidate's build folder: the build is under way, with every other x86 candidate still to come.
    while not list(scratch.glob("edgekit-compile-*/00-*")) and process.poll() is None:
        assert time.monotonic() < deadline, "no candidate build started within 120 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert not out.exists() and not list(tmp_path.glob("*.partial"))
    assert not list(scratch.glob("edgekit-compile-*")), "the compile's temporary folder is left behind"


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, "absolute"])
def test_links_devices_and_absolute_paths_are_rejected(cli, signed, tmp_path, kind):
    """Checked by edgekit itself, so Pythons without tarfile's extraction filters (< 3.11.4) are as safe."""
    damaged = tmp_path / "damaged.ekb"
    with tarfile.open(signed[0]) as src, tarfile.open(damaged, "w") as dst:
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member))
        info = tarfile.TarInfo(str(tmp_path / "abs.txt") if kind == "absolute" else "artifacts/evil")
        if kind != "absolute":
            info.type, info.linkname = kind, "/etc/passwd"
        dst.addfile(info, io.BytesIO(b"") if kind == "absolute" else None)
    result = cli("verify", damaged, "--trust-key", signed[1])
    assert result.exit_code == 1 and "unsafe member rejected" in result.stderr, result.output
    assert not (tmp_path / "abs.txt").exists()
