"""The job store's revisions, one module each (loaded by Alembic from this folder)."""
