"""The hub: embedded or external broker, fleet store, bundle registry, staged rollouts, REST API and dashboard.

Every part is a module here: `db` (SQLAlchemy models), `ingest` (MQTT → database), `registry` (bundles),
`rollouts` (staged deployments), `api` (FastAPI + dashboard), `service` (wires them for `edgekit hub`).
Nothing assumes it is the only hub process: ingest de-duplicates in the database, and the rollout controller
takes a row lock (PostgreSQL) or runs in the one process that owns the SQLite file.
"""
