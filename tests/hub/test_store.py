"""Bundle bytes in an S3 bucket (`edgekit hub --bundle-store s3://…`, edgekit.hub.store.S3Store).

No S3 service is reachable here, so the bucket is moto's S3 server: a stand-in that speaks S3's HTTP API on
loopback, talked to by the same boto3 a user's hub runs. The database store is tested with real hubs
(tests/hub/test_downloads.py)."""

import hashlib
import os
import time
from collections.abc import Iterator

import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer

from edgekit.errors import BadInput
from edgekit.hub.broker import free_port
from edgekit.hub.service import HubSettings
from edgekit.hub.store import S3Store


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    settings = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "edgekit-test",
                "AWS_SECRET_ACCESS_KEY": "edgekit-test", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    boto3.client("s3").create_bucket(Bucket="fleet-bundles")
    try:
        yield endpoint
    finally:
        server.stop()


def test_two_hubs_on_one_bucket_serve_what_either_pushed(s3_endpoint, make_hub, cnn_bundles, tmp_path) -> None:
    db = f"sqlite:///{tmp_path / 'shared.sqlite'}"
    a = make_hub(db=db, bundle_store="s3://fleet-bundles/prod")
    b = make_hub(db=db, bundle_store="s3://fleet-bundles/prod")
    pushed, _ = a.registry.add(cnn_bundles["v1"], "test")
    listed = boto3.client("s3").list_objects_v2(Bucket="fleet-bundles")["Contents"]
    assert [(item["Key"], item["Size"]) for item in listed] == [(f"prod/{pushed.id}.ekb", pushed.size)]
    (url,) = b.links.urls(pushed.id, "cam-1", time.time() + 60)
    served = httpx.get(url, timeout=10)
    assert served.status_code == 200 and hashlib.sha256(served.content).hexdigest() == pushed.id

    other, _ = a.registry.add(cnn_bundles["v2"], "test")
    boto3.client("s3").put_object(Bucket="fleet-bundles", Key=f"prod/{other.id}.ekb", Body=os.urandom(100))
    (url,) = b.links.urls(other.id, "cam-1", time.time() + 60)
    assert httpx.get(url, timeout=10).status_code == 404  # replaced in the bucket: never served


def test_a_store_that_is_not_an_s3_url_is_refused_before_anything_starts(tmp_path) -> None:
    for url in ("s3://", "https://bucket", "fleet-bundles"):
        with pytest.raises(BadInput, match="expected s3://BUCKET or s3://BUCKET/PREFIX"):
            HubSettings(data_dir=tmp_path / "hub", bundle_store=url)
    assert not (tmp_path / "hub").exists()
    assert S3Store("s3://fleet-bundles").description == "s3://fleet-bundles"
