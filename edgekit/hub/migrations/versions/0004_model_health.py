"""Model health: the newest telemetry's health blocks per device, drift scores per telemetry sample, and health
gates on deployments (a shadow phase, the gates, what they measured)."""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("devices", sa.Column("health", sa.JSON(), nullable=True))
    drift = sa.Column("drift_score", sa.Float(), nullable=True, comment="Telemetry.drift.score (PSI)")
    op.add_column("telemetry", drift)
    # Plain ADD COLUMNs with constant defaults: SQLite takes them without a table copy (and `migrate --sql` works).
    op.add_column("deployments", sa.Column("shadow", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column("deployments", sa.Column("shadow_budget", sa.Float(), nullable=False, server_default="0.25",
                                           comment="DesiredShadow.budget"))  # fmt: skip
    op.add_column("deployments", sa.Column("phase", sa.String(length=8), nullable=False, server_default="waves",
                                           comment="shadow|waves"))  # fmt: skip
    op.add_column("deployments", sa.Column("gates", sa.JSON(), nullable=False, server_default="[]", comment="[Gate]"))
    op.add_column("deployments", sa.Column("min_samples", sa.Integer(), nullable=False, server_default="0",
                                           comment="inferences a gate needs per device"))  # fmt: skip
    op.add_column("deployments", sa.Column("gate_results", sa.JSON(), nullable=False, server_default="[]",
                                           comment="[GateResult]"))  # fmt: skip
    op.add_column("deployment_devices", sa.Column("baseline", sa.JSON(), nullable=True))
    op.add_column("deployment_devices", sa.Column("health", sa.JSON(), nullable=True))


def downgrade() -> None:
    for column in ("health", "baseline"):
        op.drop_column("deployment_devices", column)
    with op.batch_alter_table("deployments") as table:
        for column in ("gate_results", "min_samples", "gates", "phase", "shadow_budget", "shadow"):
            table.drop_column(column)
    op.drop_column("telemetry", "drift_score")
    op.drop_column("devices", "health")
