"""Checking written DICOM against the standard with David Clunie's ``dciodvfy`` (dicom3tools).

``dciodvfy`` carries the IOD and module tables of the standard in the binary, so it works
offline (the PyPI ``dicom-validator`` downloads the standard at run time and cannot work here).
It prints to stderr: the IOD it recognised (``SCImage``), then one line per finding,
``Error - ...`` or ``Warning - ...``. Only errors fail a test; a test may excuse an error it
knows to be a false positive, by a regular expression and the reason it is wrong, e.g.::

    errors = dciodvfy(path, known_false_positives={r"Element=<Foo>": "why dciodvfy is wrong here"})
    assert not errors, "\\n".join(errors)

An excuse that matches nothing fails the test, so excuses cannot outlive the false positive.

Install: ``apt-get install dicom3tools`` (Debian/Ubuntu). Without it the tests skip, except on CI
(``CI=true``), where they fail.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest
from external_tools import require

TIMEOUT_S = 60.0


def require_dciodvfy() -> str:
    """The path of the ``dciodvfy`` binary; skips the test without it (fails it on CI)."""
    return require("dciodvfy", package="dicom3tools", purpose="DICOM outputs were not checked against the standard")


def dciodvfy_output(path: Path) -> str:
    """Everything ``dciodvfy`` prints for the file at ``path`` (stderr, then stdout)."""
    result = subprocess.run(
        [require_dciodvfy(), str(path)], capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    # The exit status is 1 whenever an error is found, so it says nothing the lines do not.
    return result.stderr + result.stdout


def error_lines(output: str) -> list[str]:
    """The ``Error - ...`` lines of a ``dciodvfy`` output, in order."""
    return [line.strip() for line in output.splitlines() if line.strip().startswith("Error")]


def dciodvfy(path: Path, *, known_false_positives: Mapping[str, str] | None = None) -> list[str]:
    """The errors dciodvfy reports for the DICOM file at ``path`` (lines starting 'Error'),
    less the known false positives.

    Parameters
    ----------
    path : a DICOM file (Part 10, with its meta header).
    known_false_positives : regular expression (searched in each error line) -> the reason the
        error is wrong. Every expression must match at least one error, else the test fails:
        an excuse that no longer applies is removed, not kept.

    Returns
    -------
    The remaining error lines, verbatim (empty when the file conforms).
    """
    excuses = dict(known_false_positives or {})
    errors = error_lines(dciodvfy_output(path))
    unused = [pattern for pattern in excuses if not any(re.search(pattern, e) for e in errors)]
    if unused:
        pytest.fail(f"dciodvfy no longer reports the known false positive(s) {unused} for {path.name}; remove them")
    return [e for e in errors if not any(re.search(pattern, e) for pattern in excuses)]
