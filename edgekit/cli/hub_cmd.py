"""`edgekit hub` (run the hub), `edgekit hub token …`, and the commands that talk to a hub's REST API:
`edgekit push`, `edgekit deploy`, `edgekit devices`, `edgekit deployments`.

The API commands import only httpx and rich: they run on a workstation that has no hub stack.
"""

import json
import signal
import socket
import threading
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import typer
from rich.markup import escape
from rich.table import Table

from edgekit.cli.console import console, err_console, print_json
from edgekit.drift import LARGE
from edgekit.errors import BadInput, OperationFailed
from edgekit.hub.gates import DEFAULT_GATES, DEFAULT_MIN_SAMPLES, parse_gate
from edgekit.hub.scopes import DEFAULT_SCOPE, SCOPE_HELP, Scope
from edgekit.trust import DEFAULT_DESIRED_TTL_S

DEFAULT_DATA = Path("edgekit-hub")
MQTT_PORT = 1883  # devices find an embedded broker on the standard port when it is free

DataOpt = Annotated[
    Path, typer.Option("--data", help="The hub's folder: SQLite database, bundles, broker, trust keys.")
]
DbOpt = Annotated[
    str | None, typer.Option("--db", help="sqlite:///PATH or postgresql://USER@HOST/DB; default: SQLite in --data.")
]
HubOpt = Annotated[
    str | None,
    typer.Option("--hub", envvar="EDGEKIT_HUB", help="The hub's URL (default: http://127.0.0.1:8080)."),
]
TokenOpt = Annotated[
    str | None, typer.Option("--token", envvar="EDGEKIT_TOKEN", help="API token (edgekit hub token create NAME).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


class MqttVersionChoice(str, Enum):
    v5 = "5"
    v311 = "3.1.1"


app = typer.Typer(
    help="Run the hub: broker (embedded or external), fleet database, bundle registry, rollouts, API and dashboard.",
    invoke_without_command=True,
)
token_app = typer.Typer(help="API tokens for the REST API and the dashboard login.", no_args_is_help=True)
app.add_typer(token_app, name="token")


# ---------------------------------------------------------------- edgekit hub


def parse_http(value: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT or PORT (on 127.0.0.1)."""
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", value
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise BadInput(f"--http '{value}': expected HOST:PORT, e.g. 0.0.0.0:8080")
    return host, int(port)


def check_public_url(value: str) -> str:
    """An http(s) URL with a host, as devices will fetch `<url>/dl/…`."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise BadInput(f"--public-url '{value}': expected http(s)://HOST[:PORT][/PATH], as devices reach this hub")
    return value.rstrip("/")


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    try:
        _check_listen(host, port)
    except BadInput:
        return False
    return True


def _check_listen(host: str, port: int) -> None:
    """Fail before starting anything: uvicorn reports a taken port only from its own thread."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            raise BadInput(f"--http {host}:{port}: cannot listen there ({error.strerror})") from None


@app.callback()
def hub(
    ctx: typer.Context,
    broker: Annotated[
        str | None,
        typer.Option(
            "--broker",
            "-b",
            help="External broker: mqtt://HOST:PORT or mqtts://…, USER:PASS@HOST for a login; a clustered broker's "
            "nodes as a comma-separated list (the hub moves to the next when one fails).",
        ),
    ] = None,
    jetstream: Annotated[
        str | None,
        typer.Option(
            "--jetstream",
            help="NATS cluster: nats://USER:PASS@HOST:PORT,nats://HOST2:PORT,… Telemetry, results, events and chunk "
            "requests then come through JetStream, shared by every hub replica; needs --broker (the cluster's MQTT "
            "listeners). See docs/brokers.md.",
        ),
    ] = None,
    broker_port: Annotated[
        int | None,
        typer.Option("--broker-port", min=1, max=65535, help="Embedded broker's port (default: 1883, else any free)."),
    ] = None,
    broker_listen: Annotated[
        str,
        typer.Option("--broker-listen", help="Address the embedded broker listens on; 0.0.0.0 lets devices in."),
    ] = "127.0.0.1",
    db: DbOpt = None,
    http: Annotated[str, typer.Option("--http", help="Where the API and dashboard listen, HOST:PORT.")] = (
        "127.0.0.1:8080"
    ),
    data: DataOpt = DEFAULT_DATA,
    trust_key: Annotated[
        Path | None, typer.Option("--trust-key", "-k", help="Ed25519 public key pushed bundles must be signed with.")
    ] = None,
    share_group: Annotated[
        str | None, typer.Option("--share-group", help="MQTT shared-subscription group, to run several hubs.")
    ] = None,
    public_url: Annotated[
        list[str] | None,
        typer.Option(
            "--public-url",
            help="Where devices download bundles over HTTP(S): this hub's address as they reach it, or a load "
            "balancer's in front of every replica; repeat for several, tried in order. Default: the --http address. "
            "Devices that cannot reach any fall back to chunks over MQTT.",
        ),
    ] = None,
    bundle_store: Annotated[
        str | None,
        typer.Option(
            "--bundle-store",
            help="Keep bundle bytes in an S3 bucket (s3://BUCKET/PREFIX; needs boto3: pip install 'edgekit[s3]') "
            "instead of the hub database. Every replica reads them there.",
        ),
    ] = None,
    no_controller: Annotated[
        bool,
        typer.Option(
            "--no-controller", help="Never drive rollouts or run retention here (replicas take turns otherwise)."
        ),
    ] = False,
    insecure_broker: Annotated[
        bool,
        typer.Option(
            "--insecure-broker",
            help="Embedded broker open to anyone, on every device's topics (no passwords, no ACL): a lab only.",
        ),
    ] = False,
    desired_ttl: Annotated[
        float,
        typer.Option(
            "--desired-ttl",
            min=60,
            help="Seconds a signed desired state stays valid; the hub signs a "
            "device's again each time it connects. Device clocks must be right to within it.",
        ),
    ] = DEFAULT_DESIRED_TTL_S,
    mqtt_version: Annotated[
        MqttVersionChoice | None,
        typer.Option(
            "--mqtt-version",
            help="The hub's own MQTT connection: 5 (default), or 3.1.1 for a broker that speaks nothing newer "
            "(automatic on the embedded amqtt).",
        ),
    ] = None,
    session_expiry: Annotated[
        int | None,
        typer.Option(
            "--session-expiry",
            help="Seconds the broker keeps the hub's MQTT session, queueing device messages for it, while the hub "
            "is away (MQTT 5 session expiry; default 86400); 0 ends it when the hub disconnects.",
        ),
    ] = None,
    drift_threshold: Annotated[
        float,
        typer.Option(
            "--drift-threshold",
            help="Alert on a device whose input drift score (PSI of its last 200 inputs against the bundle's "
            "calibration data) is above this: 0.1 is a moderate shift, 0.25 a large one (docs/health.md).",
        ),
    ] = LARGE,
) -> None:
    """Run the hub until Ctrl-C or SIGTERM. With no --broker it starts an embedded one (Mosquitto, else amqtt)."""
    if ctx.invoked_subcommand is not None:
        return
    from edgekit.hub.auth import ensure_admin_token
    from edgekit.hub.service import Hub, HubSettings

    host, port = parse_http(http)
    if broker:
        from edgekit.mqtt import parse_broker_url

        parse_broker_url(broker)
        if insecure_broker:
            raise BadInput("--insecure-broker opens the embedded broker; an external --broker is secured where it runs")
    if trust_key is not None and not trust_key.is_file():
        raise BadInput(f"--trust-key {trust_key}: no such file")
    _check_listen(host, port)
    if broker_port is None and not broker:
        broker_port = MQTT_PORT if _port_free(MQTT_PORT) else None
    settings = HubSettings(data_dir=data, broker=broker, db=db, http_host=host, http_port=port, trust_key=trust_key,
                           share_group=share_group, controller=not no_controller, broker_port=broker_port,
                           broker_host=broker_listen, insecure_broker=insecure_broker,
                           desired_ttl_s=desired_ttl, mqtt_version=mqtt_version.value if mqtt_version else None,
                           jetstream=jetstream, public_urls=tuple(check_public_url(u) for u in public_url or ()),
                           bundle_store=bundle_store, drift_threshold=drift_threshold,
                           **({} if session_expiry is None else {"session_expiry_s": session_expiry}))  # fmt: skip
    _hub_logging()
    hub = Hub(settings)
    admin = ensure_admin_token(hub.sessions)
    _run_until_signal(hub, admin)


def _hub_logging() -> None:
    """The hub's own INFO lines (rollout progress, broker choice) go to stderr; libraries stay at WARNING."""
    import logging

    logging.getLogger("edgekit.hub").setLevel(logging.INFO)


def _run_until_signal(hub, admin_token: str | None) -> None:
    from edgekit.mqtt import redact_url

    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    try:
        hub.start()
        if not hub.wait_http(15):
            raise OperationFailed(f"the hub's HTTP server did not start on {hub.http_url}")
        _announce(hub, admin_token)
        if not hub.wait_connected(10):
            err_console.print(
                f"[yellow]warning:[/] not connected to the broker {redact_url(hub.broker_url)} yet; retrying"
            )
        done.wait()
        err_console.print("stopping the hub")
    finally:
        hub.stop()


def _announce(hub, admin_token: str | None) -> None:
    from edgekit.mqtt import redact_url

    settings = hub.settings
    if hub.embedded is not None:
        embedded = hub.embedded
        err_console.print(f"broker: embedded {embedded.kind} listening on {embedded.host}:{embedded.port}"
                          + ("" if embedded.host != "127.0.0.1" else " (this machine only; --broker-listen 0.0.0.0 "
                             "lets devices on the network in)"))  # fmt: skip
        if hub.users is None:
            err_console.print("[bold red]INSECURE:[/] --insecure-broker: anyone who reaches the broker can read every "
                              "device's messages and steer every device")  # fmt: skip
    else:
        err_console.print(f"broker: external {redact_url(hub.broker_url)}")
    if settings.jetstream:
        err_console.print(f"device messages: JetStream at {redact_url(settings.jetstream)}", highlight=False)
    err_console.print(f"database: {settings.db or settings.data_dir / 'hub.sqlite'}; data in {settings.data_dir}")
    root = hub.trust.root
    err_console.print(f"trust: {root.describe()}; devices take desired states signed by {hub.trust.public_key_file}",
                      highlight=False)  # fmt: skip
    if not root.bundle_keys:
        err_console.print(
            "[yellow]warning:[/] no bundle key (--trust-key): pushed bundles are checked for integrity, not "
            "signatures, and devices refuse every update"
        )
    if not settings.controller:
        err_console.print("rollout controller: off here (--no-controller)")
    console.print(f"dashboard: {hub.http_url}/   API docs: {hub.http_url}/docs", highlight=False)
    if admin_token:
        console.print(f"admin token (shown once; keep it): [bold]{admin_token}[/]", highlight=False)


# ---------------------------------------------------------------- edgekit hub token …

SCOPE_OPTION_HELP = (
    "; ".join(f"{s}: {what}" for s, what in SCOPE_HELP.items())
    + f". Default {DEFAULT_SCOPE}: what CI and operators need day to day, without the power to make or revoke tokens."
)


def _open_sessions(data: Path, db: str | None):
    from edgekit.hub.db import database_url, open_database

    # A mistyped --data must not quietly start a second, empty hub database.
    if not db and not (data / "hub.sqlite").is_file():
        raise BadInput(f"--data {data}: no hub database there (start `edgekit hub --data {data}` once, or pass --db)")
    return open_database(database_url(db, data))


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Argument(help="Who or what uses it; the audit log shows this name.")],
    scope: Annotated[Scope, typer.Option("--scope", help=SCOPE_OPTION_HELP)] = DEFAULT_SCOPE,
    data: DataOpt = DEFAULT_DATA,
    db: DbOpt = None,
) -> None:
    """Create a token and print it once (only its hash is stored)."""
    from edgekit.hub.auth import create_token, local_actor

    engine, sessions = _open_sessions(data, db)
    try:
        token = create_token(sessions, name, local_actor(), scope)
    finally:
        engine.dispose()
    err_console.print(f"token '{escape(name)}' ({scope}) created; it is shown once, keep it:")
    print(token)


@token_app.command("list")
def token_list(data: DataOpt = DEFAULT_DATA, db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Tokens by name (the tokens themselves are not stored)."""
    from dataclasses import asdict

    from edgekit.hub.auth import list_tokens

    engine, sessions = _open_sessions(data, db)
    try:
        tokens = list_tokens(sessions)
    finally:
        engine.dispose()
    if as_json:
        print_json(json.dumps([asdict(t) for t in tokens], indent=2))
        return
    table = Table("name", "scope", "created", "by", "state")
    for t in tokens:
        state = "[red]revoked[/]" if t.revoked else "[green]active[/]"
        table.add_row(t.name, t.scope, _when(t.created), t.created_by, state)
    console.print(table)


@token_app.command("revoke")
def token_revoke(name: Annotated[str, typer.Argument()], data: DataOpt = DEFAULT_DATA, db: DbOpt = None) -> None:
    """Revoke a token: its API calls and dashboard sessions stop working at once."""
    from edgekit.hub.auth import local_actor, revoke_token

    engine, sessions = _open_sessions(data, db)
    try:
        revoke_token(sessions, name, local_actor())
    finally:
        engine.dispose()
    console.print(f"token '{escape(name)}' revoked")


# ---------------------------------------------------------------- API commands


def _client(hub_url: str | None, token: str | None):
    from edgekit.hub.client import HubClient

    return HubClient(hub_url, token)


def _when(ts: float | None) -> str:
    return "-" if not ts else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    seconds = max(0.0, time.time() - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _num(value: Any, fmt: str = ".1f") -> str:
    return "-" if value is None else format(value, fmt)


def _size(n: int) -> str:
    return f"{n / 1024:.1f} KB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MB"


def devices(
    label: Annotated[list[str] | None, typer.Option("--label", "-l", help="KEY=VALUE; repeat to AND them.")] = None,
    online: Annotated[bool, typer.Option("--online", help="Only devices online now.")] = False,
    hub_url: HubOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The fleet: each device's state, bundle and latest telemetry."""
    with _client(hub_url, token) as client:
        rows = client.devices(label or [], True if online else None)
    if as_json:
        print_json(json.dumps(rows, indent=2))
        return
    table = Table("device", "state", "bundle", "p50 ms", "fps", "CPU %", "temp °C", "last seen", "labels")
    for d in rows:
        state = "[green]online[/]" if d["online"] else "[red]offline[/]"
        labels = ", ".join(f"{k}={v}" for k, v in sorted(d["labels"].items()))
        table.add_row(escape(d["id"]), state, escape(d["bundle_label"] or "-"), _num(d["latency_p50_ms"], ".2f"),
                      _num(d["fps"]), _num(d["cpu_percent"], ".0f"), _num(d["temperature_c"]), _ago(d["last_seen"]),
                      escape(labels))  # fmt: skip
    console.print(table)
    console.print(f"{len(rows)} devices, {sum(d['online'] for d in rows)} online", highlight=False)


def push(
    bundle: Annotated[Path, typer.Argument(help="The .ekb file.")],
    hub_url: HubOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload a bundle to the hub's registry; the hub verifies it before storing it."""
    if not bundle.is_file():
        raise BadInput(f"{bundle}: no such bundle file")
    with _client(hub_url, token) as client:
        record = client.push(bundle)
    if as_json:
        print_json(json.dumps(record, indent=2))
        return
    what = "pushed" if record["created"] else "already in the registry:"
    console.print(f"{what} {escape(record['name'])}@{escape(record['version'])} ({_size(record['size'])}, "
                  f"{record['profile']}/{record['backend']}/{record['precision']})", highlight=False)  # fmt: skip
    console.print(f"bundle id {record['id']}", highlight=False)
    console.print(f"deploy it:  edgekit deploy {record['id'][:12]} --to DEVICE|group:KEY=VALUE|all", highlight=False)


def _fraction(value: str) -> float:
    """0.2 or 20%: the fraction of a wave that may fail before the rollout halts."""
    try:
        number = float(value.removesuffix("%")) / (100 if value.endswith("%") else 1)
    except ValueError:
        raise BadInput(f"--max-failures '{value}': expected a fraction like 0.2 or a percentage like 20%") from None
    if not 0 <= number <= 1:
        raise BadInput(f"--max-failures '{value}': must be between 0 and 1 (or 0% and 100%)")
    return number


def deploy(
    bundle_id: Annotated[str, typer.Argument(help="The bundle's sha256 or its first 8+ characters.")],
    to: Annotated[str, typer.Option("--to", help="A device id, group:KEY[=VALUE] (by label), or all.")],
    canary: Annotated[float | None, typer.Option("--canary", help="Percent of devices in the canary wave.")] = None,
    wave: Annotated[float | None, typer.Option("--wave", help="Percent of devices per later wave.")] = None,
    max_failures: Annotated[
        str | None, typer.Option("--max-failures", help="Fraction (0.2) or percent (20%) of a wave that may fail.")
    ] = None,
    wave_timeout: Annotated[
        float | None, typer.Option("--wave-timeout", help="Seconds a wave may take to report healthy.")
    ] = None,
    health_checks: Annotated[
        int | None,
        typer.Option(
            "--health-checks",
            min=1,
            max=10_000,
            help="Inferences each device must run on the new bundle before it counts healthy (default: 20).",
        ),
    ] = None,
    shadow: Annotated[
        bool,
        typer.Option(
            "--shadow",
            help="The canary first runs the bundle as a shadow beside its current one, "
            "compared on live input; the waves start only when the gates pass.",
        ),
    ] = False,
    gate: Annotated[
        list[str] | None,
        typer.Option(
            "--gate",
            help="A health gate every wave must pass, e.g. agreement>=0.98, p95<=1.2x, "
            "errors<=0.01, shift<=0.3 (repeatable; with --shadow and none given: "
            f"{', '.join(DEFAULT_GATES)}).",
        ),
    ] = None,
    shadow_budget: Annotated[
        float | None,
        typer.Option(
            "--shadow-budget",
            min=0.01,
            max=4,
            help="The shadow's inference time as a fraction of the active model's (default 0.25).",
        ),
    ] = None,
    min_samples: Annotated[
        int | None,
        typer.Option(
            "--min-samples",
            min=1,
            help=f"Inputs a device must have measured before the gates count it (default {DEFAULT_MIN_SAMPLES}).",
        ),
    ] = None,
    hub_url: HubOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a staged rollout: canary first, then waves; halts and rolls back past the failure threshold or when a
    health gate fails (docs/health.md)."""
    threshold = _fraction(max_failures) if max_failures is not None else None
    for text in gate or []:
        parse_gate(text)  # a typo is refused here, before anything reaches the hub
    with _client(hub_url, token) as client:
        deployment = client.deploy(bundle_id, to, canary_percent=canary, wave_percent=wave,
                                   failure_threshold=threshold, wave_timeout_s=wave_timeout,
                                   health_checks=health_checks, shadow=shadow or None, gates=gate or None,
                                   min_samples=min_samples, shadow_budget=shadow_budget)  # fmt: skip
    if as_json:
        print_json(json.dumps(deployment, indent=2))
        return
    _print_deployment(deployment)
    console.print(f"follow it:  edgekit deployments {deployment['id']}", highlight=False)


STATE_STYLE = {"running": "cyan", "completed": "green", "halted": "red", "healthy": "green", "failed": "red",
               "timed_out": "red", "rolled_back": "yellow", "sent": "cyan", "pending": "dim"}  # fmt: skip


def _styled(state: str) -> str:
    return f"[{STATE_STYLE.get(state, 'white')}]{state}[/]"


def _print_deployment(d: dict[str, Any]) -> None:
    bundle = d.get("bundle") or {}
    label = f"{bundle['name']}@{bundle['version']}" if bundle else d["bundle_id"][:12]
    head = f"deployment {d['id']}: {escape(label)} → {escape(d['target'])}, {_styled(d['state'])}"
    console.print(f"{head}, wave {d['current_wave']} of {d['waves']}, {d['devices_total']} devices", highlight=False)
    for result in d.get("gate_results") or []:
        mark = "[green]passed[/]" if result["passed"] else "[red]FAILED[/]"
        value = "not measured" if result["value"] is None else f"{result['value']:g}"
        where = "shadow" if result["phase"] == "shadow" else f"wave {result['wave']}"
        console.print(f"gate {escape(result['gate'])} ({where}): {value} {mark}", highlight=False)
    if d.get("reason"):
        console.print(f"reason: {escape(d['reason'])}", highlight=False)
    table = Table("wave", "devices", "states")
    for w in d.get("wave_progress", []):
        states = ", ".join(f"{_styled(s)} {n}" for s, n in sorted(w["states"].items()))
        table.add_row("canary" if w["wave"] == 0 else str(w["wave"]), str(w["total"]), states)
    console.print(table)


def deployments(
    deployment_id: Annotated[int | None, typer.Argument(help="Show one deployment with its waves.")] = None,
    halt: Annotated[bool, typer.Option("--halt", help="Halt it (and roll back the devices it updated).")] = False,
    reason: Annotated[str | None, typer.Option("--reason", help="Why, for the audit log (with --halt).")] = None,
    hub_url: HubOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Rollouts: all of them, or one with its per-wave progress; --halt stops one."""
    if halt and deployment_id is None:
        raise BadInput("--halt needs a DEPLOYMENT_ID")
    with _client(hub_url, token) as client:
        if deployment_id is None:
            data: Any = client.deployments()
        else:
            data = client.halt(deployment_id, reason) if halt else client.deployment(deployment_id)
    if as_json:
        print_json(json.dumps(data, indent=2))
    elif deployment_id is not None:
        _print_deployment(data)
    else:
        table = Table("id", "bundle", "target", "state", "wave", "devices", "created", "by")
        for d in data:
            table.add_row(str(d["id"]), d["bundle_id"][:12], escape(d["target"]), _styled(d["state"]),
                          f"{d['current_wave']}/{d['waves']}", str(d["devices_total"]), _when(d["created"]),
                          escape(d["created_by"]))  # fmt: skip
        console.print(table)


def rotate_keys(
    hub_key: Annotated[bool, typer.Option("--hub-key", help="Replace the hub's signing key with a new one.")] = False,
    bundle_key: Annotated[
        list[Path] | None,
        typer.Option(
            "--bundle-key",
            help="Public key (edgekit.pub) bundles may be signed with from now on; "
            "repeat for several. Replaces the current ones: a key not named is retired.",
        ),
    ] = None,
    hub_url: HubOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Rotate the keys devices trust, on a running fleet: the next trust root is signed by the old hub key and the
    new one, and every device moves to it without re-enrolment; material signed by a retired key is refused."""
    if not hub_key and not bundle_key:
        raise BadInput("nothing to rotate: pass --hub-key, --bundle-key FILE, or both")
    pems = None
    if bundle_key:
        from edgekit.signing import load_public_key
        from edgekit.trust import public_pem

        pems = [public_pem(load_public_key(path)) for path in bundle_key]
    with _client(hub_url, token) as client:
        data = client.rotate_keys(hub_key, pems)
    if as_json:
        print_json(json.dumps(data, indent=2))
        return
    console.print(f"trust root v{data['version']}: hub keys {', '.join(data['hub_keys'])}; bundle keys "
                  f"{', '.join(data['bundle_keys']) or 'none'}", highlight=False)  # fmt: skip
    console.print("announced to every device; new enrollments carry it", highlight=False)


def register(root: typer.Typer) -> None:
    from edgekit.cli.acl_cmd import acl
    from edgekit.cli.enroll_cmd import enroll
    from edgekit.cli.migrate_cmd import migrate

    app.command("acl")(acl)
    app.command("migrate")(migrate)
    app.command("enroll")(enroll)
    app.command("rotate-keys")(rotate_keys)
    root.add_typer(app, name="hub")
    root.command("push")(push)
    root.command("deploy")(deploy)
    root.command("devices")(devices)
    root.command("deployments")(deployments)
