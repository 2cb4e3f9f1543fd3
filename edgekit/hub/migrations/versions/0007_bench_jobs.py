"""Benchmark jobs (`bench_jobs`): candidate bundles timed on fleet devices without activating them
(edgekit.hub.bench, docs/measure.md)."""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bench_jobs",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("bundle_id", sa.String(length=64), nullable=False),
        sa.Column("created", sa.Float(), nullable=False),
        sa.Column(
            "device_seq", sa.BigInteger(), nullable=False, comment="the device's last stored seq when it was sent"
        ),
        sa.Column("expires", sa.Float(), nullable=False, comment="no answer by then: failed"),
        sa.Column("state", sa.String(length=16), nullable=False, comment="running|done|failed"),
        sa.Column("result", sa.JSON(), nullable=True, comment="edgekit.protocol.BenchResult"),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_bench_jobs_device_id"), "bench_jobs", ["device_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_bench_jobs_device_id"), table_name="bench_jobs")
    op.drop_table("bench_jobs")
