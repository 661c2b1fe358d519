"""routes: the route a series was given (or why none took it), and each job's route, models, destinations and mode

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('series') as batch:
        batch.add_column(sa.Column('route', sa.String(64), nullable=True))
        batch.add_column(sa.Column('route_reason', sa.Text(), nullable=False, server_default=''))
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('route', sa.String(64), nullable=True))
        batch.add_column(sa.Column('models', sa.JSON(), nullable=True))
        batch.add_column(sa.Column('destinations', sa.JSON(), nullable=True))
        batch.add_column(sa.Column('mode', sa.String(8), nullable=False, server_default='live'))


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        for column in ('mode', 'destinations', 'models', 'route'):
            batch.drop_column(column)
    with op.batch_alter_table('series') as batch:
        batch.drop_column('route_reason')
        batch.drop_column('route')
