"""`edgekit hub`, `hub token`, `push`, `deploy`, `devices` and `deployments` as a user runs them: against a running
hub over real HTTP, with real agents and real signed bundles. Errors must be one line with the right exit code."""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import httpx
import pytest
from brokers import Probe
from helpers import compile_bundle
from hub_helpers import device_url, devices, fleet, fleet_ids, signing_keys, wait_devices_reported, wait_until
from typer.testing import CliRunner

from edgekit.cli import app
from edgekit.enrollment import Enrollment, load_enrollment
from edgekit.hub.auth import create_token
from edgekit.hub.broker import free_port
from edgekit.protocol import DesiredState

TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def bundles(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cli-bundles")
    key, public = signing_keys(folder / "key")
    calibration = digits / "calibration.npz"
    return {
        "public": public,
        "v1": compile_bundle(digits, calibration, key, "1.0.0", folder / "digits-1.ekb"),
        "v2": compile_bundle(digits, calibration, key, "2.0.0", folder / "digits-2.ekb"),
    }


def run(*args: str, hub=None, token: str | None = None) -> "CliResult":
    """`edgekit ARGS` in-process, pointed at `hub` through the environment variables a user would set."""
    env = {"EDGEKIT_HUB": hub.http_url if hub else None, "EDGEKIT_TOKEN": token}
    result = CliRunner().invoke(app, list(args), env=env)
    assert "Traceback" not in result.output, result.output
    return CliResult(result.exit_code, result.stdout, result.stderr)


class CliResult:
    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        self.code, self.stdout, self.stderr = code, stdout, stderr

    def error(self) -> str:
        """The one error line (and nothing else on stderr)."""
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), self.stderr
        return lines[0].removeprefix("error: ")


def _tampered(bundle: Path, out: Path) -> Path:
    with tarfile.open(bundle) as source, tarfile.open(out, "w") as target:
        for member in source.getmembers():
            data = source.extractfile(member).read()
            if member.name.endswith(".onnx"):
                data = data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:]
            target.addfile(member, io.BytesIO(data))
    return out


def test_push_deploy_devices_and_deployments(make_hub, bundles, tmp_path: Path) -> None:
    hub = make_hub(trust_key=bundles["public"])
    token = create_token(hub.sessions, "cli-user", "test")
    ids = fleet_ids("cli", 2)
    with fleet(hub, 2, tmp_path, bundles["public"], bundles["v1"], prefix="cli"):
        wait_devices_reported(hub, ids)
        listed = run("devices", hub=hub, token=token)
        assert listed.code == 0, listed.stderr
        assert all(i in listed.stdout for i in ids) and "digits@1.0.0" in listed.stdout
        assert "2 devices, 2 online" in listed.stdout
        rows = json.loads(run("devices", "--json", hub=hub, token=token).stdout)
        assert [r["id"] for r in rows] == ids and all(r["online"] for r in rows)
        httpx.put(f"{hub.http_url}/api/devices/{ids[1]}/labels", json={"labels": {"site": "lab"}},
                  headers={"Authorization": f"Bearer {token}"}, trust_env=False).raise_for_status()  # fmt: skip
        labelled = json.loads(run("devices", "--label", "site=lab", "--json", hub=hub, token=token).stdout)
        assert [r["id"] for r in labelled] == [ids[1]]

        pushed = run("push", str(bundles["v2"]), hub=hub, token=token)
        assert pushed.code == 0, pushed.stderr
        assert "pushed digits@2.0.0" in pushed.stdout
        bundle_id = json.loads(run("push", str(bundles["v2"]), "--json", hub=hub, token=token).stdout)["id"]
        assert bundle_id in pushed.stdout
        assert "already in the registry" in run("push", str(bundles["v2"]), hub=hub, token=token).stdout
        refused = run("push", str(_tampered(bundles["v1"], tmp_path / "bad.ekb")), hub=hub, token=token)
        assert refused.code == 1
        assert refused.error().startswith("the hub refused the bundle:") and "sha256 does not match" in refused.error()
        missing = run("push", str(tmp_path / "none.ekb"), hub=hub, token=token)
        assert missing.code == 2 and "no such bundle file" in missing.error()

        bad_target = run("deploy", bundle_id[:10], "--to", "two words", hub=hub, token=token)
        assert bad_target.code == 2 and bad_target.error().startswith("the hub rejected the request: target:")
        unknown = run("deploy", "0000000000", "--to", "all", hub=hub, token=token)
        assert unknown.code == 2 and "bundle_id:" in unknown.error() and "no bundles match" in unknown.error()
        assert run("deploy", bundle_id, "--to", "all", "--max-failures", "2", hub=hub, token=token).code == 2
        nobody = run("deploy", bundle_id, "--to", "group:site=moon", hub=hub, token=token)
        assert nobody.code == 2 and "no devices match" in nobody.error()

        deployed = run("deploy", bundle_id[:10], "--to", "all", "--canary", "50", "--wave", "50",
                       "--max-failures", "50%", "--health-checks", "7", hub=hub, token=token)  # fmt: skip
        assert deployed.code == 0, deployed.stderr
        assert "deployment 1: digits@2.0.0 → all" in deployed.stdout and "canary" in deployed.stdout
        detail = json.loads(run("deployments", "1", "--json", hub=hub, token=token).stdout)
        assert detail["failure_threshold"] == 0.5 and detail["canary_percent"] == 50 and detail["health_checks"] == 7
        assert [w["total"] for w in detail["wave_progress"]] == [1, 1]
        table = run("deployments", hub=hub, token=token)
        assert table.code == 0 and bundle_id[:12] in table.stdout and "cli-user" in table.stdout

        halted = run("deployments", "1", "--halt", "--reason", "test halt", hub=hub, token=token)
        assert halted.code == 0, halted.stderr
        assert "halted" in halted.stdout and "test halt" in halted.stdout
        again = run("deployments", "1", "--halt", hub=hub, token=token)
        assert again.code == 2 and "already halted" in again.error()
        assert run("deployments", "--halt", hub=hub, token=token).code == 2


def test_clear_errors_for_tokens_and_unreachable_hubs(hub) -> None:
    refused = run("devices", hub=hub, token="wrong-token")
    assert refused.code == 2 and refused.error().startswith("the hub refused the token")
    no_token = run("devices", hub=hub)
    assert no_token.code == 2 and "EDGEKIT_TOKEN" in no_token.error()
    down = run("devices", "--hub", f"http://127.0.0.1:{free_port()}", "--token", "x")
    assert down.code == 1 and down.error().startswith("cannot reach the hub at http://127.0.0.1:")
    assert run("devices", "--hub", "ftp://x", "--token", "x").code == 2
    assert run("hub", "token", "list", "--data", str(hub.settings.data_dir.parent / "nowhere")).code == 2


def _read_until(process: subprocess.Popen, marker: str, timeout: float = TIMEOUT_S) -> list[str]:
    """stdout lines up to and including the one containing `marker`; fails after `timeout`."""
    lines: list[str] = []
    found = threading.Event()

    def reader() -> None:
        for line in process.stdout:
            lines.append(line)
            if marker in line:
                found.set()
                return

    threading.Thread(target=reader, daemon=True).start()
    assert found.wait(timeout), f"no '{marker}' from edgekit hub in {timeout:g} s: {lines}"
    return lines


def _start_hub(data: Path, http_port: int, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "edgekit", "hub", "--data", str(data), "--http", f"127.0.0.1:{http_port}",
            "--broker-port", str(free_port()), *extra]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _stop(process: subprocess.Popen) -> tuple[int, str, str]:
    """SIGTERM, as systemd sends it; (exit code, rest of stdout, stderr). Given systemd's own default of 90 s before
    it kills, 60 s: on a loaded 2-core CI machine the hub's stop has once taken more than 30."""
    process.send_signal(signal.SIGTERM)
    try:
        stdout, stderr = process.communicate(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate(timeout=10)
        raise AssertionError(f"edgekit hub did not stop on SIGTERM in {STOP_TIMEOUT_S:g} s; its stderr: "
                             f"{stderr[-3000:]}") from None  # fmt: skip
    return process.returncode, stdout, stderr


def test_hub_command_prints_admin_token_once_and_stops_on_sigterm(tmp_path: Path) -> None:
    data, port = tmp_path / "hub", free_port()
    process = _start_hub(data, port)
    try:
        lines = _read_until(process, "admin token")
    finally:
        code, _, stderr = _stop(process)
    assert code == 0, stderr
    assert "Traceback" not in stderr
    assert "broker: embedded mosquitto listening on 127.0.0.1:" in stderr and "stopping the hub" in stderr
    assert any(f"dashboard: http://127.0.0.1:{port}/" in line for line in lines)
    admin = lines[-1].split()[-1]
    assert len(admin) >= 40

    created = run("hub", "token", "create", "ci", "--data", str(data))
    assert created.code == 0, created.stderr
    ci_token = created.stdout.strip()
    assert run("hub", "token", "create", "ci", "--data", str(data)).code == 2
    tokens = json.loads(run("hub", "token", "list", "--data", str(data), "--json").stdout)
    assert [(t["name"], t["revoked"]) for t in tokens] == [("admin", False), ("ci", False)]

    process = _start_hub(data, port)
    try:
        lines = _read_until(process, "dashboard:")
        hub_url = f"http://127.0.0.1:{port}"
        for token in (admin, ci_token):
            listed = run("devices", "--json", "--hub", hub_url, "--token", token)
            assert listed.code == 0 and json.loads(listed.stdout) == [], listed.stderr
        assert run("hub", "token", "revoke", "ci", "--data", str(data)).code == 0
        revoked = run("devices", "--hub", hub_url, "--token", ci_token)
        assert revoked.code == 2 and "refused the token" in revoked.error()
    finally:
        code, rest, stderr = _stop(process)
    assert code == 0, stderr
    assert "admin token" not in "".join(lines) + rest, "the admin token was shown on a second start"


def test_hub_command_rejects_bad_options(tmp_path: Path) -> None:
    bad = run("hub", "--data", str(tmp_path), "--http", "localhost:http")
    assert bad.code == 2 and "--http 'localhost:http'" in bad.error()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = run("hub", "--data", str(tmp_path), "--http", f"127.0.0.1:{port}")
    assert busy.code == 2 and "cannot listen there" in busy.error()
    assert run("hub", "--data", str(tmp_path), "--trust-key", str(tmp_path / "none.pub")).code == 2


# ---- enrollment ----------------------------------------------------------------------------------------------------


def test_hub_enroll_writes_a_private_file_an_agent_joins_with(make_hub, bundles, tmp_path: Path) -> None:
    """`edgekit hub enroll` while the hub runs: a 0600 file with the broker as devices reach it, the trust key and
    the hub's key; `edgekit agent --enrollment FILE` (a real process, no other flag about the hub) comes online with
    it and takes a desired state the hub signed."""
    hub = make_hub(trust_key=bundles["public"])
    path = tmp_path / "cam-9.json"
    result = run("hub", "enroll", "cam-9", "--data", str(hub.settings.data_dir), "--out", str(path),
                 "--trust-key", str(bundles["public"]))  # fmt: skip
    assert result.code == 0, result.stderr
    assert path.stat().st_mode & 0o777 == 0o600
    enrolled = load_enrollment(path)
    assert (enrolled.device_id, enrolled.username) == ("cam-9", "cam-9")
    assert enrolled.broker == f"mqtt://127.0.0.1:{hub.embedded.port}"
    assert enrolled.trust_key == bundles["public"].read_text()
    assert enrolled.hub_key == hub.trust.public_key_file.read_text()
    assert enrolled.trust_version == hub.trust.root.version
    agent = subprocess.Popen([sys.executable, "-m", "edgekit", "agent", "--enrollment", str(path), "--data",
                              str(tmp_path / "agent"), "--source", "synthetic:?fps=2", "--telemetry-s", "0.5"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_until(lambda: devices(hub).get("cam-9") and devices(hub)["cam-9"].online, TIMEOUT_S, "cam-9 online")
        hub.send_desired("cam-9", DesiredState(rev=1), None)
        wait_until(lambda: (devices(hub)["cam-9"].reported or {}).get("rev") == 1, TIMEOUT_S, "cam-9 to take rev 1")
    finally:
        agent.terminate()
        agent.wait(30)


def test_enrollment_by_api_is_for_admin_tokens(make_hub, tmp_path: Path) -> None:
    """POST /api/enrollments: an admin token gets a login the broker accepts at once; an operator token gets 403,
    a bad device id 422, and a hub with an open broker has nothing to enroll on (409)."""
    hub = make_hub()
    admin, operator = (create_token(hub.sessions, name, "test", scope) for name, scope in
                       (("root", "admin"), ("ops", "operate")))  # fmt: skip

    def post(token: str, device_id: str, target=hub) -> httpx.Response:
        return httpx.post(f"{target.http_url}/api/enrollments", json={"device_id": device_id},
                          headers={"Authorization": f"Bearer {token}"})  # fmt: skip

    made = post(admin, "cam-3")
    assert made.status_code == 201, made.text
    login = Probe(Enrollment.model_validate(made.json()).broker_url())
    assert login.accepted
    login.close()
    assert post(operator, "cam-4").status_code == 403
    assert post(admin, "bad id!").status_code == 422
    open_hub = make_hub(insecure_broker=True)
    refused = post(create_token(open_hub.sessions, "root", "test", "admin"), "cam-5", open_hub)
    assert refused.status_code == 409 and "embedded broker" in refused.json()["detail"]


def test_hub_enroll_and_agent_enrollment_errors_are_one_line(tmp_path: Path) -> None:
    never_started = run("hub", "enroll", "cam-1", "--data", str(tmp_path / "none"))
    assert never_started.code == 2 and "no embedded broker has started there" in never_started.error()
    url = ["--broker-url", "mqtt://hub.local:1883"]
    assert "device ids bad id!" in run("hub", "enroll", "bad id!", "--data", str(tmp_path), *url).error()
    made = run("hub", "enroll", "cam-1", "--data", str(tmp_path), *url, "--out", str(tmp_path / "cam-1.json"))
    assert made.code == 0 and "takes effect when it starts" in made.stderr
    (tmp_path / "broken.json").write_text('{"device_id": "cam-1"}')
    for args, fragment in (
        (["--enrollment", str(tmp_path / "missing.json")], "missing.json: cannot read it"),
        (["--enrollment", str(tmp_path / "broken.json")], "broken.json: broker: Field required"),
        (["--enrollment", str(tmp_path / "cam-1.json"), "--device-id", "cam-2"], "is for 'cam-1'"),
        (["--enrollment", str(tmp_path / "cam-1.json"), "--broker", "mqtt://x"], "leave out --broker"),
    ):
        result = run("agent", *args, "--data", str(tmp_path / "agent"))
        assert result.code == 2 and fragment in result.error(), result.stderr


# ---- an open broker only when asked ----------------------------------------------------------------------------


def test_insecure_broker_is_asked_for_said_loudly_and_shown_in_red(make_hub, tmp_path: Path) -> None:
    """`--insecure-broker`: anonymous clients get in, stderr says INSECURE, every dashboard page has the red banner;
    by default none of that."""
    process = _start_hub(tmp_path / "open", free_port(), "--insecure-broker")
    try:
        _read_until(process, "dashboard:")
    finally:
        code, _, stderr = _stop(process)
    assert code == 0 and "INSECURE: --insecure-broker" in stderr, stderr
    for hub, banner in ((make_hub(insecure_broker=True), True), (make_hub(), False)):
        token = create_token(hub.sessions, "viewer", "test")
        page = httpx.get(f"{hub.http_url}/", headers={"Authorization": f"Bearer {token}"})
        assert page.status_code == 200 and ('class="insecure-broker"' in page.text) == banner
        anonymous = Probe(f"mqtt://127.0.0.1:{hub.embedded.port}")
        assert anonymous.accepted == banner
        anonymous.close()
    refused = run("hub", "--data", str(tmp_path), "--broker", "mqtt://h:1883", "--insecure-broker")
    assert refused.code == 2 and "external --broker is secured where it runs" in refused.error()


def test_a_simulated_fleet_joins_with_its_enrollment_folder(make_hub, tmp_path: Path) -> None:
    """`edgekit hub enroll` for three devices into a folder, `edgekit fleet simulate --enrollments DIR`: each
    simulated device logs in as itself (the broker binds client ids to logins, so shared logins would not do)."""
    hub = make_hub()
    ids = fleet_ids("sim", 3)
    assert run("hub", "enroll", *ids, "--data", str(hub.settings.data_dir), "--out-dir", str(tmp_path)).code == 0
    assert "--out-dir" in run("hub", "enroll", *ids, "--data", str(hub.settings.data_dir), "--out", "x").error()
    command = [sys.executable, "-m", "edgekit", "fleet", "simulate", "--enrollments", str(tmp_path), "--n", "3",
               "--data", str(tmp_path / "fleet"), "--telemetry-s", "0.5"]  # fmt: skip
    fleet_process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: all(d in devices(hub) and devices(hub)[d].online for d in ids), TIMEOUT_S, "3 online")
    finally:
        fleet_process.terminate()
        fleet_process.wait(60)


def test_hub_users_for_more_hub_processes_read_every_device(make_hub) -> None:
    """`edgekit hub enroll NAME --hub-user` prints a broker URL with a new hub login: it reads any device's topics
    (a device's login reads only its own), and a second hub process connects with it."""
    hub = make_hub()
    made = run("hub", "enroll", "second", "--hub-user", "--data", str(hub.settings.data_dir))
    assert made.code == 0, made.stderr
    url = made.stdout.strip()
    assert url.startswith("mqtt://edgekit-hub-second:") and url.endswith(f"@127.0.0.1:{hub.embedded.port}")
    reader, device = Probe(url), Probe(device_url(hub, "cam-1"))
    try:
        reader.subscribe("edgekit/#")
        device.publish("edgekit/v1/cam-1/status", b"hello")
        reader.wait_for("edgekit/v1/cam-1/status", b"hello")
    finally:
        reader.close()
        device.close()
    second = make_hub(broker=url, share_group="hubs-5f0c2a9e7d41b3c8")
    assert second.link.connected
