"""`edgekit profiles list|show NAME`."""

from typing import Annotated

import typer

from edgekit.cli.console import console, print_json

app = typer.Typer(help="Device profiles: what each target is and how edgekit builds for it.", no_args_is_help=True)


@app.command("list")
def list_profiles(json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the built-in device profiles."""
    from rich.table import Table

    from edgekit.profiles import builtin_profile_names, load_profile

    profiles = [load_profile(name) for name in builtin_profile_names()]
    if json:
        print_json("[" + ",".join(p.model_dump_json() for p in profiles) + "]")
        return
    table = Table("profile", "device", "cpu", "accelerator", "candidates (in order)")
    for p in profiles:
        accelerator = "-" if p.accelerator.kind == "none" else f"{p.accelerator.kind} {p.accelerator.arch or ''}"
        candidates = ", ".join(f"{c.backend}/{c.precision}" for c in p.candidates)
        table.add_row(p.name, p.description, f"{p.cpu.arch} {p.cpu.model}", accelerator, candidates)
    console.print(table)


@app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="Profile name (see `profiles list`) or path to a profile .yaml.")],
    json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show one profile, validated, with every default filled in."""
    import yaml

    from edgekit.profiles import load_profile

    profile = load_profile(name)
    if json:
        print_json(profile.model_dump_json(indent=2))
    else:
        console.print(yaml.safe_dump(profile.model_dump(mode="json"), sort_keys=False), highlight=False)
