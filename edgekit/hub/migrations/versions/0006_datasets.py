"""Datasets of inputs captured on devices (docs/datasets.md): `datasets` with their retention limits, the samples
(content-addressed, bytes in the database like bundle parts), and the chunks of samples still being uploaded."""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "datasets",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("created", sa.Float(), nullable=False),
        sa.Column("samples", sa.BigInteger(), nullable=False),
        sa.Column("stored_bytes", sa.BigInteger(), nullable=False),
        sa.Column("dropped", sa.BigInteger(), nullable=False, comment="samples removed by retention, oldest first"),
        sa.Column("max_samples", sa.BigInteger(), nullable=False),
        sa.Column("max_bytes", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "dataset_samples",
        sa.Column("dataset", sa.String(length=64), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("ts", sa.Float(), nullable=False, comment="when the source gave it (device clock)"),
        sa.Column("received", sa.Float(), nullable=False),
        sa.Column("bundle", sa.String(length=160), nullable=False),
        sa.Column("bundle_id", sa.String(length=64), nullable=False),
        sa.Column("input_name", sa.String(length=128), nullable=False),
        sa.Column("format", sa.String(length=8), nullable=False, comment="png|npy"),
        sa.Column("reason", sa.String(length=16), nullable=False, comment="low_confidence|disagreement|random"),
        sa.Column("output", sa.JSON(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("label", sa.Integer(), nullable=True),
        sa.Column("labelled_by", sa.String(length=64), nullable=True),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["dataset"], ["datasets.name"]),
        sa.PrimaryKeyConstraint("dataset", "sha256"),
    )
    op.create_index("ix_dataset_samples_device_id", "dataset_samples", ["device_id"])
    op.create_index("ix_dataset_samples_received", "dataset_samples", ["received"])
    op.create_table(
        "sample_chunks",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("sample", sa.String(length=64), nullable=False),
        sa.Column("index", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("received", sa.Float(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "sample", "index"),
    )
    op.create_index("ix_sample_chunks_received", "sample_chunks", ["received"])


def downgrade() -> None:
    op.drop_table("sample_chunks")
    op.drop_table("dataset_samples")
    op.drop_table("datasets")
