"""recserve.v1.FeatureService: live events into the feature store, writes batched.

    writer = EventWriter(store)               # one per server
    accepted = await writer.push(events)      # validated here; durable when it returns
    await writer.close()

Concurrent PushEvents calls are merged: while one write transaction commits (and fsyncs),
the calls that arrive wait together and go into the next one, so the fsync cost is paid
once per write, not once per call. Each call's events are validated before they join a
write, so one bad call fails alone (INVALID_ARGUMENT naming the event) and never holds the
others back. LMDB readers (Recommend batches) are never blocked by these writes.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from recserve.features.events import EventError
from recserve.features.store import FeatureStore
from recserve.server.errors import InvalidRequest, NoFeatureStore, NotReady
from recserve.v1 import feature_service_pb2, feature_service_pb2_grpc

log = logging.getLogger(__name__)
MAX_EVENTS_PER_WRITE = 16_384


class EventWriter:
    def __init__(self, store: FeatureStore):
        self.store = store
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="recserve-events")
        self._pending: list[tuple[list, asyncio.Future]] = []
        self._wake = asyncio.Event()
        self._closed = False
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="event writer")
        self.writes = 0  # write transactions (tests, metrics)

    async def push(self, events: list) -> int:
        if self._closed:
            raise NotReady("the server is shutting down; retry on another replica")
        try:
            checked = self.store.validate_events(events)
        except EventError as e:
            raise InvalidRequest(str(e)) from None
        if not checked:
            return 0
        future = asyncio.get_running_loop().create_future()
        self._pending.append((checked, future))
        self._wake.set()
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not (self._closed and not self._pending):
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            taken, n = [], 0
            while self._pending and (not taken or n + len(self._pending[0][0]) <= MAX_EVENTS_PER_WRITE):
                taken.append(self._pending.pop(0))
                n += len(taken[-1][0])
            merged = [e for events, _ in taken for e in events]
            try:
                await loop.run_in_executor(self._thread, self.store.push_events, merged)
                self.writes += 1
            except Exception as e:  # the write failed as a whole: every caller in it gets the error
                log.exception("feature store write of %d events failed", len(merged))
                for _, f in taken:
                    if not f.done():
                        f.set_exception(e)
                continue
            for events, f in taken:
                if not f.done():
                    f.set_result(len(events))

    async def close(self) -> None:
        """Write what is pending, then stop."""
        self._closed = True
        self._wake.set()
        await asyncio.gather(self._task, return_exceptions=True)
        self._thread.shutdown(wait=True)


def _events(request) -> list[tuple[str, str, float, str]]:
    return [(e.user_id, e.item_id, e.timestamp, e.event_type or "interaction") for e in request.events]


class FeatureServicer(feature_service_pb2_grpc.FeatureServiceServicer):
    def __init__(self, writer: EventWriter | None, is_draining):
        self.writer = writer
        self._draining = is_draining

    def _writer(self) -> EventWriter:
        if self.writer is None:
            raise NoFeatureStore("this server has no feature store (start it with --feature-store PATH)")
        if self._draining():
            raise NotReady("server is draining; retry on another replica")
        return self.writer

    async def PushEvents(self, request, context):
        accepted = await self._writer().push(_events(request))
        return feature_service_pb2.PushEventsResponse(accepted=accepted)

    async def StreamEvents(self, request_iterator, context):
        writer, accepted = self._writer(), 0
        async for i, batch in _enumerate(request_iterator):
            try:
                accepted += await writer.push(_events(batch))
            except InvalidRequest as e:
                raise InvalidRequest(f"batch {i}: {e.message} ({accepted} events of earlier batches were written)")
        return feature_service_pb2.PushEventsResponse(accepted=accepted)


async def _enumerate(aiter):
    i = 0
    async for x in aiter:
        yield i, x
        i += 1
