"""`edgekit config set|show` as a user runs them: against a running hub over real HTTP, with a real agent and real
signed bundles. Errors are one line with the right exit code (2: bad input, 1: the hub unreachable)."""

import json
from pathlib import Path

import httpx
from hub_helpers import devices, fleet, fleet_ids, wait_devices_reported, wait_until

from edgekit.hub.auth import create_token
from edgekit.hub.broker import free_port

TIMEOUT_S = 60.0


def test_config_set_and_show_against_a_hub_with_a_real_agent(make_hub, cnn_bundles, tmp_path: Path, cli) -> None:
    hub = make_hub(trust_key=cnn_bundles["public"])
    ops = ["--hub", hub.http_url, "--token", create_token(hub.sessions, "ops", "test", scope="operate")]
    (device,) = fleet_ids("cli", 1)
    with fleet(hub, 1, tmp_path, cnn_bundles["public"], cnn_bundles["v1"], prefix="cli"):
        wait_devices_reported(hub, [device])
        empty = cli("config", "set", "--to", "group:site=a", "--top-k", "2", "--telemetry-s", "3", *ops)
        assert empty.exit_code == 0, empty.stderr
        assert "group:site=a" in empty.stdout and "no device in it now" in empty.stdout

        # The device joins the group: it gets the group's configuration.
        with httpx.Client(base_url=hub.http_url, headers={"Authorization": f"Bearer {ops[-1]}"}) as http:
            assert http.put(f"/api/devices/{device}/labels", json={"labels": {"site": "a"}}).status_code == 200
        wait_until(lambda: (devices(hub)[device].reported or {})["thresholds"]["top_k"] == 2, TIMEOUT_S, "top_k 2")

        refused = cli("config", "set", "--to", device, "--source", "camera:7", "--score", "0.4", *ops)
        assert refused.exit_code == 0, refused.stderr
        rev = devices(hub)[device].desired_rev
        assert f"{device}" in refused.stdout and str(rev) in refused.stdout
        wait_until(lambda: (devices(hub)[device].reported or {}).get("rev") == rev, TIMEOUT_S, f"rev {rev}")
        shown = cli("config", "show", device, *ops)
        assert shown.exit_code == 0, shown.stderr
        assert f"refused rev {rev}" in shown.stdout and "camera 7" in shown.stdout, shown.stdout
        assert "site=a (v1)" in shown.stdout
        as_json = json.loads(cli("config", "show", device, "--json", *ops).stdout)
        assert as_json["state"]["state"] == "refused" and as_json["desired"]["source"] == "camera:7"
        assert as_json["reported"]["thresholds"]["score"] != 0.4  # all or nothing: the score was not taken either

    reader = ["--hub", hub.http_url, "--token", create_token(hub.sessions, "viewer", "test", scope="read")]
    for args, code, fragment in [
        (("config", "set", "--to", device, "--source", "no kind", *ops), 2, "source"),
        (("config", "set", "--to", device, "--score", "2", *ops), 2, "--score"),
        (("config", "set", "--to", device, *ops), 2, "nothing to change"),
        (("config", "set", "--to", device, "--capture", "{oops", *ops), 2, "--capture"),
        (("config", "set", "--to", "group:a b", "--task", "raw", *ops), 2, "expected KEY=VALUE or KEY"),
        (("config", "set", "--to", device, "--task", "segmenter", *ops), 2, "task"),
        (("config", "show", "nope", *ops), 2, "no device 'nope'"),
        (("config", "set", "--to", device, "--task", "raw", *reader), 2, "operate"),
        (("config", "show", device, "--hub", f"http://127.0.0.1:{free_port()}", "--token", "t"), 1, "cannot reach"),
    ]:
        result = cli(*args)
        assert result.exit_code == code, (args, result.exit_code, result.stdout, result.stderr)
        assert fragment in result.stderr + result.stdout, (args, result.stderr)
        assert "Traceback" not in result.stderr
