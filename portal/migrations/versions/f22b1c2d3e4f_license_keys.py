"""License key pool: serial keys per appliance, held by at most one VM

Revision ID: f22b1c2d3e4f
Revises: e11a0b1c2d3e
Create Date: 2026-11-23 08:35:00.000000

"""
import sqlalchemy as sa
from alembic import op


# revision identifiers, used by Alembic.
revision = 'f22b1c2d3e4f'
down_revision = 'e11a0b1c2d3e'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('appliances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('license_required', sa.Boolean(), server_default='0', nullable=False))
    op.create_table(
        'license_keys',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('appliance_id', sa.Integer(), nullable=False),
        sa.Column('key', sa.String(length=255), nullable=False),
        sa.Column('vm_id', sa.Integer(), nullable=True),
        sa.Column('added_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['appliance_id'], ['appliances.id'], name=op.f('fk_license_keys_appliance_id_appliances'),
                                ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['vm_id'], ['vms.id'], name=op.f('fk_license_keys_vm_id_vms'), ondelete='SET NULL'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_license_keys')),
        sa.UniqueConstraint('appliance_id', 'key', name='uq_license_keys_key'),
        sa.UniqueConstraint('vm_id', name=op.f('uq_license_keys_vm_id')),
    )
    with op.batch_alter_table('license_keys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_license_keys_appliance_id'), ['appliance_id'], unique=False)


def downgrade():
    with op.batch_alter_table('license_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_license_keys_appliance_id'))
    op.drop_table('license_keys')
    with op.batch_alter_table('appliances', schema=None) as batch_op:
        batch_op.drop_column('license_required')
