"""Reading the pipeline's JSON reports (metrics.json, gate.json, meta.json, export.json) defensively, and small
helpers for the documents once read."""

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


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> one level with dotted keys: `{"a": {"b": 1}, "c": 2}` -> `{"a.b": 1, "c": 2}`.

    Lists and other values are kept as they are; keys are prefixed with `prefix`."""
    flat: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
