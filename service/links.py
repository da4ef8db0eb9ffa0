"""The links of a job, as the job view and the webhook body give them."""

from __future__ import annotations

from typing import Any

from core.outputs import OUTPUTS


def job_links(job_id: str, artifacts: dict[str, Any]) -> dict[str, str]:
    """Links of a job: itself, and each output it has (``artifacts`` keyed by output key)."""
    links = {"self": f"/v1/jobs/{job_id}"}
    links.update({o.key: f"/v1/jobs/{job_id}/{o.key}" for o in OUTPUTS if o.key in artifacts})
    return links
