"""Admission of predict requests by expected wait (lensmith.serve.admission): the estimate, the budget and the
decision as pure functions; then a real service flooded past its budget."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from lensmith.serve.admission import AUTO_WAIT_RUNS, OVERLOAD_REFUSED_SHARE, OVERLOAD_WAIT_RUNS, Admission, ServiceTime, expected_wait_s


def test_the_mean_seconds_per_image_follows_recent_runs() -> None:
    times = ServiceTime(weight=0.5)
    assert times.per_image_s is None
    times.observe(4, 0.040)  # the first run sets it: 10 ms per image
    assert times.per_image_s == pytest.approx(0.010)
    times.observe(1, 0.020)  # halfway to 20 ms
    assert times.per_image_s == pytest.approx(0.015)
    times.observe(0, 1.0)  # an empty run says nothing
    assert times.per_image_s == pytest.approx(0.015)


def test_the_expected_wait_is_the_images_ahead_shared_by_the_runners() -> None:
    assert expected_wait_s(0, 0.010, 3) == 0.0
    assert expected_wait_s(6, 0.010, 3) == pytest.approx(0.020)
    assert expected_wait_s(6, 0.010, 0) == pytest.approx(0.060)  # never divided by zero runners


def measured(per_image_s: float) -> ServiceTime:
    times = ServiceTime()
    times.observe(1, per_image_s)
    return times


def test_until_a_run_was_measured_only_the_count_applies() -> None:
    admission = Admission(max_queue=4, budget_ms=0.0, runners=2)
    assert admission.budget_s() is None
    assert admission.decide(queued_requests=3, images_ahead=1000).admitted
    refused = admission.decide(queued_requests=4, images_ahead=0)
    assert (refused.admitted, refused.reason, refused.expected_wait_s) == (False, "queue_full", None)


def test_the_auto_budget_is_a_few_single_image_runs() -> None:
    admission = Admission(max_queue=32, budget_ms=0.0, runners=2, service_time=measured(0.010))
    assert admission.budget_s() == pytest.approx(AUTO_WAIT_RUNS * 0.010)
    images_within = int(AUTO_WAIT_RUNS * 2)  # 2 runners: this many images ahead wait exactly the budget
    assert admission.decide(0, images_within).admitted
    refused = admission.decide(0, images_within + 1)
    assert (refused.admitted, refused.reason) == (False, "expected_wait")
    assert refused.expected_wait_s == pytest.approx((images_within + 1) * 0.010 / 2)


def test_a_budget_in_ms_is_taken_as_it_is_and_the_count_stays_a_hard_cap() -> None:
    admission = Admission(max_queue=8, budget_ms=50.0, runners=1, service_time=measured(0.010))
    assert admission.budget_s() == pytest.approx(0.050)
    assert admission.decide(0, 5).admitted and not admission.decide(0, 6).admitted
    cap = admission.decide(8, 0)  # nothing to wait for, but max_queue requests queued
    assert (cap.admitted, cap.reason) == (False, "queue_full")
    assert not math.isnan(cap.expected_wait_s or 0.0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_overflow_holds_the_queue_short_for_overload_hold_s_then_the_deep_queue_returns() -> None:
    clock = FakeClock()
    admission = Admission(
        max_queue=32, budget_ms=0.0, runners=2, service_time=measured(0.010), overload_hold_s=10.0, clock=clock
    )
    normal = int(AUTO_WAIT_RUNS * 2)  # images ahead the normal budget admits
    short = int(OVERLOAD_WAIT_RUNS * 2)  # ... and the overload one
    for _ in range(100):  # a closed loop that never overflows the normal budget never enters overload mode
        assert admission.decide(0, normal).admitted
    assert not admission.overloaded() and admission.budget_s() == pytest.approx(AUTO_WAIT_RUNS * 0.010)

    overflow = admission.decide(0, normal + 1)
    assert (overflow.admitted, overflow.reason) == (False, "expected_wait") and admission.overloaded()
    assert admission.budget_s() == pytest.approx(OVERLOAD_WAIT_RUNS * 0.010)
    assert admission.decide(0, short).admitted
    held = admission.decide(0, short + 1)
    assert (held.admitted, held.reason) == (False, "overload_wait")
    assert held.budget_s == pytest.approx(OVERLOAD_WAIT_RUNS * 0.010)

    clock.now += 9.0  # a few refusals among many admitted (clients that come back after Retry-After) do not extend it
    for _ in range(20):
        assert admission.decide(0, 0).admitted
    assert not admission.decide(0, short + 1).admitted and admission.overloaded()
    assert admission.refused_share() < OVERLOAD_REFUSED_SHARE
    clock.now += 1.0
    assert not admission.overloaded() and admission.decide(0, normal).admitted

    admission.decide(0, normal + 1)  # overflow again; now the arrivals keep exceeding what is admitted
    for _ in range(30):
        clock.now += 0.5
        admission.decide(0, 0)
        for _ in range(4):  # 4 of 5 refused: a sustained 5x overload holds the mode however long it lasts
            assert admission.decide(0, short + 1).reason == "overload_wait"
    assert admission.overloaded() and admission.refused_share() == pytest.approx(0.8)
    clock.now += 2 * 1.0 + 10.0  # the arrivals stop: both share windows empty, the hold runs out
    assert admission.refused_share() == 0.0 and not admission.overloaded()

    admission.decide(32, 0)  # max_queue reached is an overflow too
    assert admission.overloaded()


def test_with_one_runner_the_auto_overload_budget_keeps_the_batches() -> None:
    clock = FakeClock()
    one = Admission(max_queue=32, budget_ms=0.0, runners=1, service_time=measured(0.010), overload_hold_s=5.0, clock=clock)
    one.decide(0, int(AUTO_WAIT_RUNS) + 1)
    assert one.overloaded() and one.budget_s() == pytest.approx(AUTO_WAIT_RUNS * 0.010)
    assert one.decide(0, int(AUTO_WAIT_RUNS)).admitted
    pinned = Admission(
        max_queue=32, budget_ms=0.0, runners=1, service_time=measured(0.010), overload_budget_ms=20.0, overload_hold_s=5.0, clock=clock
    )
    pinned.decide(0, int(AUTO_WAIT_RUNS) + 1)
    assert pinned.budget_s() == pytest.approx(0.020)  # a budget in ms is taken as it is


def test_overload_mode_in_ms_never_above_the_normal_budget_and_off_with_hold_0() -> None:
    clock = FakeClock()
    admission = Admission(
        max_queue=32, budget_ms=30.0, runners=1, service_time=measured(0.010), overload_budget_ms=50.0, overload_hold_s=5.0, clock=clock
    )
    admission.decide(0, 4)
    assert admission.overloaded() and admission.budget_s() == pytest.approx(0.030)  # min(normal, overload)
    off = Admission(max_queue=32, budget_ms=30.0, runners=1, service_time=measured(0.010), overload_hold_s=0.0, clock=clock)
    off.decide(0, 4)
    assert not off.overloaded() and off.budget_s() == pytest.approx(0.030)


# ---- a real service flooded past its budget --------------------------------------------------------------

from servekit import copy_project, jpeg_bytes  # noqa: E402
from test_serve_hardening import post, run, serve_params  # noqa: E402

RUN_S_PER_IMAGE = 0.02  # each session run made this much slower per image: a known service time


def slowed_runs(service, samples: list[tuple[int, float]]) -> None:  # noqa: ANN001
    """Make every session run take RUN_S_PER_IMAGE more per image, and record at its start the images queued
    behind the runs (decoding or waiting for one) with the mean seconds per image admission then used."""
    real = service.batcher._run

    def slowed(model, batch):  # noqa: ANN001, ANN202
        samples.append((service.preparing_images + service.batcher.waiting_images, service.admission.service_time.per_image_s))
        time.sleep(RUN_S_PER_IMAGE * len(batch))
        return real(model, batch)

    service.batcher._run = slowed


def test_a_flood_is_refused_503_beyond_the_wait_budget_and_the_accepted_never_queue_longer(tmp_path) -> None:  # noqa: ANN001
    budget_ms = 3 * RUN_S_PER_IMAGE * 1000  # about three images' runs
    flood = 60

    async def go(client, service):  # noqa: ANN001, ANN202
        samples: list[tuple[int, float]] = []
        slowed_runs(service, samples)
        first = await post(client, (jpeg_bytes(0), "image/jpeg"))  # a run measured: the budget applies from here
        answers = await asyncio.gather(*(post(client, (jpeg_bytes(i), "image/jpeg")) for i in range(1, flood + 1)))
        after = await post(client, (jpeg_bytes(0), "image/jpeg"))
        metrics = (await client.get("/metrics")).text
        return first, answers, after, metrics, samples, service.queued

    params = serve_params(runners=1, max_batch_size=1, max_queue=32, max_queue_wait_ms=budget_ms, overload_hold_s=0)
    first, answers, after, metrics, samples, queued_after = run(go, copy_project(tmp_path), params)
    assert first.status_code == 200 and after.status_code == 200 and queued_after == 0
    statuses = [a.status_code for a in answers]
    assert set(statuses) == {200, 503}, statuses
    for answer in answers:
        if answer.status_code == 503:
            assert answer.headers["retry-after"] == "1" and answer.headers["content-type"] == "application/json"
            error = answer.json()["error"]
            assert error["code"] == "overloaded" and "serve.max_queue_wait_ms" in error["message"]
        else:
            assert len(answer.json()["predictions"]) == 1
    # the count cap alone (32) would have admitted 32 of them at once; the budget admits about three runs' worth
    # at a time (more as runs finish while the flood is still arriving: hence the margin)
    assert statuses.count(200) <= 16
    assert 'lensmith_rejected_requests_total{reason="expected_wait"} ' + f"{statuses.count(503)}.0" in metrics
    assert f"lensmith_admission_budget_seconds {budget_ms / 1000}" in metrics
    # every run started with no more images queued behind it than the budget admits at the seconds per image then measured
    for queued, per_image_s in samples[1:]:
        assert queued * per_image_s <= budget_ms / 1000 + per_image_s, (queued, per_image_s, samples)


def test_after_an_overflow_a_second_flood_gets_the_short_overload_queue(tmp_path) -> None:  # noqa: ANN001
    """Overload mode through the real service: the first flood overflows the normal budget (3 runs), and a
    second flood while it holds is admitted to about one run's wait (serve.overload_queue_wait_ms), the rest
    answered 503 naming that param; a lone request after both is served."""
    budget_ms, overload_ms = 3 * RUN_S_PER_IMAGE * 1000, 1 * RUN_S_PER_IMAGE * 1000
    flood = 30

    async def go(client, service):  # noqa: ANN001, ANN202
        samples: list[tuple[int, float]] = []
        slowed_runs(service, samples)
        await post(client, (jpeg_bytes(0), "image/jpeg"))  # a run measured
        first = await asyncio.gather(*(post(client, (jpeg_bytes(i), "image/jpeg")) for i in range(1, flood + 1)))
        overloaded_between = service.admission.overloaded()
        runs_before_second = len(samples)
        second = await asyncio.gather(*(post(client, (jpeg_bytes(i), "image/jpeg")) for i in range(1, flood + 1)))
        after = await post(client, (jpeg_bytes(0), "image/jpeg"))
        metrics = (await client.get("/metrics")).text
        return first, second, after, metrics, samples[runs_before_second:], overloaded_between

    params = serve_params(
        runners=1, max_batch_size=1, max_queue=32, max_queue_wait_ms=budget_ms, overload_queue_wait_ms=overload_ms, overload_hold_s=60
    )
    first, second, after, metrics, second_runs, overloaded_between = run(go, copy_project(tmp_path), params)
    assert 503 in [a.status_code for a in first] and overloaded_between
    statuses = [a.status_code for a in second]
    assert set(statuses) == {200, 503} and after.status_code == 200, statuses
    messages = {a.json()["error"]["message"] for a in second if a.status_code == 503}
    assert all("serve.overload_queue_wait_ms" in m for m in messages), messages
    # the normal budget admitted ~3 runs' worth at once plus those finishing while the flood arrived; the short one ~1
    assert statuses.count(200) < [a.status_code for a in first].count(200)
    assert 'lensmith_rejected_requests_total{reason="overload_wait"} ' + f"{statuses.count(503)}.0" in metrics
    assert "lensmith_admission_overloaded 1.0" in metrics
    assert f"lensmith_admission_budget_seconds {overload_ms / 1000}" in metrics
    for queued, per_image_s in second_runs:  # no run of the second flood started with more queued than one run's wait
        assert queued * per_image_s <= overload_ms / 1000 + per_image_s, (queued, per_image_s, second_runs)


def test_a_refused_request_is_answered_before_its_body_is_read(tmp_path) -> None:  # noqa: ANN001
    """The 503 comes from the fast path: nothing of the request is received, the server discards its body."""

    async def go(client, service):  # noqa: ANN001, ANN202
        service.preparing = service.params.max_queue  # as many requests queued as serve.max_queue admits
        app = client._transport.app
        received, sent = [], []

        async def receive():  # noqa: ANN202
            received.append(1)
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):  # noqa: ANN001, ANN202
            sent.append(message)

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/v1/predict", "raw_path": b"/v1/predict", "query_string": b"", "root_path": "",
            "headers": [(b"content-type", b"multipart/form-data; boundary=x"), (b"content-length", b"100000")],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
        }
        await app(scope, receive, send)
        service.preparing = 0
        return received, sent, (await client.get("/metrics")).text

    received, sent, metrics = run(go, copy_project(tmp_path))
    assert received == []
    start, body = sent
    headers = dict(start["headers"])
    assert start["status"] == 503 and headers[b"retry-after"] == b"1" and headers[b"content-type"] == b"application/json"
    assert b'"code":"overloaded"' in body["body"] and b"serve.max_queue" in body["body"]
    assert 'lensmith_rejected_requests_total{reason="queue_full"} 1.0' in metrics
    assert 'lensmith_requests_total{endpoint="/v1/predict",status="503"} 1.0' in metrics


def test_garbage_collection_pauses_are_measured_per_generation() -> None:
    import gc

    from prometheus_client import CollectorRegistry

    from lensmith.serve.gcwatch import GcPauses

    registry = CollectorRegistry()
    pauses = GcPauses(registry)
    pauses.install()
    try:
        gc.collect(2)
        gc.collect(0)
    finally:
        pauses.remove()
    gc.collect(2)  # after remove(): not counted
    counts = {
        sample.labels["generation"]: sample.value
        for metric in registry.collect() for sample in metric.samples if sample.name == "lensmith_gc_pause_seconds_count"
    }
    assert counts["2"] == 1.0 and counts["0"] >= 1.0  # an automatic young collection may add to generation 0
    assert pauses._callback not in gc.callbacks
