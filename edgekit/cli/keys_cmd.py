"""`edgekit keys generate DIR`."""

from pathlib import Path
from typing import Annotated

import typer

from edgekit.cli.console import console

app = typer.Typer(help="Manage Ed25519 signing keys for bundles.", no_args_is_help=True)


@app.command("generate")
def generate(
    directory: Annotated[Path, typer.Argument(help="Folder to write edgekit.key (private) and edgekit.pub into.")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing key pair.")] = False,
) -> None:
    """Create a signing key pair. Keep edgekit.key secret; give edgekit.pub to devices and `verify --trust-key`."""
    from edgekit.signing import generate_keypair, key_id, load_public_key

    private_path, public_path = generate_keypair(directory, overwrite=force)
    console.print(f"private key: {private_path} (mode 0600)")
    console.print(f"public key:  {public_path} (key id {key_id(load_public_key(public_path))})")
