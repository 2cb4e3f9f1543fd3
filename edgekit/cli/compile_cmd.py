"""`edgekit compile`: the workstation step from ONNX model to signed bundle."""

import contextlib
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from edgekit.cli.console import console, err_console, print_json

if TYPE_CHECKING:
    from edgekit.compile.pipeline import CompileRequest
    from edgekit.compile.report import CompileReport
    from edgekit.hub.client import FleetMeasurer
    from edgekit.manifest import Manifest


def _floats(flag: str, text: str | None) -> list[float] | None:
    from edgekit.errors import BadInput

    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise BadInput(f"{flag} '{text}': expected comma-separated numbers, e.g. 0.485,0.456,0.406") from None


def compile_command(
    model: Annotated[Path, typer.Argument(help="The ONNX model to compile.")],
    profile: Annotated[
        str, typer.Option("--profile", "-p", help="Device profile name or .yaml path (`edgekit profiles list`).")
    ],
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Bundle to write (default: MODEL-PROFILE.ekb).")
    ] = None,
    precision: Annotated[
        Optional[str],
        typer.Option(help="Only build this precision: fp32, fp16 or int8 (default: every one the profile lists)."),
    ] = None,
    backend: Annotated[
        str, typer.Option(help="'auto' tries the profile's candidates in order; or name one backend.")
    ] = "auto",
    calibration: Annotated[
        Optional[Path],
        typer.Option(
            help="Folder of images or .npz (arrays named after the inputs, optional 'labels'). "
            "Required for int8; 20% is held out for verification."
        ),
    ] = None,
    eval_data: Annotated[
        Optional[Path],
        typer.Option(
            "--eval-data",
            help="A separate evaluation set (same formats as --calibration, with 'labels' for accuracy): every "
            "candidate is judged on it, and all of --calibration calibrates.",
        ),
    ] = None,
    input_shape: Annotated[
        Optional[list[str]],
        typer.Option(
            "--input-shape",
            help="Fix an input's dynamic dims, any of them (NAME:1x3x224x224; a state [2, batch, 128] as "
            "state:2x1x128). One per input; the batch dim comes from the profile when not given.",
        ),
    ] = None,
    input_value: Annotated[
        Optional[list[str]],
        typer.Option(
            "--input-value",
            help="Freeze an input to a constant (NAME=VALUE, or NAME=V1,V2,... for a small tensor), e.g. a VAD's "
            "sample rate sr=16000: control flow that reads it folds away, so int8 and every backend can build the "
            "model. The bundle then has no such input.",
        ),
    ] = None,
    mean: Annotated[
        Optional[str], typer.Option(help="Image mean per channel after scaling, e.g. 0.485,0.456,0.406.")
    ] = None,
    std: Annotated[
        Optional[str], typer.Option(help="Image std per channel after scaling, e.g. 0.229,0.224,0.225.")
    ] = None,
    scale: Annotated[Optional[float], typer.Option(help="Divide pixels by this first (default: 255).")] = None,
    color: Annotated[Optional[str], typer.Option(help="Channel order the model expects: rgb, bgr or gray.")] = None,
    sign_key: Annotated[
        Optional[Path], typer.Option(help="Ed25519 private key (default: per-user key, created on first use).")
    ] = None,
    name: Annotated[Optional[str], typer.Option(help="Bundle name (default: model file name).")] = None,
    labels: Annotated[
        Optional[Path],
        typer.Option(
            help="Class names, stored in the bundle: results then carry each class's name. A .txt file with one "
            'name per line, or .json: a list of names or {"0": "cat", ...}. A classifier needs one name per class.'
        ),
    ] = None,
    bundle_version: Annotated[str, typer.Option(help="Bundle semver version.")] = "0.1.0",
    max_accuracy_drop: Annotated[
        float,
        typer.Option(
            help="Classifiers: reject a candidate whose top-1 accuracy (with labels) or top-1 agreement with fp32 "
            "(without) is more than this many points below fp32, by more than one sample's worth."
        ),
    ] = 1.0,
    min_cosine: Annotated[
        float, typer.Option(help="Other models: reject a candidate whose outputs' cosine to fp32 is below this.")
    ] = 0.999,
    bench_seconds: Annotated[float, typer.Option(help="Seconds of latency measurement per candidate.")] = 2.0,
    mixed_seconds: Annotated[
        float,
        typer.Option(
            help="Time all mixed-precision ranking and rebuilds of this compile may take; a round does not start "
            "once it is spent (0: no mixed precision).",
            min=0,
        ),
    ] = 600.0,
    option: Annotated[
        Optional[list[str]],
        typer.Option(
            "--option",
            help="BACKEND.NAME=VALUE: set one option of a backend over the profile's, repeatable; each backend's "
            "options are listed in docs/profiles.md (e.g. tvm.tune_trials=64, openvino.preset=mixed).",
        ),
    ] = None,
    tune_trials: Annotated[
        Optional[int], typer.Option(hidden=True, help="Deprecated: use --option tvm.tune_trials=N.")
    ] = None,
    threads: Annotated[
        Optional[int], typer.Option(help="Runtime threads on this host (default: runtime's choice).")
    ] = None,
    verify_emulated: Annotated[
        bool,
        typer.Option(
            "--verify-emulated",
            help="Also run aarch64 TVM builds under an emulated arm64 device (qemu-user; `make arm64-sysroot`).",
        ),
    ] = False,
    measure_on: Annotated[
        Optional[str],
        typer.Option(
            "--measure-on",
            help="DEVICE or group:LABEL[=VALUE]: time every passing candidate on that fleet device (through the hub, "
            "signed, not activated) and rank by its p50; falls back to the profile's order when it cannot "
            "(docs/measure.md). Needs --hub/--token or EDGEKIT_HUB/EDGEKIT_TOKEN.",
        ),
    ] = None,
    measure_seconds: Annotated[
        float, typer.Option(help="With --measure-on: seconds the device times each candidate.", min=0.1, max=600)
    ] = 5.0,
    hub_url: Annotated[
        Optional[str], typer.Option("--hub", envvar="EDGEKIT_HUB", help="With --measure-on: the hub's URL.")
    ] = None,
    token: Annotated[
        Optional[str], typer.Option("--token", envvar="EDGEKIT_TOKEN", help="With --measure-on: an API token.")
    ] = None,
    json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Build every candidate the profile lists, verify each against fp32, and bundle the best, signed.

    The model is checked and simplified; int8 candidates are calibrated on --calibration data, of which 20% (at
    least 50 samples) is held out, or judged on --eval-data: every candidate runs on it on this host and is
    compared with the ONNX Runtime fp32 reference, with 95% intervals. An int8 candidate that misses the accuracy
    budget is rebuilt with its most sensitive layers in float (mixed precision) before it is given up.
    """
    from edgekit.cli.render import compile_report
    from edgekit.compile.intake import parse_input_values, parse_shape_overrides
    from edgekit.compile.pipeline import CompileRequest
    from edgekit.compilers import parse_backend_options
    from edgekit.errors import BadInput
    from edgekit.profiles import Preprocessing, load_profile
    from edgekit.schema import PRECISIONS, validate_file

    if precision is not None and precision not in PRECISIONS:
        raise BadInput(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    target = load_profile(profile)
    overrides = {"mean": _floats("--mean", mean), "std": _floats("--std", std), "scale": scale, "color": color}
    base = (target.preprocessing or Preprocessing()).model_dump()
    base.update({k: v for k, v in overrides.items() if v is not None})
    preprocessing = validate_file(Preprocessing, base, "preprocessing flags")
    request = CompileRequest(
        model=model,
        profile=target,
        out=out or Path(f"{model.stem}-{target.name}.ekb"),
        precision=precision,
        backend=backend,
        calibration=calibration,
        eval_data=eval_data,
        input_shapes=parse_shape_overrides(input_shape or []),
        input_values=parse_input_values(input_value or []),
        preprocessing=preprocessing,
        sign_key=sign_key,
        name=name,
        version=bundle_version,
        max_accuracy_drop=max_accuracy_drop,
        min_cosine=min_cosine,
        bench_seconds=bench_seconds,
        mixed_seconds=mixed_seconds,
        threads=threads,
        backend_options=parse_backend_options(_with_deprecated_flags(option or [], tune_trials)),
        verify_emulated=verify_emulated,
        labels=labels,
    )
    with contextlib.ExitStack() as stack:
        if measure_on:
            request = dataclasses.replace(request, measurer=_fleet_measurer(stack, hub_url, token, measure_on,
                                                                            measure_seconds))  # fmt: skip
        report, manifest = _compile(request, json)
    if json:
        print_json(report.model_dump_json(indent=2))
        return
    console.print(compile_report(report))
    console.print(
        f"[bold green]wrote[/] {request.out}: {manifest.backend} {manifest.precision}, "
        f"signed by key {manifest.signing_key_id}"
    )


def _fleet_measurer(stack: contextlib.ExitStack, hub_url: str | None, token: str | None, target: str,
                    seconds: float) -> "FleetMeasurer":  # fmt: skip
    from edgekit.hub.client import FleetMeasurer, HubClient

    client = stack.enter_context(HubClient(hub_url, token))
    return FleetMeasurer(client, target, seconds)


def _compile(request: "CompileRequest", json: bool) -> tuple["CompileReport", "Manifest"]:
    from edgekit.cli.render import compile_report
    from edgekit.compile.pipeline import CompileFailed, compile_model
    from edgekit.progress import RichProgress

    try:
        with RichProgress() as progress:
            return compile_model(request, progress)
    except CompileFailed as failure:
        (err_console if json else console).print(compile_report(failure.report))
        if json:
            print_json(failure.report.model_dump_json(indent=2))
        raise


def _with_deprecated_flags(options: list[str], tune_trials: int | None) -> list[str]:
    """`--tune-trials N` (edgekit 0.1) still works, as the backend option it always was."""
    if tune_trials is None:
        return options
    err_console.print("[yellow]--tune-trials is deprecated: use --option tvm.tune_trials=N[/]")
    return [f"tvm.tune_trials={tune_trials}", *options]


def register(app: typer.Typer) -> None:
    app.command("compile")(compile_command)
