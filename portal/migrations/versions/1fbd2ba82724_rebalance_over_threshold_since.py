"""Rebalancing: since when a server is over a threshold

Revision ID: 1fbd2ba82724
Revises: 8b3bc13c751c
Create Date: 2026-11-23 07:38:33.105258

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '1fbd2ba82724'
down_revision = '8b3bc13c751c'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('servers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('over_threshold_since', sa.DateTime(timezone=True), nullable=True))



def downgrade():
    with op.batch_alter_table('servers', schema=None) as batch_op:
        batch_op.drop_column('over_threshold_since')

