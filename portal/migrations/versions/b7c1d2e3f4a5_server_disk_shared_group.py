"""server disks: shared_group (storage verified as shared between servers)

Revision ID: b7c1d2e3f4a5
Revises: 7985ef2887b8
Create Date: 2026-11-23 12:00:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = 'b7c1d2e3f4a5'
down_revision = '7985ef2887b8'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('server_disks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('shared_group', sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f('ix_server_disks_shared_group'), ['shared_group'], unique=False)


def downgrade():
    with op.batch_alter_table('server_disks', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_server_disks_shared_group'))
        batch_op.drop_column('shared_group')
