"""The agent over mqtts:// with a client certificate, against a real Mosquitto that requires one."""

import datetime
import ipaddress
import os
import shutil
import ssl
import subprocess
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from brokers import NO_MOSQUITTO, wait_until
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgekit.hub.broker import accepts_connections, free_port, mosquitto_binary
from edgekit.mqtt import TlsFiles
from edgekit.protocol import Status

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason=NO_MOSQUITTO)


def _issue(name: str, issuer_key, issuer_name, key, ca: bool, ip: str | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ip:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, name: str, cert: x509.Certificate, key) -> tuple[Path, Path]:
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return cert_path, key_path


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate for dev-1, all signed by the CA."""
    folder = tmp_path / "pki"
    folder.mkdir()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("edgekit test CA", ca_key, None, ca_key, ca=True)
    files = dict(zip(("ca", "ca_key"), _write(folder, "ca", ca, ca_key), strict=True))
    for name, ip in (("server", "127.0.0.1"), ("dev-1", None)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(name, ca_key, ca.subject, key, ca=False, ip=ip)
        files[name], files[f"{name}_key"] = _write(folder, name, cert, key)
    return files


@pytest.fixture
def tls_broker(tmp_path: Path, pki: dict[str, Path]):
    """Mosquitto with one TLS listener that requires a client certificate from the test CA."""
    port = free_port()
    config = tmp_path / "mosquitto.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "require_certificate true",
             f"cafile {pki['ca']}", f"certfile {pki['server']}", f"keyfile {pki['server_key']}",
             f"log_dest file {tmp_path / 'mosquitto.log'}"]  # fmt: skip
    if os.geteuid() == 0:
        lines.append("user root")
    config.write_text("\n".join(lines) + "\n")
    process = subprocess.Popen([str(mosquitto_binary()), "-c", str(config)], stderr=subprocess.DEVNULL)
    wait_until(lambda: accepts_connections("127.0.0.1", port), 10, "the TLS broker to listen")
    yield port
    process.terminate()
    process.wait(timeout=10)
    shutil.rmtree(tmp_path / "pki", ignore_errors=True)


def _tls_subscriber(port: int, pki: dict[str, Path], with_cert: bool) -> tuple[mqtt.Client, list, list, list]:
    """(client, messages, connect outcomes, disconnects) of a client subscribed to edgekit/# on every connect."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.tls_set(ca_certs=str(pki["ca"]), certfile=str(pki["dev-1"]) if with_cert else None,
                   keyfile=str(pki["dev-1_key"]) if with_cert else None)  # fmt: skip
    messages, connects, disconnects = [], [], []
    client.on_connect = lambda c, u, f, reason, p: (connects.append(reason), c.subscribe("edgekit/#", qos=1))
    client.on_disconnect = lambda c, u, f, reason, p: disconnects.append(reason)
    client.on_message = lambda c, u, m: messages.append((m.topic, m.payload))
    return client, messages, connects, disconnects


def test_agent_connects_with_a_client_certificate(tls_broker, pki, start_agent, digits_bundle):
    subscriber, messages, _, _ = _tls_subscriber(tls_broker, pki, with_cert=True)
    subscriber.connect("127.0.0.1", tls_broker)
    subscriber.loop_start()
    try:
        broker = type("TlsBroker", (), {"url": f"mqtts://127.0.0.1:{tls_broker}"})()
        tls = TlsFiles(ca=str(pki["ca"]), cert=str(pki["dev-1"]), key=str(pki["dev-1_key"]))
        agent = start_agent(broker, bundle=digits_bundle("1.0.0"), source="synthetic:?fps=5", tls=tls)
        assert agent.link.wait_connected(10)
        wait_until(lambda: any(t.endswith("/results") for t, _ in messages), 10, "results over TLS")
        status = [Status.model_validate_json(p) for t, p in messages if t.endswith("/status")]
        assert status and status[-1].state == "online" and status[-1].bundle.version == "1.0.0"
    finally:
        subscriber.disconnect()
        subscriber.loop_stop()


def test_a_client_without_certificate_is_refused(tls_broker, pki):
    client, _, connects, disconnects = _tls_subscriber(tls_broker, pki, with_cert=False)
    try:
        client.connect("127.0.0.1", tls_broker)
    except (ssl.SSLError, OSError):
        return  # refused in the TLS handshake (TLS 1.2), before any MQTT
    client.loop_start()  # TLS 1.3: the server rejects the certificate-less client right after the handshake
    try:
        wait_until(lambda: connects or disconnects, 10, "the broker to answer the certificate-less client")
    finally:
        client.loop_stop()
    assert disconnects, f"the broker did not drop the connection: {connects}"
    assert not any(not reason.is_failure for reason in connects), f"connected without a certificate: {connects}"
