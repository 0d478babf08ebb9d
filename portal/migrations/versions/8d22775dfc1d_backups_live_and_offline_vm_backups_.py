"""backups: live and offline VM backups with their files

Revision ID: 8d22775dfc1d
Revises: b7c1d2e3f4a5
Create Date: 2026-11-23 01:39:54.310642

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '8d22775dfc1d'
down_revision = 'b7c1d2e3f4a5'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('backups',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('vm_id', sa.Integer(), nullable=False),
    sa.Column('server_id', sa.Integer(), nullable=False),
    sa.Column('disk_id', sa.Integer(), nullable=False),
    sa.Column('path', sa.String(length=1024), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('live', sa.Boolean(), nullable=False),
    sa.Column('checkpoint', sa.String(length=64), nullable=True),
    sa.Column('parent_id', sa.Integer(), nullable=True),
    sa.Column('size_bytes', sa.BigInteger(), nullable=True),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('task_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("kind IN ('full', 'incremental')", name=op.f('ck_backups_kind')),
    sa.CheckConstraint("state IN ('creating', 'ready', 'failed', 'deleting')", name=op.f('ck_backups_state')),
    sa.ForeignKeyConstraint(['disk_id'], ['server_disks.id'], name=op.f('fk_backups_disk_id_server_disks'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['parent_id'], ['backups.id'], name=op.f('fk_backups_parent_id_backups'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['server_id'], ['servers.id'], name=op.f('fk_backups_server_id_servers'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], name=op.f('fk_backups_task_id_tasks'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['vm_id'], ['vms.id'], name=op.f('fk_backups_vm_id_vms'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_backups'))
    )
    with op.batch_alter_table('backups', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_backups_parent_id'), ['parent_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_backups_server_id'), ['server_id'], unique=False)
        batch_op.create_index('ix_backups_vm_created', ['vm_id', 'created_at'], unique=False)

    op.create_table('backup_files',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('backup_id', sa.Integer(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('target', sa.String(length=16), nullable=False),
    sa.Column('path', sa.String(length=1024), nullable=False),
    sa.Column('virtual_size_bytes', sa.BigInteger(), nullable=True),
    sa.Column('size_bytes', sa.BigInteger(), nullable=True),
    sa.Column('sha256', sa.String(length=64), nullable=True),
    sa.ForeignKeyConstraint(['backup_id'], ['backups.id'], name=op.f('fk_backup_files_backup_id_backups'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_backup_files')),
    sa.UniqueConstraint('backup_id', 'position', name='uq_backup_files_pos')
    )
    with op.batch_alter_table('backup_files', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_backup_files_backup_id'), ['backup_id'], unique=False)



def downgrade():
    with op.batch_alter_table('backup_files', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_backup_files_backup_id'))

    op.drop_table('backup_files')
    with op.batch_alter_table('backups', schema=None) as batch_op:
        batch_op.drop_index('ix_backups_vm_created')
        batch_op.drop_index(batch_op.f('ix_backups_server_id'))
        batch_op.drop_index(batch_op.f('ix_backups_parent_id'))

    op.drop_table('backups')
