"""Networks: uplink, DHCP range, MAC -> IP reservations

Revision ID: e11a0b1c2d3e
Revises: c3f4a5b6d7e8
Create Date: 2026-11-23 08:30:00.000000

"""
import sqlalchemy as sa
from alembic import op


# revision identifiers, used by Alembic.
revision = 'e11a0b1c2d3e'
down_revision = 'c3f4a5b6d7e8'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('networks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('uplink', sa.String(length=15), nullable=True))
        batch_op.add_column(sa.Column('dhcp_start', sa.String(length=45), nullable=True))
        batch_op.add_column(sa.Column('dhcp_end', sa.String(length=45), nullable=True))
    op.create_table(
        'network_reservations',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('network_id', sa.Integer(), nullable=False),
        sa.Column('mac', sa.String(length=17), nullable=False),
        sa.Column('ip', sa.String(length=45), nullable=False),
        sa.ForeignKeyConstraint(['network_id'], ['networks.id'], name=op.f('fk_network_reservations_network_id_networks'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_network_reservations')),
        sa.UniqueConstraint('network_id', 'ip', name='uq_reservations_ip'),
        sa.UniqueConstraint('network_id', 'mac', name='uq_reservations_mac'),
    )
    with op.batch_alter_table('network_reservations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_network_reservations_network_id'), ['network_id'], unique=False)


def downgrade():
    with op.batch_alter_table('network_reservations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_network_reservations_network_id'))
    op.drop_table('network_reservations')
    with op.batch_alter_table('networks', schema=None) as batch_op:
        batch_op.drop_column('dhcp_end')
        batch_op.drop_column('dhcp_start')
        batch_op.drop_column('uplink')
