"""Micro-batching: concurrent requests' images are run through the session together.

Requests put (model, inputs) on a queue. The worker waits for a free inference runner, takes the first
item, then keeps taking items until the batch holds its share of the work or `max_wait_s` has passed, and
runs each model's share as one batch on an inference thread. While every runner is busy, requests simply
queue, so the next batch is as full as the load allows. `runners` batches run at once (one thread each;
with a single-threaded ONNX Runtime session per run, one per core keeps every core busy without the
cross-thread barriers of a multi-threaded run stalling whenever the event loop takes a core).

With several runners a batch takes at most its fair share: the images queued plus those being run,
divided by the number of runners (and never more than `max_batch`). A single-threaded run costs about
the same per image at any batch size, so one runner holding most of the clients' requests while the
other runs a few (and then waits for them to come back) wastes a core; equal shares keep both busy.
While more than one runner is free, the queued items are shared out among them and nobody waits.
With one runner (a GPU) the batch fills up to `max_batch` within `max_wait_s`, as batching pays there.
Items carry the model they were preprocessed for, so a hot reload never mixes models within a batch.

The queue is bounded: with `max_queue` requests waiting, `submit` raises QueueFull at once (the service
answers 503). A request that stops waiting (its deadline passed, its client left) leaves the queue: it is
no longer counted and its images are never run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np


log = logging.getLogger(__name__)


def lower_thread_priority(nice: int) -> None:
    """Raise the calling thread's nice value by `nice` (Linux: a thread is scheduled on its own, by its id).

    The inference threads run below the event loop: under overload the loop that admits, refuses and answers
    requests otherwise waits for a core behind the runs, and every admitted request pays that wait several
    times (bench/serve_load.py, 4x overload: p99 of the accepted requests 167-186 ms at nice 0, 119-127 ms
    at nice 10, throughput +5 %). Elsewhere, or when the OS refuses, the threads keep the process's priority."""
    if nice <= 0 or not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as exc:  # a sandbox that forbids it: serving goes on at the same priority
        log.warning("inference threads keep the service's CPU priority (serve.runner_nice not applied: %s)", exc)


class BatcherStopped(RuntimeError):
    """The service is shutting down: the request's images were not run."""


class QueueFull(RuntimeError):
    """`max_queue` requests are already waiting for a session run."""


@dataclass
class _Item:
    model: Any
    inputs: np.ndarray
    future: asyncio.Future[Any]
    since: float  # time.perf_counter() when its request was admitted (its wait for a run counts from there)
    taken: bool = False  # out of the waiting count: gathered into a batch, or given up by its request


class MicroBatcher:
    def __init__(
        self,
        run: Callable[[Any, np.ndarray], Any],
        max_batch: int,
        max_wait_s: float,
        runners: int = 1,
        max_queue: int | None = None,
        runner_nice: int = 0,
    ) -> None:
        self._run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.runners = max(1, runners)
        self.max_queue = max_queue
        self.waiting = 0  # requests queued and still waiting for a run
        self.waiting_images = 0  # their images
        self._queue: asyncio.Queue[_Item] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._free: asyncio.Semaphore | None = None
        self._running: set[asyncio.Task[None]] = set()
        self.running_images = 0  # images in the batches being run
        self._executor = ThreadPoolExecutor(
            max_workers=self.runners, thread_name_prefix="lensmith-infer", initializer=lower_thread_priority, initargs=(runner_nice,)
        )
        self.batch_sizes: list[int] = []  # recent batch sizes, for tests and metrics
        self.busy_s = 0.0  # total seconds spent in session runs (summed over runners)
        self.on_batch: Callable[[int, float], None] | None = None  # (images, seconds) per run
        self.on_wait: Callable[[float], None] | None = None  # per request run: seconds from `since` to its run's start

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._free = asyncio.Semaphore(self.runners)
        self._worker = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Finish the batches being run, fail the requests still queued, free the threads."""
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        while self._queue is not None and not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(BatcherStopped("the service is shutting down"))
        self._executor.shutdown(wait=True)

    @property
    def full(self) -> bool:
        return self.max_queue is not None and self.waiting >= self.max_queue

    async def submit(self, model: Any, inputs: np.ndarray, since: float | None = None) -> Any:
        """`run(model, batch)`'s result for `inputs` (N images along axis 0), computed in a shared batch.
        Raises QueueFull when `max_queue` requests are waiting already. `since`: when the request was admitted
        (time.perf_counter(); default now), for `on_wait`."""
        assert self._queue is not None, "MicroBatcher.start() was not called"
        if self.full:
            raise QueueFull(f"{self.waiting} requests are waiting for inference")
        item = _Item(model, inputs, asyncio.get_running_loop().create_future(), time.perf_counter() if since is None else since)
        self.waiting += 1
        self.waiting_images += len(inputs)
        self._queue.put_nowait(item)
        try:
            return await item.future
        finally:
            if not item.taken:  # cancelled while queued: the batch gatherer skips it
                self._take(item)

    async def _next_item(self, wait: bool) -> _Item:
        """The next queued item that is still wanted (raises QueueEmpty when not `wait`ing and none is)."""
        assert self._queue is not None
        while True:
            item = await self._queue.get() if wait else self._queue.get_nowait()
            if not item.taken:
                self._take(item)
                return item

    def _take(self, item: _Item) -> None:
        item.taken = True
        self.waiting -= 1
        self.waiting_images -= len(item.inputs)

    async def _gather(self) -> list[_Item]:
        """The next batch: see the module docstring for how large and how long it waits."""
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        items = [await self._next_item(wait=True)]
        size = len(items[0].inputs)
        limit = self.batch_limit(self.waiting + size, self.running_images, len(self._running))
        others_free = self.runners - len(self._running) - 1
        deadline = loop.time() + self.max_wait_s
        while size < limit:
            try:
                item = await self._next_item(wait=False)
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0 or others_free > 0:
                    break
                try:
                    item = await asyncio.wait_for(self._next_item(wait=True), remaining)
                except asyncio.TimeoutError:
                    break
            items.append(item)
            size += len(item.inputs)
        return items

    def batch_limit(self, queued: int, running_images: int, running_batches: int) -> int:
        """Most images the next batch takes, given `queued` images waiting (this batch's first included)
        and `running_images` in the `running_batches` batches being run by the other runners."""
        if self.runners == 1:
            return self.max_batch
        free = self.runners - running_batches
        if free > 1:  # share what is queued with the other free runners, who start at once
            return min(self.max_batch, -(-queued // free))
        return min(self.max_batch, max(1, -(-(queued + running_images) // self.runners)))

    async def _loop(self) -> None:
        assert self._free is not None
        while True:
            await self._free.acquire()  # gather only when a runner can take the batch at once
            try:
                items = await self._gather()
            except BaseException:
                self._free.release()
                raise
            self.running_images += sum(len(item.inputs) for item in items)
            task = asyncio.get_running_loop().create_task(self._run_items(items))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run_items(self, items: list[_Item]) -> None:
        assert self._free is not None
        loop = asyncio.get_running_loop()
        try:
            by_model: dict[int, list[_Item]] = {}
            for item in items:
                if not item.future.done():  # a request that gave up while the batch formed is not run
                    by_model.setdefault(id(item.model), []).append(item)
            for group in by_model.values():
                batch = group[0].inputs if len(group) == 1 else np.concatenate([i.inputs for i in group])
                if self.on_wait is not None:
                    started = time.perf_counter()
                    for item in group:
                        self.on_wait(started - item.since)
                try:
                    results, seconds = await loop.run_in_executor(self._executor, self._timed_run, group[0].model, batch)
                except Exception as exc:  # delivered to each waiting request, which answers with a JSON 500
                    for item in group:
                        if not item.future.done():
                            item.future.set_exception(exc)
                    continue
                self.busy_s += seconds
                self.batch_sizes.append(len(batch))
                del self.batch_sizes[:-1000]
                if self.on_batch is not None:
                    self.on_batch(len(batch), seconds)
                start = 0
                for item in group:
                    end = start + len(item.inputs)
                    if not item.future.done():
                        item.future.set_result(results[start:end])
                    start = end
        finally:
            self.running_images -= sum(len(item.inputs) for item in items)
            self._free.release()

    def _timed_run(self, model: Any, batch: np.ndarray) -> tuple[Any, float]:
        start = time.perf_counter()
        result = self._run(model, batch)
        return result, time.perf_counter() - start
