"""The installed `edgekit` console script, run as a user runs it."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgekit import __version__

EDGEKIT = shutil.which("edgekit", path=str(Path(sys.executable).parent))


def run(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([EDGEKIT, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_console_script_is_installed():
    assert EDGEKIT, "pip install -e . should install the edgekit console script beside python"


def test_help_lists_every_command():
    result = run("--help")
    assert result.returncode == 0
    for command in ("compile", "inspect", "verify", "bench", "profiles", "keys"):
        assert command in result.stdout


def test_version():
    assert run("--version").stdout.strip() == f"edgekit {__version__}"


def test_usage_error_exits_2():
    result = run("compile")
    assert result.returncode == 2 and "Missing argument" in result.stderr


@pytest.mark.parametrize("content", [b"\x00\x01garbage", b"name,age\nbob,3\n"])
def test_bad_model_is_one_line_without_traceback(tmp_path, content):
    model = tmp_path / "model.onnx"
    model.write_bytes(content)
    result = run("compile", model, "--profile", "x86-64-avx2")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not an ONNX model" in errors[0]


def test_error_text_with_brackets_is_printed_verbatim():
    result = run("profiles", "show", "[bold]board")
    assert result.returncode == 2
    assert "unknown profile '[bold]board'" in result.stderr  # not swallowed as rich markup


def test_the_agent_command_runs_without_the_hub_client_installed() -> None:
    """`pip install edgekit[agent]` has no httpx: every CLI module must import it only when its command runs (the
    emulated arm64 device caught `edgekit config` importing it at start-up, which broke `edgekit agent`)."""
    code = ("import sys; sys.modules['httpx'] = None; from edgekit.cli import main; "
            "sys.argv = ['edgekit', 'agent', '--help']; main()")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--device-id" in done.stdout, done.stderr[-2000:]
