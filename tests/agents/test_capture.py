"""Sample capture on the device (agents/capture.py): the policy decides after each result, the day's bounds hold
across a restart, the spool survives kill -9 and keeps its bound, and the uploader sends chunks that a hub played by
the test reassembles, deleting a sample only once that hub acknowledged it."""

import hashlib
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from agent_helpers import desired_for, signed

from edgekit.agents.agent import Agent
from edgekit.agents.capture import Spool, utc_day
from edgekit.agents.memory import MemoryLink
from edgekit.protocol import (
    CapturePolicy,
    DesiredShadow,
    Event,
    SampleAck,
    SampleMeta,
    Topic,
    decode,
    decode_sample,
    device_topic,
    encode,
)

DEVICE = "dev-1"
TIMEOUT_S = 30.0
SOURCE = "synthetic:?fps=50"


def _meta(ts: float = 1_700_000_000.0) -> SampleMeta:
    return SampleMeta(ts=ts, bundle="digits@1.0.0", bundle_id="a" * 64, input="x", format="npy", reason="random")


def _captured_events(link: MemoryLink) -> list[Event]:
    events = [decode(Event, payload) for _, payload in link.messages(device_topic(DEVICE, Topic.EVENTS))]
    return [event for event in events if event.type == "sample.captured"]


def _capture(link: MemoryLink, bundle: Path, rev: int, policy: CapturePolicy | None) -> None:
    desired = desired_for(bundle, rev=rev, version="1.0.0", capture=policy)
    link.deliver(device_topic(DEVICE, Topic.DESIRED), signed(desired, DEVICE))


class PlayedHub:
    """The hub's side of uploads on a MemoryLink: chunks reassembled by sample, each complete one checked and
    acknowledged (or, with `answer` False, left unanswered)."""

    def __init__(self, link: MemoryLink, answer: bool = True) -> None:
        self.link, self.answer = link, answer
        self.chunks: dict[str, dict[int, bytes]] = {}
        self.stored: dict[str, bytes] = {}
        self.formats: dict[str, str] = {}
        link.on_send(device_topic(DEVICE, Topic.SAMPLES), self._on_chunk)

    def _on_chunk(self, topic: str, payload: bytes) -> None:
        header, data = decode_sample(payload)
        assert hashlib.sha256(data).hexdigest() == header.sha256
        parts = self.chunks.setdefault(header.sample, {})
        parts[header.index] = data
        self.formats[header.sample] = header.meta.format
        if len(parts) == header.total and self.answer:
            whole = b"".join(parts[i] for i in range(header.total))
            assert hashlib.sha256(whole).hexdigest() == header.sample and len(whole) == header.size
            self.stored[header.sample] = whole
            self.link.deliver(device_topic(DEVICE, Topic.SAMPLES_ACK), encode(SampleAck(sample=header.sample)))


def test_capture_is_off_by_default_and_a_policy_keeps_only_what_it_asks_for(
    start_agent: Callable[..., Agent], link: MemoryLink, digits_bundle
) -> None:
    bundle = digits_bundle()
    agent = start_agent(None, link=link, bundle=bundle, source=SOURCE)
    _wait_inferences(link, agent, 20)
    assert agent.capture.policy is None and agent.capture.spool.stats().captured == 0
    _capture(link, bundle, 1, CapturePolicy(below_confidence=1e-6))  # no top score is that low
    link.wait_for(lambda _: agent.capture.policy is not None, TIMEOUT_S)
    _wait_inferences(link, agent, 20)
    assert agent.capture.spool.stats().captured == 0 and not _captured_events(link)
    _capture(link, bundle, 2, CapturePolicy(below_confidence=1.0, max_per_day=3))  # every top score is below 1
    link.wait_for(lambda _: len(_captured_events(link)) >= 3, TIMEOUT_S)
    _wait_inferences(link, agent, 20)
    events = _captured_events(link)
    assert len(events) == 3 and {event.data["reason"] for event in events} == {"low_confidence"}


def _wait_inferences(link: MemoryLink, agent: Agent, more: int) -> None:
    start = agent.runner.model_health.stats().inferences
    link.wait_for(lambda _: agent.runner.model_health.stats().inferences >= start + more, TIMEOUT_S)


def test_a_day_bound_holds_across_a_restart_and_uploads_delete_only_what_the_hub_acknowledged(
    start_agent: Callable[..., Agent], digits_bundle, tmp_path: Path
) -> None:
    bundle = digits_bundle()
    link = MemoryLink()
    hub = PlayedHub(link, answer=False)
    agent = start_agent(None, link=link, bundle=bundle, source=SOURCE)
    _capture(link, bundle, 1, CapturePolicy(random_rate=1.0, max_per_day=5))
    link.wait_for(lambda _: len(_captured_events(link)) >= 5, TIMEOUT_S)
    link.wait_for(lambda _: len(hub.chunks) >= 1, TIMEOUT_S, device_topic(DEVICE, Topic.SAMPLES))
    stats = agent.capture.spool.stats()
    assert stats.captured == 5 and stats.spooled == 5 and stats.uploaded == 0, "unacknowledged samples stay"
    agent.stop()

    # Restarted on the same data: the day's five are spent, and the hub now answers.
    link = MemoryLink()
    hub = PlayedHub(link)
    agent = start_agent(None, link=link, bundle=bundle, source=SOURCE)
    link.wait_for(lambda _: agent.capture.spool.stats().spooled == 0, TIMEOUT_S)
    _wait_inferences(link, agent, 20)
    stats = agent.capture.spool.stats()
    assert stats.captured == 5 and stats.uploaded == 5 and not _captured_events(link), "the day's bound held"
    assert len(hub.stored) == 5
    assert set(hub.formats.values()) == {"png"}, "the synthetic source gives digits 8x8 images, kept as PNG"
    image = cv2.imdecode(np.frombuffer(next(iter(hub.stored.values())), np.uint8), cv2.IMREAD_UNCHANGED)
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8, "the image as the source gave it"
    telemetry = agent.telemetry.fields()["capture"]
    assert telemetry.uploaded == 5 and telemetry.spooled == 0


def test_the_spool_survives_kill_9_and_keeps_its_bound(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite"
    script = textwrap.dedent(f"""
        import os, signal
        from edgekit.agents.capture import Spool
        from edgekit.protocol import SampleMeta
        from pathlib import Path
        spool = Spool(Path({str(path)!r}))
        for i in range(3):
            meta = SampleMeta(ts=1_700_000_000.0, bundle="d@1", bundle_id="a" * 64, input="x", format="npy",
                              reason="random")
            spool.add(str(i) * 64, meta, bytes(100))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert done.returncode == -9, done.stderr.decode()
    spool = Spool(path, max_samples=4)
    assert spool.stats().spooled == 3 and spool.day_usage(utc_day(1_700_000_000.0)) == (3, 300)
    assert spool.add("0" * 64, _meta(), bytes(100)) is None, "content-addressed: the same sample is kept once"
    assert spool.add("3" * 64, _meta(), bytes(100)) == 0
    assert spool.add("4" * 64, _meta(), bytes(100)) == 1, "over the bound: the oldest is dropped"
    stats = spool.stats()
    assert stats.spooled == 4 and stats.dropped == 1 and stats.captured == 5
    assert spool.oldest().sha256 == "1" * 64
    assert spool.remove("1" * 64, "uploaded") and not spool.remove("1" * 64, "uploaded")
    assert spool.stats().uploaded == 1
    assert spool.add("1" * 64, _meta(), bytes(100)) is None, "an uploaded sample is not captured again"
    spool.close()


def test_a_shadow_that_disagrees_gets_its_inputs_captured_and_the_size_bounds_hold(
    start_agent: Callable[..., Agent], link: MemoryLink, served_in_memory, small_cnn_model: Path,
    small_cnn_calibration: Path, signing_keys: tuple[Path, Path], tmp_path: Path
) -> None:  # fmt: skip
    from helpers import compile_bundle, with_permuted_classes

    v1 = compile_bundle(small_cnn_model, small_cnn_calibration, signing_keys[0], "1.0.0", tmp_path / "v1.ekb", "cnn")
    damaged = with_permuted_classes(small_cnn_model, tmp_path / "damaged.onnx", classes=10)
    shadow = compile_bundle(damaged, small_cnn_calibration, signing_keys[0], "1.1.0", tmp_path / "damaged.ekb", "cnn")
    served_in_memory.add(shadow)
    agent = start_agent(None, link=link, bundle=v1, source=SOURCE)
    base = desired_for(v1, rev=1, version="1.0.0", name="cnn")
    shadowed = DesiredShadow(bundle=desired_for(shadow, 1, "1.1.0", "cnn").bundle)
    with_shadow = base.model_copy(update={"shadow": shadowed})

    # Samples (32x32 PNGs of noise, about 3 KB) over max_sample_bytes are not kept.
    policy = CapturePolicy(on_disagreement=True, max_sample_bytes=1024)
    link.deliver(device_topic(DEVICE, Topic.DESIRED), signed(with_shadow.model_copy(update={"capture": policy})))
    link.wait_for(lambda _: agent.runner.shadow is not None and agent.runner.shadow.stats().samples >= 10, TIMEOUT_S)
    assert agent.capture.spool.stats().captured == 0

    # The day's bytes bound: room for two of them.
    day_bytes = 2 * 3072 + 2048
    policy = CapturePolicy(on_disagreement=True, max_bytes_per_day=day_bytes)
    link.deliver(device_topic(DEVICE, Topic.DESIRED),
                 signed(with_shadow.model_copy(update={"rev": 2, "capture": policy})))  # fmt: skip
    link.wait_for(lambda _: len(_captured_events(link)) >= 2, TIMEOUT_S)
    _wait_inferences(link, agent, 30)
    events = _captured_events(link)
    assert {event.data["reason"] for event in events} == {"disagreement"}
    assert sum(event.data["bytes"] for event in events) <= day_bytes and len(events) in (2, 3)
