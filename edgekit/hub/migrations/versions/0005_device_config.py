"""Device configuration from the hub: a configuration per device group (`group_configs`), and which version of
each a device was given (`group_config_devices`), so a device that joins a group later (labels changed, or it
enrolled) gets the group's configuration once, and a device's own later change is not overwritten."""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "group_configs",
        sa.Column("selector", sa.String(length=160), nullable=False, comment="LABEL=VALUE or LABEL"),
        sa.Column("config", sa.JSON(), nullable=False, comment="edgekit.hub.config.ConfigChange"),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("updated", sa.Float(), nullable=False),
        sa.Column("updated_by", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("selector"),
    )
    op.create_table(
        "group_config_devices",
        sa.Column("selector", sa.String(length=160), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False, comment="the group_configs.version it was given"),
        sa.PrimaryKeyConstraint("selector", "device_id"),
    )


def downgrade() -> None:
    op.drop_table("group_config_devices")
    op.drop_table("group_configs")
