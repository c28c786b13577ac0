"""The gRPC server: recserve.v1 services, health and reflection on one port.

    recserve serve --repository models [--port 8500] [--config serve.json] [--workers 2]

    server = await create_server(config)      # binds (port 0: any free port), loads models
    await server.start(); ...; await server.drain()

Health (grpc.health.v1) reports NOT_SERVING until every model has a version loaded and
again while draining. SIGTERM/SIGINT: NOT_SERVING, refuse new requests (UNAVAILABLE),
let in-flight ones finish (up to drain_timeout_s), stop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from recserve.server.admin import ModelServicer
from recserve.server.config import ServerConfig
from recserve.features.store import FeatureStore
from recserve.server.errors import InvalidRequest, NotReady, ServingError
from recserve.server.events import EventWriter, FeatureServicer
from recserve.server.kserve import KSERVE_SERVICE, KServeServicer
from recserve.server.metrics import Metrics
from recserve.server.logs import configure_logging
from recserve.server.reflection import enable_reflection
from recserve.server.models import ModelRegistry
from recserve.server.native import NativeDataPlane
from recserve.server.tracing import Tracing
from recserve.server.recommend import Query
from recserve.v1 import (feature_service_pb2, feature_service_pb2_grpc, model_service_pb2, model_service_pb2_grpc,
                         recommend_pb2, recommend_pb2_grpc)

log = logging.getLogger(__name__)
RECOMMEND_SERVICE = recommend_pb2.DESCRIPTOR.services_by_name["RecommendService"].full_name
MODEL_SERVICE = model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name
FEATURE_SERVICE = feature_service_pb2.DESCRIPTOR.services_by_name["FeatureService"].full_name
# Compute runs on the event loop thread (cheap batches, a lone request) only while that
# thread was on a CPU for less than this share of the last window (RecserveServer._loop_has_room).
INLINE_MAX_LOOP_BUSY = 0.6
LOOP_BUSY_WINDOW_S = 0.02
# ...or when the call found the server idle: no call in flight, and the loop thread was off
# the CPU (asleep) for at least this long since the last call ended. A closed-loop client at
# concurrency 1 leaves such gaps (seen: 360-610 us asleep of 0.9-1.2 ms between calls, the
# rest being grpc.aio's send and receive); calls queued in gRPC's core (invisible to
# Python) do not: the loop goes straight from one call to the next, off the CPU only when
# the host steals it (a burst this long is rare and costs one call computed on the loop).
IDLE_ARRIVAL_S = 0.0002


def _request_id(metadata) -> str:
    """The caller's x-request-id metadata, or a new id (made only when a call fails)."""
    for key, value in metadata or ():
        if key == "x-request-id" and isinstance(value, str) and 0 < len(value) <= 128:
            return value
    return uuid.uuid4().hex[:16]


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """ServingError -> its status and message; anything else -> INTERNAL. Either way the
    message, the x-request-id trailing metadata and the log line carry the request id.
    Also the server's call accounting (``begin``/``end``), which the native front end's
    calls go through too (server/native.py)."""

    def __init__(self):
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}  # one wrapper per method, not per call
        self.in_flight = 0  # unary calls being handled
        self.streams = 0  # client streams being handled (drain waits for both to be zero)
        # The share of wall time the event loop thread spent on a CPU over the last window
        # of at least LOOP_BUSY_WINDOW_S, sampled as calls start (RecserveServer._loop_has_room).
        self.loop_busy = 0.0
        self._window = (time.perf_counter(), time.thread_time())
        # Whether the call that started last found the server idle (IDLE_ARRIVAL_S), and
        # (wall, loop thread CPU) when the last call ended with none left in flight.
        self.arrived_idle = False
        self._quiet_since = self._window
        self.idle = asyncio.Event()
        self.idle.set()

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method in self._wrapped:
            return self._wrapped[method]
        handler = await continuation(handler_call_details)
        if handler is None or (handler.unary_unary is None and handler.stream_unary is None):
            return handler  # server streams (Health.Watch) run unguarded and never hold a drain
        self._wrapped[method] = self._wrap(handler, method)
        return self._wrapped[method]

    def begin(self, counter: str = "in_flight") -> None:
        """A call starts (on the event loop thread): counted, and the loop's busy share sampled."""
        wall = time.perf_counter()
        cpu = None
        if wall - self._window[0] >= LOOP_BUSY_WINDOW_S:
            cpu = time.thread_time()  # the loop thread's: handlers run on it
            self.loop_busy = (cpu - self._window[1]) / (wall - self._window[0])
            self._window = (wall, cpu)
        if self.in_flight == 0:
            cpu = time.thread_time() if cpu is None else cpu
            asleep = (wall - self._quiet_since[0]) - (cpu - self._quiet_since[1])  # off the CPU
            self.arrived_idle = asleep >= IDLE_ARRIVAL_S
        else:
            self.arrived_idle = False
        setattr(self, counter, getattr(self, counter) + 1)
        self.idle.clear()

    def end(self, counter: str = "in_flight") -> None:
        setattr(self, counter, getattr(self, counter) - 1)
        if self.in_flight == 0:
            self._quiet_since = (time.perf_counter(), time.thread_time())
            if self.streams == 0:
                self.idle.set()

    @staticmethod
    def failure(error: Exception, method: str, metadata) -> tuple[grpc.StatusCode, str, str]:
        """(status code, message, request id) for a call that raised ``error``, logged."""
        request_id = _request_id(metadata)
        if isinstance(error, ServingError):
            log.info("%s %s: %s", method, error.code.name, error.message,
                     extra={"request_id": request_id, "method": method, "code": error.code.name})
            return error.code, f"{error.message} (request id {request_id})", request_id
        log.error("internal error in %s (request id %s)", method, request_id, exc_info=error,
                  extra={"request_id": request_id, "method": method, "code": "INTERNAL"})
        return grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})", request_id

    def _wrap(self, handler, method: str):
        behavior = handler.unary_unary or handler.stream_unary
        counter = "in_flight" if handler.unary_unary else "streams"

        async def guarded(request, context):
            self.begin(counter)
            try:
                return await behavior(request, context)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as e:
                code, message, request_id = self.failure(e, method, context.invocation_metadata())
                context.set_trailing_metadata((("x-request-id", request_id),))
                await context.abort(code, message)
            finally:
                self.end(counter)

        make = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
        return make(guarded, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)


class RecommendServicer(recommend_pb2_grpc.RecommendServiceServicer):
    """Thin: protobuf <-> domain types; the registry and batcher do the work."""

    def __init__(self, registry: ModelRegistry, config: ServerConfig, metrics: Metrics, tracing: Tracing):
        self.registry = registry
        self.config = config
        self.metrics = metrics
        self.tracing = tracing
        self.draining = False
        self.batch_queries = 0  # queries of BatchRecommend calls beyond their first, in flight

    def _prepare(self, request) -> tuple[str, int | None, str | None, Query]:
        """Validate a request (errors before any routing or compute)."""
        if not request.model:
            raise InvalidRequest("model is empty")
        if not request.user_id:
            raise InvalidRequest("user_id is empty")
        if not 1 <= request.k <= self.config.max_k:
            raise InvalidRequest(f"k must be in 1..{self.config.max_k}, got {request.k}")
        query = Query(user_id=request.user_id, k=request.k, context=dict(request.context),
                      exclude=tuple(request.exclude_item_ids), recent_items=tuple(request.recent_item_ids))
        return (request.model, request.version if request.HasField("version") else None,
                request.variant if request.HasField("variant") else None, query)

    async def _answer(self, name, version, variant, query, deadline, metadata=None):
        started = time.perf_counter()
        span = self.tracing.start("recserve.Recommend", metadata, {"recserve.model": name, "recserve.k": query.k})
        # Recorded by the loop after this handler returns (call_soon): the reply does not wait on it.
        record = asyncio.get_running_loop().call_soon
        try:
            result, served, variant_name = await self.registry.recommend(name, query, deadline, version, variant)
        except ServingError as e:
            record(self.metrics.request, name, version or 0, variant or "", e.code.name, time.perf_counter() - started)
            self.tracing.finish(span, (), e.code.name)
            raise
        record(self.metrics.request, name, served.version, variant_name, "OK", time.perf_counter() - started)
        if span is not None:
            self.tracing.finish(span, result.stages, "OK", {"recserve.version": served.version,
                                                            "recserve.variant": variant_name,
                                                            "recserve.items": len(result.item_ids)})
        return recommend_pb2.RecommendResponse(item_ids=result.item_ids, scores=result.scores, model=served.name,
                                               version=served.version, variant=variant_name)

    def _check_open(self) -> None:
        if self.draining:
            raise NotReady("server is draining; retry on another replica")

    @staticmethod
    def _deadline(context) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else asyncio.get_running_loop().time() + remaining

    async def Recommend(self, request, context):
        self._check_open()
        metadata = context.invocation_metadata() if self.tracing.enabled else None
        return await self._answer(*self._prepare(request), self._deadline(context), metadata)

    async def BatchRecommend(self, request, context):
        self._check_open()
        n = len(request.requests)
        limit = self.config.batching.max_queue_size
        if not 1 <= n <= limit:
            raise InvalidRequest(f"requests must hold 1..{limit} requests (max_queue_size), got {n}")
        prepared = []
        for i, r in enumerate(request.requests):  # every request is valid before any is computed
            try:
                prepared.append(self._prepare(r))
                if r.HasField("version"):  # unknown models and versions fail the call before any compute
                    self.registry.get(r.model, r.version)
                else:
                    self.registry.entry(r.model)
            except ServingError as e:
                raise type(e)(f"requests[{i}]: {e.message}") from None
        deadline = self._deadline(context)
        self.batch_queries += n - 1  # they count as requests in flight, so that they batch
        try:
            metadata = context.invocation_metadata() if self.tracing.enabled else None
            responses = await asyncio.gather(*(self._answer(*p, deadline, metadata) for p in prepared),
                                             return_exceptions=True)
        finally:
            self.batch_queries -= n - 1
        for i, r in enumerate(responses):
            if isinstance(r, ServingError):
                raise type(r)(f"requests[{i}]: {r.message}")
            if isinstance(r, BaseException):
                raise r
        return recommend_pb2.BatchRecommendResponse(responses=responses)


class RecserveServer:
    def __init__(self, config: ServerConfig, share_port: bool = False, span_exporter=None):
        """``span_exporter``: an OpenTelemetry SpanExporter that receives every sampled span
        instead of the configured exporter (tests, embedding the server)."""
        self.config = config
        self.executor = ThreadPoolExecutor(max_workers=config.compute_threads, thread_name_prefix="recserve-compute")
        self.metrics = (Metrics.serve_prometheus(config.host, config.metrics_port) if config.metrics_port is not None
                        else Metrics.disabled())
        self.interceptor = ErrorInterceptor()
        self.store = FeatureStore.open(config.feature_store) if config.feature_store else None  # StoreError: one line
        if self.store is not None:
            self.metrics.watch_feature_store(self.store.counters)
        self.registry = ModelRegistry(config, self.executor, self.metrics, store=self.store,
                                      in_flight=self._in_flight, loop_has_room=self._loop_has_room)
        # gRPC sets SO_REUSEPORT by default: a second server on a taken port would bind and
        # silently take half the connections. Only worker processes share a port.
        self.grpc = grpc.aio.server(interceptors=[self.interceptor], options=[
            ("grpc.so_reuseport", int(share_port)),
            ("grpc.max_receive_message_length", config.max_receive_message_bytes),
            ("grpc.max_send_message_length", config.max_send_message_bytes)])
        self.tracing = Tracing.from_config(config, span_exporter)
        self.servicer = RecommendServicer(self.registry, config, self.metrics, self.tracing)
        self.health = health.aio.HealthServicer()
        recommend_pb2_grpc.add_RecommendServiceServicer_to_server(self.servicer, self.grpc)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            ModelServicer(self.registry, config.admin_bearer_token), self.grpc)
        self.features = FeatureServicer(None, lambda: self.servicer.draining)  # its writer starts with the loop
        feature_service_pb2_grpc.add_FeatureServiceServicer_to_server(self.features, self.grpc)
        KServeServicer(self).add_to_server(self.grpc)  # inference.GRPCInferenceService (KServe v2)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        enable_reflection(self.grpc, (RECOMMEND_SERVICE, MODEL_SERVICE, FEATURE_SERVICE, KSERVE_SERVICE,
                                      health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
        # RecommendService again on a gRPC C++ front end (server/native.py), when configured.
        self.native = NativeDataPlane(self, share_port) if config.native_port is not None else None
        address = f"{config.host}:{config.port}"
        if config.tls_cert:
            self.port = self.grpc.add_secure_port(address, _server_credentials(config))  # RuntimeError if taken
        else:
            self.port = self.grpc.add_insecure_port(address)

    def _in_flight(self) -> int:
        """Requests being handled: unary calls (either port), plus the extra queries of BatchRecommends,
        plus calls waiting in the native front end (the main port's waiting calls are invisible)."""
        waiting = self.native.waiting if self.native is not None else 0
        return self.interceptor.in_flight + self.servicer.batch_queries + waiting

    def _loop_has_room(self) -> bool:
        """Whether compute may run on the event loop thread: only while that thread has
        time to spare. Then a cheap batch computed in place saves two thread hand-offs. A
        busy loop (gRPC's per-call work alone fills one core at a few thousand calls/s here)
        needs the compute on the other core instead; worse, calls waiting in gRPC's core
        are invisible to Python, so under load a request computing on the loop keeps the
        next one there and each looks alone: nothing batches (measured at 64 in flight:
        1,425 req/s with compute on the loop vs 2,012 in the executor). A call that found the
        server idle (``ErrorInterceptor.arrived_idle``: a lone caller, nothing queued behind
        it) may use the loop however busy its recent windows were: at concurrency 1 on the
        main port the loop's share swings about the limit, and the executor hop cost 38 %
        of the calls 100-200 us each."""
        return self.interceptor.loop_busy < INLINE_MAX_LOOP_BUSY or self.interceptor.arrived_idle

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", RECOMMEND_SERVICE):
            await self.health.set(service, status)
        if self.native is not None:
            self.native.set_serving(serving)

    async def start(self) -> None:
        """Start answering (health NOT_SERVING), then load the models (SERVING when all are)."""
        await self._set_health(False)
        if self.store is not None:
            self.features.writer = EventWriter(self.store)
        await self.grpc.start()
        log.info("listening on %s:%d", self.config.host, self.port)
        if self.native is not None:
            try:
                self.native.start()  # RuntimeError if its port is taken
            except RuntimeError:
                await self.grpc.stop(None)
                raise
        await self.registry.start()
        if self.registry.ready and not self.servicer.draining:
            await self._set_health(True)

    async def drain(self) -> None:
        """NOT_SERVING, refuse new requests, wait (up to drain_timeout_s) for the unary calls
        in flight, then stop — Health.Watch streams never end by themselves, so the
        server is not left waiting on them."""
        self.servicer.draining = True
        await self.health.enter_graceful_shutdown()
        if self.native is not None:
            self.native.set_serving(False)
        try:
            await asyncio.wait_for(self.interceptor.idle.wait(), self.config.drain_timeout_s)
        except asyncio.TimeoutError:
            log.warning("drain: %d requests still running after %.0f s; stopping", self.interceptor.in_flight,
                        self.config.drain_timeout_s)
        await self.grpc.stop(grace=0.5)
        if self.native is not None:
            await self.native.stop(grace_s=0.5)
        if self.features.writer is not None:
            await self.features.writer.close()
        await self.registry.close()
        self.executor.shutdown(wait=True)
        if self.store is not None:
            self.store.close()
        self.metrics.close()
        self.tracing.close()

    async def wait(self) -> None:
        await self.grpc.wait_for_termination()


def _server_credentials(config: ServerConfig) -> grpc.ServerCredentials:
    """TLS from the configured PEM files; with tls_client_ca, clients must present a
    certificate signed by it (mutual TLS)."""
    key, cert = Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes()
    ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


async def create_server(config: ServerConfig) -> RecserveServer:
    """A started server with its models loaded; ``server.port`` is the bound port."""
    server = RecserveServer(config)
    await server.start()
    return server


def serve_processes(config: ServerConfig, workers: int) -> None:
    """Run ``workers`` server processes on one port (SO_REUSEPORT: the kernel spreads
    connections over them); tables and item matrices are memory-mapped, so the processes
    share those pages. SIGTERM/SIGINT to this process drains every worker; a worker that
    dies on its own takes the others down with it (exit status 1)."""
    if workers <= 1:
        asyncio.run(serve(config))
        return
    configure_logging(config.log_format)
    if config.port == 0:
        raise ValueError("--workers > 1 needs a fixed --port (the workers share it)")
    if config.native_port == 0:
        raise ValueError("--workers > 1 needs a fixed --native-port (the workers share it)")
    ctx = multiprocessing.get_context("spawn")
    # Each worker has its own metrics endpoint: metrics_port + its index (0: any free port).
    procs = [ctx.Process(target=_worker, name=f"recserve-worker-{i}", args=(dataclasses.replace(
        config, metrics_port=config.metrics_port + i if config.metrics_port else config.metrics_port), os.getpid()))
        for i in range(workers)]
    stopping = False

    def stop_all(signum=None, frame=None) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.pid is not None and p.exitcode is None:
                os.kill(p.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    for p in procs:
        p.start()
        if stopping:  # a signal arrived while starting: this one too
            os.kill(p.pid, signal.SIGTERM)
    while any(p.exitcode is None for p in procs):
        multiprocessing.connection.wait([p.sentinel for p in procs if p.exitcode is None], timeout=1.0)
        if not stopping and any(p.exitcode is not None for p in procs):
            log.error("a worker exited on its own; stopping the others")
            stop_all()
    clean = (0, -signal.SIGTERM) if stopping else (0,)
    failed = [f"{p.name} ({p.exitcode})" for p in procs if p.exitcode not in clean]
    if failed or not stopping:
        raise RuntimeError(f"worker(s) exited with an error: {', '.join(failed) or 'unexpected exit'}")


def _worker(config: ServerConfig, parent: int) -> None:
    # A worker outlives a parent killed with SIGKILL (nothing can forward that signal), and
    # would keep serving on, holding the ports: on Linux the kernel sends it SIGTERM then
    # (PR_SET_PDEATHSIG), so it drains and exits like its siblings.
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the request took effect
            return
    asyncio.run(serve(config, share_port=True))


async def serve(config: ServerConfig, share_port: bool = False) -> None:
    """Run until SIGTERM/SIGINT, then drain."""
    configure_logging(config.log_format)
    server = RecserveServer(config, share_port=share_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    loaded = [name for name, entry in server.registry.models.items() if entry.serving is not None]
    missing = sorted(set(server.registry.models) - set(loaded))
    if missing:
        print(f"recserve: NOT serving {', '.join(missing)}: no loadable version (reasons in the log)",
              file=sys.stderr, flush=True)
    native = f" (native port {server.native.port})" if server.native is not None else ""  # the main port comes last
    print(f"recserve (pid {os.getpid()}) serving {', '.join(loaded) or 'no model'}{native} on port {server.port}",
          flush=True)
    await stop.wait()
    log.info("draining (up to %.0f s)", config.drain_timeout_s)
    await server.drain()
