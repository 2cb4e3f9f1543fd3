"""The hub: embedded or external broker, fleet store, bundle registry, staged rollouts, REST API and dashboard.

Every part is a module here: `db` (SQLAlchemy models), `ingest` (MQTT → database), `link` (the hub's MQTT client),
`registry` (bundles), `rollouts` (staged deployments), `retention` (telemetry rollups), `alerts` and `live` (what
the dashboard shows), `app` (the FastAPI app and the lifespan that runs the workers) with `schemas`, `deps` and
`routes/`, and `service` (the `Hub` that holds them for `edgekit hub`).
Nothing assumes it is the only hub process: ingest de-duplicates in the database, the rollout driver and retention
work only in the process holding their lease (`leases`), and the driver only ever changes a deployment that is
still running.
"""
