"""DynamicBatcher on its own: batching, deadlines, queue bound, bad requests, close."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from recserve.server.batcher import DynamicBatcher
from recserve.server.config import BatchingConfig
from recserve.server.errors import DeadlineExpired, InvalidRequest, NotReady, QueueFull


class Gate:
    """A run_batch that records its batches and can be held closed by the test."""

    def __init__(self):
        self.open = threading.Event()
        self.open.set()
        self.batches: list[list] = []

    def __call__(self, items):
        self.open.wait(10)
        self.batches.append(list(items))
        for item in items:
            if item == "bad":
                raise InvalidRequest("bad item")
        if items == ["short"]:
            return []  # a broken run_batch: fewer results than items
        return [f"done {item}" for item in items]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def batcher(gate, **config):
    return DynamicBatcher(gate, BatchingConfig(**config), ThreadPoolExecutor(1), name="m/1")


async def hold_computing(b, gate, item="a"):
    """Submit ``item`` with the gate closed: it is computing (held) when this returns."""
    gate.open.clear()
    computing = asyncio.ensure_future(b.submit(item))
    await asyncio.sleep(0.05)
    return computing


def test_requests_arriving_during_a_compute_form_the_next_batch():
    async def main():
        gate = Gate()
        b = batcher(gate, max_batch_size=8)
        first = await hold_computing(b, gate)
        rest = [asyncio.ensure_future(b.submit(x)) for x in "bcdefghij"]
        await asyncio.sleep(0.05)
        gate.open.set()
        results = await asyncio.gather(first, *rest)
        await b.close()
        return gate.batches, results

    batches, results = run(main())
    assert batches == [["a"], list("bcdefghi"), ["j"]]  # greedy: no waiting; max_batch_size 8
    assert results == [f"done {x}" for x in "abcdefghij"]


def test_a_positive_delay_waits_for_company_from_the_first_arrival():
    async def main():
        gate = Gate()
        b = batcher(gate, max_batch_size=8, max_queue_delay_us=200_000)
        first = asyncio.ensure_future(b.submit("a"))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(b.submit("b"))
        await asyncio.gather(first, second)
        await b.close()
        return gate.batches

    assert run(main()) == [["a", "b"]]


def test_expired_requests_are_dropped_before_compute():
    async def main():
        gate = Gate()
        b = batcher(gate, max_batch_size=8)
        blocker = await hold_computing(b, gate)
        loop = asyncio.get_running_loop()
        late = asyncio.ensure_future(b.submit("late", deadline=loop.time() + 0.05))
        ok = asyncio.ensure_future(b.submit("ok", deadline=loop.time() + 30))
        await asyncio.sleep(0.2)  # "late" expires while "a" still computes
        gate.open.set()
        with pytest.raises(DeadlineExpired, match="deadline passed while the request was queued"):
            await late
        assert await ok == "done ok" and await blocker == "done a"
        await b.close()
        return gate.batches

    assert run(main()) == [["a"], ["ok"]]  # "late" never reached run_batch


def test_a_full_queue_refuses_at_once_and_cancelled_callers_free_their_place():
    async def main():
        gate = Gate()
        b = batcher(gate, max_batch_size=1, max_queue_size=2)
        computing = await hold_computing(b, gate)
        queued = [asyncio.ensure_future(b.submit(x)) for x in "bc"]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull, match="max_queue_size 2"):
            await b.submit("d")
        queued[0].cancel()
        await asyncio.sleep(0.01)
        also = asyncio.ensure_future(b.submit("e"))  # the cancelled caller's place is free
        await asyncio.sleep(0.01)
        gate.open.set()
        results = await asyncio.gather(computing, queued[1], also)
        await b.close()
        return results, gate.batches

    results, batches = run(main())
    assert results == ["done a", "done c", "done e"]
    assert ["b"] not in batches


def test_one_bad_request_fails_alone_and_a_broken_batch_does_not_hang():
    async def main():
        gate = Gate()
        b = batcher(gate, max_batch_size=8)
        blocker = await hold_computing(b, gate)
        batch = [asyncio.ensure_future(b.submit(x)) for x in ("x", "bad", "y")]
        await asyncio.sleep(0.05)
        gate.open.set()
        results = await asyncio.gather(blocker, *batch, return_exceptions=True)
        short = await asyncio.gather(b.submit("short"), return_exceptions=True)
        after = await b.submit("z")  # the batcher still runs
        await b.close()
        return results, short, after

    results, short, after = run(main())
    assert results[0] == "done a" and results[1] == "done x" and results[3] == "done y"
    assert isinstance(results[2], InvalidRequest)
    assert isinstance(short[0], ValueError)  # zip(strict=True): a result per request, or an error
    assert after == "done z"


def test_close_fails_queued_requests_and_refuses_new_ones():
    async def main():
        gate = Gate()
        b = batcher(gate, max_batch_size=1)
        computing = await hold_computing(b, gate)
        queued = asyncio.ensure_future(b.submit("b"))
        await asyncio.sleep(0.01)
        closing = asyncio.ensure_future(b.close())
        await asyncio.sleep(0.05)
        with pytest.raises(NotReady, match="unloaded before this request ran"):
            await queued
        with pytest.raises(NotReady, match="unloaded"):
            await b.submit("c")
        gate.open.set()
        await closing
        return await computing  # the batch in flight finished

    assert run(main()) == "done a"
