"""Bundle bytes in the database (`bundle_parts`), so that every hub replica can serve every bundle.

Bundles pushed to an older hub exist only as files in that hub's `<data>/bundles`; the registry copies them into
the database when it starts (`edgekit.hub.registry.Registry.store_local_files`), which a migration cannot do: it
does not know the data dir.
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bundle_parts",
        sa.Column("bundle_id", sa.String(length=64), nullable=False),
        sa.Column("part", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["bundle_id"], ["bundles.id"]),
        sa.PrimaryKeyConstraint("bundle_id", "part"),
    )
