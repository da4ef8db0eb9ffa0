"""Retention of job files and rotation of webhook secrets.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

- ``jobs.files_deleted_at``: when the job's folder (inputs and outputs) was deleted by the
  retention pass (``SCSNET_RETENTION_DAYS``); the record stays. ``ix_jobs_finished_at`` finds
  the jobs whose files are due.
- ``tenants.previous_webhook_secret`` and ``previous_secret_expires_at``: the secret replaced by
  ``scsnet tenant rotate-secret``, still signing webhooks (as a second ``v1``) until then.

Only nullable columns are added: no table copy on SQLite, no rewrite on PostgreSQL.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.add_column(sa.Column("files_deleted_at", TIME, nullable=True))
        jobs.create_index("ix_jobs_finished_at", ["finished_at"])
    with op.batch_alter_table("tenants") as tenants:
        tenants.add_column(sa.Column("previous_webhook_secret", sa.String(100), nullable=True))
        tenants.add_column(sa.Column("previous_secret_expires_at", TIME, nullable=True))


def downgrade() -> None:
    # plain ALTER TABLE ... DROP COLUMN (SQLite >= 3.35, PostgreSQL): a batch table copy of
    # jobs would, with foreign keys on, cascade-delete every review
    op.drop_column("tenants", "previous_secret_expires_at")
    op.drop_column("tenants", "previous_webhook_secret")
    op.drop_index("ix_jobs_finished_at", table_name="jobs")
    op.drop_column("jobs", "files_deleted_at")
