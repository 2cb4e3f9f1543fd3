"""The reliability suite's figures: tests call `record(scenario, metric, value, limit)`; one table at the end.

Each pytest process (xdist worker or a plain run) appends JSON lines to its own file under
`tests/artifacts/reliability/`, so workers never share a file; the terminal summary runs in the controller and
reads them all. The hooks live here and are registered by tests/conftest.py (`pytest_plugins`): with xdist the
controller collects nothing, so a hook in tests/e2e/conftest.py would never run there.
"""

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

FOLDER = Path(__file__).resolve().parent / "artifacts" / "reliability"


def _worker() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


def record(scenario: str, metric: str, value: float | int, limit: float | int | None = None) -> bool:
    """Write one figure; `limit` is the most it may be (None: reported only). Returns whether it is within limit,
    so a test can `assert record(...)`-style check after recording every figure it measured."""
    ok = None if limit is None else value <= limit
    entry = {"scenario": scenario, "metric": metric, "value": value, "limit": limit, "ok": ok,
             "test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]}  # fmt: skip
    FOLDER.mkdir(parents=True, exist_ok=True)
    with open(FOLDER / f"{_worker()}.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")
    return ok is not False


def read_all(folder: Path = FOLDER) -> list[dict[str, Any]]:
    """Every figure recorded in this session, ordered by scenario then by when it was recorded per worker."""
    entries: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                entries.append(json.loads(line))
    return sorted(entries, key=lambda e: e["scenario"])  # stable: keeps each scenario's own order


def clear(folder: Path = FOLDER) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def rows(entries: list[dict[str, Any]]) -> list[tuple[str, str, str, str, str]]:
    marks = {True: "ok", False: "FAIL", None: "—"}
    return [(e["scenario"], e["metric"], _fmt(e["value"]), _fmt(e["limit"]), marks[e["ok"]]) for e in entries]


HEADER = ("scenario", "metric", "value", "limit", "ok")
ATTACK = "attack: "  # scenarios named so are attacks: each figure with a limit is one attack, held when within it


def attack_tally(entries: list[dict[str, Any]]) -> tuple[int, int]:
    """(attacks tried, attacks held) over the figures of `attack: …` scenarios that have a limit."""
    attacks = [e for e in entries if e["scenario"].startswith(ATTACK) and e["limit"] is not None]
    return len(attacks), sum(1 for e in attacks if e["ok"])


def plain_table(entries: list[dict[str, Any]]) -> str:
    table = [HEADER, *rows(entries)]
    widths = [max(len(row[i]) for row in table) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def render(entries: list[dict[str, Any]]) -> str:
    """The table as text: drawn with rich where it is installed, plain columns otherwise."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return plain_table(entries)
    table = Table(title=None, show_lines=False)
    for name in HEADER:
        table.add_column(name, justify="right" if name in ("value", "limit") else "left")
    for row in rows(entries):
        table.add_row(*row)
    console = Console(width=140, record=True, force_terminal=False, color_system=None, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(table)
    return console.export_text().rstrip()


# ---- pytest hooks (registered by tests/conftest.py) -------------------------------------------------------------


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """Controller only, before any worker starts: figures from an earlier run must not reappear, unless this run
    continues one (`make test-all` runs the soak on its own after the rest, for one table at the end)."""
    if not _is_worker(session.config) and not os.environ.get("EDGEKIT_KEEP_FIGURES"):
        clear()


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if _is_worker(config):
        return
    entries = read_all()
    if not entries:
        return
    terminalreporter.write_sep("=", "reliability figures")
    terminalreporter.write_line(render(entries))
    failed = sum(1 for e in entries if e["ok"] is False)
    tried, held = attack_tally(entries)
    attacks = f"attacks tried / held: {tried} / {held}; " if tried else ""
    terminalreporter.write_line(
        f"{len(entries)} figures from {len({e['scenario'] for e in entries})} scenarios; {failed} over their limit; "
        f"{attacks}raw: {FOLDER}"
    )
