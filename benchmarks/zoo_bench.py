"""The real-model conformance matrix: every corpus model (benchmarks/zoo_corpus.py) × profile family × precision,
each compiled by the real CLI in its own process, as a user would run it.

    python benchmarks/zoo_bench.py [--models a,b] [--profiles x,y] [--precisions float,int8] [--timeout 1800] [--list]

A cell runs `edgekit compile MODEL -p PROFILE --precision P [--calibration DATA.npz] [--input-shape ...]
[--input-value ...] --bench-seconds 0.3 --json -o OUT.ekb`. The float precision is the one the profile lists for
its accelerator (fp16 for jetson-orin-nano and intel-core-ultra-npu), else fp32; ethos-u55 lists no float
candidate (its NPU is int8-only), so that cell is n/a. int8 cells get the corpus calibration data; float cells do
too (so outputs are compared on real data, not synthetic).

Each cell is one of:
- ok: a bundle was written (chosen backend and precision, accuracy / top-1 agreement / cosine, bundle size,
  the chosen candidate's host p50 over the fp32 reference's);
- refused: exit 2, one `error:` line (kept);
- failed: exit 1, no candidate passed (each candidate's reason kept);
- TRACEBACK: a Python traceback on stderr, another exit code, or the timeout.

Writes out/zoo/results.json (every cell, its reasons and the totals) and out/zoo/logs/ (each cell's stderr and
JSON report). Bundles go to a temporary folder and are deleted after their size is taken.
"""

import argparse
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from zoo_corpus import BY_KEY, CORPUS, REPO, MissingPackage, ZooModel

from edgekit.profiles import Profile, load_profile

PROFILES = ("x86-64-avx512", "rpi4", "jetson-orin-nano", "ethos-u55", "intel-core-ultra-npu")
PRECISION_FAMILIES = ("float", "int8")
# EDGEKIT_ZOO_OUT runs a part of the matrix beside another run (each keeps its own results.json and logs).
OUT = Path(os.environ.get("EDGEKIT_ZOO_OUT", REPO / "out" / "zoo")).resolve()
EDGEKIT = Path(sys.executable).with_name("edgekit")
BENCH_SECONDS = 0.3
REFUSED, FAILED = 2, 1  # edgekit's exit codes: bad input, failed operation
DEVICE_LIMIT = "does not fit"  # edgekit's refusal when every candidate overflows the device's SRAM/flash
Status = Literal["ok", "refused", "failed", "TRACEBACK", "n/a"]


class CellResult(BaseModel):
    model: str
    profile: str
    family: Literal["float", "int8"]
    precision: str | None  # what --precision asked for; None when the profile has no candidate of the family
    status: Status
    seconds: float = 0.0
    exit_code: int | None = None
    backend: str | None = None  # the chosen candidate's
    chosen_precision: str | None = None
    accuracy: float | None = None
    reference_accuracy: float | None = None
    top1_agreement: float | None = None
    cosine: float | None = None
    bundle_bytes: int | None = None
    p50_ratio: float | None = None  # chosen candidate's host p50 / fp32 reference p50
    float_layers: list[str] | None = None  # layers an int8 build kept in float (mixed precision), if reported
    message: str = ""  # the refusal, the traceback's exception line, the timeout, or why n/a
    candidates: list[str] = []  # "backend precision status: reason" for every candidate that did not pass
    log: str | None = None
    code: str = ""  # the edgekit code it ran (see code_state)

    @property
    def mixed(self) -> bool:
        return bool(self.float_layers)


@dataclass(frozen=True)
class Cell:
    model: ZooModel
    profile: Profile
    family: Literal["float", "int8"]

    @property
    def precision(self) -> str | None:
        return "int8" if self.family == "int8" else float_precision(self.profile)

    @property
    def label(self) -> str:
        return f"{self.model.key}--{self.profile.name}--{self.family}"


def float_precision(profile: Profile) -> str | None:
    """fp16 where the profile lists it for an accelerator, else fp32; None when it lists no float candidate."""
    listed = {c.precision for c in profile.candidates} - {"int8"}
    if profile.accelerator.kind != "none" and "fp16" in listed:
        return "fp16"
    if "fp32" in listed:
        return "fp32"
    return next(iter(sorted(listed)), None)


# ------------------------------------------------------------------------------------------------ one cell


def compile_command(cell: Cell, model: Path, data: Path, bundle: Path) -> list[str]:
    command = [str(EDGEKIT), "compile", str(model), "-p", cell.profile.name, "--precision", str(cell.precision)]
    command += ["--calibration", str(data)]
    for shape in cell.model.input_shapes:
        command += ["--input-shape", shape]
    for value in cell.model.input_values:
        command += ["--input-value", value]
    return [*command, "--bench-seconds", str(BENCH_SECONDS), "--json", "-o", str(bundle)]


@dataclass(frozen=True)
class Finished:
    exit_code: int | None  # None: killed at the timeout
    stdout: str
    stderr: str
    seconds: float


def run_cli(command: list[str], timeout: float, workdir: Path, env: dict[str, str], log: Path) -> Finished:
    """Run in its own process group, so a timeout also ends what it started (onnx2tf, compilers). stderr goes
    straight to the cell's log, so a long cell can be watched."""
    started = time.perf_counter()
    with log.open("w") as stderr:
        process = subprocess.Popen(
            command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True
        )
        try:
            stdout, _ = process.communicate(timeout=timeout)
            code: int | None = process.returncode
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, _ = process.communicate()
            code = None
    return Finished(code, stdout, log.read_text(errors="replace"), time.perf_counter() - started)


def classify(cell: Cell, finished: Finished, bundle: Path, timeout: float) -> CellResult:
    result = CellResult(
        model=cell.model.key,
        profile=cell.profile.name,
        family=cell.family,
        precision=cell.precision,
        status="ok",
        seconds=round(finished.seconds, 1),
        exit_code=finished.exit_code,
    )
    report = parse_report(finished.stdout)
    if report is not None:
        result = result.model_copy(update={"candidates": unsuccessful_candidates(report)})
    traceback = last_exception(finished.stderr)
    if finished.exit_code is None:
        return result.model_copy(update={"status": "TRACEBACK", "message": f"timeout after {timeout:.0f} s"})
    if traceback is not None or finished.exit_code not in (0, FAILED, REFUSED):
        message = traceback or f"exit code {finished.exit_code}: {last_line(finished.stderr)}"
        return result.model_copy(update={"status": "TRACEBACK", "message": message})
    if finished.exit_code == REFUSED:
        return result.model_copy(update={"status": "refused", "message": error_line(finished.stderr)})
    if finished.exit_code == FAILED:
        return result.model_copy(update={"status": "failed", "message": error_line(finished.stderr)})
    if report is None:
        return result.model_copy(update={"status": "TRACEBACK", "message": "exit 0 without a JSON report"})
    return result.model_copy(update=chosen_facts(report, bundle))


def parse_report(stdout: str) -> dict[str, Any] | None:
    """The --json report: the JSON object on stdout (libraries may have printed lines before it)."""
    start = stdout.find("{")
    if start < 0:
        return None
    try:
        report, _ = json.JSONDecoder().raw_decode(stdout[start:])
    except json.JSONDecodeError:
        return None
    return report if isinstance(report, dict) else None


def unsuccessful_candidates(report: dict[str, Any]) -> list[str]:
    return [
        f"{c['backend']} {c['precision']} {c['status']}: {c.get('reason', '')}"
        for c in report.get("candidates", [])
        if c["status"] not in ("chosen", "passed")
    ]


def chosen_facts(report: dict[str, Any], bundle: Path) -> dict[str, Any]:
    chosen = next(c for c in report["candidates"] if c["status"] == "chosen")
    metrics = chosen.get("metrics") or {}
    reference_p50 = report["reference"]["latency_p50_ms"]
    p50 = metrics.get("latency_p50_ms")
    return {
        "backend": chosen["backend"],
        "chosen_precision": chosen["precision"],
        "accuracy": metrics.get("accuracy"),
        "reference_accuracy": metrics.get("reference_accuracy"),
        "top1_agreement": metrics.get("top1_agreement"),
        "cosine": metrics.get("cosine"),
        "bundle_bytes": bundle.stat().st_size if bundle.is_file() else None,
        "p50_ratio": p50 / reference_p50 if p50 and reference_p50 else None,
        "float_layers": float_layers(chosen.get("details") or {}),
    }


def float_layers(details: dict[str, Any]) -> list[str] | None:
    """The layers a mixed-precision build kept in float (`details.mixed_precision.keep_float`)."""
    mixed = details.get("mixed_precision")
    kept = mixed.get("keep_float") if isinstance(mixed, dict) else details.get("keep_float")
    return [str(layer) for layer in kept] if kept else None


TRACEBACK_HEADER = "Traceback (most recent call last):"


def last_exception(stderr: str) -> str | None:
    """The exception line that ends the last traceback on stderr, if there is one."""
    start = stderr.rfind(TRACEBACK_HEADER)
    if start < 0:
        return None
    lines = [line for line in stderr[start:].splitlines()[1:] if line.strip()]
    exception = next((line for line in lines if not line.startswith(" ")), lines[-1] if lines else "")
    return exception.strip()[:400]


def error_line(stderr: str) -> str:
    line = next((ln for ln in reversed(stderr.splitlines()) if ln.startswith("error:")), None)
    return (line.removeprefix("error:").strip() if line else last_line(stderr))[:400]


def last_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[-1].strip()[:400] if lines else ""


def run_cell(cell: Cell, timeout: float, scratch: Path, env: dict[str, str]) -> CellResult:
    if cell.precision is None:
        return CellResult(
            model=cell.model.key, profile=cell.profile.name, family=cell.family, precision=None, status="n/a",
            message=f"{cell.profile.name} lists no {cell.family} candidate",
        )  # fmt: skip
    try:
        model, data = cell.model.model_path(), cell.model.data_path()
    except MissingPackage as missing:
        return CellResult(
            model=cell.model.key, profile=cell.profile.name, family=cell.family, precision=cell.precision,
            status="n/a", message=str(missing),
        )  # fmt: skip
    bundle = scratch / f"{cell.label}.ekb"
    logs = OUT / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{cell.label}.log"
    code = code_state()
    finished = run_cli(compile_command(cell, model, data, bundle), timeout, scratch, env, log)
    (logs / f"{cell.label}.json").write_text(finished.stdout)
    result = classify(cell, finished, bundle, timeout)
    bundle.unlink(missing_ok=True)
    return result.model_copy(update={"log": str(_shown(log)), "code": code})


def code_state() -> str:
    """The commit, plus a hash of uncommitted changes to the code the CLI runs: others edit this checkout while
    the matrix runs, so each cell records what it ran."""
    git = ["git", "-C", str(REPO)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    diff = subprocess.run(
        [*git, "diff", "HEAD", "--", "edgekit", "compilers", "agents", "firmware_profiles"], capture_output=True
    ).stdout
    return f"{head}+{hashlib.sha1(diff).hexdigest()[:8]}" if diff else head


# ---------------------------------------------------------------------------------------------- the matrix


def cell_text(result: CellResult) -> str:
    if result.status == "ok":
        size = f"{result.bundle_bytes / 1e6:.1f} MB" if result.bundle_bytes else "? MB"
        ratio = f"{result.p50_ratio:.2f}x" if result.p50_ratio else "?x"
        mixed = f" mixed({len(result.float_layers or [])} float)" if result.mixed else ""
        return f"ok {result.backend} {result.chosen_precision}{mixed} · {verdict(result)} · {size} · {ratio}"
    # A failure's error line names the closest candidate and by how much it missed; each reason is in the JSON.
    message = result.message.removeprefix("no candidate passed; ")
    if result.status == "failed" and message.startswith("no candidate built"):
        message = "; ".join(c[:90] for c in result.candidates)
    return f"{result.status}: {message}"[:200] if message else result.status


def verdict(result: CellResult) -> str:
    if result.accuracy is not None and result.reference_accuracy is not None:
        return f"acc {result.accuracy:.3f} (fp32 {result.reference_accuracy:.3f})"
    if result.top1_agreement is not None:
        return f"top-1 {result.top1_agreement * 100:.1f}%"
    return f"cos {result.cosine:.5f}" if result.cosine is not None else "no metric"


def matrix(results: list[CellResult], families: list[str]) -> Table:
    table = Table(title="edgekit compile on the real-model corpus", show_lines=False)
    table.add_column("model")
    table.add_column("profile")
    for family in families:
        table.add_column(family, overflow="fold")
    rows: dict[tuple[str, str], dict[str, CellResult]] = defaultdict(dict)
    for result in results:
        rows[(result.model, result.profile)][result.family] = result
    for (model, profile), cells in rows.items():
        table.add_row(model, profile, *[escape(cell_text(cells[f])) if f in cells else "" for f in families])
    return table


class Totals(BaseModel):
    cells: int
    bundles_float: int
    bundles_int8: int
    bundles_int8_mixed: int
    refused: int
    failed: int
    tracebacks: int
    not_applicable: int
    float_cells: int = 0
    int8_cells: int = 0
    float_refused_for_device_limits: int = 0
    int8_refused_for_device_limits: int = 0

    def line(self) -> str:
        int8_judged = self.int8_cells - self.int8_refused_for_device_limits
        float_covered = self.bundles_float + self.float_refused_for_device_limits
        return (
            f"{self.cells} cells: {self.bundles_float} bundles at float, {self.bundles_int8} at int8 "
            f"({self.bundles_int8_mixed} mixed precision), {self.refused} refused, {self.failed} failed, "
            f"{self.tracebacks} tracebacks ({self.not_applicable} n/a not counted)\n"
            f"float: {float_covered} of {self.float_cells} have a bundle or a device-limit refusal; "
            f"int8: {self.bundles_int8} of {int8_judged} ({_percent(self.bundles_int8, int8_judged)}) have an int8 "
            f"or mixed bundle, the {self.int8_refused_for_device_limits} device-limit refusals not counted"
        )


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"


def totals(results: list[CellResult]) -> Totals:
    counted = [r for r in results if r.status != "n/a"]
    ok = [r for r in counted if r.status == "ok"]
    int8 = [r for r in ok if r.family == "int8"]
    limited = [r for r in counted if r.status == "refused" and DEVICE_LIMIT in r.message]
    return Totals(
        cells=len(counted),
        bundles_float=sum(r.family == "float" for r in ok),
        bundles_int8=len(int8),
        bundles_int8_mixed=sum(r.mixed for r in int8),
        refused=sum(r.status == "refused" for r in counted),
        failed=sum(r.status == "failed" for r in counted),
        tracebacks=sum(r.status == "TRACEBACK" for r in counted),
        not_applicable=len(results) - len(counted),
        float_cells=sum(r.family == "float" for r in counted),
        int8_cells=sum(r.family == "int8" for r in counted),
        float_refused_for_device_limits=sum(r.family == "float" for r in limited),
        int8_refused_for_device_limits=sum(r.family == "int8" for r in limited),
    )


def reason_key(text: str) -> str:
    """Group reasons that differ only in numbers, paths or quoted names."""
    text = re.sub(r"(/[\w.+-]+)+/?", "<path>", text)
    text = re.sub(r"'[^']*'", "'…'", text)
    return re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", text)


def failure_reasons(results: list[CellResult]) -> dict[str, list[str]]:
    """Each distinct reason a cell got no bundle → the cells it affects ('model profile family')."""
    found = []
    for result in results:
        if result.status in ("ok", "n/a"):
            continue
        reasons = result.candidates if result.status == "failed" and result.candidates else [result.message]
        found += [(f"{result.status}: {reason}", cell_name(result)) for reason in reasons]
    return group_reasons(found)


def candidate_failures(results: list[CellResult]) -> dict[str, list[str]]:
    """Candidates that failed or were rejected inside cells that still got a bundle (another one passed)."""
    found = [
        (reason, cell_name(result))
        for result in results
        if result.status == "ok"
        for reason in result.candidates
        if " skipped: " not in reason
    ]
    return group_reasons(found)


def cell_name(result: CellResult) -> str:
    return f"{result.model} {result.profile} {result.family}"


def group_reasons(found: list[tuple[str, str]]) -> dict[str, list[str]]:
    """(reason, cell) pairs → {first reason of each group: its cells}."""
    groups: dict[str, tuple[str, list[str]]] = {}
    for reason, cell in found:
        groups.setdefault(reason_key(reason), (reason, []))[1].append(cell)
    return dict(groups.values())


# ----------------------------------------------------------------------------------------------------- main


def selected(names: str | None, known: list[str], what: str) -> list[str]:
    if names is None:
        return known
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return chosen


def list_corpus(console: Console) -> None:
    table = Table(title=f"real-model corpus ({len(CORPUS)} models)")
    for column in ("key", "kind", "source", "inputs", "--input-shape", "samples"):
        table.add_column(column, overflow="fold")
    for model in CORPUS:
        row = (model.key, model.kind, model.source.describe(), describe_inputs(model), " ".join(model.input_shapes))
        table.add_row(*[escape(text) for text in row], str(model.samples))
    console.print(table)


def describe_inputs(model: ZooModel) -> str:
    import onnx

    try:
        graph = onnx.load(str(model.model_path()), load_external_data=False).graph
    except MissingPackage as missing:
        return f"({missing})"
    weights = {init.name for init in graph.initializer}
    inputs = [value for value in graph.input if value.name not in weights]
    return ", ".join(f"{v.name} {_dtype(v)}[{_dims(v)}]" for v in inputs)


def _dtype(value) -> str:
    import onnx

    return onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type).lower()


def _dims(value) -> str:
    dims = value.type.tensor_type.shape.dim
    return ",".join(d.dim_param or (str(d.dim_value) if d.dim_value > 0 else "?") for d in dims)


def prepare(models: list[ZooModel], console: Console) -> None:
    """Build what is derived and every calibration set before timing cells (first run: a few minutes)."""
    for model in models:
        started = time.perf_counter()
        try:
            model.model_path()
            model.data_path()
        except MissingPackage as missing:
            console.print(f"corpus {model.key}: {missing}; its cells are n/a")
            continue
        console.print(f"corpus {model.key}: ready ({time.perf_counter() - started:.0f} s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated corpus keys (default: all; see --list)")
    parser.add_argument("--profiles", help=f"comma-separated (default: {','.join(PROFILES)})")
    parser.add_argument("--precisions", help="float, int8 or both (default: float,int8)")
    parser.add_argument(
        "--timeout", type=float, default=1800,
        help="seconds per cell (default: 1800; the slowest, DenseNet-121 and PicoDet int8 for rpi4, take about 1050)",
    )  # fmt: skip
    parser.add_argument("--list", action="store_true", help="print the corpus and exit")
    parser.add_argument(
        "--merge", action="store_true", help="keep the cells of the last results.json that this run does not redo"
    )
    parser.add_argument(
        "--redo-failed",
        action="store_true",
        help="with --merge: run only the selected cells that the last results.json lacks or has without a bundle",
    )
    parser.add_argument(
        "--merge-from",
        action="append",
        metavar="RESULTS_JSON",
        help="fold another run's results.json (e.g. one made with EDGEKIT_ZOO_OUT) into this one; compile nothing",
    )
    parser.add_argument(
        "--rescore", action="store_true", help="classify the last results.json again from its logs; compile nothing"
    )
    args = parser.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 220)
    if args.list:
        list_corpus(console)
        return 0
    if args.rescore:
        results = rescored(previous_results(), args.timeout)
    elif args.merge_from:
        results = previous_results()
        for other in args.merge_from:
            results = merged(results, results_in(Path(other)))
    else:
        earlier = previous_results() if args.merge else []
        # Saved after every cell, so a run that is stopped keeps what it measured (and --merge can go on from it).
        done_before = {(r.model, r.profile, r.family) for r in earlier if r.status in ("ok", "n/a")}
        skip = done_before if args.redo_failed else set()
        results = run_selected(args, console, lambda done: write_results(merged(earlier, done), args), skip)
        results = merged(earlier, results)
    console.print(matrix(results, [f for f in PRECISION_FAMILIES if any(r.family == f for r in results)]))
    console.print(totals(results).line())
    print_reasons(console, "why cells got no bundle", failure_reasons(results))
    print_reasons(console, "candidates that failed in cells that still got a bundle", candidate_failures(results))
    write_results(results, args)
    console.print(f"results: {_shown(OUT / 'results.json')}, logs: {_shown(OUT / 'logs')}/")
    return 0


def _shown(path: Path) -> Path:
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def run_selected(
    args: argparse.Namespace, console: Console, save: Callable[[list[CellResult]], None], skip: set[tuple]
) -> list[CellResult]:
    """The cells --models (in the order given), --profiles and --precisions select, less those in `skip`."""
    models = [BY_KEY[key] for key in selected(args.models, list(BY_KEY), "model")]
    profiles = [load_profile(name) for name in selected(args.profiles, list(PROFILES), "profile")]
    families = selected(args.precisions, list(PRECISION_FAMILIES), "precision")
    prepare(models, console)
    cells = [Cell(m, p, f) for m in models for p in profiles for f in families if (m.key, p.name, f) not in skip]
    return run_matrix(cells, args.timeout, console, save)


def rescored(previous: list[CellResult], timeout: float) -> list[CellResult]:
    """Each recorded cell classified again from its saved stderr log and JSON report (bundle sizes kept)."""
    results = []
    for old in previous:
        if old.log is None:
            results.append(old)
            continue
        log = REPO / old.log
        finished = Finished(old.exit_code, log.with_suffix(".json").read_text(), log.read_text(errors="replace"), 0)
        cell = Cell(BY_KEY[old.model], load_profile(old.profile), old.family)
        new = classify(cell, finished, log.with_suffix(".ekb"), timeout)
        results.append(new.model_copy(update={k: getattr(old, k) for k in ("seconds", "bundle_bytes", "log", "code")}))
    return results


def run_matrix(
    cells: list[Cell], timeout: float, console: Console, save: Callable[[list[CellResult]], None]
) -> list[CellResult]:
    OUT.mkdir(parents=True, exist_ok=True)
    # Keys and TVM tuning databases of these runs stay out of the user's own edgekit home.
    env = {**os.environ, "EDGEKIT_HOME": str(OUT / "home")}
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="edgekit-zoo-") as scratch:
        for index, cell in enumerate(cells, 1):
            result = run_cell(cell, timeout, Path(scratch), env)
            results.append(result)
            elapsed = time.perf_counter() - started
            console.print(
                f"[{index}/{len(cells)}] {cell.model.key} {cell.profile.name} {cell.family}: {cell_text(result)} "
                f"({result.seconds:.0f} s; {elapsed / 60:.1f} min in all)",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
            save(results)
    return results


def previous_results() -> list[CellResult]:
    path = OUT / "results.json"
    return results_in(path) if path.is_file() else []


def results_in(path: Path) -> list[CellResult]:
    return [CellResult.model_validate(cell) for cell in json.loads(path.read_text())["cells"]]


def merged(previous: list[CellResult], new: list[CellResult]) -> list[CellResult]:
    """Earlier cells, each replaced by this run's result for the same model, profile and precision, in corpus
    order."""
    by_cell = {(r.model, r.profile, r.family): r for r in [*previous, *new]}
    order = {m.key: i for i, m in enumerate(CORPUS)}
    return sorted(by_cell.values(), key=lambda r: (order.get(r.model, len(order)), PROFILES.index(r.profile), r.family))


def print_reasons(console: Console, title: str, reasons: dict[str, list[str]]) -> None:
    if not reasons:
        return
    console.print(f"\n{title}:")
    for reason, cells in sorted(reasons.items(), key=lambda item: -len(item[1])):
        # Reasons are grouped when only numbers, paths or names differ; the text shown is the first cell's.
        numbers = f" (numbers: {cells[0]})" if len(cells) > 1 and reason != reason_key(reason) else ""
        text = f"- {reason}{numbers}\n    {len(cells)} cell(s): {', '.join(cells)}"
        console.print(text, markup=False, highlight=False, soft_wrap=True)


def write_results(results: list[CellResult], args: argparse.Namespace) -> None:
    summary = totals(results)
    document = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "arguments": vars(args),
        "seconds": round(sum(r.seconds for r in results), 1),
        "totals": summary.model_dump(),
        "totals_line": summary.line(),
        "failure_reasons": failure_reasons(results),
        "candidate_failures": candidate_failures(results),
        "cells": [r.model_dump() for r in results],
    }
    # Written whole, then renamed: a run stopped mid-write leaves the previous file intact.
    temporary = OUT / "results.json.tmp"
    temporary.write_text(json.dumps(document, indent=2))
    temporary.replace(OUT / "results.json")


if __name__ == "__main__":
    sys.exit(main())
