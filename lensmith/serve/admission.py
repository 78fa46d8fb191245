"""Admission of predict requests by the wait they would have, not only by how many are queued.

A request admitted behind `serve.max_queue` others waits for all of them: under overload the accepted answers
were ~70x slower than unloaded ones although every excess request was refused. So a new request is refused
(503 with Retry-After) when the work already admitted would keep it waiting longer than a budget:

    expected wait = images ahead (decoding, waiting for a run, in the runs going on) x seconds per image / runners

where seconds per image is an exponentially weighted mean over recent session runs (a run's seconds divided
by its images; single-threaded runs side by side cost about the same per image whatever the batch size, and
the mean is taken under the load that the runners share the cores with). The budget is
`serve.max_queue_wait_ms`, or with 0 `AUTO_WAIT_RUNS` times the mean seconds per image: an admitted request
waits for about that many single-image runs at most (a closed loop of a few clients per runner is still
served whole; a tighter budget in ms trades those clients' 503s for a shorter wait of the accepted ones). Until a first run was measured only the count applies;
`serve.max_queue` stays a hard cap either way.

Overload mode. A queue as deep as that budget serves a closed loop of clients without a refusal, but under
sustained overload it only adds latency: the runners are busy whatever its depth, and the accepted requests
wait through all of it (Little's law: 16 clients at ~360 answers/s wait ~44 ms, 4.5x an unloaded request's p99).
So once the budget has refused a request (the queue overflowed: arrivals beyond what the service can answer),
the budget is the overload one, `serve.overload_queue_wait_ms` (auto: half a single-image run, about one image
ahead per two runners): arrivals keep the runners fed, and an accepted request mostly goes straight to a runner. A closed loop of clients that never overflows the normal budget never enters it. While in
it, a refusal by the overload budget extends it only when the arrivals still clearly exceed what is admitted
(over `SHARE_WINDOW_S`, more than `OVERLOAD_REFUSED_SHARE` of the requests refused): otherwise the mode would
lapse in the middle of a sustained overload, let the deep queue fill and re-enter, and the requests admitted in
between would wait through it all. When the refusals fall below that share (the load fell, or clients honour
Retry-After), the deep queue comes back `overload_hold_s` after the last extension.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

# serve.max_queue_wait_ms 0: the budget in single-image run times. Budget and estimate then share the measured
# seconds per image, so this admits AUTO_WAIT_RUNS x runners images ahead: 18 with 3 runners (2 cores), enough
# for 16 clients sending back to back (bench/serve_load.py's soak) to be served without a 503, while the
# accepted wait under overload stays a few runs long instead of serve.max_queue requests'.
AUTO_WAIT_RUNS = 6.0
# serve.overload_queue_wait_ms 0: the overload budget in single-image run times. Half a run admits about one image
# ahead per two runners: a request mostly goes straight to a runner (bench/serve_load.py at 4x, 3 runners: p99 of
# the accepted 2.7-2.8x unloaded with ~3 ms, 4.6x with one run, ~5.5 ms; answers/s 221-272 vs 250-279).
OVERLOAD_WAIT_RUNS = 0.5
SHARE_WINDOW_S = 1.0  # the refused share is counted over the current and the previous window of this length
OVERLOAD_REFUSED_SHARE = 0.2  # refused / arriving above this (arrivals >= 1.25x those admitted) extends overload mode
EWMA_WEIGHT = 0.2  # weight of the newest run in the mean seconds per image


class ServiceTime:
    """Exponentially weighted mean of the seconds a session run takes per image (None until a run was seen)."""

    def __init__(self, weight: float = EWMA_WEIGHT) -> None:
        self.weight = weight
        self.per_image_s: float | None = None

    def observe(self, images: int, seconds: float) -> None:
        if images <= 0 or seconds < 0:
            return
        sample = seconds / images
        self.per_image_s = sample if self.per_image_s is None else self.per_image_s + self.weight * (sample - self.per_image_s)


def expected_wait_s(images_ahead: int, per_image_s: float, runners: int) -> float:
    """Seconds a new request would wait before its run starts, with `images_ahead` admitted images before it."""
    return images_ahead * per_image_s / max(1, runners)


REASONS = ("queue_full", "expected_wait", "overload_wait")  # why a request was refused (lensmith_rejected_requests)


@dataclass(frozen=True)
class Verdict:
    admitted: bool
    reason: str  # "" when admitted; else one of REASONS
    expected_wait_s: float | None  # None: no run measured yet
    budget_s: float | None = None  # the budget it was judged by (None: auto and no run measured yet)


class Admission:
    """The decision for a new request: `max_queue` queued requests at most, and an expected wait within the budget
    (the overload budget for `overload_hold_s` after the normal one overflowed: see the module docstring).

    `budget_ms`: serve.max_queue_wait_ms (0: auto, `AUTO_WAIT_RUNS` x the measured seconds per image);
    `overload_budget_ms`: serve.overload_queue_wait_ms (0: auto, `OVERLOAD_WAIT_RUNS` x it); `overload_hold_s` 0
    turns overload mode off. `clock`: seconds, monotonic (a parameter for tests)."""

    def __init__(
        self,
        max_queue: int,
        budget_ms: float,
        runners: int,
        service_time: ServiceTime | None = None,
        overload_budget_ms: float = 0.0,
        overload_hold_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_queue = max_queue
        self.budget_ms = budget_ms
        self.overload_budget_ms = overload_budget_ms
        self.overload_hold_s = overload_hold_s
        self.runners = max(1, runners)
        self.service_time = service_time or ServiceTime()
        self.clock = clock
        self.overflowed_at: float | None = None  # when the normal budget or max_queue last refused a request
        self._window_start = clock()
        self._counts = [0, 0]  # (admitted, refused) in the current window
        self._previous = [0, 0]  # ... and in the one before it

    def _budget(self, ms: float, runs: float) -> float | None:
        if ms > 0:
            return ms / 1000.0
        per_image = self.service_time.per_image_s
        return None if per_image is None else runs * per_image

    def normal_budget_s(self) -> float | None:
        """serve.max_queue_wait_ms in seconds (None: auto and no run measured yet)."""
        return self._budget(self.budget_ms, AUTO_WAIT_RUNS)

    def overloaded(self) -> bool:
        """Whether overload mode is on: the normal budget overflowed within the last `overload_hold_s`."""
        return self.overflowed_at is not None and self.overload_hold_s > 0 and self.clock() - self.overflowed_at < self.overload_hold_s

    def budget_s(self) -> float | None:
        """The longest expected wait admitted now, in seconds (None: auto and no run measured yet)."""
        normal = self.normal_budget_s()
        if not self.overloaded() or (self.overload_budget_ms == 0 and self.runners == 1):
            # one runner (a GPU, or runners: 1): its batches are what make it fast, and half a run would admit
            # nothing ahead, so runs of one image; the auto overload budget is then the normal one
            return normal
        overload = self._budget(self.overload_budget_ms, OVERLOAD_WAIT_RUNS)
        return overload if normal is None or overload is None else min(normal, overload)

    def expected_wait_s(self, images_ahead: int) -> float | None:
        per_image = self.service_time.per_image_s
        return None if per_image is None else expected_wait_s(images_ahead, per_image, self.runners)

    def refused_share(self) -> float:
        """Share of the requests refused over the current and the previous `SHARE_WINDOW_S` (0 with none)."""
        self._roll(self.clock())
        admitted, refused = self._counts[0] + self._previous[0], self._counts[1] + self._previous[1]
        return refused / (admitted + refused) if admitted + refused else 0.0

    def _roll(self, now: float) -> None:
        elapsed = now - self._window_start
        if elapsed >= SHARE_WINDOW_S:
            self._previous = self._counts if elapsed < 2 * SHARE_WINDOW_S else [0, 0]
            self._counts = [0, 0]
            self._window_start = now

    def _count(self, verdict: Verdict) -> Verdict:
        self._roll(self.clock())
        self._counts[0 if verdict.admitted else 1] += 1
        return verdict

    def decide(self, queued_requests: int, images_ahead: int) -> Verdict:
        verdict = self._decide(queued_requests, images_ahead)
        self._count(verdict)
        if verdict.reason == "overload_wait" and self.refused_share() > OVERLOAD_REFUSED_SHARE:
            self.overflowed_at = self.clock()
        return verdict

    def _decide(self, queued_requests: int, images_ahead: int) -> Verdict:
        """`queued_requests`: decoding or waiting for a decode slot or a run (what serve.max_queue bounds);
        `images_ahead`: their images plus those in the runs going on."""
        wait = self.expected_wait_s(images_ahead)
        normal = self.normal_budget_s()
        if queued_requests >= self.max_queue:
            self.overflowed_at = self.clock()
            return Verdict(False, "queue_full", wait, normal)
        if wait is not None and normal is not None and wait > normal:
            self.overflowed_at = self.clock()
            return Verdict(False, "expected_wait", wait, normal)
        budget = self.budget_s()
        if wait is not None and budget is not None and wait > budget:
            return Verdict(False, "overload_wait", wait, budget)
        return Verdict(True, "", wait, budget)
