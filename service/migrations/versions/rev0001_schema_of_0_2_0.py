"""The job store's schema as scsnet 0.2.0 released it (tenants, api_keys, jobs, reviews, workers).

Revision ID: 0001
Revises:
Create Date: 2026-12-01

Frozen: this is what ``Base.metadata.create_all`` made in 0.2.0, written out by hand; later
changes to the models go into new revisions, never here.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("webhook_secret", sa.String(100), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "workers",
        sa.Column("hostname", sa.String(255), primary_key=True),
        sa.Column("seen_at", TIME, nullable=False),
        sa.Column("info", sa.JSON(), nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant_id", sa.Integer(), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("revoked_at", TIME, nullable=True),
    )
    op.create_table(
        "jobs",
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("tenant_id", sa.Integer(), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("stage", sa.String(16), nullable=True),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("updated_at", TIME, nullable=False),
        sa.Column("enqueued_at", TIME, nullable=True),
        sa.Column("started_at", TIME, nullable=True),
        sa.Column("finished_at", TIME, nullable=True),
        sa.Column("duration_s", sa.Float(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("dispatch_token", sa.String(32), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("callback_url", sa.String(2048), nullable=True),
        sa.Column("inputs", sa.JSON(), nullable=False),
        sa.Column("problem", sa.JSON(), nullable=True),
        sa.Column("artifacts", sa.JSON(), nullable=False),
        sa.Column("deliveries", sa.JSON(), nullable=False),
        sa.UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency"),
    )
    # before reviews: their foreign key points at this unique index
    op.create_index("ix_jobs_id", "jobs", ["id"], unique=True)
    op.create_index("ix_jobs_state", "jobs", ["state"])
    op.create_index("ix_jobs_tenant_id", "jobs", ["tenant_id"])
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("note", sa.String(2000), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("at", TIME, nullable=False),
        sa.Column("latest", sa.Boolean(), nullable=False),
    )
    op.create_index("ix_reviews_job_latest", "reviews", ["job_id", "latest", "verdict"])


def downgrade() -> None:
    for table in ("reviews", "jobs", "api_keys", "workers", "tenants"):
        op.drop_table(table)
