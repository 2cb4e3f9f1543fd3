"""Hub replicas on one database: leases (one rollout controller, one retention pass at a time), settings every
replica shares (the cookie key), and a device in at most one running deployment, enforced by a unique index.

Members of running deployments are marked active. A device that an older hub put into two running deployments
at once (the race this revision closes) stays active in the newest one only, so the index can be built.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

MARK_ACTIVE = """
UPDATE deployment_devices SET active = true
WHERE deployment_id IN (SELECT id FROM deployments WHERE state = 'running')
  AND NOT EXISTS (
    SELECT 1 FROM deployment_devices AS newer JOIN deployments ON deployments.id = newer.deployment_id
    WHERE deployments.state = 'running' AND newer.device_id = deployment_devices.device_id
      AND newer.deployment_id > deployment_devices.deployment_id)
"""


def upgrade() -> None:
    op.create_table(
        "leases",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("holder", sa.String(length=64), nullable=False),
        sa.Column("expires", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "hub_settings",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.add_column("deployment_devices", sa.Column("active", sa.Boolean(), nullable=True))
    op.execute(MARK_ACTIVE)
    op.create_index("ux_deployment_devices_active_device", "deployment_devices", ["device_id"], unique=True,
                    sqlite_where=sa.text("active"), postgresql_where=sa.text("active"))  # fmt: skip
