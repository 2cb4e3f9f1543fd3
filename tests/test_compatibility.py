"""Mixed versions (#15 item 3): payloads and manifests from a newer edgekit, with fields this one does not know, are
read (the fields counted and logged once); a newer major version, or a known field of the wrong type, is refused."""

import json
import logging

import pytest
from helpers import compile_bundle, tar_of

from edgekit.bundle import MANIFEST_FILE, SIGNATURE_FILE, open_bundle
from edgekit.errors import OperationFailed
from edgekit.protocol import PayloadRejected, ReportedState, Telemetry, decode, encode
from edgekit.schema import UnknownFields, unknown
from edgekit.signing import generate_keypair, load_private_key, load_public_key, sign


def _telemetry(**extra) -> bytes:
    return json.dumps({**json.loads(encode(Telemetry(seq=1, ts=1.0))), **extra}).encode()


def test_unknown_fields_are_read_counted_and_logged_once(caplog):
    before = unknown.counts["Telemetry.battery_mv"]
    with caplog.at_level(logging.WARNING, logger="edgekit.schema"):
        for _ in range(3):
            telemetry = decode(Telemetry, _telemetry(battery_mv=3300, fps=7.5))
    assert telemetry.fps == 7.5 and telemetry.seq == 1
    assert unknown.counts["Telemetry.battery_mv"] - before == 3
    logged = [r.message for r in caplog.records if "battery_mv" in r.message]
    assert len(logged) <= 1  # once per process: another test may have logged it first


def test_unknown_fields_inside_nested_models_are_named_by_path():
    counter = UnknownFields()
    payload = json.loads(encode(ReportedState(rev=3)))
    payload["update"]["eta_s"] = 12
    payload["thresholds"]["nms"] = "fast"
    reported = ReportedState.model_validate_json(json.dumps(payload))
    counter.note(reported)
    assert reported.update.state == "idle"
    assert dict(counter.counts) == {"ReportedState.update.eta_s": 1, "ReportedState.thresholds.nms": 1}


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"schema_version": 2}, "protocol major version 2: this edgekit speaks 1"),
        ({"schema_version": "1"}, "schema_version: Input should be a valid integer"),
        ({"fps": "fast"}, "fps: Input should be a valid number"),
        ({"seq": 0}, "seq: Input should be greater than or equal to 1"),
    ],
)
def test_known_fields_stay_strict_and_a_newer_major_is_refused(fields, message):
    with pytest.raises(PayloadRejected, match=message):
        decode(Telemetry, _telemetry(**fields))


def test_a_manifest_from_a_newer_compiler_opens_and_a_newer_format_does_not(digits, tmp_path):
    """A signed bundle whose manifest has a field this version does not know opens (and verifies); one whose
    format version is newer is refused, naming it."""
    private, public = generate_keypair(tmp_path / "keys")
    bundle = compile_bundle(digits, digits / "calibration.npz", private, "1.0.0", tmp_path / "digits.ekb")
    root = tmp_path / "unpacked"
    manifest = open_bundle(bundle, root, load_public_key(public))

    def resigned(extra: dict, name: str):
        """The same bundle, its manifest changed as a newer compiler might write it, and signed again."""
        data = json.dumps({**json.loads((root / MANIFEST_FILE).read_text()), **extra}).encode()
        members = [(MANIFEST_FILE, data), (SIGNATURE_FILE, sign(load_private_key(private), data))]
        members += [(entry.path, (root / entry.path).read_bytes()) for entry in manifest.files]
        return tar_of(tmp_path / name, members)

    before = unknown.counts["Manifest.accelerator_hint"]
    opened = open_bundle(resigned({"accelerator_hint": "npu"}, "newer.ekb"), tmp_path / "n", load_public_key(public))
    assert opened.name == manifest.name and unknown.counts["Manifest.accelerator_hint"] == before + 1
    with pytest.raises(OperationFailed, match="bundle format version 2: this edgekit reads 1"):
        open_bundle(resigned({"schema_version": 2}, "format2.ekb"), tmp_path / "f", load_public_key(public))
