"""`edgekit fleet simulate`: N real agents in one process — each with its own MQTT connection, outbox, bundle
store and inference loop — for tests, benchmarks and demos without N devices.

What is shared is only the process: each agent runs with one inference thread and small backoffs.
"""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.agents.agent import Agent, AgentSettings
from edgekit.mqtt import Backoff

STOPPERS = 32


@dataclass(frozen=True)
class FleetSettings:
    count: int
    broker: str
    data_dir: Path
    trust_key: Path | None = None
    bundle: Path | None = None
    source: str | dict[str, Any] | None = None
    prefix: str = "sim"
    telemetry_s: float = 5.0
    profile: str | None = None
    # Each device's own broker URL (with its login, from `edgekit hub enroll`), by id; `broker` for the others.
    brokers: dict[str, str] | None = None
    hub_key: Path | None = None  # the hub's public key: desired states are signed by it
    trust_version: int = 0


def device_ids(prefix: str, count: int) -> list[str]:
    width = len(str(count - 1))
    return [f"{prefix}-{index:0{width}d}" for index in range(count)]


class Fleet:
    def __init__(self, settings: FleetSettings) -> None:
        self.settings = settings
        self.agents = [
            Agent(
                AgentSettings(
                    device_id=device_id,
                    broker=(settings.brokers or {}).get(device_id, settings.broker),
                    data_dir=settings.data_dir / device_id,
                    trust_key=settings.trust_key,
                    hub_key=settings.hub_key,
                    trust_version=settings.trust_version,
                    bundle=settings.bundle,
                    source=settings.source,
                    profile=settings.profile,
                    threads=1,
                    telemetry_s=settings.telemetry_s,
                    backoff=Backoff(initial_s=0.5, max_s=10.0),
                )
            )
            for device_id in device_ids(settings.prefix, settings.count)
        ]

    def start(self) -> None:
        starters = [threading.Thread(target=agent.start) for agent in self.agents]
        for thread in starters:
            thread.start()
        for thread in starters:
            thread.join()

    def wait_connected(self, timeout: float) -> int:
        """How many agents are connected once all are, or when `timeout` runs out."""
        deadline = time.monotonic() + timeout
        for agent in self.agents:
            agent.link.wait_connected(max(0.0, deadline - time.monotonic()))
        return sum(agent.link.connected for agent in self.agents)

    def stop(self) -> None:
        # A bounded pool, not a thread per agent: with hundreds of busy agents, starting hundreds more threads
        # crawls under the GIL, while each agent stopped frees CPU for the next.
        with ThreadPoolExecutor(max_workers=STOPPERS) as pool:
            list(pool.map(lambda agent: agent.stop(), self.agents))

    def __enter__(self) -> "Fleet":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
