"""The native data plane: RecommendService on a gRPC C++ front end, beside the grpc.aio port.

    recserve serve --repository models --port 8500 --native-port 8510

    plane = NativeDataPlane(server)   # server: RecserveServer; binds config.native_port
    plane.start()                     # on the event loop; health NOT_SERVING until set_serving
    await plane.stop()                # after the server drained: refuse, answer the rest, close

Same answers, same errors, same batcher: each call is handled by RecommendServicer's own
Recommend / BatchRecommend on the event loop, through the server's call accounting
(``ErrorInterceptor.begin/end``, so drain and batching see these calls too) and its error
mapping; a call its client cancels has its task cancelled, as grpc.aio does. What differs is below Python: HTTP/2 and each call's state machine run in gRPC C++
on its own threads (``recserve._frontend``), and Python is woken once per burst of arrivals
(an eventfd on the loop), taking every waiting call's request bytes at once — instead of
grpc.aio's per-call Cython objects, poller hand-offs and a coroutine per call started by
its server.

On this port: recserve.v1.RecommendService (Recommend, BatchRecommend), grpc.health.v1.Health
(gRPC C++'s service: Check and Watch, NOT_SERVING until the models are ready and while
draining) and server reflection (ghz and grpcurl with no proto files). The admin, feature,
and KServe services stay on the main port; their methods answer UNIMPLEMENTED here.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from pathlib import Path

import grpc

from recserve.v1 import recommend_pb2

log = logging.getLogger(__name__)


def native_frontend_available() -> bool:
    try:
        from recserve import _frontend  # noqa: F401
    except ImportError:
        return False
    return True


def _load_frontend():
    try:
        from recserve import _frontend
    except ImportError as e:
        raise RuntimeError("native_port is set but this recserve was built without the native front end (gRPC C++ "
                           "was not found at build time): install libgrpc++-dev and reinstall (make "
                           f".venv/.installed), or leave native_port unset ({e})") from None
    return _frontend


class NativeContext:
    """What RecommendServicer reads from a grpc.aio context, for a native call."""

    __slots__ = ("_call", "_deadline")

    def __init__(self, call, deadline: float | None):
        self._call = call
        self._deadline = deadline  # event loop time

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - asyncio.get_running_loop().time())

    def invocation_metadata(self):
        return tuple(self._call.metadata())


class NativeDataPlane:
    def __init__(self, server, share_port: bool = False):
        config = server.config
        self._server = server
        servicer = server.servicer
        self._service = recommend_pb2.DESCRIPTOR.services_by_name["RecommendService"].full_name
        prefix = f"/{self._service}/"
        self._methods = {
            prefix + "Recommend": (recommend_pb2.RecommendRequest.FromString, servicer.Recommend),
            prefix + "BatchRecommend": (recommend_pb2.BatchRecommendRequest.FromString, servicer.BatchRecommend),
        }
        frontend = _load_frontend()
        if sorted(frontend.METHODS) != sorted(self._methods):  # a stale build after a proto change
            raise RuntimeError(f"the native front end serves {sorted(frontend.METHODS)} but the API has "
                               f"{sorted(self._methods)}: rebuild it (make .venv/.installed)")
        tls = ("", "", "")
        if config.tls_cert:
            tls = (Path(config.tls_key).read_text(), Path(config.tls_cert).read_text(),
                   Path(config.tls_client_ca).read_text() if config.tls_client_ca else "")
        self._frontend = frontend.NativeFrontend(
            f"{config.host}:{config.native_port}", config.max_receive_message_bytes,
            config.max_send_message_bytes, *tls, share_port)
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: dict[object, asyncio.Task] = {}  # by the front end's call handle

    def start(self) -> int:
        """Listen (RuntimeError if the port is taken); returns the bound port."""
        self._loop = asyncio.get_running_loop()
        self.port = self._frontend.start()
        self._loop.add_reader(self._frontend.fd, self._arrived)
        log.info("native front end listening on %s:%d", self._server.config.host, self.port)
        return self.port

    @property
    def waiting(self) -> int:
        """Calls that arrived in the front end and are not taken yet (not counted in flight)."""
        return self._frontend.waiting

    def set_serving(self, serving: bool) -> None:
        """This port's health, for the server ("") and RecommendService, as on the main port."""
        for service in ("", self._service):
            self._frontend.set_serving(service, serving)

    def _arrived(self) -> None:
        """The eventfd is readable: every waiting call becomes a task (the loop runs them in
        order); a call its client cancelled (or whose deadline passed) has its task cancelled,
        as grpc.aio does, so the batcher drops it before compute."""
        now = self._loop.time()
        calls, cancelled = self._frontend.take()
        interceptor = self._server.interceptor
        for call in calls:
            # Counted in flight from now, not from when its task first runs: the first task
            # of a burst must see the others, or it computes alone while they wait.
            interceptor.begin()
            timeout = call.timeout
            task = self._loop.create_task(self._handle(call, None if timeout is None else now + timeout))
            self._tasks[call] = task
            task.add_done_callback(functools.partial(self._done, call))
        for call in cancelled:
            task = self._tasks.get(call)
            if task is not None:
                task.cancel()

    def _done(self, call, task: asyncio.Task) -> None:
        del self._tasks[call]
        self._server.interceptor.end()
        if task.cancelled():  # the call must still be finished; its client no longer listens
            call.fail(grpc.StatusCode.CANCELLED.value[0], "the call was cancelled")

    async def _handle(self, call, deadline: float | None) -> None:
        method = call.method
        context = NativeContext(call, deadline)
        try:
            parse, behavior = self._methods[method]
            try:
                request = parse(call.request)
            except Exception:  # a malformed message: grpc.aio answers the same
                call.fail(grpc.StatusCode.INTERNAL.value[0], "failed to parse the request message")
                return
            response = await behavior(request, context)
            call.finish(response.SerializeToString())
        except Exception as e:
            code, message, request_id = self._server.interceptor.failure(e, method, context.invocation_metadata())
            call.fail(code.value[0], message, [("x-request-id", request_id)])

    async def stop(self, grace_s: float = 0.5) -> None:
        """Refuse new calls and close the port (calls still unanswered get UNAVAILABLE)."""
        if self._loop is None:
            return
        self._loop.remove_reader(self._frontend.fd)
        await self._loop.run_in_executor(None, self._frontend.shutdown, grace_s)
        self._loop = None
