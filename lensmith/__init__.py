"""Lensmith: a reproducible image-recognition pipeline (library package: no Prefect, no DVC)."""

__version__ = "0.1.0"
