"""`edgekit inspect`, `edgekit verify` and `edgekit bench`: what is in a bundle, can it be trusted, how fast is it."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgekit.cli.bench_cmd import ON_HELP
from edgekit.cli.console import console, print_json
from edgekit.cli.hub_cmd import HubOpt, TokenOpt

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]
LABELS_SHOWN = 8


def inspect_command(bundle: Annotated[Path, typer.Argument(help="The .ekb bundle.")], json: JsonFlag = False) -> None:
    """Show a bundle's manifest: target, tensors, verification metrics, files. Checks file hashes, not the signature."""
    import tempfile

    from edgekit.bundle import open_bundle
    from edgekit.cli.render import manifest_table

    with tempfile.TemporaryDirectory(prefix="edgekit-inspect-") as scratch:
        manifest = open_bundle(bundle, Path(scratch), trust_key=None)
    if json:
        print_json(manifest.model_dump_json(indent=2))
    else:
        console.print(manifest_table(manifest))
        if manifest.labels:
            console.print(labels_line(manifest.labels), markup=False, highlight=False)


def labels_line(labels: list[str]) -> str:
    """The first few class names and how many there are: a 1000-class list would bury the rest of the manifest."""
    shown = ", ".join(f"{index} {name}" for index, name in enumerate(labels[:LABELS_SHOWN]))
    more = f", … ({len(labels) - LABELS_SHOWN} more; --json lists all)" if len(labels) > LABELS_SHOWN else ""
    return f"labels: {len(labels)} classes: {shown}{more}"


def verify_command(
    bundle: Annotated[Path, typer.Argument(help="The .ekb bundle.")],
    trust_key: Annotated[Path, typer.Option(help="Public key (edgekit.pub) the bundle must be signed with.")],
    json: JsonFlag = False,
) -> None:
    """Check the signature against a trusted key and every file against the manifest. Exit 0 only if all hold."""
    import json as jsonlib

    from edgekit.bundle import verify_bundle
    from edgekit.signing import load_public_key

    manifest = verify_bundle(bundle, load_public_key(trust_key))
    if json:
        print_json(
            jsonlib.dumps(
                {
                    "bundle": str(bundle),
                    "ok": True,
                    "name": manifest.name,
                    "version": manifest.version,
                    "files": len(manifest.files),
                    "signing_key_id": manifest.signing_key_id,
                }
            )
        )
    else:
        console.print(
            f"[bold green]OK[/] {bundle}: {manifest.name} {manifest.version} signed by key "
            f"{manifest.signing_key_id}; {len(manifest.files)} files match the manifest"
        )


def bench_command(
    subject: Annotated[Path, typer.Argument(help="A bundle (.ekb) or an ONNX model (.onnx).")],
    seconds: Annotated[float, typer.Option(help="How long to measure.")] = 5.0,
    threads: Annotated[Optional[int], typer.Option(help="Runtime threads (default: runtime's choice).")] = None,
    input_shape: Annotated[
        Optional[list[str]], typer.Option("--input-shape", help="For models with dynamic inputs: NAME:1x3x224x224.")
    ] = None,
    on: Annotated[Optional[str], typer.Option("--on", help=ON_HELP)] = None,
    hub_url: HubOpt = None,
    token: TokenOpt = None,
    json: JsonFlag = False,
) -> None:
    """Latency p50/p95 and throughput on this host. A bundle runs through its own runtime after its self-test.

    With --on, a bundle is timed on a fleet device instead, through the hub and without activating it: the device
    verifies it like an update, runs it at a lower priority than its live model, and reports p50/p95, throughput,
    RSS, temperature and the live model's latency before, during and after (docs/measure.md). Exit 1 when the
    device could not (offline, refused, no answer)."""
    from rich.table import Table

    if on:
        from edgekit.cli.bench_cmd import bench_on_device

        bench_on_device(subject, on, seconds, hub_url, token, json)
        return

    from edgekit.compile.benchmark import bench
    from edgekit.compile.intake import parse_shape_overrides

    result = bench(subject, seconds, threads, parse_shape_overrides(input_shape or []))
    if json:
        print_json(result.model_dump_json(indent=2))
        return
    table = Table("subject", "runtime", "batch", "p50 ms", "p95 ms", "throughput/s", "runs", title="edgekit bench")
    table.add_row(
        result.subject,
        result.device,
        str(result.batch_size),
        f"{result.latency_p50_ms:.3f}",
        f"{result.latency_p95_ms:.3f}",
        f"{result.throughput_per_s:.1f}",
        str(result.iterations),
    )
    console.print(table)
    if result.selftest:
        console.print(f"self-test: {result.selftest}")


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_command)
    app.command("verify")(verify_command)
    app.command("bench")(bench_command)
