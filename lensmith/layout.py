"""Where every stage reads and writes, relative to the project root (one place, so stages agree)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def manifest(self) -> Path:
        return self.data / "manifest.parquet"

    @property
    def quarantine(self) -> Path:
        return self.data / "quarantine.csv"

    @property
    def splits_dir(self) -> Path:
        return self.data / "splits"

    def split_file(self, name: str) -> Path:
        return self.splits_dir / f"{name}.parquet"

    @property
    def cache_dir(self) -> Path:
        """Derived, rebuildable data (decoded-image caches, S3 mirrors): never versioned."""
        return self.root / ".cache"

    @property
    def s3_mirror(self) -> Path:
        return self.cache_dir / "s3"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def candidate(self) -> Path:
        return self.models / "candidate"

    @property
    def exported(self) -> Path:
        """The export stage's folder: model.onnx, model.opt.onnx, model.int8.onnx (when kept), export.json."""
        return self.models / "export"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def validation_json(self) -> Path:
        return self.reports / "validation.json"

    @property
    def validation_html(self) -> Path:
        return self.reports / "validation.html"

    @property
    def labels_lock(self) -> Path:
        """Label set discovered on the first run and pinned (git-tracked, not DVC-tracked)."""
        return self.root / "labels.lock.json"


SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
