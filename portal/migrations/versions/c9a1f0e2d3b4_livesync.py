"""LiveSync: the backup copy's server disk and one livesync row per protected VM

Revision ID: c9a1f0e2d3b4
Revises: 7e85c5f36f8e
Create Date: 2026-11-23 07:30:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = 'c9a1f0e2d3b4'
down_revision = '7e85c5f36f8e'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('livesync',
    sa.Column('vm_id', sa.Integer(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('progress_pct', sa.Integer(), nullable=False),
    sa.Column('bytes_done', sa.BigInteger(), nullable=False),
    sa.Column('bytes_total', sa.BigInteger(), nullable=False),
    sa.Column('broken_since', sa.DateTime(timezone=True), nullable=True),
    sa.Column('broken_reason', sa.Text(), nullable=True),
    sa.Column('home_server_id', sa.Integer(), nullable=True),
    sa.Column('epoch', sa.Integer(), nullable=False),
    sa.Column('export_port', sa.Integer(), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("state IN ('unprotected', 'syncing', 'in_sync', 'broken')", name=op.f('ck_livesync_state')),
    sa.ForeignKeyConstraint(['home_server_id'], ['servers.id'], name=op.f('fk_livesync_home_server_id_servers'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['vm_id'], ['vms.id'], name=op.f('fk_livesync_vm_id_vms'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('vm_id', name=op.f('pk_livesync'))
    )
    with op.batch_alter_table('livesync', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_livesync_home_server_id'), ['home_server_id'], unique=False)

    with op.batch_alter_table('vms', schema=None) as batch_op:
        batch_op.add_column(sa.Column('backup_disk_id', sa.Integer(), nullable=True))
        batch_op.create_foreign_key(batch_op.f('fk_vms_backup_disk_id_server_disks'), 'server_disks', ['backup_disk_id'], ['id'], ondelete='RESTRICT')


def downgrade():
    with op.batch_alter_table('vms', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_vms_backup_disk_id_server_disks'), type_='foreignkey')
        batch_op.drop_column('backup_disk_id')

    with op.batch_alter_table('livesync', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_livesync_home_server_id'))

    op.drop_table('livesync')
