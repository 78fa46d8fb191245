"""Apply `--set` overrides to params.yaml for the duration of a run (what DVC stages read)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from lensmith.fsutil import write_bytes_atomic, write_text_atomic
from lensmith.params import apply_overrides, params_from_dict, read_params_yaml


@contextmanager
def params_overridden(params_file: Path, overrides: list[str]) -> Iterator[None]:
    """Write params.yaml with `overrides` applied (validated first); restore the original bytes after.

    DVC stages read params.yaml, so an override must be in the file for dvc.lock to record it.
    """
    if not overrides:
        yield
        return
    original = params_file.read_bytes() if params_file.exists() else None
    merged = apply_overrides(read_params_yaml(params_file), overrides)
    params_from_dict(merged, f"{params_file} with --set overrides")  # fail before touching the file
    write_text_atomic(params_file, yaml.safe_dump(merged, sort_keys=False))
    try:
        yield
    finally:
        if original is None:
            params_file.unlink(missing_ok=True)
        else:
            write_bytes_atomic(params_file, original)
