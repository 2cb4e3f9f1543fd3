"""`edgekit dataset list|export|purge`: the hub's datasets of inputs captured on devices (`/api/datasets`,
docs/datasets.md). Like the other API commands it imports only httpx and rich."""

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from edgekit.cli.console import console, print_json
from edgekit.cli.hub_cmd import HubOpt, JsonOpt, TokenOpt, _client
from edgekit.errors import BadInput

app = typer.Typer(help="Datasets of inputs captured on devices, in the hub (docs/datasets.md).", no_args_is_help=True)
NameArg = Annotated[str, typer.Argument(help="The dataset: the name of the bundle its samples were captured with.")]


@app.command("list")
def list_datasets(hub_url: HubOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Every dataset: its samples, how many are labelled, its bytes and what retention dropped."""
    client = _client(hub_url, token)
    with client:
        rows = client.datasets()
    if as_json:
        print_json(json.dumps(rows, indent=2))
        return
    table = Table("dataset", "samples", "labelled", "MiB", "dropped (retention)", "limit")
    for row in rows:
        table.add_row(escape(row["name"]), str(row["samples"]), str(row["labelled"]),
                      f"{row['stored_bytes'] / 1024**2:.1f}", str(row["dropped"]),
                      f"{row['max_samples']} samples, {row['max_bytes'] / 1024**3:.1f} GiB")  # fmt: skip
    console.print(table if rows else "no datasets yet (devices capture when their configuration has a capture policy)")


@app.command("export")
def export(
    name: NameArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="The .npz to write.")],
    hub_url: HubOpt = None,
    token: TokenOpt = None,
) -> None:
    """Write the dataset as an .npz that `edgekit compile --calibration` takes: arrays named after the model's inputs,
    `labels` when every sample has one."""
    if out.suffix != ".npz":
        raise BadInput(f"--out {out}: expected a file name ending in .npz")
    client = _client(hub_url, token)
    with client:
        data, count = client.export(name)
    out.write_bytes(data)
    console.print(f"{count} samples of {escape(name)} → {escape(str(out))} (edgekit compile MODEL --calibration "
                  f"{escape(str(out))})", highlight=False)  # fmt: skip


@app.command("purge")
def purge(
    name: NameArg,
    yes: Annotated[bool, typer.Option("--yes", help="Confirm: the samples and their bytes are deleted.")] = False,
    hub_url: HubOpt = None,
    token: TokenOpt = None,
) -> None:
    """Delete a dataset and every sample's bytes from the hub (audited; operate scope)."""
    if not yes:
        raise BadInput(f"purging '{name}' deletes its samples for good: pass --yes to confirm")
    client = _client(hub_url, token)
    with client:
        purged = client.purge(name)
    console.print(f"purged {escape(purged['dataset'])}: {purged['samples']} samples deleted", highlight=False)
