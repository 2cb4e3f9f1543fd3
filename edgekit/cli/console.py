"""Shared consoles: results on stdout, progress and errors on stderr (so `--json` output stays parseable)."""

import sys

from rich.console import Console

# Piped or logged output gets room for the report tables instead of rich's 80-column fallback.
console = Console(width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)


def print_json(text: str) -> None:
    """Machine output: plain, no colour or wrapping."""
    print(text)
