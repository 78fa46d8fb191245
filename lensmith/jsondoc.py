"""Reading the pipeline's JSON reports (metrics.json, gate.json, meta.json, export.json) defensively."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_or_none(path: Path) -> Any:
    """Parsed JSON, or None when the file is missing or not valid JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def dig(data: Any, dotted: str) -> Any:
    """`dig(m, "test.positive_class.recall")`; None when any part is missing."""
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node
