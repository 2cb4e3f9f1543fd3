"""Assertions shared by tests (importable because pytest.ini puts tests/ on the path)."""

from dataclasses import dataclass


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def assert_user_error(result: CliResult, *fragments: str) -> None:
    """Exit 2, one line naming the cause, and no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    # Progress bars of the steps that ran before the failure may precede the error; nothing else may.
    lines = [line for line in result.stderr.strip().splitlines() if line.strip() and "━" not in line]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


def compile_args(model, profile: str, *extra, out=None, seconds: str = "0.05") -> list:
    """`edgekit compile` arguments with a short latency measurement, as most tests want."""
    return ["compile", model, "-p", profile, "--bench-seconds", seconds, *(["-o", out] if out else []), *extra]
