"""reviews: reviewed structure sets matched to their auto-contours

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('reviews',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('instance_id', sa.Integer(), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('approval_status', sa.String(length=16), nullable=False),
    sa.Column('structure_set_label', sa.String(length=64), nullable=False),
    sa.Column('structure_set_date', sa.String(length=8), nullable=False),
    sa.Column('roi_name', sa.String(length=64), nullable=False),
    sa.Column('calling_ae_title', sa.String(length=16), nullable=False),
    sa.Column('dice', sa.Float(), nullable=True),
    sa.Column('hd95_mm', sa.Float(), nullable=True),
    sa.Column('surface_dice', sa.Float(), nullable=True),
    sa.Column('surface_tolerance_mm', sa.Float(), nullable=True),
    sa.Column('auto_volume_cm3', sa.Float(), nullable=True),
    sa.Column('reviewed_volume_cm3', sa.Float(), nullable=True),
    sa.Column('added_cm3', sa.Float(), nullable=True),
    sa.Column('removed_cm3', sa.Float(), nullable=True),
    sa.Column('received_at', sa.DateTime(), nullable=False),
    sa.Column('measured_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['instance_id'], ['instances.id'], name=op.f('fk_reviews_instance_id_instances')),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_reviews_job_id_jobs')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_reviews'))
    )
    with op.batch_alter_table('reviews', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_reviews_instance_id'), ['instance_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_reviews_job_id'), ['job_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_reviews_sop_instance_uid'), ['sop_instance_uid'], unique=False)
        batch_op.create_index(batch_op.f('ix_reviews_status'), ['status'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('reviews', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_reviews_status'))
        batch_op.drop_index(batch_op.f('ix_reviews_sop_instance_uid'))
        batch_op.drop_index(batch_op.f('ix_reviews_job_id'))
        batch_op.drop_index(batch_op.f('ix_reviews_instance_id'))
    op.drop_table('reviews')
