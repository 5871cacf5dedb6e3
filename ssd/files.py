"""Reading the project's versioned JSON documents (bundle manifests, checkpoint states).

Torch-free: the runtime reads manifests through this too.
"""
from __future__ import annotations

import json
from pathlib import Path


def read_versioned_json(path: Path, fmt: str, version: int, error: type[Exception], what: str) -> dict:
    """Parse ``path`` and check its ``format`` and ``format_version``; raise ``error`` with a
    one-line message otherwise. ``what`` names the document in messages."""
    try:
        document = json.loads(Path(path).read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{path} is unreadable: {err}") from None
    if not isinstance(document, dict) or document.get("format") != fmt:
        raise error(f"{path} is not an {fmt} {what}")
    if document.get("format_version") != version:
        raise error(
            f"{path} has {what} format version {document.get('format_version')!r}; "
            f"this ssd reads version {version}"
        )
    return document
