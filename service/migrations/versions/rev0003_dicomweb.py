"""DICOMweb in and out: STOW-RS batches, destinations, a job's study and delivery.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05

- ``jobs.study_uid`` (with ``ix_jobs_tenant_study``): the Study Instance UID of a DICOM job,
  for ``GET /v1/jobs?study_uid=``.
- ``jobs.delivery``: the state of storing the job's DICOM results in the tenant's destination.
- ``destinations``: a tenant's DICOMweb destination (URL and secret headers).
- ``stow_batches``: instances received by STOW-RS, gathering per tenant and study until they
  settle into a job.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.add_column(sa.Column("study_uid", sa.String(64), nullable=True))
        jobs.add_column(sa.Column("delivery", sa.JSON(), nullable=True))
        jobs.create_index("ix_jobs_tenant_study", ["tenant_id", "study_uid"])
    op.create_table(
        "destinations",
        sa.Column("tenant_id", sa.Integer(), sa.ForeignKey("tenants.id"), primary_key=True),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("headers", sa.JSON(), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("updated_at", TIME, nullable=False),
    )
    op.create_table(
        "stow_batches",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant_id", sa.Integer(), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("gathering", sa.String(120), nullable=True),
        sa.Column("first_at", TIME, nullable=False),
        sa.Column("last_at", TIME, nullable=False),
        sa.Column("instances", sa.Integer(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=True),
        sa.UniqueConstraint("gathering"),
    )
    op.create_index("ix_stow_batches_tenant_id", "stow_batches", ["tenant_id"])
    op.create_index("ix_stow_batches_last_at", "stow_batches", ["last_at"])


def downgrade() -> None:
    op.drop_table("stow_batches")
    op.drop_table("destinations")
    op.drop_index("ix_jobs_tenant_study", table_name="jobs")
    op.drop_column("jobs", "delivery")
    op.drop_column("jobs", "study_uid")
