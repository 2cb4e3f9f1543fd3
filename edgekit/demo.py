"""`edgekit demo` / `make demo`: the whole loop on one machine.

Train the digits classifier, compile it to a signed int8 bundle for this host, start the hub (embedded broker,
dashboard), start a real agent process on a video made on the fly from held-out digits, deploy the bundle to it
through a staged rollout, then print a live summary until Ctrl-C (or `--duration`).
"""

import importlib.util
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from sqlalchemy import func, select

from edgekit.enrollment import write_enrollment
from edgekit.errors import BadInput, OperationFailed
from edgekit.mqtt import redact_url

DEVICE_ID = "demo-cam-1"
REPO = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO / "examples" / "digits" / "train.py"
VIDEO_FPS = 10


@dataclass(frozen=True)
class DemoSettings:
    out: Path = Path("demo-out")
    http_port: int = 8080
    duration_s: float = 0.0  # 0: until Ctrl-C
    profile: str | None = None


def host_profile() -> str:
    """The built-in profile for this machine's CPU."""
    import platform

    if platform.machine() in ("aarch64", "arm64"):
        return "rpi5"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "x86-64-avx512" if " avx512f" in flags else "x86-64-avx2"


def _load_trainer():
    if not TRAIN_SCRIPT.is_file():
        raise BadInput(f"the demo trains the example in {TRAIN_SCRIPT}; run it from an edgekit source checkout")
    spec = importlib.util.spec_from_file_location("edgekit_demo_train", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train(out: Path, console: Console) -> float:
    trainer = _load_trainer()
    classifier, split = trainer.train()
    accuracy = classifier.score(split["x_test"].reshape(len(split["x_test"]), -1), split["y_test"])
    trainer.write_outputs(out, classifier, split)
    console.print(f"trained the digits MLP: test accuracy {accuracy:.4f} (fp32, scikit-learn)")
    return accuracy


def make_video(test_npz: Path, path: Path, frames: int = 200) -> np.ndarray:
    """An MJPG clip of held-out digits (each 8x8 image scaled up to 64x64); returns the label of every frame."""
    import cv2

    with np.load(test_npz) as data:
        images, labels = data["image"][:frames, 0], data["labels"][:frames]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), VIDEO_FPS, (64, 64), isColor=True)
    for image in images:
        pixels = np.round(image * 255).astype(np.uint8)
        big = cv2.resize(pixels, (64, 64), interpolation=cv2.INTER_NEAREST)
        writer.write(cv2.cvtColor(big, cv2.COLOR_GRAY2BGR))
    writer.release()
    return labels


def compile_bundle(model: Path, calibration: Path, key: Path, profile: str, out: Path, console: Console,
                   backend: str = "auto", eval_data: Path | None = None) -> Path:  # fmt: skip
    from edgekit.compile.pipeline import CompileRequest, compile_model
    from edgekit.profiles import load_profile
    from edgekit.progress import RichProgress

    request = CompileRequest(model=model, profile=load_profile(profile), out=out, precision="int8", backend=backend,
                             calibration=calibration, eval_data=eval_data, sign_key=key, name="digits",
                             version="1.0.0", bench_seconds=0.3)  # fmt: skip
    with RichProgress() as progress:
        _, manifest = compile_model(request, progress)
    m = manifest.verification
    console.print(f"compiled {manifest.backend} {manifest.precision} for {profile}: accuracy {m.accuracy:.4f} "
                  f"vs fp32 {m.reference_accuracy:.4f} on {m.samples} samples ({m.data}), "
                  f"host p50 {m.latency_p50_ms:.3f} ms, signed")  # fmt: skip
    return out


class Demo:
    def __init__(self, settings: DemoSettings, console: Console | None = None) -> None:
        self.settings = settings
        self.console = console or Console(stderr=True, width=None if sys.stderr.isatty() else 140)
        self.hub = None
        self.agent: subprocess.Popen | None = None
        self.stop_requested = threading.Event()

    def prepare(self) -> tuple[Path, Path, np.ndarray]:
        """(bundle, public key, frame labels): everything the devices side needs, built in `out`."""
        from edgekit.signing import generate_keypair

        out = self.settings.out
        out.mkdir(parents=True, exist_ok=True)
        train(out / "digits", self.console)
        keys = out / "keys"
        if not (keys / "edgekit.key").exists():
            generate_keypair(keys)
        profile = self.settings.profile or host_profile()
        # Judged on the test split (the live video's digits), not on held-out training samples.
        bundle = compile_bundle(out / "digits" / "digits.onnx", out / "digits" / "calibration.npz",
                                keys / "edgekit.key", profile, out / "digits-int8.ekb", self.console,
                                eval_data=out / "digits" / "test.npz")  # fmt: skip
        labels = make_video(out / "digits" / "test.npz", out / "digits.avi")
        self.console.print(f"made {out / 'digits.avi'}: {len(labels)} held-out digits at {VIDEO_FPS} fps")
        return bundle, keys / "edgekit.pub", labels

    def start_hub(self, public_key: Path) -> str:
        """Start the hub; returns an admin token for the dashboard."""
        from edgekit.hub.auth import create_token
        from edgekit.hub.service import Hub, HubSettings

        self.hub = Hub(HubSettings(data_dir=self.settings.out / "hub", http_port=self.settings.http_port,
                                   trust_key=public_key))  # fmt: skip
        self.hub.start()
        if not (self.hub.wait_connected(20) and self.hub.wait_http(20)):
            raise OperationFailed("the hub did not start (broker or HTTP server)")
        token = create_token(self.hub.sessions, f"demo-{int(time.time())}", "demo")
        kind = self.hub.embedded.kind if self.hub.embedded else "external"
        self.console.print(f"hub: broker {kind} at {redact_url(self.hub.broker_url)}, dashboard {self.hub.http_url}")
        return token

    def start_agent(self) -> None:
        out = self.settings.out
        # Enrolled like any device: its login in a 0600 file, not on a command line that `ps` shows.
        enrollment = out / "agent.enrollment.json"
        write_enrollment(enrollment, self.hub.enroll([DEVICE_ID])[0])
        # The enrollment carries the hub's trust key too.
        command = [sys.executable, "-m", "edgekit", "agent", "--enrollment", str(enrollment),
                   "--source", f"video:{out / 'digits.avi'}?fps={VIDEO_FPS}", "--data", str(out / "agent"),
                   "--telemetry-s", "1", "--profile", host_profile()]  # fmt: skip
        log = open(out / "agent.log", "w")  # noqa: SIM115 (kept open for the agent's lifetime)
        self.agent = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self.console.print(f"agent {DEVICE_ID}: pid {self.agent.pid}, log {out / 'agent.log'}")

    def wait_for_device(self, timeout: float = 60) -> None:
        from edgekit.hub.db import Device

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stop_requested.is_set():
            with self.hub.sessions() as session:
                device = session.get(Device, DEVICE_ID)
            if device is not None and device.online:
                return
            if self.agent.poll() is not None:
                raise OperationFailed(f"the agent exited with {self.agent.returncode}; see its log")
            time.sleep(0.2)
        raise OperationFailed(f"{DEVICE_ID} did not come online within {timeout:g} s")

    def deploy(self, bundle: Path) -> int:
        record, _ = self.hub.registry.add(bundle, "demo")
        deployment = self.hub.rollouts.create(record.id, DEVICE_ID, canary_percent=100, health_checks=10,
                                              actor="demo")  # fmt: skip
        self.console.print(f"rollout {deployment.id}: {record.name}@{record.version} ({record.id[:12]}) → {DEVICE_ID}")
        return deployment.id

    def summary(self, labels: np.ndarray, window_s: float = 2.0) -> str | None:
        """One line: results/s, latency, bundle, and accuracy of the live results against the video's labels."""
        from edgekit.hub.db import Device, ResultRecord

        since = time.time() - window_s
        with self.hub.sessions() as session:
            device = session.get(Device, DEVICE_ID)
            count = session.scalar(select(func.count()).select_from(ResultRecord).where(
                ResultRecord.device_id == DEVICE_ID, ResultRecord.ts >= since))  # fmt: skip
            recent = session.scalars(select(ResultRecord).where(ResultRecord.device_id == DEVICE_ID)
                                     .order_by(ResultRecord.seq.desc()).limit(100)).all()  # fmt: skip
        if not count or device is None:
            return None
        scored = [(r.summary["top"][0]["label"], int(r.summary["source"]["frame"])) for r in recent
                  if r.summary.get("top") and "frame" in r.summary.get("source", {})]  # fmt: skip
        correct = sum(label == labels[frame % len(labels)] for label, frame in scored)
        accuracy = f", live accuracy {correct / len(scored):.2f} (last {len(scored)})" if scored else ""
        p50 = f"{device.latency_p50_ms:.3f} ms" if device.latency_p50_ms is not None else "n/a"
        return f"results flowing: {count / window_s:.1f}/s, p50 {p50}, bundle {device.bundle_label}{accuracy}"

    def run(self) -> None:
        bundle, public_key, labels = self.prepare()
        # From here on Ctrl-C / SIGTERM end the demo cleanly (agent first, then the hub), not mid-step.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stop_requested.set())
        token = self.start_hub(public_key)
        try:
            self.start_agent()
            self.wait_for_device()
            self.deploy(bundle)
            self.console.print(f"dashboard: {self.hub.http_url}/  (log in with token {token})")
            self.console.print("Ctrl-C stops everything")
            self._report_until_stopped(labels)
        finally:
            self.stop()

    def _report_until_stopped(self, labels: np.ndarray) -> None:
        deadline = time.monotonic() + self.settings.duration_s if self.settings.duration_s else None
        while not self.stop_requested.wait(2.0):
            if self.agent.poll() is not None:
                raise OperationFailed(f"the agent exited with {self.agent.returncode}; see its log")
            line = self.summary(labels)
            self.console.print(line or "waiting for the first results …")
            if deadline and time.monotonic() > deadline:
                break

    def stop(self) -> None:
        if self.agent is not None and self.agent.poll() is None:
            self.agent.send_signal(signal.SIGTERM)
            try:
                self.agent.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.agent.kill()
        if self.hub is not None:
            self.hub.stop()
        self.console.print("demo stopped")
