"""The manifest's and the splits' columns, in one place: ingest writes them, split adds to them, and every
other column of a manifest came from the source's metadata (lensmith.resolve tells them apart)."""

from __future__ import annotations

IMAGE_STAT_COLUMNS: tuple[str, ...] = ("brightness", "contrast", "sharpness", "mean_r", "mean_g", "mean_b")
MEMBER_COLUMNS: tuple[str, ...] = ("member_offset", "member_size")  # manifest/split columns; NA for plain files
IMAGE_COLUMNS: tuple[str, ...] = (
    "sha256",
    "file_bytes",
    "format",
    "width",
    "height",
    "mode",
    "source_mode",
    "channels",
    *IMAGE_STAT_COLUMNS,
    "phash",
)
# `file` is the image file, or the shard holding it; MEMBER_COLUMNS say where inside (NA for plain files).
# `source` is the source the row came from: data.source, one of data.sources, or data.reviewed_dir.
MANIFEST_COLUMNS: tuple[str, ...] = ("path", "file", "label", *IMAGE_COLUMNS, "mtime_ns", "etag", *MEMBER_COLUMNS, "source")
# Provenance `lensmith review import` writes beside each corrected image (reviewed folder's metadata.csv): system
# columns, never declared metadata every image must have.
REVIEW_COLUMNS: tuple[str, ...] = (
    "review_item_id",
    "review_reason",
    "review_label",
    "review_predicted_label",
    "review_confidence",
    "review_model_version",
    "review_served_at",
    "review_imported_at",
)
SPLIT_ADDED_COLUMNS: tuple[str, ...] = ("split", "group")  # what split adds to the manifest's columns
