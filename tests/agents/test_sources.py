"""Input sources on real parts: video files OpenCV wrote, image folders, a pseudo-terminal as the serial port, and
the MQTT source fed through the subscribe hook the agent hands it (the broker path is tested with the agent)."""

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgekit.agents.sources import (
    Frame,
    Source,
    SourceContext,
    SourceExhausted,
    SourceUnavailable,
    create_source,
    parse_source,
    sources,
    to_feeds,
)
from edgekit.compile.calibration import load_samples
from edgekit.errors import BadInput
from edgekit.manifest import TensorSpec
from edgekit.profiles import Preprocessing

NCHW = TensorSpec(name="x", shape=[1, 3, 32, 32], dtype="float32", layout="NCHW")
NHWC = TensorSpec(name="x", shape=[1, 32, 32, 3], dtype="float32", layout="NHWC")
GRAY = TensorSpec(name="x", shape=[1, 1, 32, 32], dtype="float32", layout="NCHW")
VALUES = TensorSpec(name="x", shape=[1, 64], dtype="float32", layout="NC")
CLIP_FRAMES = 10


def context(spec: TensorSpec = NCHW, subscribe: Callable | None = None) -> SourceContext:
    return SourceContext(device_id="dev-1", input=spec, subscribe=subscribe)


@pytest.fixture
def opened() -> Iterator[Callable[..., Source]]:
    """Open a source from its spec string; every source opened in the test is closed afterwards."""
    created: list[Source] = []

    def open_source(spec: str, ctx: SourceContext | None = None) -> Source:
        source = create_source(parse_source(spec), ctx or context())
        created.append(source)
        source.open()
        return source

    yield open_source
    for source in created:
        source.close()


def read_frames(source: Source, count: int) -> list[Frame]:
    frames = [source.read(timeout=2.0) for _ in range(count)]
    assert all(frame is not None for frame in frames)
    return frames


# --- video --------------------------------------------------------------------------------------------------


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    """Ten 48x32 frames at 25 fps, frame i filled with grey level 20*i so the order can be checked."""
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (48, 32))
    for i in range(CLIP_FRAMES):
        writer.write(np.full((32, 48, 3), 20 * i, np.uint8))
    writer.release()
    return path


def test_video_delivers_frames_in_order_and_loops(opened, clip):
    source = opened(f"video:{clip}?fps=500")
    frames = read_frames(source, CLIP_FRAMES + 3)
    assert all(f.kind == "image" and f.data.shape == (32, 48, 3) and f.data.dtype == np.uint8 for f in frames)
    levels = [round(float(f.data.mean()) / 20) for f in frames]
    assert levels == [*range(CLIP_FRAMES), 0, 1, 2]
    assert [f.meta for f in frames[9:11]] == [{"frame": 9, "file": "clip.avi"}, {"frame": 0, "file": "clip.avi"}]


def test_video_is_paced_to_the_file_rate_or_fps(opened, clip):
    source = opened(f"video:{clip}")
    start = time.monotonic()
    read_frames(source, 6)
    assert 5 / 25 * 0.8 <= time.monotonic() - start < 2.0  # 25 fps from the file: 5 periods after the first frame

    slow = opened(f"video:{clip}?fps=2")
    assert slow.read(timeout=1.0) is not None
    assert slow.read(timeout=0.05) is None  # the next frame is due in 0.5 s
    assert slow.read(timeout=1.0) is not None


def test_video_without_loop_ends(opened, clip):
    source = opened(f"video:{clip}?loop=false&fps=500")
    read_frames(source, CLIP_FRAMES)
    with pytest.raises(SourceExhausted):
        source.read(timeout=1.0)


def test_missing_video_file_is_unavailable(opened, tmp_path):
    with pytest.raises(SourceUnavailable, match=r"missing\.mp4"):
        opened(f"video:{tmp_path / 'missing.mp4'}")


def test_absent_camera_is_unavailable(opened):
    with pytest.raises(SourceUnavailable, match="camera 99: not found"):
        opened("camera:99")


# --- folder -------------------------------------------------------------------------------------------------


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """a: gray, b: colour, c: corrupt, d/e: colour in a subfolder, plus a file that is not an image."""
    folder = tmp_path / "images"
    (folder / "d").mkdir(parents=True)
    rng = np.random.default_rng(0)
    cv2.imwrite(str(folder / "a.png"), rng.integers(0, 256, (20, 30), np.uint8))
    cv2.imwrite(str(folder / "b.png"), rng.integers(0, 256, (40, 40, 3), np.uint8))
    (folder / "c.png").write_bytes(b"not a png at all")
    cv2.imwrite(str(folder / "d" / "e.png"), rng.integers(0, 256, (24, 36, 3), np.uint8))
    (folder / "notes.txt").write_text("ignored")
    return folder


def test_folder_plays_images_in_name_order_skipping_undecodable(opened, images):
    source = opened(f"folder:{images}?fps=500")
    frames = read_frames(source, 4)
    assert [f.meta["file"] for f in frames] == ["a.png", "b.png", "d/e.png", "a.png"]
    # A gray file decodes as three equal BGR channels; to_feeds makes it gray again for a gray model.
    assert frames[0].data.shape == (20, 30, 3) and (frames[0].data[..., 0] == frames[0].data[..., 2]).all()
    assert frames[1].data.shape == (40, 40, 3)
    assert source.undecodable == {"c.png"}


def test_folder_without_loop_ends(opened, images):
    source = opened(f"folder:{images}?fps=500&loop=false")
    read_frames(source, 3)
    with pytest.raises(SourceExhausted):
        source.read(timeout=1.0)


def test_folder_paces_at_fps(opened, images):
    source = opened(f"folder:{images}?fps=20")
    start = time.monotonic()
    read_frames(source, 5)
    assert 4 / 20 * 0.8 <= time.monotonic() - start < 2.0


@pytest.mark.parametrize("content", ["missing", "empty", "corrupt"])
def test_folder_without_usable_images_is_unavailable(opened, tmp_path, content):
    folder = tmp_path / "f"
    if content != "missing":
        folder.mkdir()
    if content == "corrupt":
        (folder / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(SourceUnavailable, match="folder"):
        opened(f"folder:{folder}?fps=500").read(timeout=1.0)


# --- serial -------------------------------------------------------------------------------------------------


@pytest.fixture
def pty() -> Iterator[tuple[int, str]]:
    """(master fd, port path): the test writes to the master what a sensor would send down the wire."""
    master, slave = os.openpty()
    yield master, os.ttyname(slave)
    for fd in (master, slave):
        # A test may have closed the master already, to unplug the "device".
        with contextlib.suppress(OSError):
            os.close(fd)


def test_serial_csv_lines_become_windows_that_hop(opened, pty):
    master, port = pty
    source = opened(f"serial:{port}?hop=4", context(TensorSpec(name="x", shape=[1, 8], dtype="float32")))
    os.write(master, b"1,2,3\r\n4,5,6,7,8\nnot numbers\n9,10,")
    first = source.read(timeout=2.0)
    assert first.kind == "values" and first.data.dtype == np.float32
    assert first.data.tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert source.read(timeout=0.1) is None  # 5..8 and half a line: not a window yet
    os.write(master, b"11,12\n1,nan,2\n\n")
    second = source.read(timeout=2.0)
    assert second.data.tolist() == [5, 6, 7, 8, 9, 10, 11, 12]
    assert second.meta == {"malformed": 1}  # a frame is returned as soon as it is full; the rest waits
    assert source.read(timeout=0.1) is None
    assert source.malformed == 2


def test_serial_json_lines(opened, pty):
    master, port = pty
    source = opened(f"serial:{port}?format=json&window=3", context(VALUES))
    os.write(master, b'[1, 2]\n{"x": 1}\n[true]\n[1e999]\n0.5,1\n{"values": [3, 4.5]}\n')
    assert source.read(timeout=2.0).data.tolist() == [1, 2, 3]
    assert source.malformed == 4
    assert source.read(timeout=0.1) is None


def test_serial_port_lost_or_missing_is_unavailable(opened, pty, tmp_path):
    master, port = pty
    source = opened(f"serial:{port}", context(VALUES))
    os.close(master)
    with pytest.raises(SourceUnavailable, match=port):
        source.read(timeout=1.0)
    with pytest.raises(SourceUnavailable, match="no-such-port"):
        opened(f"serial:{tmp_path / 'no-such-port'}", context(VALUES))


def test_serial_hop_larger_than_window_is_rejected(pty):
    with pytest.raises(BadInput, match="hop 9 is larger than window 8"):
        create_source(parse_source(f"serial:{pty[1]}?window=8&hop=9"), context(VALUES))


# --- mqtt ---------------------------------------------------------------------------------------------------


class Subscriptions(dict):
    """The agent's subscribe hook, recorded: topic → callback, as the MQTT link would route messages."""

    calls = 0

    def __call__(self, topic: str, callback: Callable[[bytes], None]) -> None:
        self.calls += 1
        self[topic] = callback


def png(height: int = 16, width: int = 16) -> bytes:
    return cv2.imencode(".png", np.full((height, width, 3), 100, np.uint8))[1].tobytes()


def test_mqtt_payloads_become_frames(opened):
    subscriptions = Subscriptions()
    source = opened("mqtt:?max_bytes=2000", context(VALUES, subscriptions))
    deliver = subscriptions["edgekit/v1/dev-1/input"]
    too_big = json.dumps([0] * 1000).encode()
    for payload in (b"[1, 2.5]", json.dumps({"values": [3, 4]}).encode(), png(), b"\x00garbage", b"[", too_big):
        deliver(payload)
    assert source.read(timeout=1.0).data.tolist() == [1.0, 2.5]
    assert source.read(timeout=1.0).data.tolist() == [3.0, 4.0]
    image = source.read(timeout=1.0)
    assert image.kind == "image" and image.data.shape == (16, 16, 3)
    assert source.read(timeout=0.1) is None
    assert source.malformed == 3  # garbage, half a JSON list, and a list over max_bytes (refused unread)


def test_mqtt_queue_discards_the_oldest(opened):
    subscriptions = Subscriptions()
    source = opened("mqtt:sensors?queue=2", context(VALUES, subscriptions))
    for i in range(5):
        subscriptions["edgekit/v1/dev-1/sensors"](json.dumps([i]).encode())
    assert source.dropped == 3
    assert [source.read(timeout=1.0).data.tolist() for _ in range(2)] == [[3.0], [4.0]]


def test_mqtt_reopen_subscribes_once_and_closed_source_ignores_messages(opened):
    subscriptions = Subscriptions()
    source = opened("mqtt:", context(VALUES, subscriptions))
    source.close()
    subscriptions["edgekit/v1/dev-1/input"](b"[1]")
    source.open()
    assert subscriptions.calls == 1
    assert source.read(timeout=0.05) is None


def test_mqtt_needs_the_agent_link(opened):
    with pytest.raises(SourceUnavailable, match="no broker connection"):
        opened("mqtt:", context(VALUES))


# --- to_feeds -----------------------------------------------------------------------------------------------


@pytest.fixture
def image_frames(opened, clip, images) -> dict[str, Frame]:
    subscriptions = Subscriptions()
    mqtt = opened("mqtt:", context(NCHW, subscriptions))
    subscriptions["edgekit/v1/dev-1/input"](png(20, 28))
    return {
        "video": opened(f"video:{clip}?fps=500").read(timeout=1.0),
        "folder gray": opened(f"folder:{images}?fps=500").read(timeout=1.0),
        "mqtt": mqtt.read(timeout=1.0),
    }


@pytest.mark.parametrize(
    ("spec", "shape"),
    [(NCHW, (1, 3, 32, 32)), (NHWC, (1, 32, 32, 3)), (GRAY, (1, 1, 32, 32))],
)
def test_image_frames_feed_image_inputs(image_frames, spec, shape):
    for name, frame in image_frames.items():
        feeds = to_feeds(frame, spec, Preprocessing())
        assert feeds["x"].shape == shape and feeds["x"].dtype == np.float32, name
        assert feeds["x"].min() >= 0 and feeds["x"].max() <= 1, name


def test_values_frames_feed_a_values_input(opened, pty):
    master, port = pty
    serial = opened(f"serial:{port}", context(VALUES))
    os.write(master, ",".join(str(i) for i in range(64)).encode() + b"\n")
    subscriptions = Subscriptions()
    mqtt = opened("mqtt:", context(VALUES, subscriptions))
    subscriptions["edgekit/v1/dev-1/input"](json.dumps(list(range(64))).encode())
    for frame in (serial.read(timeout=2.0), mqtt.read(timeout=1.0)):
        feeds = to_feeds(frame, VALUES, Preprocessing())
        assert feeds["x"].shape == (1, 64) and feeds["x"][0, 63] == 63


def test_frames_that_do_not_fit_the_input_are_refused(image_frames):
    with pytest.raises(ValueError, match="image frame cannot feed input 'x'"):
        to_feeds(image_frames["video"], VALUES, Preprocessing())
    with pytest.raises(ValueError, match="window of 8 values cannot feed input 'x'"):
        to_feeds(Frame(np.zeros(8, np.float32), "values"), VALUES, Preprocessing())


@pytest.mark.parametrize("spec", [NCHW, GRAY])
def test_folder_frames_feed_what_calibration_saw(opened, images, spec):
    """The device must preprocess exactly as compile's calibration did, gray models included."""
    (images / "c.png").unlink()
    calibration = load_samples(images, [spec], Preprocessing()).inputs["x"]
    source = opened(f"folder:{images}?fps=500", context(spec))
    fed = np.concatenate([to_feeds(frame, spec, Preprocessing())["x"] for frame in read_frames(source, 3)])
    np.testing.assert_array_equal(fed, calibration)


# --- specs and discovery ------------------------------------------------------------------------------------


def test_spec_strings_parse_into_each_kinds_config():
    assert parse_source("camera:").index == 0
    assert parse_source("camera:2?width=640").width == 640
    serial = parse_source("serial:/dev/ttyUSB0?baud=9600&format=json")
    assert (serial.path, serial.baud, serial.format) == ("/dev/ttyUSB0", 9600, "json")
    assert parse_source("mqtt:").topic == "input"
    assert parse_source("video:clip.mp4?loop=false").loop is False
    assert parse_source({"kind": "folder", "path": "imgs", "fps": "2"}).fps == 2.0


@pytest.mark.parametrize(
    ("spec", "fragments"),
    [
        ("webcam:0", ["webcam:0", "camera, folder, mqtt, serial, synthetic, video"]),
        ("no-colon", ["no-colon", "KIND:TARGET"]),
        ("camera:front", ["camera.index"]),
        ("serial:/dev/ttyUSB0?baud=fast", ["serial.baud"]),
        ("folder:imgs?colour=gray", ["folder.colour", "Extra inputs"]),
        ({"kind": "radio"}, ["radio"]),
    ],
)
def test_bad_specs_name_the_kind_or_field(spec, fragments):
    with pytest.raises(BadInput) as error:
        parse_source(spec)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_discovery_does_not_import_opencv_or_pyserial():
    code = (
        "import sys; import edgekit.agents.sources as s; kinds = sorted(s.sources()); "
        "heavy = [m for m in ('cv2', 'serial') if m in sys.modules]; print(kinds, heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(sources()) == ["camera", "folder", "mqtt", "serial", "synthetic", "video"]
