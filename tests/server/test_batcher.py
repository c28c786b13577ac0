"""DynamicBatcher on its own: batching, deadlines, queue bound, bad requests, close."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from recserve.server.batcher import QUIET_S, DynamicBatcher
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
    """Batches always go to the executor (the gate holds them there) unless the test
    sets inline_compute_us itself."""
    config.setdefault("inline_compute_us", 0)
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


class Costly:
    """A run_batch whose batches of more than ``cheap_up_to`` items take 20 ms."""

    def __init__(self, cheap_up_to: int):
        self.cheap_up_to = cheap_up_to
        self.threads: list[tuple[int, int]] = []  # (batch size, thread id)

    def __call__(self, items):
        self.threads.append((len(items), threading.get_ident()))
        if len(items) > self.cheap_up_to:
            threading.Event().wait(0.02)
        return [f"done {item}" for item in items]


def test_measured_cheap_batches_run_on_the_loop_thread_and_costly_ones_in_the_executor():
    async def main():
        loop_thread = threading.get_ident()
        cheap = Costly(cheap_up_to=1)
        in_flight = {"n": 1}
        b = DynamicBatcher(cheap, BatchingConfig(inline_compute_us=5000), ThreadPoolExecutor(1), name="m/1",
                           in_flight=lambda: in_flight["n"])
        in_flight["n"] = 2  # company: the server is not quiet, so only measured cost decides
        assert await b.submit("a") == "done a"  # nothing measured yet: the executor
        assert cheap.threads[-1][1] != loop_thread and b.inline_batches == 0
        in_flight["n"] = 1
        assert await b.submit("b") == "done b"  # batches of one are now known to be cheap
        assert cheap.threads[-1][1] == loop_thread and b.inline_batches == 1
        await b.close()

        busy_loop = DynamicBatcher(cheap, BatchingConfig(inline_compute_us=5000), ThreadPoolExecutor(1), name="m/3",
                                   in_flight=lambda: 1, loop_has_room=lambda: False)
        busy_loop.warm_up([["w"]])
        assert await busy_loop.submit("x") == "done x"  # cheap and quiet, but the loop has no time to spare
        assert cheap.threads[-1][1] != loop_thread and busy_loop.inline_batches == 0
        await busy_loop.close()

        costly = Costly(cheap_up_to=0)
        b = DynamicBatcher(costly, BatchingConfig(inline_compute_us=5000), ThreadPoolExecutor(1), name="m/2")
        b.warm_up([["w"]])  # 20 ms: over the 5 ms budget
        assert await b.submit("c") == "done c"
        assert costly.threads[-1][1] != loop_thread and b.inline_batches == 0
        await b.close()

    run(main())


def test_a_lone_request_in_a_quiet_server_computes_in_its_coroutine_whatever_it_costs():
    """Alone and no company for QUIET_S: no thread hand-off even for a 20 ms compute; a
    request that just had company (the start of a burst) sends the costly one to the
    executor; inline_compute_us=0 keeps every compute off the loop."""
    async def main():
        loop_thread = threading.get_ident()
        costly = Costly(cheap_up_to=0)
        in_flight = {"n": 1}
        b = DynamicBatcher(costly, BatchingConfig(inline_compute_us=500), ThreadPoolExecutor(1), name="m/1",
                           in_flight=lambda: in_flight["n"])
        b.warm_up([["w"]])  # 20 ms: 40x the inline budget
        assert await b.submit("a") == "done a"
        assert costly.threads[-1][1] == loop_thread and b.inline_batches == 1
        in_flight["n"] = 2
        assert await b.submit("b") == "done b"  # with company: queued, computed in the executor
        in_flight["n"] = 1
        assert await b.submit("c") == "done c"  # alone, but company was seen just now
        assert costly.threads[-1][1] != loop_thread and b.inline_batches == 1
        await asyncio.sleep(QUIET_S)
        assert await b.submit("d") == "done d"  # quiet again
        assert costly.threads[-1][1] == loop_thread and b.inline_batches == 2
        await b.close()

        never = DynamicBatcher(costly, BatchingConfig(inline_compute_us=0), ThreadPoolExecutor(1), name="m/2",
                               in_flight=lambda: 1)
        assert await never.submit("e") == "done e"
        assert costly.threads[-1][1] != loop_thread and never.inline_batches == 0
        await never.close()

    run(main())


def test_warm_up_seeds_the_cost_and_the_inline_path_honours_deadlines():
    async def main():
        b = DynamicBatcher(Costly(cheap_up_to=64), BatchingConfig(inline_compute_us=5000), ThreadPoolExecutor(1),
                           name="m/1", in_flight=lambda: 1)
        b.warm_up([["w"]])
        loop = asyncio.get_running_loop()
        with pytest.raises(DeadlineExpired):
            await b.submit("late", deadline=loop.time() - 0.001)
        assert await b.submit("on time", deadline=loop.time() + 1) == "done on time"
        assert b.inline_batches == 1
        await b.close()

    run(main())


def test_with_company_cheap_requests_still_batch_on_the_loop_thread():
    async def main():
        work = Costly(cheap_up_to=64)
        busy = {"n": 8}
        b = DynamicBatcher(work, BatchingConfig(inline_compute_us=5000), ThreadPoolExecutor(1), name="m/1",
                           in_flight=lambda: busy["n"])
        b.warm_up([["w"], ["w"] * 5])  # sizes 1 and 4..7 are cheap
        warm = len(work.threads)
        results = await asyncio.gather(*(b.submit(x) for x in "abcde"))
        assert results == [f"done {x}" for x in "abcde"]
        assert [size for size, _ in work.threads[warm:]] == [5]  # one batch, not five
        assert work.threads[-1][1] == threading.get_ident()  # computed on the loop thread
        await b.close()

    run(main())


def test_warm_up_stops_after_one_round_once_every_size_is_clearly_too_costly_for_the_loop():
    costly, cheap = Costly(cheap_up_to=0), Costly(cheap_up_to=64)
    config = BatchingConfig(inline_compute_us=5000)
    DynamicBatcher(costly, config, ThreadPoolExecutor(1)).warm_up([["w"], ["w", "w"]])  # 20 ms > 2 x 5 ms
    DynamicBatcher(cheap, config, ThreadPoolExecutor(1)).warm_up([["w"], ["w", "w"]])
    assert len(costly.threads) == 2  # one round
    assert len(cheap.threads) == 6  # three rounds: the median decides where they run
