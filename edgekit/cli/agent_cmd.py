"""`edgekit agent` (run the device agent), `edgekit agent install` (systemd unit) and `edgekit fleet simulate`.

Only the runtime side is imported here: the agent must start on a device that has no compiler stack.
"""

import logging
import os
import signal
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated

import typer

from edgekit.cli.console import console, err_console
from edgekit.errors import BadInput

BrokerOpt = Annotated[
    str,
    typer.Option(
        "--broker",
        "-b",
        envvar="EDGEKIT_BROKER",
        show_envvar=False,  # its value may hold a password: never print it in --help
        help="mqtt://HOST:PORT or mqtts://USER:PASS@HOST:PORT (user and port optional); a clustered broker's nodes "
        "as a comma-separated list, tried in turn; or $EDGEKIT_BROKER",
    ),
]
EnrollmentOpt = Annotated[
    Path | None,
    typer.Option(
        "--enrollment", "-e", help="The file `edgekit hub enroll` wrote: broker, login, device id, trust key."
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device-id", "-d", help="This device's id: letters, digits, . _ -")]
SourceOpt = Annotated[
    str | None,
    typer.Option(
        "--source",
        "-s",
        help="Input until config/desired names one: camera:0, video:FILE|URL, folder:DIR, "
        "serial:/dev/ttyUSB0?baud=115200, mqtt:, synthetic:?fps=5",
    ),
]
TrustOpt = Annotated[
    Path | None, typer.Option("--trust-key", "-k", help="Ed25519 public key (edgekit.pub) bundles must be signed with.")
]
HUB_KEY_HELP = (
    "The hub's public key (trust/hub.pub in its --data): desired states must be signed by it, or by a key it "
    "rotated to. An enrollment holds it."
)
HubKeyOpt = Annotated[Path | None, typer.Option("--hub-key", help=HUB_KEY_HELP)]
TrustVersionOpt = Annotated[
    int,
    typer.Option("--trust-version", min=0, help="The hub's trust root version the keys are from (an enrollment says)."),
]
BundleOpt = Annotated[Path | None, typer.Option("--bundle", help="A .ekb to verify, install and run at start-up.")]
ProfileOpt = Annotated[str | None, typer.Option("--profile", help="Profile name reported to the hub.")]

app = typer.Typer(
    help="Run the device agent: the active bundle on an input, telemetry and results over MQTT, safe updates.",
    invoke_without_command=True,
)
fleet_app = typer.Typer(help="Simulated fleets for tests, benchmarks and demos.", no_args_is_help=True)


def _agent_logging() -> None:
    """The agent's own INFO lines go to stderr (journald on a device); libraries stay at WARNING."""
    logging.getLogger("edgekit.agents").setLevel(logging.INFO)


def _run_until_signal(start, stop) -> None:
    """Start, then stop cleanly on SIGTERM (systemd) or Ctrl-C."""
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    start()
    try:
        done.wait()
    finally:
        stop()


@app.callback()
def agent(
    ctx: typer.Context,
    broker: BrokerOpt = "",
    device_id: DeviceOpt = "",
    source: SourceOpt = None,
    data: Annotated[Path, typer.Option("--data", help="State folder: bundles, outbox, desired state.")] = Path(
        "edgekit-agent"
    ),
    trust_key: TrustOpt = None,
    hub_key: HubKeyOpt = None,
    trust_version: TrustVersionOpt = 0,
    bundle: BundleOpt = None,
    profile: ProfileOpt = None,
    telemetry: Annotated[float, typer.Option("--telemetry-s", help="Seconds between telemetry messages.")] = 5.0,
    tls_ca: Annotated[Path | None, typer.Option("--tls-ca", help="CA certificate for mqtts://.")] = None,
    tls_cert: Annotated[Path | None, typer.Option("--tls-cert", help="Client certificate (mutual TLS).")] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="Client certificate's private key.")] = None,
    enrollment: EnrollmentOpt = None,
) -> None:
    """Run the agent until SIGTERM or Ctrl-C. It keeps running through broker outages (messages wait on disk)."""
    if ctx.invoked_subcommand is not None:
        return
    keys = Keys(trust_key, hub_key, trust_version)
    if enrollment is not None:
        broker, device_id, keys = _enrolled(enrollment, broker, device_id, keys, data)
    if not broker or not device_id:
        raise BadInput("edgekit agent needs --enrollment FILE, or --broker and --device-id (see edgekit agent --help)")
    from edgekit.agents.agent import Agent, AgentSettings
    from edgekit.agents.sources import parse_source
    from edgekit.mqtt import TlsFiles, parse_broker_url, redact_url
    from edgekit.schema import validate_file

    parse_broker_url(broker)
    if source:
        parse_source(source)
    tls = TlsFiles(*(str(p) if p else None for p in (tls_ca, tls_cert, tls_key))) if tls_ca or tls_cert else None
    fields = dict(device_id=device_id, broker=broker, data_dir=data, trust_key=keys.trust_key, hub_key=keys.hub_key,
                  trust_version=keys.version, source=source, bundle=bundle, profile=profile, telemetry_s=telemetry,
                  tls=tls)  # fmt: skip
    settings = validate_file(AgentSettings, fields, "agent settings")
    _agent_logging()
    # Everything the agent writes from here on (outbox, desired state, bundles) is the device's alone.
    os.umask(0o077)
    agent = Agent(settings)
    err_console.print(f"agent {device_id}: broker {redact_url(broker)}, data {data}", highlight=False)
    err_console.print(f"trust: {agent.trust.describe()}", highlight=False)
    _run_until_signal(agent.start, agent.stop)


@dataclass(frozen=True)
class Keys:
    """The public keys a device starts trusting: bundles' (--trust-key) and the hub's (--hub-key), from root
    `version` of the hub's trust (an enrollment says which)."""

    trust_key: Path | None = None
    hub_key: Path | None = None
    version: int = 0


def _enrolled(
    path: Path, broker: str, device_id: str, keys: Keys, folder: Path, prefix: str = ""
) -> tuple[str, str, Keys]:
    """(broker URL with the login, device id, keys) from an enrollment file; each key the file holds is written to
    `folder` (PREFIXtrust.pub, PREFIXhub.pub) unless a flag names one. Flags that would contradict the file are
    refused."""
    from edgekit.enrollment import load_enrollment, write_private

    enrolled = load_enrollment(path)
    if broker:
        raise BadInput(f"--enrollment {path} holds the broker and its login: leave out --broker")
    if device_id and device_id != enrolled.device_id:
        raise BadInput(f"--device-id {device_id}: --enrollment {path} is for '{enrolled.device_id}'")
    if keys.trust_key is None and enrolled.trust_key is not None:
        write_private(folder / f"{prefix}trust.pub", enrolled.trust_key)
        keys = replace(keys, trust_key=folder / f"{prefix}trust.pub")
    if keys.hub_key is None and enrolled.hub_key is not None:
        write_private(folder / f"{prefix}hub.pub", enrolled.hub_key)
        keys = replace(keys, hub_key=folder / f"{prefix}hub.pub", version=enrolled.trust_version)
    return enrolled.broker_url(), enrolled.device_id, keys


@app.command("install")
def install(
    broker: BrokerOpt = "",
    device_id: DeviceOpt = "",
    trust_key: Annotated[
        Path | None, typer.Option("--trust-key", "-k", help="Ed25519 public key (edgekit.pub).")
    ] = None,
    hub_key: HubKeyOpt = None,
    enrollment: EnrollmentOpt = None,
    source: SourceOpt = None,
    data: Annotated[Path, typer.Option("--data", help="State folder (absolute).")] = Path("/var/lib/edgekit"),
    bundle: BundleOpt = None,
    profile: ProfileOpt = None,
    telemetry: Annotated[
        float | None, typer.Option("--telemetry-s", help="Seconds between telemetry messages.")
    ] = None,
    tls_ca: Annotated[Path | None, typer.Option("--tls-ca", help="CA certificate for mqtts://.")] = None,
    tls_cert: Annotated[Path | None, typer.Option("--tls-cert", help="Client certificate (mutual TLS).")] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="Client certificate's private key.")] = None,
    user: Annotated[str, typer.Option("--user", help="Account the service runs as.")] = "edgekit",
    unit_dir: Annotated[Path, typer.Option("--unit-dir", help="Where to write the unit.")] = Path(
        "/etc/systemd/system"
    ),
    env_file: Annotated[
        Path | None,
        typer.Option("--env-file", help="Where the broker URL and login go (0600; default: next to the unit)."),
    ] = None,
) -> None:
    """Write a systemd unit that runs this agent at boot and restarts it on failure; the broker login goes into an
    EnvironmentFile only root can read, never into the unit."""
    from edgekit.agents.install import ENV_NAME, UNIT_KEY_PREFIX, InstallSettings, write_unit
    from edgekit.mqtt import parse_broker_url

    keys = Keys(trust_key, hub_key)
    if enrollment is not None:
        # The keys go next to the environment file (public: the service reads them as its own user).
        folder = (env_file or unit_dir / ENV_NAME).parent
        broker, device_id, keys = _enrolled(enrollment, broker, device_id, keys, folder, UNIT_KEY_PREFIX)
        for written in {keys.trust_key, keys.hub_key} - {trust_key, hub_key}:
            written.chmod(0o644)
    if not broker or not device_id or keys.trust_key is None or keys.hub_key is None:
        raise BadInput("edgekit agent install needs --enrollment FILE, or --broker, --device-id, --trust-key and "
                       "--hub-key")  # fmt: skip
    parse_broker_url(broker)
    extra = [("--telemetry-s", telemetry), ("--tls-ca", tls_ca), ("--tls-cert", tls_cert), ("--tls-key", tls_key)]
    settings = InstallSettings(device_id, broker, keys.trust_key, data, source, bundle, profile, user, tuple(extra),
                               keys.hub_key, keys.version)  # fmt: skip
    path, env_path = write_unit(settings, unit_dir, env_file)
    console.print(f"wrote {path} and {env_path} (mode 0600: the broker login)")
    console.print("enable it with:  systemctl daemon-reload && systemctl enable --now edgekit-agent")


@fleet_app.command("simulate")
def simulate(
    broker: BrokerOpt = "",
    enrollments: Annotated[
        Path | None,
        typer.Option("--enrollments", help="A folder of PREFIX-NNN.enrollment.json (edgekit hub enroll --out-dir)."),
    ] = None,
    n: Annotated[int, typer.Option("--n", "-n", min=1, max=10_000, help="Number of simulated devices.")] = 10,
    source: SourceOpt = "synthetic:?fps=1",
    trust_key: TrustOpt = None,
    hub_key: HubKeyOpt = None,
    bundle: BundleOpt = None,
    prefix: Annotated[str, typer.Option("--prefix", help="Device ids are PREFIX-000 …")] = "sim",
    data: Annotated[Path, typer.Option("--data", help="Parent of each device's state folder.")] = Path("edgekit-fleet"),
    telemetry: Annotated[float, typer.Option("--telemetry-s", help="Seconds between telemetry messages.")] = 5.0,
    duration: Annotated[float, typer.Option("--duration", help="Stop after this many seconds; 0: until Ctrl-C.")] = 0,
) -> None:
    """Run N real agents in this process against a broker (real MQTT connections, real bundles); each device logs in
    with its own enrollment from --enrollments, or all with the --broker URL."""
    from edgekit.agents.fleet import Fleet, FleetSettings, device_ids
    from edgekit.enrollment import load_enrollment
    from edgekit.mqtt import parse_broker_url, redact_url

    brokers = None
    keys = Keys(trust_key, hub_key)
    if enrollments is not None:
        enrolled = [load_enrollment(enrollments / f"{d}.enrollment.json") for d in device_ids(prefix, n)]
        brokers = {e.device_id: e.broker_url() for e in enrolled}
        broker = broker or enrolled[0].broker
        # One hub enrolled them all: its keys, from the first file, for every simulated device.
        _, _, keys = _enrolled(enrollments / f"{enrolled[0].device_id}.enrollment.json", "", "", keys, data)
    if not broker:
        raise BadInput("edgekit fleet simulate needs --enrollments DIR or --broker URL")
    parse_broker_url(broker)
    fleet = Fleet(FleetSettings(n, broker, data, keys.trust_key, bundle, source, prefix, telemetry, brokers=brokers,
                                hub_key=keys.hub_key, trust_version=keys.version))  # fmt: skip

    def start() -> None:
        fleet.start()
        connected = fleet.wait_connected(timeout=30)
        err_console.print(f"{connected}/{n} simulated devices connected to {redact_url(broker)}")
        if duration:
            threading.Timer(duration, lambda: signal.raise_signal(signal.SIGTERM)).start()

    _run_until_signal(start, fleet.stop)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="agent")
    root.add_typer(fleet_app, name="fleet")
