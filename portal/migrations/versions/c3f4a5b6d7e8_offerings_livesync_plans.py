"""Service catalog: offerings may come with LiveSync (with or without automatic failover)

Revision ID: c3f4a5b6d7e8
Revises: a11e0c7d2b91
Create Date: 2026-11-23 08:06:00.000000

"""
from alembic import op


# revision identifiers, used by Alembic.
revision = 'c3f4a5b6d7e8'
down_revision = 'a11e0c7d2b91'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('offerings', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('ck_offerings_backup'), type_='check')
        batch_op.create_check_constraint(
            batch_op.f('ck_offerings_backup'), "backup IN ('none', 'daily', 'weekly', 'livesync', 'livesync_failover')")


def downgrade():
    op.execute("UPDATE offerings SET backup = 'none' WHERE backup IN ('livesync', 'livesync_failover')")
    with op.batch_alter_table('offerings', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('ck_offerings_backup'), type_='check')
        batch_op.create_check_constraint(batch_op.f('ck_offerings_backup'), "backup IN ('none', 'daily', 'weekly')")
