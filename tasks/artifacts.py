"""Post what a stage produced to the Prefect API as artifacts (what to show is lensmith/artifacts.py's, named per
stage in the stage table)."""

from __future__ import annotations

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from lensmith.layout import Layout
from lensmith.stages import STAGE_TABLE


def publish_stage_artifacts(stage: str, layout: Layout) -> None:
    """The stage's artifacts; nothing for a stage the table does not know (a project's own dvc.yaml stage)."""
    entry = STAGE_TABLE.get(stage)
    if entry is None or entry.publishes is None:
        return
    for artifact in entry.publishes(layout):
        if artifact.markdown is not None:
            create_markdown_artifact(key=artifact.key, markdown=artifact.markdown, description=artifact.description)
        if artifact.table is not None:
            create_table_artifact(key=artifact.key, table=artifact.table, description=artifact.description)
