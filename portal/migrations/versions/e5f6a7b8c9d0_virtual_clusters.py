"""Virtual clusters (Rocks add cluster): a frontend and computes on a private VLAN network

Revision ID: e5f6a7b8c9d0
Revises: d4e5f6a7b8c9
Create Date: 2026-11-23 13:00:00.000000

"""
import sqlalchemy as sa
from alembic import op


# revision identifiers, used by Alembic.
revision = 'e5f6a7b8c9d0'
down_revision = 'd4e5f6a7b8c9'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        'virtual_clusters',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=253), nullable=False),
        sa.Column('public_ip', sa.String(length=45), nullable=False),
        sa.Column('owner_id', sa.Integer(), nullable=False),
        sa.Column('vlan', sa.Integer(), nullable=False),
        sa.Column('network_id', sa.Integer(), nullable=True),
        sa.Column('appliance_id', sa.Integer(), nullable=True),
        sa.Column('compute_memory_mb', sa.Integer(), nullable=False),
        sa.Column('compute_vcpus', sa.Integer(), nullable=False),
        sa.Column('compute_disk_gb', sa.Integer(), nullable=False),
        sa.Column('clone', sa.Boolean(), nullable=False),
        sa.Column('server_ids', sa.String(length=255), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['owner_id'], ['users.id'], name=op.f('fk_virtual_clusters_owner_id_users'),
                                ondelete='RESTRICT'),
        sa.ForeignKeyConstraint(['network_id'], ['networks.id'], name=op.f('fk_virtual_clusters_network_id_networks'),
                                ondelete='SET NULL'),
        sa.ForeignKeyConstraint(['appliance_id'], ['appliances.id'],
                                name=op.f('fk_virtual_clusters_appliance_id_appliances'), ondelete='SET NULL'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_virtual_clusters')),
        sa.UniqueConstraint('name', name=op.f('uq_virtual_clusters_name')),
        sa.UniqueConstraint('public_ip', name=op.f('uq_virtual_clusters_public_ip')),
        sa.UniqueConstraint('vlan', name=op.f('uq_virtual_clusters_vlan')),
    )
    with op.batch_alter_table('virtual_clusters', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_virtual_clusters_owner_id'), ['owner_id'], unique=False)
    op.create_table(
        'cluster_members',
        sa.Column('vm_id', sa.Integer(), nullable=False),
        sa.Column('cluster_id', sa.Integer(), nullable=False),
        sa.Column('role', sa.String(length=8), nullable=False),
        sa.Column('index', sa.Integer(), nullable=False),
        sa.CheckConstraint("role IN ('frontend', 'compute')", name=op.f('ck_cluster_members_role')),
        sa.ForeignKeyConstraint(['vm_id'], ['vms.id'], name=op.f('fk_cluster_members_vm_id_vms'), ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['cluster_id'], ['virtual_clusters.id'],
                                name=op.f('fk_cluster_members_cluster_id_virtual_clusters'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('vm_id', name=op.f('pk_cluster_members')),
        sa.UniqueConstraint('cluster_id', 'role', 'index', name='uq_cluster_members_slot'),
    )
    with op.batch_alter_table('cluster_members', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_cluster_members_cluster_id'), ['cluster_id'], unique=False)


def downgrade():
    with op.batch_alter_table('cluster_members', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_cluster_members_cluster_id'))
    op.drop_table('cluster_members')
    with op.batch_alter_table('virtual_clusters', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_virtual_clusters_owner_id'))
    op.drop_table('virtual_clusters')
