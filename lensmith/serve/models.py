"""Which model the service runs, and swapping it without dropping a request.

A `ModelSource` says where the model is now (`locate`) and cheaply whether that may have changed
(`fingerprint`): the registry's production alias (aliases.json) or a fixed path. `ModelHolder.reload`
loads the new model completely before one attribute assignment makes it current; requests already
holding the old model finish on it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from lensmith.errors import LensmithError
from lensmith.layout import EXPORT_JSON, INT8_FILE, ONNX_FILE
from lensmith.onnxmodel import OnnxModel, onnx_file_for

log = logging.getLogger("lensmith.serve")



class ModelSource(Protocol):
    def locate(self) -> Path: ...

    def fingerprint(self) -> str: ...

    def describe(self) -> str: ...


def file_fingerprint(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return "missing"
    return f"{st.st_mtime_ns}:{st.st_size}"


@dataclass(frozen=True)
class RegistrySource:
    """The registry's `alias` (production by default); changes when aliases.json is rewritten."""

    models_root: Path
    alias: str = "production"

    def locate(self) -> Path:
        from lensmith.registry import Registry

        return Registry(self.models_root).resolve(self.alias)

    def fingerprint(self) -> str:
        from lensmith.registry import Registry

        aliases = Registry(self.models_root).aliases_path
        try:
            return aliases.read_text(encoding="utf-8")
        except OSError:
            return "missing"

    def describe(self) -> str:
        return f"registry alias {self.alias!r}"


@dataclass(frozen=True)
class PathSource:
    """A model folder (model.onnx, export.json...) or one .onnx file; changes when the file is replaced."""

    path: Path

    def locate(self) -> Path:
        if not self.path.exists():
            raise LensmithError(f"no model at {self.path}; run `lensmith export` or pass --model")
        return self.path

    def fingerprint(self) -> str:
        base = self.path if self.path.is_file() else self.path / ONNX_FILE
        return "|".join(file_fingerprint(p) for p in (base, base.with_name(INT8_FILE), base.with_name(EXPORT_JSON)))

    def describe(self) -> str:
        return f"path {self.path}"


def production_source(models_root: Path) -> ModelSource:
    """What `lensmith serve` runs without --model: the registry's production model."""
    return RegistrySource(models_root, "production")


@dataclass
class ServedModel:
    onnx: OnnxModel
    version: str
    variant: str
    file: str
    loaded_at: float = field(default_factory=time.time)


def load_served_model(location: Path, providers: list[str], variant: str, threads: int) -> ServedModel:
    path, chosen = onnx_file_for(location, variant, providers)
    onnx = OnnxModel.load(path, providers, threads=threads)
    # a registry version folder is named v0003: that is the version people talk about
    folder = location if location.is_dir() else location.parent
    version = folder.name if folder.name.startswith("v") and folder.name[1:].isdigit() else onnx.version
    return ServedModel(onnx=onnx, version=version, variant=chosen, file=path.name)


class ModelHolder:
    def __init__(self, source: ModelSource, providers: list[str], variant: str, threads: int) -> None:
        self.source = source
        self.providers = providers
        self.variant = variant
        self.threads = threads
        self.current: ServedModel | None = None
        self.last_error: str | None = None
        self._fingerprint: str | None = None
        self._lock = threading.Lock()

    def reload(self, force: bool = False) -> bool:
        """Load the source's model if it changed (or `force`); True when a new model took over.

        Raises LensmithError when the new model cannot be loaded; the current one keeps serving.
        """
        with self._lock:
            fingerprint = self.source.fingerprint()
            if not force and self.current is not None and fingerprint == self._fingerprint:
                return False
            try:
                location = self.source.locate()
                new = load_served_model(location, self.providers, self.variant, self.threads)
            except LensmithError as exc:
                self.last_error = str(exc)
                raise
            previous = self.current
            self.current = new
            self._fingerprint = fingerprint
            self.last_error = None
        if previous is None or previous.version != new.version or previous.file != new.file:
            log.info("serving model %s (%s, %s) from %s", new.version, new.variant, new.onnx.provider, self.source.describe())
        return True
