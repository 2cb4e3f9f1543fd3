"""Shadow evaluation on the device (agents/shadow.py, Updater.set_shadow) in a whole agent on an in-memory link:
real signed bundles, real ONNX Runtime sessions, the hub's BundleServer answering chunk requests.

A shadow is prepared like an update (download, signature, hashes, self-test) and never switched to; it runs on a
sample of live inputs within its CPU budget and its agreement is reported; one that cannot be verified is refused
and the active model runs on alone; a restart brings it back from the installed copy."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from agent_helpers import desired_for, signed
from helpers import compile_bundle, with_extra_work, with_permuted_classes

from edgekit.agents.agent import Agent
from edgekit.agents.memory import MemoryLink
from edgekit.agents.shadow import box_agreement, cosine
from edgekit.bundle import sha256_file
from edgekit.protocol import DesiredShadow, DesiredState, Detection, ReportedState, Topic, device_topic
from edgekit.signing import generate_keypair

DEVICE = "dev-1"
REPORTED = device_topic(DEVICE, Topic.REPORTED)
TIMEOUT_S = 30.0
SOURCE = "synthetic:?fps=50"


def _box(x: float, label: int = 1) -> Detection:
    return Detection(box=[x, 0, x + 10, 10], score=0.9, label=label)


def test_boxes_agree_when_matched_one_to_one_by_class_and_overlap() -> None:
    assert box_agreement([], []) == 1
    assert box_agreement([_box(0)], [_box(1)]) == 1  # IoU 0.82
    assert box_agreement([_box(0)], [_box(0, label=2)]) == 0
    assert box_agreement([_box(0), _box(100)], [_box(0)]) == 0.5
    assert box_agreement([_box(0)], [_box(0), _box(1)]) == 0.5  # one box cannot match two


def test_cosine_of_raw_outputs() -> None:
    a = np.array([[1.0, 2.0, 3.0]])
    assert cosine(a, a * 2) == pytest.approx(1) and cosine(a, -a) == 0 and cosine(a, np.ones(4)) == 0


@pytest.fixture(scope="module")
def shadow_bundles(small_cnn_model: Path, small_cnn_calibration: Path, signing_keys: tuple[Path, Path],
                   tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:  # fmt: skip
    """The small CNN as cnn 1.0.0 and 1.1.0 (the same model), a class-rolled 1.1.0, a slow 1.2.0, and 1.1.0 signed
    by a key the device does not trust."""
    folder = tmp_path_factory.mktemp("shadow-bundles")
    stranger, _ = generate_keypair(folder / "stranger")

    def build(model: Path, version: str, name: str, key: Path = signing_keys[0]) -> Path:
        return compile_bundle(model, small_cnn_calibration, key, version, folder / name, "cnn")

    damaged = with_permuted_classes(small_cnn_model, folder / "damaged.onnx", classes=10)
    slow = with_extra_work(small_cnn_model, folder / "slow.onnx", size=1024, rounds=4)
    return {"v1": build(small_cnn_model, "1.0.0", "v1.ekb"), "same": build(small_cnn_model, "1.1.0", "same.ekb"),
            "damaged": build(damaged, "1.1.0", "damaged.ekb"), "slow": build(slow, "1.2.0", "slow.ekb"),
            "stranger": build(small_cnn_model, "1.1.0", "stranger.ekb", stranger)}  # fmt: skip


def _shadow_desired(v1: Path, shadow: Path, rev: int, version: str, **policy) -> DesiredState:
    desired = desired_for(v1, rev=rev, version="1.0.0", name="cnn")
    target = desired_for(shadow, rev=rev, version=version, name="cnn").bundle
    return desired.model_copy(update={"shadow": DesiredShadow(bundle=target, **policy)})


def _reported(link: MemoryLink) -> ReportedState:
    return ReportedState.model_validate_json(link.messages(REPORTED)[-1][1])


def _wait_shadow(link: MemoryLink, state: str, rev: int) -> ReportedState:
    def there(_) -> bool:
        reported = _reported(link)
        return reported.rev == rev and reported.shadow is not None and reported.shadow.state == state

    link.wait_for(there, TIMEOUT_S, REPORTED)
    return _reported(link)


def _start(start_agent: Callable[..., Agent], link: MemoryLink, v1: Path) -> Agent:
    return start_agent(None, link=link, bundle=v1, source=SOURCE)


def _wait_samples(agent: Agent, samples: int) -> None:
    deadline_link = agent.link
    assert isinstance(deadline_link, MemoryLink)
    deadline_link.wait_for(lambda _: agent.runner.shadow is not None and agent.runner.shadow.stats().samples >= samples,
                           TIMEOUT_S)  # fmt: skip


def test_a_shadow_runs_beside_the_active_model_and_reports_its_agreement(
    start_agent, link, served_in_memory, shadow_bundles
):
    v1, same, damaged = shadow_bundles["v1"], shadow_bundles["same"], shadow_bundles["damaged"]
    served_in_memory.add(same)
    served_in_memory.add(damaged)
    agent = _start(start_agent, link, v1)
    link.deliver(device_topic(DEVICE, Topic.DESIRED), signed(_shadow_desired(v1, same, 1, "1.1.0"), DEVICE))
    reported = _wait_shadow(link, "running", rev=1)
    assert reported.shadow.bundle.id == sha256_file(same) and reported.bundle.id == sha256_file(v1)
    _wait_samples(agent, 20)
    stats = agent.telemetry.fields()["shadow"]
    assert stats.metric == "top1" and stats.agreement == 1.0 and stats.errors == 0 and stats.disagreements == []
    assert stats.active == sha256_file(v1) and stats.latency_p95_ms is not None
    assert agent.runner.model.bundle.id == sha256_file(v1), "a shadow is never switched to"
    assert agent.store.record().shadow == sha256_file(same)

    # Another shadow in its place: the damaged model disagrees on every input, and says how.
    link.deliver(device_topic(DEVICE, Topic.DESIRED), signed(_shadow_desired(v1, damaged, 2, "1.1.0"), DEVICE))
    _wait_shadow(link, "running", rev=2)
    _wait_samples(agent, 20)
    stats = agent.telemetry.fields()["shadow"]
    assert stats.bundle == sha256_file(damaged) and stats.agreement == 0.0
    assert stats.disagreements and stats.disagreements[0].active != stats.disagreements[0].shadow
    assert not (agent.settings.data_dir / "bundles" / sha256_file(same)).exists(), "the replaced shadow is kept"

    # No shadow: it stops, its files go, the active model runs on.
    link.deliver(device_topic(DEVICE, Topic.DESIRED), signed(desired_for(v1, rev=3, version="1.0.0", name="cnn"),
                                                             DEVICE))  # fmt: skip
    link.wait_for(lambda _: _reported(link).rev == 3 and _reported(link).shadow is None, TIMEOUT_S, REPORTED)
    assert agent.runner.shadow is None and agent.store.record().shadow is None
    assert not (agent.settings.data_dir / "bundles" / sha256_file(damaged)).exists()


def test_a_shadow_that_cannot_be_verified_is_refused_and_the_active_model_runs_on(
    start_agent, link, served_in_memory, shadow_bundles
):
    v1, stranger = shadow_bundles["v1"], shadow_bundles["stranger"]
    served_in_memory.add(stranger)
    agent = _start(start_agent, link, v1)
    link.deliver(device_topic(DEVICE, Topic.DESIRED), signed(_shadow_desired(v1, stranger, 1, "1.1.0"), DEVICE))
    reported = _wait_shadow(link, "refused", rev=1)
    assert "verification failed" in reported.shadow.detail, reported.shadow
    assert agent.runner.shadow is None and agent.runner.model.bundle.id == sha256_file(v1)
    assert agent.store.record().shadow is None


def test_the_shadow_keeps_to_its_cpu_budget_and_comes_back_after_a_restart(
    start_agent, link, served_in_memory, shadow_bundles
):
    v1, slow = shadow_bundles["v1"], shadow_bundles["slow"]
    served_in_memory.add(slow)
    agent = _start(start_agent, link, v1)
    link.deliver(device_topic(DEVICE, Topic.DESIRED),
                 signed(_shadow_desired(v1, slow, 1, "1.2.0", budget=0.5), DEVICE))  # fmt: skip
    _wait_shadow(link, "running", rev=1)
    _wait_samples(agent, 5)
    shadow = agent.runner.shadow
    stats = shadow.stats()
    assert stats.budget_skipped > stats.samples, stats  # a shadow far slower than the active model waits its turn
    # Within budget: at most half the active model's time, give or take the one inference that crossed the line.
    assert shadow._shadow_s <= 0.5 * shadow._active_s + 2 * stats.latency_p95_ms / 1000

    agent.stop()
    restarted = _start(start_agent, MemoryLink(), v1)
    restarted.link.wait_for(lambda _: restarted.runner.shadow is not None, TIMEOUT_S)
    assert restarted.runner.shadow.model.bundle.id == sha256_file(slow)
