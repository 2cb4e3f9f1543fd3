"""The agent against a real broker (Mosquitto and amqtt): inputs in, results and telemetry out, updates applied."""

import json
import subprocess
import sys
import time

import numpy as np
from agent_helpers import desired_for, sequenced, signed
from brokers import Subscriber, publish, publish_many, wait_until

from edgekit.agents import link as link_module
from edgekit.protocol import Event, ReportedState, Result, Status, Telemetry, device_topic

TOPICS = "edgekit/v1/dev-1/#"


def _events(sub: Subscriber) -> list[Event]:
    return [Event.model_validate_json(p) for _, p in sub.messages("edgekit/v1/dev-1/events")]


def test_mqtt_input_gives_results_telemetry_and_status(broker, start_agent, digits_bundle, digits):
    with Subscriber(broker.url, TOPICS) as sub:
        start_agent(broker, bundle=digits_bundle("1.0.0"), source="mqtt:")
        status = Status.model_validate_json(sub.wait_count(1, "edgekit/v1/dev-1/status", timeout=10)[0][1])
        assert status.state == "online" and status.bundle.version == "1.0.0"
        test = np.load(digits / "test.npz")
        images, labels = test["image"], test["labels"]
        inputs = [json.dumps({"values": image.ravel().tolist()}) for image in images[:10]]
        publish_many(broker.url, [(device_topic("dev-1", "input"), payload) for payload in inputs])
        # A reconnect on a loaded machine may deliver a result twice: count each seq once, in seq order.
        distinct = lambda: sequenced(sub.messages("edgekit/v1/dev-1/results"), Result)  # noqa: E731
        wait_until(lambda: len(distinct()) >= 10, 30, "10 distinct results")
        results = distinct()[:10]
        predicted = [r.top[0].label for r in results]
        assert sum(p == t for p, t in zip(predicted, labels[:10], strict=True)) >= 9
        telemetry = [Telemetry.model_validate_json(p) for _, p in sub.wait_count(2, "edgekit/v1/dev-1/telemetry")]
        assert all(t.bundle == "digits@1.0.0" for t in telemetry)
        sub.wait_for(lambda ms: sum(Telemetry.model_validate_json(p).inferences for _, p in ms) >= 10,
                     topic_filter="edgekit/v1/dev-1/telemetry")  # fmt: skip


def test_update_over_mqtt_switches_and_reports(broker, start_agent, served, digits_bundle):
    new = digits_bundle("1.1.0")
    served.add(new)
    with Subscriber(broker.url, TOPICS) as sub:
        agent = start_agent(broker, bundle=digits_bundle("1.0.0"), source="synthetic:?fps=50")
        desired = desired_for(new, rev=1, version="1.1.0", health_checks=5)
        publish(broker.url, device_topic("dev-1", "config/desired"), signed(desired, "dev-1"), retain=True)
        sub.wait_for(lambda ms: any(b'"config.applied"' in p for _, p in ms), timeout=20, topic_filter=TOPICS)
        sub.wait_for(lambda ms: any(b'"rev":1' in p for _, p in ms), topic_filter="edgekit/v1/dev-1/config/reported")
        kinds = [e.type for e in _events(sub)]
        for step in ("update.started", "update.downloaded", "update.selftest", "update.activated", "update.healthy"):
            assert step in kinds, kinds
        reported = ReportedState.model_validate_json(sub.messages("edgekit/v1/dev-1/config/reported")[-1][1])
        assert reported.rev == 1 and reported.bundle.version == "1.1.0" and reported.update.state == "healthy"
        assert reported.previous_bundle.version == "1.0.0"
        assert agent.runner.model.bundle.manifest.version == "1.1.0"

        # The hub, having missed that report, sends rev 1 again: the device reports once more, and updates nothing.
        reports = len(sub.messages("edgekit/v1/dev-1/config/reported"))
        publish(broker.url, device_topic("dev-1", "config/desired"), signed(desired, "dev-1"), retain=True)
        sub.wait_count(reports + 1, "edgekit/v1/dev-1/config/reported")
        again = ReportedState.model_validate_json(sub.messages("edgekit/v1/dev-1/config/reported")[-1][1])
        assert (again.rev, again.bundle.version, again.update.state) == (1, "1.1.0", "healthy")
        assert [e.type for e in _events(sub)].count("update.started") == 1


def test_subscriptions_that_stopped_delivering_are_renewed(broker, start_agent, served, digits_bundle, monkeypatch):
    """A broker that keeps the connection but no longer delivers to the session (nats-server's MQTT after a node is
    lost, nats-io/nats-server#5282): played here by taking the agent's subscriptions away behind its back. Its
    probe does not come back, it subscribes again, and the desired state published meanwhile is applied."""
    monkeypatch.setattr(link_module, "PROBE_S", 0.5)
    monkeypatch.setattr(link_module, "PROBE_WAIT_S", 1.0)
    new = digits_bundle("1.1.0")
    served.add(new)
    agent = start_agent(broker, bundle=digits_bundle("1.0.0"), source="synthetic:?fps=50")
    wait_until(lambda: agent.link.connected, 10, "the agent connected")
    client = agent.link._client
    for topic in ("config/desired", "config/trust", "transfer/chunk", "link/probe"):
        client.unsubscribe(device_topic("dev-1", topic))
    desired = desired_for(new, rev=1, version="1.1.0", health_checks=5)
    publish(broker.url, device_topic("dev-1", "config/desired"), signed(desired, "dev-1"), retain=True)
    wait_until(lambda: agent.link.resubscribes >= 1, 10, "the agent to subscribe again")
    wait_until(lambda: agent.runner.model.bundle.manifest.version == "1.1.0", 30, "the update applied")
    resubscribed = agent.link.resubscribes
    time.sleep(2)  # probes now come back: nothing renewed again
    assert agent.link.resubscribes == resubscribed


def test_the_agent_never_imports_the_compiler_stack():
    """`pip install edgekit[agent]` has no onnx/openvino/TVM/TF: importing the agent and its plugins must not need
    them (the runtime a bundle needs is imported only when that bundle loads)."""
    code = (
        "import sys, edgekit.agents.agent, edgekit.agents.fleet, edgekit.cli.agent_cmd\n"
        "from edgekit.agents.sources import sources; from edgekit.agents.runtimes import runtimes\n"
        "sources(); runtimes()\n"
        "print(sorted(m for m in ('onnx', 'openvino', 'nncf', 'tvm', 'tensorflow', 'onnxruntime', 'cv2', 'sklearn')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
