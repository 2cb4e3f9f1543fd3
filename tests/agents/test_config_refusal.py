"""A configuration from the hub is taken all or nothing: one the device cannot apply (a camera it does not have, a
video file that is not there) is refused in the reported state, the device keeps its previous configuration and
keeps running; the rest of that desired state still applies. Real broker, real agent."""

import time
from pathlib import Path

from agent_helpers import signed
from brokers import Subscriber, publish, wait_until

from edgekit.protocol import DesiredState, ReportedState, Result, Thresholds, device_topic

REPORTED = "edgekit/v1/dev-1/config/reported"
SYNTHETIC_20 = {"kind": "synthetic", "fps": 20.0, "seed": 0}


def _send(broker, desired: DesiredState) -> None:
    publish(broker.url, device_topic("dev-1", "config/desired"), signed(desired, "dev-1"), retain=True)


def _reported_rev(sub: Subscriber, rev: int) -> ReportedState:
    """The first report of the device converged to `rev`."""
    messages = sub.wait_for(lambda ms: any(ReportedState.model_validate_json(p).rev >= rev for _, p in ms),
                            timeout=20, topic_filter=REPORTED)  # fmt: skip
    return next(r for r in (ReportedState.model_validate_json(p) for _, p in messages) if r.rev >= rev)


def _results_after(sub: Subscriber, since: float) -> int:
    return sum(Result.model_validate_json(p).ts > since for _, p in sub.messages("edgekit/v1/dev-1/results"))


def test_a_source_the_device_lacks_is_refused_and_the_previous_config_kept(broker, start_agent, digits_bundle,
                                                                            tmp_path: Path) -> None:  # fmt: skip
    with Subscriber(broker.url, "edgekit/v1/dev-1/#") as sub:
        agent = start_agent(broker, bundle=digits_bundle("1.0.0"), source="synthetic:?fps=50")
        good = DesiredState(rev=1, source="synthetic:?fps=20", thresholds=Thresholds(score=0.7, top_k=3))
        _send(broker, good)
        applied = _reported_rev(sub, 1)
        assert applied.config is not None and (applied.config.state, applied.config.rev) == ("applied", 1)
        assert applied.thresholds.top_k == 3 and applied.source == SYNTHETIC_20

        for rev, source, why in ((2, "camera:7", "camera 7"), (3, f"video:{tmp_path / 'gone.mp4'}", "file not found")):
            _send(broker, DesiredState(rev=rev, source=source, thresholds=Thresholds(top_k=1)))
            refused = _reported_rev(sub, rev)
            assert refused.config is not None and (refused.config.state, refused.config.rev) == ("refused", rev)
            assert why in refused.config.detail, refused.config.detail
            # All or nothing: neither the source nor the thresholds sent with it changed.
            assert refused.thresholds == good.thresholds, refused.thresholds
            assert refused.source == SYNTHETIC_20, refused.source
            assert agent.runner.source_config.model_dump() == refused.source
        since = time.time()
        wait_until(lambda: _results_after(sub, since) >= 5, 20, "results after the refusals: the device keeps running")
        events = [p for _, p in sub.messages("edgekit/v1/dev-1/events") if b'"config.rejected"' in p]
        assert len(events) == 2 and b"keeping the previous configuration" in events[0], events

        # Still refused after a restart (the reported state survives it), and a good change applies again.
        agent.stop()
        reports = len(sub.messages(REPORTED))  # counted before the start: its first report can come at once
        start_agent(broker, bundle=digits_bundle("1.0.0"), source="synthetic:?fps=50")
        again = ReportedState.model_validate_json(sub.wait_count(reports + 1, REPORTED)[-1][1])
        assert again.config is not None and (again.config.state, again.config.rev) == ("refused", 3)
        _send(broker, DesiredState(rev=4, source="synthetic:?fps=30", thresholds=Thresholds(top_k=2)))
        fixed = _reported_rev(sub, 4)
        assert fixed.config is not None and fixed.config.state == "applied" and fixed.thresholds.top_k == 2
        assert fixed.source == {**SYNTHETIC_20, "fps": 30.0}
