"""The agent's inputs end to end, on both brokers: a video file, an image folder and a serial port (a pseudo-terminal)
feed a real model in an in-process agent; a plain MQTT subscriber checks the results, telemetry and events."""

import contextlib
import fcntl
import os
import select
import statistics
import struct
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from agent_helpers import signed
from brokers import Subscriber, publish, wait_until

from edgekit.protocol import DesiredState, Event, Rates, Result, Telemetry, device_topic

TOPICS = "edgekit/v1/dev-1/#"
RESULTS = "edgekit/v1/dev-1/results"
TELEMETRY = "edgekit/v1/dev-1/telemetry"
EVENTS = "edgekit/v1/dev-1/events"
START_S = 15.0  # agent start-up, model load and the first messages on a loaded CI machine


def results(sub: Subscriber) -> list[Result]:
    return [Result.model_validate_json(p) for _, p in sub.messages(RESULTS)]


def telemetry(sub: Subscriber) -> list[Telemetry]:
    return [Telemetry.model_validate_json(p) for _, p in sub.messages(TELEMETRY)]


def events(sub: Subscriber, kind: str | None = None) -> list[Event]:
    parsed = [Event.model_validate_json(p) for _, p in sub.messages(EVENTS)]
    return [e for e in parsed if kind in (None, e.type)]


def wait_event(sub: Subscriber, kind: str, timeout: float = START_S) -> Event:
    sub.wait_for(lambda ms: any(f'"{kind}"'.encode() in p for _, p in ms), timeout, EVENTS)
    return events(sub, kind)[0]


def assert_classified(result: Result, bundle: str) -> None:
    assert result.bundle == bundle and result.task == "classifier" and result.latency_ms >= 0
    assert result.top and all(0 <= s.label < 10 for s in result.top)
    assert result.frame_ts <= result.ts


def cap_inference_rate(broker_url: str, sub: Subscriber, max_fps: float) -> None:
    """Make the model slower than its source: the desired state caps inferences per second."""
    # telemetry_s as the agent fixture's: a desired state carries its (default) telemetry rate once encoded.
    desired = DesiredState(rev=1, rates=Rates(max_fps=max_fps, telemetry_s=0.5))
    publish(broker_url, device_topic("dev-1", "config/desired"), signed(desired, "dev-1"), retain=True)
    wait_event(sub, "config.applied")


# --- video and folder (image input, latest frame wins) -----------------------------------------------------------


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 20.0, (64, 48))
    rng = np.random.default_rng(3)
    for _ in range(8):
        writer.write(rng.integers(0, 256, (48, 64, 3), np.uint8))
    writer.release()
    assert path.stat().st_size > 0
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(4)
    for index in range(5):
        cv2.imwrite(str(folder / f"img{index}.png"), rng.integers(0, 256, (40, 40, 3), np.uint8))
    return folder


def test_video_file_gives_results_and_telemetry(broker, start_agent, cnn_bundle, clip):
    with Subscriber(broker.url, TOPICS) as sub:
        start_agent(broker, bundle=cnn_bundle, source=f"video:{clip}?fps=20")
        # Every frame of the clip comes through (it loops, so a frame skipped once comes round again).
        sub.wait_for(lambda ms: {Result.model_validate_json(p).source["frame"] for _, p in ms} == set(range(8)),
                     START_S, RESULTS)  # fmt: skip
        for result in results(sub):
            assert_classified(result, "cnn@1.0.0")
            assert result.source == {"frame": result.source["frame"], "file": "clip.avi"}
        sub.wait_for(lambda ms: sum(Telemetry.model_validate_json(p).inferences for _, p in ms) > 0, START_S, TELEMETRY)
        for report in telemetry(sub):
            assert report.bundle == "cnn@1.0.0" and 0 <= report.queue_depth <= 1 and report.dropped_frames >= 0
        assert not events(sub, "source.error")


def test_image_folder_results_name_their_file(broker, start_agent, cnn_bundle, image_folder):
    with Subscriber(broker.url, TOPICS) as sub:
        start_agent(broker, bundle=cnn_bundle, source=f"folder:{image_folder}?fps=20")
        names = {f"img{i}.png" for i in range(5)}
        sub.wait_for(lambda ms: {Result.model_validate_json(p).source["file"] for _, p in ms} == names, START_S,
                     RESULTS)  # fmt: skip
        for result in results(sub):
            assert_classified(result, "cnn@1.0.0")
            assert set(result.source) == {"file"} and result.source["file"] in names
        sub.wait_count(3, TELEMETRY)
        for report in telemetry(sub):
            assert report.bundle == "cnn@1.0.0" and isinstance(report.dropped_frames, int)
            assert report.dropped_frames >= 0 and 0 <= report.queue_depth <= 1  # latest wins: one frame at most


def test_image_source_drops_stale_frames_when_the_model_is_slower(broker, start_agent, cnn_bundle, image_folder):
    """Latest wins: frames that arrive while the model is busy are dropped and counted, and what the model runs on
    is the newest frame, not one that waited for the model."""
    max_fps = 5.0
    with Subscriber(broker.url, TOPICS) as sub:
        start_agent(broker, bundle=cnn_bundle, source=f"folder:{image_folder}?fps=50")
        sub.wait_count(1, RESULTS, timeout=START_S)
        cap_inference_rate(broker.url, sub, max_fps)
        capped_at = time.time()
        dropped_before = max([t.dropped_frames for t in telemetry(sub)], default=0)
        time.sleep(2.0)  # deliberate: a fixed window to measure the capped rate and the drops in
        capped = [r for r in results(sub) if r.frame_ts > capped_at + 0.3]
        span = 2.0 - 0.3
        assert 2 <= len(capped) <= span * max_fps + 2, len(capped)
        reports = [t for t in telemetry(sub) if t.ts > capped_at]
        assert len(reports) >= 2, telemetry(sub)
        assert reports[-1].dropped_frames - dropped_before >= 20, reports  # ~45 frames/s come in, 5 go through
        assert all(t.queue_depth <= 1 for t in telemetry(sub))
        ages = [r.ts - r.frame_ts for r in capped]
        assert statistics.median(ages) < 0.5 / max_fps, ages  # fresh frames, not ones held for a whole period


# --- serial port (values input, nothing dropped) ------------------------------------------------------------------


@pytest.fixture
def pty() -> Iterator[tuple[int, int, str]]:
    """(master fd, slave fd, port path): the test writes to the master what a sensor sends down the wire."""
    master, slave = os.openpty()
    yield master, slave, os.ttyname(slave)
    for fd in (master, slave):
        with contextlib.suppress(OSError):  # a test may have closed the master, to unplug the "device"
            os.close(fd)


def wait_port_reading(master: int, slave: int, timeout: float = START_S) -> None:
    """Until the agent reads the port. pyserial puts the terminal in raw mode, then flushes its input once, so
    anything written before that would be lost: a blank line (the agent skips those) written after raw mode is
    consumed either by that flush or by a read, and a second one, written once the first is gone, only by a read."""
    wait_until(lambda: not termios.tcgetattr(slave)[3] & termios.ICANON, timeout, "the agent to open the serial port")
    for _ in range(2):
        os.write(master, b"\n")
        wait_until(lambda: unread_bytes(slave) == 0, timeout, "the agent to read the serial port")


def unread_bytes(fd: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]


def write_all(fd: int, data: bytes, timeout: float = 10.0) -> None:
    """Write everything to the pty master without ever blocking past `timeout` (the agent must be reading)."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    deadline = time.monotonic() + timeout
    view = memoryview(data)
    while view:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"the serial port took only {len(data) - len(view)} of {len(data)} bytes"
        select.select([], [fd], [], remaining)
        with contextlib.suppress(BlockingIOError):
            view = view[os.write(fd, view) :]


def csv_window(values: np.ndarray) -> bytes:
    """One 64-value window as a sensor would send it: 8 CSV lines of 8 values each."""
    rows = values.reshape(8, 8)
    return b"".join((",".join(repr(float(v)) for v in row) + "\n").encode() for row in rows)


@pytest.fixture
def digit_windows(digits: Path) -> tuple[np.ndarray, np.ndarray]:
    test = np.load(digits / "test.npz")
    return test["image"].reshape(len(test["labels"]), 64), test["labels"]


def test_serial_port_windows_are_classified(broker, start_agent, digits_bundle, digit_windows, pty):
    master, slave, port = pty
    images, labels = digit_windows
    with Subscriber(broker.url, TOPICS) as sub:
        start_agent(broker, bundle=digits_bundle("1.0.0"), source=f"serial:{port}?baud=115200")
        wait_port_reading(master, slave)
        for image in images[:10]:
            write_all(master, csv_window(image))
        sub.wait_count(10, RESULTS, timeout=10)
        got = results(sub)
        assert len(got) == 10
        for result in got:
            assert_classified(result, "digits@1.0.0")
            assert result.source == {"malformed": 0}
        predicted = [r.top[0].label for r in got]
        assert sum(p == t for p, t in zip(predicted, labels[:10], strict=True)) >= 8, (predicted, labels[:10])
        sub.wait_for(lambda ms: sum(Telemetry.model_validate_json(p).inferences for _, p in ms) >= 10, 5, TELEMETRY)
        assert all(t.bundle == "digits@1.0.0" for t in telemetry(sub))


def test_serial_burst_is_not_dropped_when_the_model_is_slower(broker, start_agent, digits_bundle, digit_windows, pty):
    master, slave, port = pty
    images, labels = digit_windows
    with Subscriber(broker.url, TOPICS) as sub:
        start_agent(broker, bundle=digits_bundle("1.0.0"), source=f"serial:{port}")
        wait_port_reading(master, slave)
        cap_inference_rate(broker.url, sub, max_fps=20)  # 20 windows arrive at once; 1 s to work through them
        write_all(master, b"".join(csv_window(image) for image in images[20:40]))
        sub.wait_count(20, RESULTS, timeout=10)
        time.sleep(0.5)  # deliberate: a window for a duplicate or a 21st result to show up in (none may)
        got = results(sub)
        assert len(got) == 20  # every window, exactly once
        predicted = [r.top[0].label for r in got]
        assert sum(p == t for p, t in zip(predicted, labels[20:40], strict=True)) >= 16, (predicted, labels[20:40])
        frame_ts = [r.frame_ts for r in got]
        assert frame_ts == sorted(frame_ts)  # in the order they were sent
        sub.wait_for(lambda ms: sum(Telemetry.model_validate_json(p).inferences for _, p in ms) >= 20, 5, TELEMETRY)
        assert all(t.dropped_frames == 0 for t in telemetry(sub))


def test_missing_serial_port_is_reported_and_the_agent_keeps_running(broker, start_agent, digits_bundle, tmp_path):
    port = tmp_path / "no-such-port"
    with Subscriber(broker.url, TOPICS) as sub:
        agent = start_agent(broker, bundle=digits_bundle("1.0.0"), source=f"serial:{port}?baud=115200")
        error = wait_event(sub, "source.error")
        assert error.level == "warning" and str(port) in error.message and error.data == {"source": "serial"}
        before = len(sub.messages(TELEMETRY))
        sub.wait_count(before + 3, TELEMETRY, timeout=5)  # still reporting while the source is retried
        assert agent.link.connected and agent.runner.model is not None
        assert len(events(sub, "source.error")) == 1  # reported once, not on every retry
        assert not sub.messages(RESULTS)


def test_unplugged_serial_port_is_reported_and_telemetry_keeps_flowing(
    broker, start_agent, digits_bundle, digit_windows, pty
):
    master, slave, port = pty
    images, _ = digit_windows
    with Subscriber(broker.url, TOPICS) as sub:
        start_agent(broker, bundle=digits_bundle("1.0.0"), source=f"serial:{port}")
        wait_port_reading(master, slave)
        write_all(master, csv_window(images[0]))
        sub.wait_count(1, RESULTS, timeout=10)
        assert not events(sub, "source.error")
        os.close(master)  # the device is unplugged
        error = wait_event(sub, "source.error", timeout=10)
        assert error.level == "warning" and port in error.message and error.data == {"source": "serial"}
        before = len(sub.messages(TELEMETRY))
        sub.wait_count(before + 3, TELEMETRY, timeout=5)
        latest = telemetry(sub)[-1]
        assert latest.bundle == "digits@1.0.0" and latest.inferences == 0  # nothing since the port went away
        assert len(sub.messages(RESULTS)) == 1
