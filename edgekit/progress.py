"""Progress reporting for long steps (calibration, quantization, compiling), decoupled from rich."""

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

Advance = Callable[[int], None]


class Progress(Protocol):
    def task(self, description: str, total: int | None = None) -> AbstractContextManager[Advance]:
        """A step shown while it runs; call the yielded function to advance it."""


class NoProgress:
    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Advance]:
        yield lambda steps=1: None


class RichProgress:
    """Progress bars on stderr, so `--json` output on stdout stays clean."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichBars

        self._bars = RichBars(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=False,
        )

    def __enter__(self) -> "RichProgress":
        self._bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bars.stop()

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Advance]:
        task_id = self._bars.add_task(description, total=total)
        try:
            yield lambda steps=1: self._bars.advance(task_id, steps)
        except BaseException:
            # The error message that follows names the failure; a half-drawn bar would only repeat it.
            self._bars.remove_task(task_id)
            raise
        self._bars.update(task_id, completed=total if total is not None else 1, total=total or 1)
