"""Service catalog: offerings and who may order them

Revision ID: 8b3bc13c751c
Revises: 12d332319af5
Create Date: 2026-11-23 07:35:37.383108

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '8b3bc13c751c'
down_revision = '12d332319af5'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('offerings',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('appliance_id', sa.Integer(), nullable=False),
    sa.Column('memory_mb', sa.Integer(), nullable=False),
    sa.Column('vcpus', sa.Integer(), nullable=False),
    sa.Column('backup', sa.String(length=8), nullable=False),
    sa.Column('monthly_price', sa.BigInteger(), nullable=False),
    sa.Column('order_roles', sa.String(length=32), nullable=False),
    sa.Column('published', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("backup IN ('none', 'daily', 'weekly')", name=op.f('ck_offerings_backup')),
    sa.CheckConstraint('memory_mb > 0 AND vcpus > 0', name=op.f('ck_offerings_sizing')),
    sa.ForeignKeyConstraint(['appliance_id'], ['appliances.id'], name=op.f('fk_offerings_appliance_id_appliances'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_offerings')),
    sa.UniqueConstraint('name', name=op.f('uq_offerings_name'))
    )
    with op.batch_alter_table('offerings', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_offerings_appliance_id'), ['appliance_id'], unique=False)

    op.create_table('offering_users',
    sa.Column('offering_id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['offering_id'], ['offerings.id'], name=op.f('fk_offering_users_offering_id_offerings'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_offering_users_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('offering_id', 'user_id', name=op.f('pk_offering_users'))
    )


def downgrade():
    op.drop_table('offering_users')
    with op.batch_alter_table('offerings', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_offerings_appliance_id'))

    op.drop_table('offerings')
