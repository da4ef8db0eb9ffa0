"""What the QC page (``qc.html``) may do when served, in one light module (standard library
only) that the page writer and the gateway share.

The page is one self-contained file: its script and style sheet are the files ``qc_page.js``
and ``qc_page.css`` beside this module, inlined into every page, and its images are ``data:``
URLs. So the page needs nothing external, and the gateway serves it with
:data:`CONTENT_SECURITY_POLICY`, which allows exactly that script and style sheet (by their
SHA-256) and ``data:`` images: no other script, no inline ``style``/``on...`` attributes, no
request to anywhere. The page itself must therefore use classes and ``addEventListener`` only.

A reviewed job's page is served with the review (verdict, note, time, reviewer key) inserted
at :data:`REVIEW_MARKER` by :func:`with_review`.
"""

from __future__ import annotations

import base64
import hashlib
import html
from functools import cache
from importlib.resources import files

REVIEW_MARKER = "<!--scsnet:review-->"
"""Where the served page shows a job's review; the written page holds the marker alone."""


@cache
def script() -> str:
    """The page's script (inlined as is; its hash is in the policy)."""
    return files("core.report").joinpath("qc_page.js").read_text(encoding="utf-8")


@cache
def style() -> str:
    """The page's style sheet (inlined as is; its hash is in the policy)."""
    return files("core.report").joinpath("qc_page.css").read_text(encoding="utf-8")


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


@cache
def content_security_policy() -> str:
    """The Content-Security-Policy the page is served with: nothing external, nothing inline
    but the page's own script and style sheet."""
    return (
        "default-src 'none'; "
        f"script-src {_sha256(script())}; "
        f"style-src {_sha256(style())}; "
        "img-src data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


@cache
def meta_policy() -> str:
    """The same policy for the page's own ``<meta http-equiv>`` (so it holds when opened from
    disk), less ``frame-ancestors``, which browsers take only from a response header."""
    return content_security_policy().replace("; frame-ancestors 'none'", "")


def with_review(page: str, *, verdict: str, note: str, at: str, reviewer: str) -> str:
    """``page`` with a job's review shown at :data:`REVIEW_MARKER` (every value escaped)."""
    section = (
        f'<section class="review review-{html.escape(verdict)}" id="review">'
        f"<h2>Review: {html.escape(verdict)}</h2>"
        f"<p>{html.escape(note)}</p>"
        f'<p class="meta">{html.escape(at)} by key {html.escape(reviewer)}</p></section>'
    )
    return page.replace(REVIEW_MARKER, section, 1)
