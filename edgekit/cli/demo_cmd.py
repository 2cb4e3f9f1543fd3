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
    """Train the digits example, compile it to a signed int8 bundle, start the hub and a real agent on a video,
    deploy through a rollout and print live results until Ctrl-C. The dashboard URL and a login token are printed."""
    from edgekit.demo import Demo, DemoSettings

    Demo(DemoSettings(out, http_port, duration, profile)).run()


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
