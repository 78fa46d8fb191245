"""The images' context (site, line...) on /v1/predict: accepted as multipart fields or headers, checked against the
served model's metadata columns, echoed, logged, kept on review items; and feedback after a restart."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from servekit import copy_project, jpeg_bytes, tiny_params

from lensmith.layout import Layout
from lensmith.params import ServeParams
from lensmith.serve.app import create_app
from lensmith.serve.models import PathSource
from lensmith.serve.predlog import read_log
from lensmith.serve.review import read_queue

pytestmark = pytest.mark.timeout(900)
TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
COLUMNS = ["site", "line_id"]


def serve_params(**changes: object) -> ServeParams:
    return tiny_params().serve.model_copy(update=changes)


def with_metadata_columns(layout: Layout, columns: list[str]) -> Layout:
    """The candidate's meta.json as training writes it (lensmith.resolve), the export stage's folder served."""
    meta_file = layout.candidate / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["resolved"] = {"metadata_columns": columns}
    meta_file.write_text(json.dumps(meta))
    return layout


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return with_metadata_columns(copy_project(tmp_path), COLUMNS)


async def clients(layout: Layout, params: ServeParams) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(params, layout.root, PathSource(layout.exported), token=TOKEN)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://lensmith") as client:
            yield client


def run(go, layout: Layout, params: ServeParams | None = None):  # noqa: ANN001, ANN201
    """`go(client)` against a freshly started service (a restart, each call)."""

    async def main():  # noqa: ANN202
        async for client in clients(layout, params or serve_params()):
            return await go(client)

    return asyncio.run(main())


def image(seed: int = 1) -> dict:
    return {"file": ("a.jpg", jpeg_bytes(seed), "image/jpeg")}


def test_context_is_echoed_logged_kept_on_review_items_and_feedback(layout: Layout) -> None:
    async def go(client: httpx.AsyncClient):
        several = await client.post(
            "/v1/predict", data={"site": "C", "line_id": "3"},
            files=[("files", ("a.jpg", jpeg_bytes(1), "image/jpeg")), ("files", ("b.jpg", jpeg_bytes(2), "image/jpeg"))],
        )
        bare = await client.post("/v1/predict", files=image(3))
        pid = several.json()["predictions"][0]["id"]
        feedback = await client.post("/v1/feedback", json={"prediction_id": pid, "label": "crack"}, headers=AUTH)
        model = await client.get("/v1/model")
        return several, bare, feedback, model

    several, bare, feedback, model = run(go, layout, serve_params(review_threshold=1.0))  # every image is queued
    assert several.status_code == 200, several.text
    assert [p["context"] for p in several.json()["predictions"]] == [{"site": "C", "line_id": "3"}] * 2
    assert bare.json()["predictions"][0]["context"] is None
    assert feedback.status_code == 201 and model.json()["context_columns"] == COLUMNS
    records = read_log(layout.root / "serving/predictions")
    assert [r["context"] for r in records] == [{"site": "C", "line_id": "3"}] * 2 + [None]
    queue = read_queue(layout.root / "serving/review")
    assert [(q["reason"], q["context"]) for q in queue] == [
        ("low_confidence", {"site": "C", "line_id": "3"}), ("low_confidence", {"site": "C", "line_id": "3"}),
        ("low_confidence", None), ("feedback", {"site": "C", "line_id": "3"}),
    ]


def test_context_as_headers_matches_columns_ignoring_case_and_dashes(layout: Layout) -> None:
    async def go(client: httpx.AsyncClient):
        headers = {"X-Lensmith-Context-Site": "D", "X-Lensmith-Context-Line-Id": "7"}
        return await client.post("/v1/predict", files=image(), headers=headers)

    response = run(go, layout)
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["context"] == {"site": "D", "line_id": "7"}
    assert read_log(layout.root / "serving/predictions")[0]["context"] == {"site": "D", "line_id": "7"}


CONTEXT_ERRORS = {
    "unknown field": ({"data": {"plant": "x"}}, "unknown_context", ["'plant'", "['site', 'line_id']"]),
    "unknown header": ({"headers": {"X-Lensmith-Context-Plant": "x"}}, "unknown_context", ["X-Lensmith-Context-plant", "'site'"]),
    "oversized value": ({"data": {"site": "x" * 129}}, "invalid_context", ["'site'", "129 characters", "serve.max_context_value_chars"]),
    "control character": ({"data": {"site": "C\x1b[31m"}}, "invalid_context", ["'site'", "unprintable"]),
    "empty value": ({"data": {"site": ""}}, "invalid_context", ["'site'", "empty"]),
    "too many fields": ({"data": {"site": "C", "line_id": "1"}, "headers": {"X-Lensmith-Context-Site": "C"}}, "invalid_context", ["3 context fields", "serve.max_context_fields"]),
    "conflicting values": ({"data": {"site": "C"}, "headers": {"X-Lensmith-Context-Site": "D"}}, "invalid_context", ["'site'", "different values"]),
}


def test_bad_context_is_refused_with_a_422_naming_the_field(layout: Layout) -> None:
    async def go(client: httpx.AsyncClient):
        return {case: await client.post("/v1/predict", files=image(), **kwargs) for case, (kwargs, _, _) in CONTEXT_ERRORS.items()}

    answers = run(go, layout, serve_params(max_context_fields=2))
    for case, (_, code, words) in CONTEXT_ERRORS.items():
        response = answers[case]
        assert response.status_code == 422, (case, response.text)
        error = response.json()["error"]
        assert error["code"] == code, (case, error)
        assert all(w in error["message"] for w in words), (case, error["message"])
        assert "\x1b" not in error["message"]
    assert read_log(layout.root / "serving/predictions") == []  # refused before any prediction


def test_a_model_without_metadata_columns_refuses_any_context(tmp_path: Path) -> None:
    layout = copy_project(tmp_path)  # its meta.json records no metadata columns

    async def go(client: httpx.AsyncClient):
        return await client.post("/v1/predict", files=image(), data={"site": "C"}), await client.post("/v1/predict", files=image())

    refused, plain = run(go, layout)
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "unknown_context"
    assert "records no metadata columns" in refused.json()["error"]["message"]
    assert plain.status_code == 200 and plain.json()["predictions"][0]["context"] is None


def test_feedback_after_a_restart_is_a_clear_404_naming_the_review_item(layout: Layout) -> None:
    async def predict(client: httpx.AsyncClient) -> str:
        response = await client.post("/v1/predict", files=image(7), data={"site": "C"})
        return response.json()["predictions"][0]["id"]

    queued = run(predict, layout, serve_params(review_threshold=1.0))  # low confidence: queued at prediction time
    not_queued = run(predict, layout, serve_params(review_threshold=0.0))

    async def feedback(client: httpx.AsyncClient):  # a third start: the service remembers neither
        return [await client.post("/v1/feedback", json={"prediction_id": pid, "label": "crack"}, headers=AUTH) for pid in (queued, not_queued)]

    with_item, without_item = run(feedback, layout, serve_params(feedback_window=100))
    (item,) = read_queue(layout.root / "serving/review")
    assert item["prediction_id"] == queued and item["context"] == {"site": "C"}
    for response in (with_item, without_item):
        assert response.status_code == 404 and response.json()["error"]["code"] == "unknown_prediction"
        message = response.json()["error"]["message"]
        assert "not remembered" in message and "last 100 predictions" in message and "serve.feedback_window" in message
        assert "restarts" in message
    assert item["item_id"] in with_item.json()["error"]["message"] and "lensmith review export" in with_item.json()["error"]["message"]
    assert "holds no item" in without_item.json()["error"]["message"]


def test_the_queue_search_for_a_prediction_is_bounded_to_the_queues_tail(tmp_path: Path) -> None:
    from lensmith.serve.review import ReviewQueue, item_for_prediction

    queue = ReviewQueue(tmp_path)
    first = queue.add(image=b"a", sha256="a" * 64, ext="jpg", reason="low_confidence", prediction={"id": "p1"}, context={"site": "A"})
    for i in range(50):
        queue.add(image=b"b", sha256="b" * 64, ext="jpg", reason="low_confidence", prediction={"id": f"q{i}"})
    assert item_for_prediction(tmp_path, "p1")["item_id"] == first
    assert item_for_prediction(tmp_path, "p1", max_bytes=2000) is None  # beyond the searched tail
    assert item_for_prediction(tmp_path, "q49", max_bytes=2000)["context"] is None
    assert item_for_prediction(tmp_path / "none", "p1") is None
