"""Data-dependent settings: `auto` resolves from the data; explicit values are kept as written."""

from __future__ import annotations

import pandas as pd
import pytest

from lensmith.params import Params
from lensmith.resolve import metadata_columns, negative_class_of, resolve


def manifest(**metadata: list[str]) -> pd.DataFrame:
    n = len(next(iter(metadata.values()))) if metadata else 4
    frame = pd.DataFrame({"path": [f"x/{i}.png" for i in range(n)], "label": ["a"] * n, "sha256": ["0" * 64] * n})
    for column, values in metadata.items():
        frame[column] = values
    return frame


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        (["crack", "ok", "stain"], "ok"),
        (["Defect", "Good"], "Good"),
        (["scratch", "No-Defect"], "No-Defect"),
        (["fail", "pass", "normal"], "normal"),  # preference order: normal before pass
        (["0", "1", "2"], None),
        (["tshirt", "bag"], None),
    ],
)
def test_negative_class_is_a_label_that_names_the_good_class(labels: list[str], expected: str | None) -> None:
    assert negative_class_of(labels) == expected


def test_metadata_columns_are_what_ingest_and_split_did_not_write() -> None:
    frame = manifest(site=["A", "B", "A", "B"]).assign(split="train", group="g", width=8, phash="0" * 16)
    assert metadata_columns(list(frame.columns)) == ["site"]


def test_auto_on_a_plain_folder_resolves_to_no_metadata_and_no_defect_view() -> None:
    resolved = resolve(Params(), manifest(), ["0", "1"])
    assert resolved.required_metadata == () and resolved.group_column is None and resolved.slices == ()
    assert resolved.negative_class is None and not resolved.has_defect_view
    assert "no defect-vs-ok view" in resolved.reasons["evaluate.negative_class"]


def test_auto_on_the_demo_kind_of_data() -> None:
    frame = manifest(
        site=["A", "B"] * 30, lighting=["dim", "bright"] * 30, batch=[f"b{i}" for i in range(60)], serial=[str(i) for i in range(60)]
    )
    resolved = resolve(Params(), frame, ["crack", "ok"])
    assert resolved.required_metadata == ("site", "lighting", "batch", "serial")
    assert resolved.group_column == "batch"
    assert resolved.slices == ("site", "lighting")  # not the group column, not a 60-value identifier
    assert "serial" in resolved.reasons["evaluate.slices"]
    assert resolved.negative_class == "ok"


def test_explicit_values_are_kept_even_when_the_data_lacks_them() -> None:
    params = Params()
    params.validate.required_metadata = ["site"]
    params.split.group_column = None
    params.evaluate.slices = ["line"]
    params.evaluate.negative_class = "good"
    resolved = resolve(params, manifest(batch=["b1", "b2", "b1", "b2"]), ["ok", "bad"])
    assert (resolved.required_metadata, resolved.group_column, resolved.slices, resolved.negative_class) == (
        ("site",), None, ("line",), "good"
    )
    assert resolved.reasons == {}  # nothing was resolved: validate's params_match_data check reports the mismatch


def test_a_positive_class_makes_the_negative_class_unnecessary() -> None:
    params = Params()
    params.evaluate.positive_class = "crack"
    resolved = resolve(params, manifest(), ["crack", "ok", "stain"])
    assert resolved.negative_class is None and resolved.positive_class == "crack" and resolved.has_defect_view
