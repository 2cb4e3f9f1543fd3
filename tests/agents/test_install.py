"""`edgekit agent install` and the agent command's input checking."""

import shlex
import shutil
import subprocess

import pytest
from helpers import assert_user_error


def test_install_writes_a_unit_that_runs_this_agent(cli, tmp_path, signing_keys, hub_signer):
    result = cli("agent", "install", "--broker", "mqtt://hub.local:1883", "--device-id", "cam-7",
                 "--trust-key", signing_keys[1], "--hub-key", hub_signer.public, "--source", "camera:0",
                 "--unit-dir", tmp_path)  # fmt: skip
    assert result.exit_code == 0, result.output
    unit = (tmp_path / "edgekit-agent.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    argv = shlex.split(exec_start.removeprefix("ExecStart="))
    assert argv[1:4] == ["-m", "edgekit", "agent"]
    assert argv[argv.index("--device-id") + 1] == "cam-7"
    assert argv[argv.index("--source") + 1] == "camera:0"
    assert argv[argv.index("--data") + 1] == "/var/lib/edgekit"
    assert argv[argv.index("--trust-key") + 1] == str(signing_keys[1].resolve())
    assert argv[argv.index("--hub-key") + 1] == str(hub_signer.public.resolve())
    assert "StateDirectory=edgekit" in unit and "Restart=always" in unit and "User=edgekit" in unit
    if shutil.which("systemd-analyze"):
        check = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "edgekit-agent.service")],
                               capture_output=True, text=True)  # fmt: skip
        complaints = [line for line in check.stderr.splitlines() if "edgekit-agent.service:" in line]
        assert not complaints, check.stderr


def test_the_unit_command_line_is_accepted_by_the_agent(cli, tmp_path, signing_keys, hub_signer):
    """The flags the unit passes are the agent's own (a renamed flag would break every installed device)."""
    result = cli("agent", "install", "--broker", "mqtt://h:1883", "--device-id", "d1", "--trust-key", signing_keys[1],
                 "--hub-key", hub_signer.public, "--data", "/srv/edgekit", "--unit-dir", tmp_path)  # fmt: skip
    assert result.exit_code == 0, result.output
    line = next(x for x in (tmp_path / "edgekit-agent.service").read_text().splitlines() if x.startswith("ExecStart"))
    argv = shlex.split(line.removeprefix("ExecStart="))
    help_text = cli("agent", "--help").stdout
    flags = [a for a in argv if a.startswith("--")]
    assert "--hub-key" in flags, argv
    for flag in flags:
        assert flag in help_text, flag
    assert "StateDirectory" not in (tmp_path / "edgekit-agent.service").read_text()


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--broker", "http://x", "--device-id", "d"], ["broker URL 'http://x'", "mqtt://"]),
        (["--broker", "mqtt://h:99999", "--device-id", "d"], ["port"]),
        (["--broker", "mqtt://h", "--device-id", "bad id!"], ["device_id"]),
        (["--broker", "mqtt://h", "--device-id", "d", "--source", "webcam:0"], ["webcam:0", "camera"]),
        (["--device-id", "d"], ["--broker"]),
    ],
)
def test_agent_rejects_bad_settings(cli, args, fragments):
    assert_user_error(cli("agent", *args), *fragments)


def test_install_needs_the_trust_key_file(cli, tmp_path, hub_signer):
    result = cli("agent", "install", "--broker", "mqtt://h", "--device-id", "d", "--trust-key", tmp_path / "none.pub",
                 "--hub-key", hub_signer.public, "--unit-dir", tmp_path)  # fmt: skip
    assert_user_error(result, "none.pub", "no such file")


def test_install_needs_the_hub_key_file(cli, tmp_path, signing_keys):
    """A unit whose --hub-key is missing would restart in a loop: install refuses it."""
    result = cli("agent", "install", "--broker", "mqtt://h", "--device-id", "d", "--trust-key", signing_keys[1],
                 "--hub-key", tmp_path / "no-hub.pub", "--unit-dir", tmp_path)  # fmt: skip
    assert_user_error(result, "no-hub.pub", "no such file")
    assert not (tmp_path / "edgekit-agent.service").exists()


def test_install_needs_the_hub_key(cli, tmp_path, signing_keys):
    """Without the hub's key the installed agent would refuse every desired state: install says so, and writes
    nothing."""
    result = cli("agent", "install", "--broker", "mqtt://h", "--device-id", "d", "--trust-key", signing_keys[1],
                 "--unit-dir", tmp_path)  # fmt: skip
    assert_user_error(result, "--hub-key")
    assert not (tmp_path / "edgekit-agent.service").exists()


def test_bundle_without_trust_key_is_refused(cli, tmp_path, digits_bundle):
    result = cli("agent", "--broker", "mqtt://127.0.0.1:1", "--device-id", "d", "--data", tmp_path,
                 "--bundle", digits_bundle("1.0.0"))  # fmt: skip
    assert_user_error(result, "--trust-key")


def test_install_passes_tls_and_telemetry_and_makes_paths_absolute(
    cli, tmp_path, signing_keys, hub_signer, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    for name in ("model.ekb", "ca.pem", "dev.pem", "dev.key"):
        (tmp_path / name).write_text("x")
    shutil.copy(hub_signer.public, tmp_path / "hub.pub")
    result = cli("agent", "install", "--broker", "mqtts://h:8883", "--device-id", "d1", "--trust-key", signing_keys[1],
                 "--hub-key", "hub.pub", "--bundle", "model.ekb", "--tls-ca", "ca.pem", "--tls-cert", "dev.pem",
                 "--tls-key", "dev.key", "--telemetry-s", "30", "--unit-dir", tmp_path)  # fmt: skip
    assert result.exit_code == 0, result.output
    line = next(x for x in (tmp_path / "edgekit-agent.service").read_text().splitlines() if x.startswith("ExecStart"))
    argv = shlex.split(line.removeprefix("ExecStart="))
    for flag, name in (
        ("--hub-key", "hub.pub"),
        ("--bundle", "model.ekb"),
        ("--tls-ca", "ca.pem"),
        ("--tls-cert", "dev.pem"),
        ("--tls-key", "dev.key"),
    ):
        assert argv[argv.index(flag) + 1] == str(tmp_path / name)
    assert argv[argv.index("--telemetry-s") + 1] == "30.0"
