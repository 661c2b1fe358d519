"""worker leases: workers on several machines claim jobs and deliveries under a renewed lease

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('workers',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('device', sa.String(length=32), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=False),
    sa.Column('heartbeat_at', sa.DateTime(), nullable=False),
    sa.Column('stopped_at', sa.DateTime(), nullable=True),
    sa.Column('current_job_id', sa.Integer(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name'),
    )
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('worker', sa.String(length=128), nullable=False, server_default=''))
        batch.add_column(sa.Column('lease_expires_at', sa.DateTime(), nullable=True))
    with op.batch_alter_table('deliveries') as batch:
        batch.add_column(sa.Column('worker', sa.String(length=128), nullable=False, server_default=''))
        batch.add_column(sa.Column('lease_expires_at', sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('deliveries') as batch:
        batch.drop_column('lease_expires_at')
        batch.drop_column('worker')
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('lease_expires_at')
        batch.drop_column('worker')
    op.drop_table('workers')
