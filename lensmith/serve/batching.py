"""Micro-batching: concurrent requests' images are run through the session together.

Requests put (model, inputs) on a queue; one worker takes the first item, then keeps taking items until
`max_batch` images are gathered or `max_wait_s` has passed, and runs each model's share as one batch in
a single inference thread. Items carry the model they were preprocessed for, so a hot reload never mixes
models within a batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class _Item:
    model: Any
    inputs: np.ndarray
    future: asyncio.Future[np.ndarray]


class MicroBatcher:
    def __init__(self, run: Callable[[Any, np.ndarray], np.ndarray], max_batch: int, max_wait_s: float) -> None:
        self._run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: asyncio.Queue[_Item] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lensmith-infer")
        self.batch_sizes: list[int] = []  # recent batch sizes, for tests and metrics
        self.on_batch: Callable[[int], None] | None = None

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    async def submit(self, model: Any, inputs: np.ndarray) -> np.ndarray:
        """Logits for `inputs` (N x C x H x W float32), computed in a shared batch."""
        assert self._queue is not None, "MicroBatcher.start() was not called"
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Item(model, inputs, future))
        return await future

    async def _gather(self) -> list[_Item]:
        assert self._queue is not None
        items = [await self._queue.get()]
        size = len(items[0].inputs)
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        while size < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            items.append(item)
            size += len(item.inputs)
        return items

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._gather()
            by_model: dict[int, list[_Item]] = {}
            for item in items:
                by_model.setdefault(id(item.model), []).append(item)
            for group in by_model.values():
                batch = np.concatenate([i.inputs for i in group])
                try:
                    logits = await loop.run_in_executor(self._executor, self._run, group[0].model, batch)
                except Exception as exc:  # delivered to each waiting request, which answers with a JSON 500
                    for item in group:
                        if not item.future.done():
                            item.future.set_exception(exc)
                    continue
                self.batch_sizes = (self.batch_sizes + [len(batch)])[-1000:]
                if self.on_batch is not None:
                    self.on_batch(len(batch))
                start = 0
                for item in group:
                    end = start + len(item.inputs)
                    if not item.future.done():
                        item.future.set_result(logits[start:end])
                    start = end
