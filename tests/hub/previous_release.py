"""Fills a hub database through an older edgekit: `PYTHONPATH=OLD_TREE python previous_release.py DB_URL` creates
the database with that tree's `open_database` and stores a few rows of every kind through its models, then prints
JSON: the db module it ran (to show it was the old one) and the plain text of the admin token it made.

Only what the old tree had may be used here: its models, `database_url`, `open_database` and `create_token`.
"""

import json
import sys
import time
from pathlib import Path

from edgekit.hub import db
from edgekit.hub.auth import create_token

DEVICES = ["cam-1", "cam-2", "cam-3"]
BUNDLE_ID = "cd" * 32


def fill(sessions) -> None:
    now = time.time()
    with sessions.begin() as session:
        session.add(
            db.BundleRecord(
                id=BUNDLE_ID,
                name="digits",
                version="1.0.0",
                size=4096,
                profile="x86-64-avx2",
                backend="onnxruntime",
                precision="int8",
                signing_key_id="k1",
                uploaded=now,
                uploaded_by="ci",
                manifest={"name": "digits", "inputs": [1, 64]},
            )
        )
        for n, device in enumerate(DEVICES):
            session.add(
                db.Device(
                    id=device,
                    labels={"site": "door", "n": str(n)},
                    online=False,
                    first_seen=now - 60,
                    last_seen=now - n,
                    agent_version="0.9",
                    profile="x86-64-avx2",
                    runtimes=["ort"],
                    bundle_id=BUNDLE_ID,
                    bundle_label="digits@1.0.0",
                    latency_p50_ms=1.5 + n,
                    fps=30.0,
                    last_seq=100 + n,
                    desired_rev=2,
                    desired={"rev": 2},
                    reported={"ok": True},
                )
            )
            for seq in range(1, 5):
                session.add(
                    db.TelemetrySample(
                        device_id=device,
                        seq=seq,
                        ts=now - 10 + seq,
                        latency_p50_ms=1.25,
                        fps=29.5,
                        inferences=1_000_000 * seq,
                        queue_depth=seq,
                        dropped_frames=7,
                        store_depth=0,
                        bundle="digits@1.0.0",
                    )
                )
            session.add(
                db.ResultRecord(
                    device_id=device, seq=10, ts=now, bundle="digits@1.0.0", latency_ms=2.5, summary={"top": [3, 0.98]}
                )
            )
            session.add(
                db.EventRecord(
                    device_id=device,
                    seq=11,
                    ts=now,
                    type="update",
                    level="info",
                    message=f"{device} updated",
                    data={"from": "0.9"},
                )
            )
        session.add(
            db.TelemetryRollup(
                device_id="cam-1",
                minute=int(now // 60) - 2000,
                samples=60,
                latency_p50_ms=1.0,
                fps=30.0,
                cpu_percent=12.0,
                temperature_c=41.5,
            )
        )
        session.add(db.AuditEntry(ts=now, actor="ci", action="push", detail={"bundle": BUNDLE_ID}))
    with sessions.begin() as session:
        deployment = db.Deployment(
            bundle_id=BUNDLE_ID,
            target="group:site=door",
            canary_percent=10.0,
            wave_percent=50.0,
            failure_threshold=0.2,
            wave_timeout_s=600.0,
            health_checks=20,
            state="completed",
            current_wave=2,
            waves=2,
            created_by="ci",
        )
        session.add(deployment)
        session.flush()
        for device in DEVICES:
            session.add(
                db.DeploymentDevice(
                    deployment_id=deployment.id,
                    device_id=device,
                    wave=1,
                    state="healthy",
                    previous_bundle={"id": "ab" * 32},
                    rev=2,
                    sent_at=now,
                )
            )


def main(url: str) -> None:
    engine, sessions = db.open_database(db.database_url(url, Path(".")))
    fill(sessions)
    token = create_token(sessions, "old-admin", "test", "admin")
    engine.dispose()
    print(json.dumps({"db_module": db.__file__, "token": token}))


if __name__ == "__main__":
    main(sys.argv[1])
