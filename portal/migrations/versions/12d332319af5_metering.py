"""Metering: VM state intervals, hourly usage records, price sheets

Revision ID: 12d332319af5
Revises: c9a1f0e2d3b4
Create Date: 2026-11-23 07:30:45.468729

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '12d332319af5'
down_revision = 'c9a1f0e2d3b4'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('metering_cursor',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('until', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_metering_cursor'))
    )
    op.create_table('usage_records',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('hour', sa.DateTime(timezone=True), nullable=False),
    sa.Column('vm_id', sa.Integer(), nullable=False),
    sa.Column('vm_name', sa.String(length=8), nullable=False),
    sa.Column('owner_id', sa.Integer(), nullable=False),
    sa.Column('owner_name', sa.String(length=64), nullable=False),
    sa.Column('appliance_id', sa.Integer(), nullable=True),
    sa.Column('defined_seconds', sa.Integer(), nullable=False),
    sa.Column('running_seconds', sa.Integer(), nullable=False),
    sa.Column('vcpu_seconds', sa.BigInteger(), nullable=False),
    sa.Column('memory_mb_seconds', sa.BigInteger(), nullable=False),
    sa.Column('disk_gb_seconds', sa.BigInteger(), nullable=False),
    sa.Column('livesync_seconds', sa.Integer(), nullable=False),
    sa.Column('backup_byte_seconds', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_usage_records')),
    sa.UniqueConstraint('vm_id', 'hour', 'owner_id', 'appliance_id', name='uq_usage_vm_hour')
    )
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.create_index('ix_usage_owner_hour', ['owner_id', 'hour'], unique=False)
        batch_op.create_index(batch_op.f('ix_usage_records_hour'), ['hour'], unique=False)

    op.create_table('vm_state_intervals',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('vm_id', sa.Integer(), nullable=False),
    sa.Column('vm_name', sa.String(length=8), nullable=False),
    sa.Column('owner_id', sa.Integer(), nullable=False),
    sa.Column('owner_name', sa.String(length=64), nullable=False),
    sa.Column('appliance_id', sa.Integer(), nullable=True),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('running', sa.Boolean(), nullable=False),
    sa.Column('vcpus', sa.Integer(), nullable=False),
    sa.Column('memory_mb', sa.Integer(), nullable=False),
    sa.Column('disk_gb', sa.Integer(), nullable=False),
    sa.Column('livesync', sa.Boolean(), nullable=False),
    sa.Column('backup_bytes', sa.BigInteger(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('ended_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_vm_state_intervals'))
    )
    with op.batch_alter_table('vm_state_intervals', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_vm_state_intervals_owner_id'), ['owner_id'], unique=False)
        batch_op.create_index('ix_vm_state_intervals_span', ['started_at', 'ended_at'], unique=False)
        batch_op.create_index('ix_vm_state_intervals_vm_end', ['vm_id', 'ended_at'], unique=False)

    op.create_table('price_sheets',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('effective_from', sa.DateTime(timezone=True), nullable=False),
    sa.Column('appliance_id', sa.Integer(), nullable=True),
    sa.Column('vcpu_hour', sa.BigInteger(), nullable=False),
    sa.Column('memory_gb_hour', sa.BigInteger(), nullable=False),
    sa.Column('disk_gb_hour', sa.BigInteger(), nullable=False),
    sa.Column('running_hour', sa.BigInteger(), nullable=False),
    sa.Column('defined_hour', sa.BigInteger(), nullable=False),
    sa.Column('livesync_hour', sa.BigInteger(), nullable=False),
    sa.Column('backup_gb_hour', sa.BigInteger(), nullable=False),
    sa.Column('created_by_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['appliance_id'], ['appliances.id'], name=op.f('fk_price_sheets_appliance_id_appliances'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['created_by_id'], ['users.id'], name=op.f('fk_price_sheets_created_by_id_users'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_price_sheets')),
    sa.UniqueConstraint('effective_from', 'appliance_id', name='uq_price_sheets_from_appliance')
    )
    with op.batch_alter_table('price_sheets', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_price_sheets_effective_from'), ['effective_from'], unique=False)



def downgrade():
    with op.batch_alter_table('price_sheets', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_price_sheets_effective_from'))

    op.drop_table('price_sheets')
    with op.batch_alter_table('vm_state_intervals', schema=None) as batch_op:
        batch_op.drop_index('ix_vm_state_intervals_vm_end')
        batch_op.drop_index('ix_vm_state_intervals_span')
        batch_op.drop_index(batch_op.f('ix_vm_state_intervals_owner_id'))

    op.drop_table('vm_state_intervals')
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_usage_records_hour'))
        batch_op.drop_index('ix_usage_owner_hour')

    op.drop_table('usage_records')
    op.drop_table('metering_cursor')
