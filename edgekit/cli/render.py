"""Human-readable tables for compile reports, manifests and benchmarks."""

from typing import Any

from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from edgekit.compile.report import CompileReport
from edgekit.drift import DriftReference
from edgekit.manifest import Manifest

STATUS_STYLE = {"chosen": "bold green", "passed": "green", "rejected": "yellow", "failed": "red", "skipped": "dim"}


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _details_line(details: dict[str, Any]) -> str:
    """One line of backend facts; vela's NPU placement and estimates get a readable summary."""
    if "mixed_precision" in details:
        mixed = details["mixed_precision"]
        rest = _details_line({k: v for k, v in details.items() if k != "mixed_precision"})
        return (
            f"mixed precision: {mixed['float_layers']} of {mixed['quantized_layers']} quantized layers kept in float "
            f"({', '.join(mixed['keep_float'][:8])}{', …' if len(mixed['keep_float']) > 8 else ''}); "
            f"p50 {_num(mixed['latency_vs_int8'], '.2f')}x and size {_num(mixed['size_vs_int8'], '.2f')}x "
            f"of plain int8, which was rejected: {mixed['int8_reason']}" + (f"; {rest}" if rest else "")
        )
    if "npu_ops" in details:
        line = (
            f"{_num(details['npu_ops'], 'd')} ops on the NPU, {details['cpu_ops']} on the CPU; "
            f"SRAM {details['sram_kib']:.0f} KiB, flash {details['flash_kib']:.0f} KiB; "
            f"vela estimate {details['estimated_inference_ms']:.2f} ms "
            f"({details['npu_cycles']} cycles, {details['system_config']})"
        )
        if details["cpu_fallback"]:
            line += "; CPU fallback: " + ", ".join(details["cpu_fallback"])
        return line
    return ", ".join(f"{key} {value}" for key, value in details.items())


def _drift_line(reference: DriftReference | None) -> str:
    if reference is None:
        return "- (the agent reports no input drift for this bundle)"
    return f"{', '.join(f.name for f in reference.features)} from {reference.samples} samples"


def compile_report(report: CompileReport) -> Group:
    """The candidate table, then backend facts per candidate and how the winner was picked."""
    notes = [Text(f"{c.backend} {c.precision}: {_details_line(c.details)}") for c in report.candidates if c.details]
    if report.ranking:
        notes.append(Text(f"ranking: {report.ranking}", style="dim"))
    if report.drift_reference:
        notes.append(Text(f"drift reference: {report.drift_reference}", style="dim"))
    notes.extend(Text(f"note: {warning}", style="yellow") for warning in report.warnings)
    return Group(compile_table(report), *notes)


def compile_table(report: CompileReport) -> Table:
    ref = report.reference
    table = Table(
        title=f"{report.model} → profile {report.profile}",
        caption=(
            f"reference: onnxruntime fp32 on host {report.host}, p50 {ref.latency_p50_ms:.3f} ms, "
            f"{_size(ref.param_bytes)} params"
            + (f", accuracy {ref.accuracy:.4f}" if ref.accuracy is not None else "")
            + f"; data: {report.data}"
        ),
    )
    for column in (
        "candidate",
        "status",
        "size (compr.)",
        "max|err| / cosine",
        "top-1 agr. / acc.",
        "p50 / p95 ms",
        "vs fp32",
        "peak MB",
    ):
        left = column in ("candidate", "status")
        table.add_column(column, justify="left" if left else "right", no_wrap=column == "candidate")
    for c in report.candidates:
        m = c.metrics
        status = f"[{STATUS_STYLE[c.status]}]{c.status}[/]" + (f"\n[dim]{escape(c.reason)}[/]" if c.reason else "")
        name = f"{c.backend} {c.precision}" + (" mixed" if "mixed_precision" in c.details else "")
        if m is None:
            table.add_row(name, status)
            continue
        speed = m.latency_p50_ms / ref.latency_p50_ms if m.latency_p50_ms and ref.latency_p50_ms else None
        table.add_row(
            name,
            status,
            f"{_size(m.model_bytes)} ({_num(m.compression_ratio, '.1f')}x)",
            f"{_num(m.max_abs_error, '.1e')} / {_num(m.cosine, '.4f')}",
            f"{_num(m.top1_agreement, '.3f')} / {_num(m.accuracy, '.3f')}",
            f"{_num(m.latency_p50_ms, '.3f')} / {_num(m.latency_p95_ms, '.3f')}",
            _num(speed, ".2f") + "x",
            _num(m.peak_memory_mb, ".1f"),
        )
    return table


def manifest_table(manifest: Manifest) -> Table:
    table = Table(show_header=False, title=f"bundle {manifest.name} {manifest.version}")
    table.add_column(style="bold")
    table.add_column()
    v = manifest.verification
    rows = {
        "profile": manifest.profile,
        "backend": f"{manifest.backend} {manifest.precision} (runtime {manifest.runtime}, target {manifest.target})",
        "inputs": "; ".join(f"{t.name} {t.dtype}{t.shape} {t.layout}" for t in manifest.inputs),
        "outputs": "; ".join(f"{t.name} {t.dtype}{t.shape}" for t in manifest.outputs),
        "preprocessing": manifest.preprocessing.model_dump_json() if manifest.preprocessing else "-",
        "verified on": f"{v.verified_on}, {v.samples} samples ({v.data})",
        "agreement": f"max|err| {_num(v.max_abs_error, '.2e')}, cosine {_num(v.cosine, '.5f')}, "
        f"top-1 {_num(v.top1_agreement, '.3f')}, accuracy {_num(v.accuracy, '.4f')} "
        f"(fp32 {_num(v.reference_accuracy, '.4f')})",
        "latency": f"p50 {_num(v.latency_p50_ms, '.3f')} ms, p95 {_num(v.latency_p95_ms, '.3f')} ms",
        "size": f"{_size(v.model_bytes)} artifacts, params {_size(v.param_bytes)} "
        f"(fp32 {_size(v.reference_param_bytes)}, {_num(v.compression_ratio, '.2f')}x smaller)",
        "self-test": f"{manifest.selftest.count} vectors, atol {manifest.selftest.atol:.3g}",
        "drift ref.": _drift_line(manifest.drift_reference),
        "compiler": ", ".join(f"{k} {val}" for k, val in manifest.compiler.items()),
        "build": _details_line(manifest.build_details) if manifest.build_details else "-",
        "signed by": f"key {manifest.signing_key_id}",
        "files": "\n".join(f"{f.path}  {_size(f.size)}  {f.sha256[:16]}…" for f in manifest.files),
    }
    for key, value in rows.items():
        table.add_row(key, value)
    return table
