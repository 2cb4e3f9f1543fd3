"""What keeps the agent's memory down (issue #19): the heap a model load frees goes back to the OS."""

import subprocess
import sys
from collections.abc import Callable
from threading import current_thread

import pytest
from brokers import wait_until

from edgekit.agents import runner as runner_module
from edgekit.agents.agent import Agent
from edgekit.agents.memory import MemoryLink
from edgekit.agents.runner import LoadedModel
from edgekit.agents.runtimes import _Release, _release, get_runtime

# Frees 200 MB of 2 KB blocks but keeps one block in 64, so glibc cannot shrink its heap from the top by itself:
# only malloc_trim hands the free pages between the kept blocks back.
FRAGMENTED_HEAP = """
import psutil
from edgekit.agents.runtimes import release_freed_memory
blocks = [bytes(2000) for _ in range(100_000)]
kept = blocks[::64]
del blocks
before = psutil.Process().memory_info().rss
release_freed_memory()
print((before - psutil.Process().memory_info().rss) // 2**20)
"""


@pytest.mark.skipif(not _release.available, reason="no glibc malloc_trim here: release_freed_memory does nothing")
def test_release_freed_memory_hands_free_heap_back_to_the_os():
    released_mib = subprocess.run([sys.executable, "-c", FRAGMENTED_HEAP], capture_output=True, text=True, check=True)
    assert int(released_mib.stdout) >= 100, released_mib.stdout


def test_agents_switching_together_release_once(monkeypatch):
    """Fifty simulated agents in one process switch within seconds: one pass over the heap serves them all."""
    passes: list[int] = []
    release = _Release()
    monkeypatch.setattr(release, "_trim", passes.append)
    for _ in range(50):
        release()
    assert passes == [0]


def test_memory_is_released_once_after_each_models_first_inference(
    start_agent: Callable[..., Agent], link: MemoryLink, digits_bundle, monkeypatch
):
    releases: list[str] = []  # the thread of each release
    monkeypatch.setattr(runner_module, "release_freed_memory", lambda: releases.append(current_thread().name))
    agent = start_agent(None, link=link, bundle=digits_bundle("1.0.0"), source="synthetic:?fps=50")
    wait_until(lambda: agent.runner.stats.total >= 10, 20, "10 inferences")
    assert releases == ["inference"], "one release, after the first inference, not one per frame"

    # The same bundle loaded anew stands for an update: its first inference releases what its load freed.
    first = agent.runner.model
    manifest = first.bundle.manifest
    session = get_runtime(manifest.runtime).load(first.bundle.root / manifest.entrypoint, manifest.target, 1)
    agent.runner.use_model(LoadedModel(first.bundle, session))
    counted = agent.runner.stats.total
    wait_until(lambda: agent.runner.stats.total >= counted + 10, 20, "10 inferences of the new model")
    assert releases == ["inference", "inference"]
