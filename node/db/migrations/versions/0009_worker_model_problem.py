"""workers.model_problem: why a worker takes no jobs (its model cannot be used), for /healthz and the dashboard

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('workers') as batch:
        batch.add_column(sa.Column('model_problem', sa.Text(), nullable=False, server_default=''))


def downgrade() -> None:
    with op.batch_alter_table('workers') as batch:
        batch.drop_column('model_problem')
