"""`edgekit agent install`: a systemd unit that runs the agent with the user's settings, restarted on failure.

The broker URL may hold the device's password, so it never goes into the unit (readable by every user, and shown
by `systemctl show`): it goes into an EnvironmentFile (0600, read by systemd as root before it starts the agent)
as `EDGEKIT_BROKER`, which the agent's `--broker` reads."""

import json
import shlex
import sys
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from edgekit.enrollment import write_private
from edgekit.errors import BadInput

UNIT_NAME = "edgekit-agent.service"
ENV_NAME = "edgekit-agent.env"
UNIT_KEY_PREFIX = "edgekit-agent."  # the enrollment's public keys go next to ENV_NAME as edgekit-agent.{trust,hub}.pub
BROKER_ENV = "EDGEKIT_BROKER"  # the agent's --broker reads it
DEFAULT_DATA_DIR = Path("/var/lib/edgekit")


@dataclass(frozen=True)
class InstallSettings:
    device_id: str
    broker: str
    trust_key: Path
    data_dir: Path = DEFAULT_DATA_DIR
    source: str | None = None
    bundle: Path | None = None
    profile: str | None = None
    user: str = "edgekit"
    # Optional (flag, value) pairs passed through as they are; paths among them are made absolute.
    extra_args: tuple[tuple[str, object], ...] = ()
    hub_key: Path | None = None  # the hub's public key; required by render_unit
    trust_version: int = 0  # the trust root version the keys are from (from the enrollment)


def agent_command(settings: InstallSettings) -> list[str]:
    """The command line systemd runs: this interpreter's edgekit, so the unit uses the venv it was installed from."""
    command = [sys.executable, "-m", "edgekit", "agent", "--device-id", settings.device_id,
               "--data", str(settings.data_dir), "--trust-key", str(settings.trust_key.resolve())]  # fmt: skip
    options = [("--hub-key", settings.hub_key), ("--trust-version", settings.trust_version or None),
               ("--source", settings.source), ("--bundle", settings.bundle),
               ("--profile", settings.profile)]  # fmt: skip
    for flag, value in options + list(settings.extra_args):
        if value is not None:
            # The unit starts in the data folder, so a relative path would point somewhere else.
            command += [flag, str(value.resolve() if isinstance(value, Path) else value)]
    return command


def render_unit(settings: InstallSettings, env_file: Path) -> str:
    if not settings.data_dir.is_absolute():
        raise BadInput(f"--data {settings.data_dir}: a service needs an absolute path")
    if not settings.trust_key.is_file():
        raise BadInput(f"--trust-key {settings.trust_key}: no such file (the Ed25519 public key, edgekit.pub)")
    if settings.hub_key is None or not settings.hub_key.is_file():
        raise BadInput(f"--hub-key {settings.hub_key}: no such file (the hub's public key: trust/hub.pub in the "
                       "hub's --data)")  # fmt: skip
    template = files("edgekit.agents").joinpath("systemd", UNIT_NAME).read_text()
    state_directory = (
        settings.data_dir.relative_to("/var/lib").as_posix() if settings.data_dir.is_relative_to("/var/lib") else ""
    )
    unit = template.format(
        device_id=settings.device_id,
        user=settings.user,
        exec_start=shlex.join(agent_command(settings)),
        state_directory=state_directory,
        data_dir=settings.data_dir,
        env_file=env_file.resolve(),
    )
    # StateDirectory= only works under /var/lib; elsewhere the folder must exist and belong to the user.
    return unit if state_directory else unit.replace("StateDirectory=\n", "")


def env_text(settings: InstallSettings) -> str:
    # JSON string quoting is what systemd's EnvironmentFile parser takes for a double-quoted value.
    return f"{BROKER_ENV}={json.dumps(settings.broker)}\n"


def write_unit(settings: InstallSettings, unit_dir: Path, env_file: Path | None = None) -> tuple[Path, Path]:
    """(unit, environment file): the unit in `unit_dir`, the broker URL in `env_file` (default: next to it)."""
    env_file = env_file or unit_dir / ENV_NAME
    unit = render_unit(settings, env_file)
    write_private(env_file, env_text(settings))
    unit_dir.mkdir(parents=True, exist_ok=True)
    path = unit_dir / UNIT_NAME
    path.write_text(unit)
    return path, env_file
