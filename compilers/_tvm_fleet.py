"""MetaSchedule tuning for a CPU this host is not, timed on a device of the user's fleet (docs/measure.md).

MetaSchedule builds each batch of trial schedules here (cross-linked for the device's architecture, like the
final library) and hands them to a runner for timing. `FleetRunner` is that runner: it sends the batch through the
hub as one signed trial bundle to the `--measure-on` device (`TrialTimer`), which verifies it, times every library
as MetaSchedule's own local runner would and answers with the seconds per run. Records land in the profile's
tuning database as on a host tuning run, so the next compile applies them without tuning.

When the device cannot time a batch (offline, refused, no answer), that batch and every later one fail as trials
with the reason, so MetaSchedule stops spending its budget on them; what was measured before stays in the
database, and the report says where tuning stopped and why.
"""

import logging
import tempfile
from pathlib import Path
from typing import Any

from edgekit.compilers import TrialTimer
from edgekit.errors import EdgekitError
from edgekit.protocol import TrialSpec, TrialTiming

log = logging.getLogger(__name__)


class FleetTiming:
    """What the fleet runner measured so far: batches sent, trials timed, the device, and why it stopped."""

    def __init__(self, timer: TrialTimer) -> None:
        self.timer = timer
        self.device = ""
        self.batches = 0
        self.timed = 0
        self.failure = ""

    def time(self, libraries: list[str], args_info: list[list[Any]]) -> list[TrialTiming]:
        """One timing per library; failed ones (with the reason) once the device could not time a batch."""
        if self.failure:
            return [TrialTiming(error=f"not timed: {self.failure}") for _ in libraries]
        pairs = zip(libraries, args_info, strict=True)
        trials = [(Path(path), TrialSpec(file=Path(path).name, args=args)) for path, args in pairs]
        try:
            self.device, timings = self.timer.time_trials(trials)
        except EdgekitError as error:
            self.failure = f"{self.timer.target}: {error}"
            log.warning("tuning on the fleet stopped after %d batches: %s", self.batches, self.failure)
            return [TrialTiming(error=f"not timed: {self.failure}") for _ in libraries]
        self.batches += 1
        self.timed += sum(t.secs is not None for t in timings)
        return timings

    def describe(self) -> str:
        where = f"device {self.device}" if self.device else self.timer.target
        done = f"{self.timed} trials timed on {where} in {self.batches} batches through the fleet"
        return f"{done}; then it stopped: {self.failure}" if self.failure else done


def fleet_runner(timing: FleetTiming):
    """A MetaSchedule runner that times each batch of trials through `timing`."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import PyRunner
    from tvm.s_tir.meta_schedule.runner.local_runner import LocalRunnerFuture

    @derived_object
    class FleetRunner(PyRunner):
        def run(self, runner_inputs):
            libraries = [item.artifact_path for item in runner_inputs]
            args = [[info.as_json() for info in item.args_info] for item in runner_inputs]
            timings = timing.time(libraries, args)  # MetaSchedule removes the libraries (RemoveBuildArtifact)
            return [LocalRunnerFuture(t.secs, None) if t.secs is not None else LocalRunnerFuture(None, t.error)
                    for t in timings]  # fmt: skip

    return FleetRunner()


def cross_export(linker: str | None):
    """MetaSchedule's export step for trials the device must load: a shared library linked by `linker` (None: this
    host's, for a device of its architecture). MetaSchedule's own exports an object-file tarball, which only a
    host with a compiler can load."""
    from tvm.support import cc

    def export(module) -> str:
        path = Path(tempfile.mkdtemp(prefix="edgekit-trial-")) / "trial.so"
        module.export_library(str(path), **({"fcompile": cc.cross_compiler(linker)} if linker else {}))
        return str(path)

    return export
