"""A fake vibration sensor: streams CSV samples over a serial port at a steady rate, with faults injected into
known windows.

The signal is a machine running at about 1,770 rpm, sampled at 1 kHz: the shaft's 1x and 2x orders and a gear
mesh at 8x, each with a little speed and amplitude wander, plus noise. The stream is cut into windows of 128
samples (the model's input); every `--every`-th window carries one fault, in turn:
    impulse   a bearing fault: ringing bursts at 380 Hz, repeating 3.05 times per shaft revolution
    shift     the gear mesh moves 10-30% up in frequency
    clip      the amplitude rises and the sensor saturates at +-1.0

Lines hold 16 samples each (8 lines per window), written every 16 ms; at 4 decimals that is about 8 kB/s,
within 115200 baud.

Run:  python examples/sensor-anomaly/sensor.py --pty               # makes a pseudo-terminal, prints its path
      python examples/sensor-anomaly/sensor.py --port /dev/ttyUSB1  # or writes to a real port (pyserial)
With --pty the stream starts once a reader has opened the port, so its windows line up with the reader's.
"""

import argparse
import json
import os
import sys
import termios
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

RATE_HZ = 1000
WINDOW = 128
SHAFT_HZ = 29.5
ORDERS = ((1.0, 1.0), (2.0, 0.35), (8.0, 0.25))  # (multiple of the shaft speed, amplitude): 1x, 2x, gear mesh
NOISE = 0.05
FAULTS = ("impulse", "shift", "clip")
SEVERITY = {"impulse": (0.15, 1.0), "shift": (0.1, 0.3), "clip": (0.15, 0.8)}  # fault sizes drawn uniformly
SAMPLES_PER_LINE = 16


class Vibration:
    """A continuous vibration signal produced one window at a time; a fault goes into the windows that ask for it.

    Phases carry over between windows, so a reader whose windows overlap or start elsewhere sees no seams."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.phases = self.rng.uniform(0, 2 * np.pi, len(ORDERS))

    def window(self, kind: str = "normal") -> np.ndarray:
        severity = self.rng.uniform(*SEVERITY[kind]) if kind in SEVERITY else 0.0
        samples = self._orders(mesh_shift=severity if kind == "shift" else 0.0)
        samples += self.rng.normal(0, NOISE, WINDOW)
        if kind == "impulse":
            samples += severity * self._bearing_impulses()
        elif kind == "clip":
            samples = np.clip(samples * (1 + severity), -1.0, 1.0)
        return samples.astype(np.float32)

    def _orders(self, mesh_shift: float) -> np.ndarray:
        speed = SHAFT_HZ * (1 + self.rng.normal(0, 0.002))
        t = np.arange(WINDOW) / RATE_HZ
        samples = np.zeros(WINDOW)
        for index, (order, amplitude) in enumerate(ORDERS):
            hz = speed * order * (1 + mesh_shift if index == len(ORDERS) - 1 else 1)
            gain = amplitude * (1 + self.rng.normal(0, 0.1))
            samples += gain * np.sin(2 * np.pi * hz * t + self.phases[index])
            self.phases[index] = (self.phases[index] + 2 * np.pi * hz * WINDOW / RATE_HZ) % (2 * np.pi)
        return samples

    def _bearing_impulses(self) -> np.ndarray:
        period = RATE_HZ / (3.05 * SHAFT_HZ)  # samples between impacts of a rolling element on the defect
        t = np.arange(WINDOW, dtype=np.float64)
        burst = np.zeros(WINDOW)
        for start in np.arange(self.rng.uniform(0, period), WINDOW, period):
            since = np.clip(t - start, 0, None)
            burst += np.where(t >= start, np.exp(-since / 3.0) * np.sin(2 * np.pi * 380 / RATE_HZ * since), 0)
        return burst


def kind_of(index: int, every: int) -> str:
    """Which fault, if any, goes into window `index`: every `every`-th window, cycling through FAULTS."""
    return FAULTS[(index // every) % len(FAULTS)] if index % every == every - 1 else "normal"


def schedule(windows: int, every: int) -> list[str]:
    return [kind_of(index, every) for index in range(windows)]


def csv_lines(samples: np.ndarray) -> list[bytes]:
    rows = samples.reshape(-1, SAMPLES_PER_LINE)
    return [(",".join(f"{v:.4f}" for v in row) + "\n").encode() for row in rows]


def stream(write: Callable[[bytes], object], kinds: list[str] | None, every: int, seed: int) -> None:
    """Write windows as CSV lines, one line every SAMPLES_PER_LINE / RATE_HZ seconds; kinds=None: forever."""
    vibration = Vibration(seed)
    line_s = SAMPLES_PER_LINE / RATE_HZ
    next_line = time.monotonic()
    index = 0
    while kinds is None or index < len(kinds):
        kind = kinds[index] if kinds is not None else kind_of(index, every)
        if kind != "normal":
            print(f"window {index} ({index * WINDOW / RATE_HZ:.3f} s): {kind}", flush=True)
        for line in csv_lines(vibration.window(kind)):
            # Deadlines from one clock, so a slow write does not make the stream drift.
            time.sleep(max(0.0, next_line - time.monotonic()))
            write(line)
            next_line += line_s
        index += 1


def open_pty() -> tuple[int, int, str]:
    """(master, slave, path): the sensor writes to the master; a reader opens the path like a serial port."""
    master, slave = os.openpty()
    return master, slave, os.ttyname(slave)


def wait_for_reader(slave: int) -> None:
    """Until a reader has opened the port: pyserial puts the terminal in raw mode and then flushes its input, so
    anything written before that is lost."""
    while termios.tcgetattr(slave)[3] & termios.ICANON:
        time.sleep(0.05)
    time.sleep(0.3)  # the flush follows raw mode within the same open()


def write_all(fd: int) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    return write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--pty", action="store_true", help="make a pseudo-terminal and print its path")
    where.add_argument("--port", help="a serial port to write to, e.g. /dev/ttyUSB1")
    parser.add_argument("--baud", type=int, default=115200)
    parser.add_argument("--windows", type=int, default=0, help="windows to send, then stop (0: forever)")
    parser.add_argument("--every", type=int, default=4, help="a fault in every N-th window")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--truth", type=Path, help="write each window's kind here as JSON (needs --windows)")
    args = parser.parse_args()
    if args.truth and not args.windows:
        parser.error("--truth needs --windows")
    kinds = schedule(args.windows, args.every) if args.windows else None
    if args.truth:
        args.truth.write_text(json.dumps({"rate_hz": RATE_HZ, "window": WINDOW, "kinds": kinds}))
    if args.port:
        import serial

        with serial.Serial(args.port, args.baud) as port:
            stream(port.write, kinds, args.every, args.seed)
        return
    master, slave, path = open_pty()
    print(f"serial port: {path}", flush=True)
    wait_for_reader(slave)
    stream(write_all(master), kinds, args.every, args.seed)
    print("done; holding the port open until interrupted", flush=True)
    # Closing the master would hang up the reader before it has read the last lines.
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
