"""Attributes (global, appliance, OS type, VM) for lights-out installs; appliances' OS type and cloud-init flag

Revision ID: d4e5f6a7b8c9
Revises: a33c2d3e4f5a
Create Date: 2026-11-23 12:35:00.000000

"""
import sqlalchemy as sa
from alembic import op


# revision identifiers, used by Alembic.
revision = 'd4e5f6a7b8c9'
down_revision = 'a33c2d3e4f5a'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('appliances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('os_type', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('cloud_init', sa.Boolean(), server_default='0', nullable=False))
    op.create_table(
        'attributes',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('scope', sa.String(length=16), nullable=False),
        sa.Column('target', sa.String(length=32), nullable=False),
        sa.Column('appliance_id', sa.Integer(), nullable=True),
        sa.Column('vm_id', sa.Integer(), nullable=True),
        sa.Column('key', sa.String(length=64), nullable=False),
        sa.Column('value', sa.Text(), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("scope IN ('global', 'appliance', 'os', 'vm')", name=op.f('ck_attributes_scope')),
        sa.ForeignKeyConstraint(['appliance_id'], ['appliances.id'], name=op.f('fk_attributes_appliance_id_appliances'),
                                ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['vm_id'], ['vms.id'], name=op.f('fk_attributes_vm_id_vms'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_attributes')),
        sa.UniqueConstraint('scope', 'target', 'key', name='uq_attributes_key'),
    )
    with op.batch_alter_table('attributes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_attributes_appliance_id'), ['appliance_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_attributes_vm_id'), ['vm_id'], unique=False)


def downgrade():
    with op.batch_alter_table('attributes', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_attributes_vm_id'))
        batch_op.drop_index(batch_op.f('ix_attributes_appliance_id'))
    op.drop_table('attributes')
    with op.batch_alter_table('appliances', schema=None) as batch_op:
        batch_op.drop_column('cloud_init')
        batch_op.drop_column('os_type')
