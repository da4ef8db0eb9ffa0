"""Write the gateway's OpenAPI document to ``openapi/openapi.json``:
``python -m app.openapi_export [PATH]``. A test checks the committed file equals what the app
serves at ``/openapi.json``."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from app.main import create_app
from app.settings import GatewaySettings

DEFAULT_PATH = Path(__file__).resolve().parents[1] / "openapi" / "openapi.json"


def document() -> dict[str, Any]:
    """The OpenAPI document of a gateway built with default settings (in a throw-away data dir)."""
    with tempfile.TemporaryDirectory() as data:
        return create_app(GatewaySettings(data_dir=Path(data), redis_url="redis://127.0.0.1:6379/0")).openapi()


def render(doc: dict[str, Any]) -> str:
    """The committed file's exact text."""
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else DEFAULT_PATH
    path.write_text(render(document()))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
