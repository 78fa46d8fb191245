"""A full disk degrades the prediction log and the review queue, never the answers (#16): /v1/predict still
answers 200 while every write fails with ENOSPC, and /metrics counts the failed writes and dropped records."""

from __future__ import annotations

import asyncio
import errno
import re
from pathlib import Path

import httpx
import pytest

from servekit import copy_project, jpeg_bytes, tiny_params

from lensmith.serve import predlog, review
from lensmith.serve.app import create_app
from lensmith.serve.models import PathSource
from lensmith.serve.predlog import PredictionLog

pytestmark = pytest.mark.timeout(900)


def metric(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_predict_answers_while_the_disk_is_full_and_metrics_count_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = copy_project(tmp_path)

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PredictionLog, "_write", disk_full)
    monkeypatch.setattr(review, "append_line", disk_full)
    monkeypatch.setattr(predlog, "RETRY_S", (0.01,))
    # every prediction goes to review (threshold 1.0); the log keeps at most 2 records in memory
    params = tiny_params().serve.model_copy(update={"review_threshold": 1.0, "log_max_backlog": 2})

    async def go() -> tuple[list[int], str]:
        app = create_app(params, layout.root, PathSource(layout.exported), token="t")
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://lensmith") as client:
                statuses = []
                for i in range(4):
                    response = await client.post("/v1/predict", files={"file": ("a.jpg", jpeg_bytes(i), "image/jpeg")})
                    statuses.append(response.status_code)
                for _ in range(500):  # the writer thread's first failed attempt
                    if app.state.service.predlog.stats().write_errors:
                        break
                    await asyncio.sleep(0.01)
                return statuses, (await client.get("/metrics")).text

    statuses, text = asyncio.run(go())
    assert statuses == [200, 200, 200, 200]
    assert metric(text, "lensmith_prediction_log_write_errors_total", '{errno="ENOSPC"}') >= 1
    assert metric(text, "lensmith_prediction_log_dropped_records_total", '{reason="backlog_full"}') == 2
    assert metric(text, "lensmith_prediction_log_backlog_records") == 2
    assert metric(text, "lensmith_review_queue_dropped_items_total", '{reason="write_error"}') == 4
    assert metric(text, "lensmith_review_queue_write_errors_total", '{errno="ENOSPC"}') == 4
