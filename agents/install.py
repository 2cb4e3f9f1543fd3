"""`edgekit agent install`: a systemd unit that runs the agent with the user's settings, restarted on failure."""

import shlex
import sys
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from edgekit.errors import BadInput

UNIT_NAME = "edgekit-agent.service"
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


def agent_command(settings: InstallSettings) -> list[str]:
    """The command line systemd runs: this interpreter's edgekit, so the unit uses the venv it was installed from."""
    command = [sys.executable, "-m", "edgekit", "agent", "--broker", settings.broker, "--device-id", settings.device_id,
               "--data", str(settings.data_dir), "--trust-key", str(settings.trust_key.resolve())]  # fmt: skip
    options = [("--source", settings.source), ("--bundle", settings.bundle), ("--profile", settings.profile)]
    for flag, value in options + list(settings.extra_args):
        if value is not None:
            # The unit starts in the data folder, so a relative path would point somewhere else.
            command += [flag, str(value.resolve() if isinstance(value, Path) else value)]
    return command


def render_unit(settings: InstallSettings) -> str:
    if not settings.data_dir.is_absolute():
        raise BadInput(f"--data {settings.data_dir}: a service needs an absolute path")
    if not settings.trust_key.is_file():
        raise BadInput(f"--trust-key {settings.trust_key}: no such file (the Ed25519 public key, edgekit.pub)")
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
    )
    # StateDirectory= only works under /var/lib; elsewhere the folder must exist and belong to the user.
    return unit if state_directory else unit.replace("StateDirectory=\n", "")


def write_unit(settings: InstallSettings, unit_dir: Path) -> Path:
    unit_dir.mkdir(parents=True, exist_ok=True)
    path = unit_dir / UNIT_NAME
    path.write_text(render_unit(settings))
    return path
