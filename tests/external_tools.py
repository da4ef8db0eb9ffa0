"""Programs from Debian packages that some tests need (``.ci/run`` installs them): without one,
such a test skips, saying which package to install, except on CI (``CI=true``), where it fails."""

from __future__ import annotations

import os
import shutil

import pytest


def require(executable: str, *, package: str, purpose: str) -> str:
    """The path of ``executable``; a skip naming ``package`` when it is absent (a failure under CI)."""
    path = shutil.which(executable)
    if path is None:
        reason = f"{executable} is not installed (Debian: apt-get install {package}); {purpose}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path
