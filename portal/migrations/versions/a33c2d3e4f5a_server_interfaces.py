"""Servers: their interfaces (NICs and bridges), so networks go only where their uplink exists

Revision ID: a33c2d3e4f5a
Revises: f22b1c2d3e4f
Create Date: 2026-11-23 08:40:00.000000

"""
import sqlalchemy as sa
from alembic import op


# revision identifiers, used by Alembic.
revision = 'a33c2d3e4f5a'
down_revision = 'f22b1c2d3e4f'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('servers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('interfaces_json', sa.Text(), nullable=True))


def downgrade():
    with op.batch_alter_table('servers', schema=None) as batch_op:
        batch_op.drop_column('interfaces_json')
