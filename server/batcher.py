"""Dynamic batching: concurrent requests for one model version computed as one batch.

    batcher = DynamicBatcher(run_batch, config.batching, executor)
    result = await batcher.submit(query, deadline=loop.time() + 0.05)
    await batcher.drain()      # stop intake (Retired); queued and in-flight requests finish
    await batcher.close()      # stop intake; queued requests fail NotReady; in-flight finish

A batch closes when it holds ``max_batch_size`` requests or when its oldest request has
waited ``max_queue_delay_us`` since it arrived (0: never wait; requests arriving during a
compute form the next batch). It is computed by ``run_batch(items) -> results``, once per
batch: in the executor, off the event loop, unless batches of its size have so far cost
at most ``inline_compute_us`` and the loop thread has time to spare (``loop_has_room``) --
then on the loop thread, because the two thread hand-offs would cost more than the compute
(costs are kept per power-of-two batch size). A request alone in a quiet server (no
request has had company for ``QUIET_S``) is computed in its caller's coroutine whatever
it costs, while the loop has room: nothing else is waiting for the loop, and the hand-offs
are pure latency. At most ``max_queue_size`` requests wait:
one more is refused at once with ``QueueFull``. A request whose deadline has passed is
dropped before compute (``DeadlineExpired``); a cancelled caller's request is skipped. If
a batch raises, its requests are retried one by one, so one bad request fails alone.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

from recserve.server.config import BatchingConfig
from recserve.server.errors import DeadlineExpired, NotReady, QueueFull, Retired

log = logging.getLogger(__name__)

# A request computed alone may take the loop for as long as it costs only once no request
# has had company for this long: the first requests of a burst look alone too, and the
# burst would wait on each of them in turn instead of batching behind the first.
QUIET_S = 0.05


@dataclass
class _Pending:
    item: object
    future: asyncio.Future
    deadline: float | None
    arrived: float


class DynamicBatcher:
    def __init__(self, run_batch: Callable[[Sequence], Sequence], config: BatchingConfig, executor: Executor,
                 name: str = "", observe: Callable[[int, list[float], float, Sequence | None], None] | None = None,
                 in_flight: Callable[[], int] | None = None, loop_has_room: Callable[[], bool] | None = None):
        """``observe(batch size, each request's seconds in the queue, compute seconds, the
        batch's results or None if it raised)`` is called after each batch (metrics), from
        the event loop after the batch's callers have resumed with their answers: no reply
        waits on it. ``in_flight()`` counts the server's requests
        being handled: a lone request may skip the queue (see submit), a batch gives the
        others one loop pass to join it. ``loop_has_room()``: whether the event loop thread
        has time for cheap compute now (default: always)."""
        self._run_batch = run_batch
        self._observe = observe
        self._in_flight = in_flight
        self._loop_has_room = loop_has_room or (lambda: True)
        self._config = config
        self._executor = executor
        self._name = name
        self._queue: collections.deque[_Pending] = collections.deque()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False
        # batch size bucket (bit length) -> seconds of recent batches; the median decides
        self._cost: dict[int, collections.deque] = {}
        self.batches = 0  # counters for metrics and tests
        self.items = 0
        self.inline_batches = 0
        self._computing = False  # the batcher task has a batch in compute
        self._company_at = float("-inf")  # loop time a request last had company

    def start(self) -> None:
        if self._closed:
            raise Retired(f"{self._name} is unloaded; retry")
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher {self._name}")
            self._task.add_done_callback(self._log_crash)

    def _log_crash(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("batcher %s stopped", self._name, exc_info=task.exception())

    async def drain(self) -> None:
        """Stop taking requests (``Retired``: the caller routes elsewhere) and return when
        every queued request has been computed and answered."""
        self._closed = True
        self._arrived.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def close(self) -> None:
        """Stop taking requests; fail the queued ones (UNAVAILABLE: retry elsewhere) and let
        the batch being computed finish."""
        self._closed = True
        while self._queue:
            p = self._queue.popleft()
            if not p.future.done():
                p.future.set_exception(NotReady(f"{self._name} was unloaded before this request ran; retry"))
        self._arrived.set()  # wake the loop so that it sees the closed queue and ends
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def submit(self, item, deadline: float | None = None):
        if self._closed:
            raise Retired(f"{self._name} is unloaded; retry")
        if len(self._queue) >= self._config.max_queue_size:
            self._drop_cancelled()
        if len(self._queue) >= self._config.max_queue_size:
            raise QueueFull(f"{self._name}: {len(self._queue)} requests already queued "
                            f"(max_queue_size {self._config.max_queue_size}); retry with backoff")
        self.start()
        loop = asyncio.get_running_loop()
        now = loop.time()
        alone = (self._in_flight is not None and self._in_flight() <= 1 and not self._queue
                 and not self._computing)
        if not alone:
            self._company_at = now
        if alone and not self._config.max_queue_delay_us and (self._inline(1) or self._quiet(now)):
            # The only request in the server, and cheap (or the server is quiet): compute
            # it in the caller's coroutine (no hop to the batcher task and back, nor to a
            # compute thread). With company, requests go through the queue so that they batch.
            if deadline is not None and deadline <= now:
                raise DeadlineExpired(f"{self._name}: the deadline passed before the request was computed")
            self.batches += 1
            self.items += 1
            self.inline_batches += 1
            started = time.perf_counter()
            results = self._timed([item])
            if self._observe is not None:
                loop.call_soon(self._observe, 1, [0.0], time.perf_counter() - started, results)
            return results[0]
        pending = _Pending(item, loop.create_future(), deadline, loop.time())
        self._queue.append(pending)
        self._arrived.set()
        return await pending.future

    def _drop_cancelled(self) -> None:
        """Callers that went away do not hold queue places."""
        self._queue = collections.deque(p for p in self._queue if not p.future.done())

    async def _collect(self) -> list[_Pending]:
        """The next batch: up to max_batch_size requests, once the oldest has waited its
        delay (measured from its arrival) or the batch is full. Empty when closed."""
        while not self._queue and not self._closed:
            self._arrived.clear()
            await self._arrived.wait()
        delay = self._config.max_queue_delay_us / 1e6
        loop = asyncio.get_running_loop()
        if not delay and self._in_flight is not None and self._in_flight() > len(self._queue):
            # Other requests are being handled and may be about to queue: let them (one
            # loop pass) so that they join this batch instead of each forming its own.
            await asyncio.sleep(0)
        while delay and self._queue and len(self._queue) < self._config.max_batch_size and not self._closed:
            remaining = self._queue[0].arrived + delay - loop.time()
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
        while not (self._closed and not self._queue):
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
            if live:
                self._computing = True
                try:
                    await self._compute(loop, live)
                finally:  # cancelled mid-compute: nobody may wait forever
                    self._computing = False
                    for p in live:
                        if not p.future.done():
                            p.future.set_exception(NotReady(f"{self._name} stopped while computing; retry"))

    def warm_up(self, batches: Sequence[list], rounds: int = 3) -> None:
        """Run sample batches (blocking; before serving, off the loop) so that the cost of
        their sizes is known from the first request on: up to ``rounds`` times, fewer once
        every size costs over twice ``inline_compute_us`` (more samples cannot change where
        they run, and a large model's warm-up competes with the version serving now)."""
        for _ in range(rounds):
            for items in batches:
                self._timed(items)
            sizes = {len(items).bit_length() for items in batches}
            if all(min(self._cost[s]) * 1e6 > 2 * self._config.inline_compute_us for s in sizes):
                return

    def _timed(self, items: list) -> Sequence:
        """run_batch, its cost recorded for the batch's size bucket."""
        started = time.perf_counter()
        results = self._run_batch(items)
        samples = self._cost.setdefault(len(items).bit_length(), collections.deque(maxlen=16))
        samples.append(time.perf_counter() - started)
        return results

    def _quiet(self, now: float) -> bool:
        """No request has had company for QUIET_S, inline compute is allowed, the loop has room."""
        return (now - self._company_at >= QUIET_S and self._config.inline_compute_us > 0
                and self._loop_has_room())

    def _inline(self, n: int) -> bool:
        samples = self._cost.get(n.bit_length())
        return (bool(samples) and statistics.median(samples) * 1e6 <= self._config.inline_compute_us
                and self._loop_has_room())

    async def _compute(self, loop, live: list[_Pending]) -> None:
        items = [p.item for p in live]
        started, queued_since = time.perf_counter(), loop.time()
        try:
            if self._inline(len(items)):
                self.inline_batches += 1
                results = self._timed(items)
            else:
                results = await loop.run_in_executor(self._executor, self._timed, items)
            outcomes = list(zip(live, results, strict=True))
        except Exception as e:
            results = None
            if len(live) == 1:
                outcomes = [(live[0], e)]
            else:  # find the request that broke the batch; the others still get answers
                outcomes = []
                for p in live:
                    try:
                        outcomes.append((p, (await loop.run_in_executor(self._executor, self._run_batch,
                                                                        [p.item]))[0]))
                    except Exception as single:
                        outcomes.append((p, single))
        self.batches += 1
        self.items += len(live)
        compute = time.perf_counter() - started
        for p, outcome in outcomes:
            if p.future.done():
                continue
            if isinstance(outcome, BaseException):
                p.future.set_exception(outcome)
            else:
                p.future.set_result(outcome)
        if self._observe is not None:  # after the callers' wake-ups, which set_result scheduled
            loop.call_soon(self._observe, len(live), [queued_since - p.arrived for p in live], compute, results)
