"""backup schedules and scheduled backups

Revision ID: 7e85c5f36f8e
Revises: 8d22775dfc1d
Create Date: 2026-11-23 07:16:57.615861

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '7e85c5f36f8e'
down_revision = '8d22775dfc1d'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('backup_schedules',
    sa.Column('vm_id', sa.Integer(), nullable=False),
    sa.Column('period', sa.String(length=8), nullable=False),
    sa.Column('hour', sa.Integer(), nullable=False),
    sa.Column('weekday', sa.Integer(), nullable=False),
    sa.Column('keep', sa.Integer(), nullable=False),
    sa.Column('next_run_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_task_id', sa.Integer(), nullable=True),
    sa.Column('last_note', sa.Text(), nullable=True),
    sa.CheckConstraint("period IN ('daily', 'weekly')", name=op.f('ck_backup_schedules_period')),
    sa.CheckConstraint('hour BETWEEN 0 AND 23', name=op.f('ck_backup_schedules_hour_range')),
    sa.CheckConstraint('keep BETWEEN 1 AND 100', name=op.f('ck_backup_schedules_keep_range')),
    sa.ForeignKeyConstraint(['last_task_id'], ['tasks.id'], name=op.f('fk_backup_schedules_last_task_id_tasks'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['vm_id'], ['vms.id'], name=op.f('fk_backup_schedules_vm_id_vms'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('vm_id', name=op.f('pk_backup_schedules'))
    )
    with op.batch_alter_table('backup_schedules', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_backup_schedules_next_run_at'), ['next_run_at'], unique=False)

    with op.batch_alter_table('backups', schema=None) as batch_op:
        batch_op.add_column(sa.Column('scheduled', sa.Boolean(), nullable=False, server_default=sa.false()))



def downgrade():
    with op.batch_alter_table('backups', schema=None) as batch_op:
        batch_op.drop_column('scheduled')

    with op.batch_alter_table('backup_schedules', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_backup_schedules_next_run_at'))

    op.drop_table('backup_schedules')
