"""docs/params.md is generated from the params model and must be current; every key is described."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from lensmith.cli import app
from lensmith.paramsdoc import params_markdown

REPO = Path(__file__).resolve().parents[1]


def test_docs_params_md_is_current() -> None:
    assert (REPO / "docs" / "params.md").read_text(encoding="utf-8") == params_markdown(), (
        "docs/params.md is out of date: run `lensmith check-params --markdown > docs/params.md`"
    )


def test_every_key_is_documented_with_its_default_and_meaning() -> None:
    rows = [line for line in params_markdown().splitlines() if line.startswith("| `")]
    assert len(rows) > 100
    assert all(not line.rstrip().endswith("|  |") for line in rows), [line for line in rows if line.rstrip().endswith("|  |")]
    assert any(line.startswith("| `evaluate.negative_class` | `\"auto\"` |") for line in rows)


def test_check_params_markdown_and_version() -> None:
    result = CliRunner().invoke(app, ["check-params", "--markdown"])
    assert result.exit_code == 0 and result.stdout == params_markdown()
    version = CliRunner().invoke(app, ["--version"])
    assert version.exit_code == 0 and version.stdout.startswith("lensmith ")
