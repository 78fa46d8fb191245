"""labels.lock.json: the label set pinned from the manifest by the first `lensmith validate` run when
params validate.labels is unset. Every read and write of the lock is here.

ingest rejects images whose label is outside it (`allowed_labels`); validate expects exactly it
(`pinned_labels`) and pins it when there is none yet (`pin_labels`). The two readers keep the checks
their stage always had: ingest takes any list (entries as strings), validate wants a list of strings.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lensmith.errors import DataError
from lensmith.fsutil import write_json_atomic

LOCK_SHAPE = '{"labels": [...]}'


def _stored_labels(lock: Path) -> Any:
    """The lock's `labels` value, unchecked (OSError, ValueError, KeyError, TypeError propagate)."""
    return json.loads(lock.read_text(encoding="utf-8"))["labels"]


def allowed_labels(lock: Path) -> set[str] | None:
    """The label set ingest allows: every entry of the lock as a string; None when there is no lock file."""
    if not lock.is_file():
        return None
    try:
        labels = _stored_labels(lock)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{lock} must be JSON like {LOCK_SHAPE}: {exc}") from None
    if not isinstance(labels, list):
        raise DataError(f"{lock}: 'labels' must be a list of label names")
    return {str(label) for label in labels}


def pinned_labels(lock: Path) -> list[str]:
    """The labels validate expects, sorted; a lock that is not a list of strings is a DataError naming the fix."""
    try:
        labels = _stored_labels(lock)
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{lock} is not a label lock ({LOCK_SHAPE}): {exc}; delete it to re-pin") from None
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise DataError(f"{lock}: 'labels' must be a list of strings; delete it to re-pin")
    return sorted(labels)


def pin_labels(lock: Path, labels: Iterable[Any]) -> list[str]:
    """Write the lock (atomically) with the distinct labels, sorted, and the time; returns what it pinned."""
    pinned = sorted({str(label) for label in labels})
    write_json_atomic(lock, {"labels": pinned, "pinned_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return pinned
