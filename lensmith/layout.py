"""Where every stage reads and writes, relative to the project root (one place, so stages agree)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


# File names the stages, the registry and the service agree on (a registry version holds the same names).
ONNX_FILE = "model.onnx"
OPTIMIZED_FILE = "model.opt.onnx"
INT8_FILE = "model.int8.onnx"
EXPORT_JSON = "export.json"
METRICS_JSON = "metrics.json"
GATE_JSON = "gate.json"
GATE_HTML = "gate.html"


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
    def metrics_json(self) -> Path:
        """The evaluate stage's test metrics."""
        return self.reports / METRICS_JSON

    @property
    def gate_json(self) -> Path:
        return self.reports / GATE_JSON

    @property
    def gate_html(self) -> Path:
        return self.reports / GATE_HTML

    @property
    def export_json(self) -> Path:
        """The export stage's report beside its ONNX files (reports/export.json holds the same figures for DVC)."""
        return self.exported / EXPORT_JSON

    @property
    def labels_lock(self) -> Path:
        """Label set discovered on the first run and pinned (git-tracked, not DVC-tracked)."""
        return self.root / "labels.lock.json"


SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
