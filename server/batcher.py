"""Dynamic batching: concurrent requests for one model version computed as one batch.

    batcher = DynamicBatcher(run_batch, config.batching, executor)
    result = await batcher.submit(query, deadline=loop.time() + 0.05)

A batch closes when it holds ``max_batch_size`` requests or when its first request has
waited ``max_queue_delay_us``; it is computed by ``run_batch(items) -> results`` in the
executor (off the event loop, once per batch). At most ``max_queue_size`` requests wait:
one more is refused at once with ``QueueFull``. A request whose deadline has passed is
dropped before compute (``DeadlineExpired``); a cancelled caller's request is skipped.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

from recserve.server.config import BatchingConfig
from recserve.server.errors import DeadlineExpired, QueueFull

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    item: object
    future: asyncio.Future
    deadline: float | None


class DynamicBatcher:
    def __init__(self, run_batch: Callable[[Sequence], Sequence], config: BatchingConfig, executor: Executor,
                 name: str = ""):
        self._run_batch = run_batch
        self._config = config
        self._executor = executor
        self._name = name
        self._queue: collections.deque[_Pending] = collections.deque()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.batches = 0  # counters for metrics and tests
        self.items = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher {self._name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._queue:
            p = self._queue.popleft()
            if not p.future.done():
                p.future.cancel()

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def submit(self, item, deadline: float | None = None):
        if len(self._queue) >= self._config.max_queue_size:
            raise QueueFull(f"{self._name}: {len(self._queue)} requests already queued "
                            f"(max_queue_size {self._config.max_queue_size}); retry with backoff")
        self.start()
        pending = _Pending(item, asyncio.get_running_loop().create_future(), deadline)
        self._queue.append(pending)
        self._arrived.set()
        return await pending.future

    async def _collect(self) -> list[_Pending]:
        """Wait for a first request, then for company until the batch is full or the
        first request's delay budget is spent."""
        while not self._queue:
            self._arrived.clear()
            await self._arrived.wait()
        loop = asyncio.get_running_loop()
        close_at = loop.time() + self._config.max_queue_delay_us / 1e6
        while self._config.max_queue_delay_us and len(self._queue) < self._config.max_batch_size:
            remaining = close_at - loop.time()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
        n = min(len(self._queue), self._config.max_batch_size)
        return [self._queue.popleft() for _ in range(n)]

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            now = loop.time()
            live = []
            for p in batch:
                if p.future.done():  # the caller went away (cancelled)
                    continue
                if p.deadline is not None and p.deadline <= now:
                    p.future.set_exception(DeadlineExpired(
                        f"{self._name}: the deadline passed while the request was queued"))
                    continue
                live.append(p)
            if not live:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, [p.item for p in live])
            except Exception as e:  # one bad batch must not stop the batcher
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            self.batches += 1
            self.items += len(live)
            for p, r in zip(live, results):
                if not p.future.done():
                    if isinstance(r, BaseException):
                        p.future.set_exception(r)
                    else:
                        p.future.set_result(r)
