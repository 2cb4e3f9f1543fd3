"""`edgekit demo`: compile → hub → agent → rollout → live results, on this machine."""

from pathlib import Path
from typing import Annotated

import typer


def demo(
    out: Annotated[Path, typer.Option("--out", help="Where the demo writes its model, bundle, keys and state.")] = Path(
        "demo-out"
    ),
    http_port: Annotated[int, typer.Option("--http-port", help="Dashboard port.", min=1, max=65535)] = 8080,
    duration: Annotated[float, typer.Option("--duration", help="Stop after this many seconds; 0: Ctrl-C.")] = 0,
    profile: Annotated[str | None, typer.Option("--profile", help="Device profile; default: this host's.")] = None,
) -> None:
    """The whole loop on this machine: train, compile (int8, signed), hub, agent on a video, rollout, live results."""
    from edgekit.demo import Demo, DemoSettings

    Demo(DemoSettings(out, http_port, duration, profile)).run()


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
