"""`edgekit` command line. Subcommands live in sibling modules; heavy libraries load only inside commands,
so `edgekit --help` starts fast and never imports the compiler stack."""

import logging
from typing import Annotated, Any

import typer
from rich.markup import escape
from typer.core import TyperGroup

from edgekit import __version__
from edgekit.cli.console import err_console
from edgekit.errors import EdgekitError


class _Group(TyperGroup):
    """Turns user errors into one red line and their exit code (2 bad input, 1 failed) instead of a traceback."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except EdgekitError as error:
            err_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None


app = typer.Typer(
    cls=_Group,
    help="Compile ONNX models into verified, signed bundles for edge devices, and run them there.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"edgekit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show debug logs, including library output.")
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_time=False, show_path=False)],
    )
    if not verbose:
        logging.getLogger("nncf").setLevel(logging.ERROR)


def _register() -> None:
    from edgekit.cli import (
        agent_cmd,
        bundle_cmds,
        compile_cmd,
        config_cmd,
        dataset_cmd,
        demo_cmd,
        hub_cmd,
        keys_cmd,
        profiles_cmd,
    )

    compile_cmd.register(app)
    bundle_cmds.register(app)
    app.add_typer(profiles_cmd.app, name="profiles")
    app.add_typer(keys_cmd.app, name="keys")
    agent_cmd.register(app)
    hub_cmd.register(app)
    app.add_typer(config_cmd.app, name="config")
    app.add_typer(dataset_cmd.app, name="dataset")
    demo_cmd.register(app)


_register()


def main() -> None:
    app(prog_name="edgekit")
