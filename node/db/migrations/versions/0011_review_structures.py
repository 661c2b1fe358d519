"""reviews.structures: each auto structure found by name in a reviewed set, with its figures, for rtnode reviews

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-10
"""

import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('reviews') as batch:
        batch.add_column(sa.Column('structures', sa.JSON(), nullable=False, server_default='[]'))


def downgrade() -> None:
    with op.batch_alter_table('reviews') as batch:
        batch.drop_column('structures')
