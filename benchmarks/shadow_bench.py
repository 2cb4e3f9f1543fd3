"""What a shadow bundle costs the active model, measured side by side in one run (edgekit.agents.shadow).

A whole agent (in-memory link, no broker) runs MobileNetV2 on its synthetic camera; a second bundle of the same
model is its shadow. In alternating blocks the shadow is off, then on, and each block reads:
- the active model's p50 and p95 (the latency the agent reports per result) and its inferences per second;
- the shadow's share: its summed inference time over the active model's in the block (its budget caps it).
Printed: median ratios on/off over the rounds, at a camera rate (idle time between frames) and at full load (the
source as fast as the model takes frames).

    python benchmarks/shadow_bench.py [--rounds 10] [--budget 0.25] [--camera-fps 15]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from agent_bench import build_bundle
from rich.console import Console
from rich.table import Table

from edgekit.agents.agent import Agent, AgentSettings
from edgekit.agents.memory import MemoryLink
from edgekit.agents.shadow import Shadow
from edgekit.agents.sources import parse_source
from edgekit.bundle import sha256_file
from edgekit.compile.synthetic import mobilenet_v2
from edgekit.protocol import DesiredBundle, DesiredShadow
from edgekit.signing import generate_keypair, load_public_key

console = Console(stderr=True)
BLOCK_S = 2.0
SETTLE_S = 0.3


def block(agent: Agent, shadow: Shadow | None) -> dict:
    """One block with the shadow on or off: the active model's p50/p95 and rate, and the shadow's time share."""
    agent.runner.use_shadow(shadow)
    time.sleep(SETTLE_S)
    agent.runner.stats.take()
    before = (shadow._shadow_s, shadow._active_s) if shadow else (0.0, 0.0)
    time.sleep(BLOCK_S)
    p50, p95, fps, _ = agent.runner.stats.take()
    share = 0.0
    if shadow is not None:
        shadow_s, active_s = shadow._shadow_s - before[0], shadow._active_s - before[1]
        share = shadow_s / active_s if active_s else 0.0
    return {"p50": p50, "p95": p95, "fps": fps, "share": share}


def measure(agent: Agent, shadow: Shadow, source: str, rounds: int) -> dict:
    agent.runner.use_source(parse_source(source))
    block(agent, None)  # warm-up
    ratios: dict[str, list[float]] = {"p50": [], "p95": [], "fps": [], "share": []}
    off_p50 = []
    for _ in range(rounds):
        off, on = block(agent, None), block(agent, shadow)
        ratios["p50"].append(on["p50"] / off["p50"])
        ratios["p95"].append(on["p95"] / off["p95"])
        ratios["fps"].append(on["fps"] / off["fps"])
        ratios["share"].append(on["share"])
        off_p50.append(off["p50"])
    agent.runner.use_shadow(None)
    return {name: statistics.median(values) for name, values in ratios.items()} | {"p50_ms": statistics.median(off_p50)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--budget", type=float, default=0.25, help="The shadow's budget (DesiredShadow.budget)")
    parser.add_argument("--camera-fps", type=float, default=15.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        key, public = generate_keypair(work / "keys")
        model = mobilenet_v2(resolution=224, width=1.0)
        active = build_bundle(work, model, "mobilenet", "1.0.0", key, (1, 3, 224, 224))
        shadow_file = build_bundle(work, model, "mobilenet", "1.1.0", key, (1, 3, 224, 224))
        settings = AgentSettings(device_id="bench-shadow", broker="memory:", data_dir=work / "agent", trust_key=public,
                                 bundle=active, telemetry_s=60.0)  # fmt: skip
        agent = Agent(settings, link=MemoryLink())
        agent.start()
        try:
            agent.store.install(shadow_file, [load_public_key(public)])  # as if downloaded for a desired state
            ref = DesiredBundle(id=sha256_file(shadow_file), name="mobilenet", version="1.1.0",
                                size=shadow_file.stat().st_size)  # fmt: skip
            agent.updater.set_shadow(DesiredShadow(bundle=ref, budget=args.budget), rev=0)
            shadow = agent.runner.shadow
            if shadow is None:
                raise SystemExit(f"the shadow did not start: {agent.updater.shadow_state}")
            camera = measure(agent, shadow, f"synthetic:?fps={args.camera_fps:g}", args.rounds)
            full = measure(agent, shadow, "synthetic:?fps=1000", args.rounds)
        finally:
            agent.stop()
    table = Table(title=f"MobileNetV2-224 fp32 with a shadow of the same model (budget {args.budget:g}), "
                  f"{args.rounds} rounds of {BLOCK_S:g} s off / on")  # fmt: skip
    for column in ("source", "active p50 off", "p50 on/off", "p95 on/off", "inferences/s on/off", "shadow time share"):
        table.add_column(column)
    for name, figures in ((f"camera {args.camera_fps:g} fps", camera), ("full load", full)):
        table.add_row(name, f"{figures['p50_ms']:.2f} ms", f"{figures['p50']:.3f}x", f"{figures['p95']:.3f}x",
                      f"{figures['fps']:.3f}x", f"{figures['share']:.3f}")  # fmt: skip
    Console().print(table)


if __name__ == "__main__":
    main()
