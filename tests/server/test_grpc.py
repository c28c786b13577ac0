"""A real server on port 0 driven through the real client: results, batching, errors, health."""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from recserve.clients import RecommendClient
from recserve.server.retrieval import RetrievalModel
from tests.server.conftest import ServerThread, WorkerServer, server_config, target_of

PORTS = ["main", "native"]  # the grpc.aio port, and the gRPC C++ front end's (server/native.py)


def golden(repo):
    return json.loads((repo / "tiny/1/manifest.json").read_text())["golden"]


@pytest.mark.parametrize("port", PORTS)
def test_golden_users_get_the_manifest_top_k(server, repo, port):
    """Zero train/serve skew: the served answer is what export promised."""
    with RecommendClient(target_of(server, port)) as client:
        for g in golden(repo):
            request = g["request"]
            rec = client.recommend("tiny", request["user_id"], k=g["k"], recent_items=request["history"],
                                   context={k: v for k, v in request.items() if k not in ("user_id", "history")})
            assert rec.item_ids == g["items"]
            assert rec.scores == pytest.approx(g["scores"], abs=1e-5)
            assert (rec.model, rec.version) == ("tiny", 1)


@pytest.mark.parametrize("port", PORTS)
def test_batch_recommend_equals_offline_computation(server, repo, port):
    offline = RetrievalModel.load(repo / "tiny/1")
    users = [str(u) for u in range(40)]
    histories = [[f"I{(u * 7 + j) % 120:03d}" for j in range(u % 5)] for u in range(40)]
    with RecommendClient(target_of(server, port)) as client:
        recs = client.batch_recommend("tiny", users, k=7, recent_items=histories)
    expected = offline.recommend([{"user_id": u, "history": h} for u, h in zip(users, histories)], k=7)
    assert [r.item_ids for r in recs] == [ids for ids, _ in expected]
    for r, (_, scores) in zip(recs, expected):
        assert r.scores == pytest.approx(scores, abs=1e-6)


def test_served_versions_search_prepared_items_with_the_plain_matrix_results(server, repo):
    """The server searches kernels.prepare_items(items) (bfloat16 or int8 rows made once where the
    CPU has the pre-filter); its answers are the plain item matrix's, bit for bit."""
    import numpy as np

    from recserve import kernels

    model = server.server.registry.get("tiny").model
    isa = kernels.build_info()["cpu_isa"]
    assert model.search_items.bfloat16 == (isa in ("avx512bf16", "amx"))
    assert model.search_items.int8 == (isa == "avx2")
    users = [str(u) for u in range(40)]
    histories = [[f"I{(u * 5 + j) % 120:03d}" for j in range(u % 4)] for u in range(40)]
    vectors = model.user_vectors([{"user_id": u, "history": h} for u, h in zip(users, histories)])
    scores, rows = kernels.topk_inner_product(vectors, np.asarray(model.item_matrix), 6)
    with RecommendClient(server.target) as client:
        recs = client.batch_recommend("tiny", users, k=6, recent_items=histories)
    assert [r.item_ids for r in recs] == [model.item_ids[r].tolist() for r in rows]
    assert [r.scores for r in recs] == [s.tolist() for s in scores]


@pytest.mark.parametrize("port", PORTS)
def test_64_concurrent_callers_each_get_their_own_answer(server, repo, port):
    offline = RetrievalModel.load(repo / "tiny/1")
    served = server.server.registry.get("tiny")
    batches_before, items_before = served.batcher.batches, served.batcher.items
    users = [f"user-{i}" for i in range(64)]
    with RecommendClient(target_of(server, port)) as client, ThreadPoolExecutor(64) as pool:
        recs = list(pool.map(lambda u: client.recommend("tiny", u, k=5, recent_items=[f"I{len(u):03d}"],
                                                        exclude=["I001"]), users))
    expected = offline.recommend([{"user_id": u, "history": [f"I{len(u):03d}"]} for u in users], k=5,
                                 exclude=[["I001"]] * len(users))
    assert [r.item_ids for r in recs] == [ids for ids, _ in expected]
    assert all("I001" not in r.item_ids for r in recs)
    assert served.batcher.items - items_before == 64
    assert served.batcher.batches - batches_before < 64  # requests were batched


def test_default_batching_computes_cheap_batches_inline_and_still_batches_under_load(repo):
    """Default config (no batching delay): an idle server computes a lone cheap request in
    the handler; under 64 callers requests are batched; answers equal offline either way."""
    offline = RetrievalModel.load(repo / "tiny/1")
    with ServerThread(server_config(repo)) as s, RecommendClient(s.target) as client:
        batcher = s.server.registry.get("tiny").batcher
        inline_before = batcher.inline_batches
        rec = client.recommend("tiny", "u1", k=5, recent_items=["I003"])
        assert batcher.inline_batches == inline_before + 1
        assert rec.item_ids == offline.recommend([{"user_id": "u1", "history": ["I003"]}], k=5)[0][0]
        users = [f"user-{i}" for i in range(64)]
        expected = [ids for ids, _ in offline.recommend([{"user_id": u, "history": []} for u in users], k=5)]
        with ThreadPoolExecutor(64) as pool:  # (callers in this process take turns on the GIL)
            assert [r.item_ids for r in pool.map(lambda u: client.recommend("tiny", u, k=5), users)] == expected
        batches_before = batcher.batches
        assert [r.item_ids for r in client.batch_recommend("tiny", users, k=5)] == expected
        assert batcher.batches - batches_before < 64  # 64 queries known at once are batched


def test_the_interceptor_measures_how_busy_the_event_loop_thread_is():
    """Compute moves off the event loop when the loop has no time to spare (under load,
    gRPC's per-call work fills it and calls waiting in gRPC's core are invisible to
    Python): the interceptor samples the loop thread's CPU share as calls start."""
    import asyncio

    from recserve.server.app import LOOP_BUSY_WINDOW_S, ErrorInterceptor

    async def main():
        interceptor = ErrorInterceptor()

        async def behavior(request, context):
            if request == "spin":  # a call that keeps the loop thread on the CPU for 2 windows of CPU time
                end = time.thread_time() + 2 * LOOP_BUSY_WINDOW_S
                while time.thread_time() < end:
                    pass
            return request

        call = interceptor._wrap(grpc.unary_unary_rpc_method_handler(behavior), "/m").unary_unary
        busy = []
        for request in ("spin", "next", "wait", "after"):
            if request == "wait":
                await asyncio.sleep(4 * LOOP_BUSY_WINDOW_S)
            await call(request, None)
            busy.append(interceptor.loop_busy)
        return busy

    busy = asyncio.run(main())
    # A CPU share of wall time: on a VM whose host steals half the time, a spinning thread
    # shows ~0.5 (seen: 0.36), so the test compares the spinning window with the asleep one.
    assert busy[1] > 0.2  # the window held the spinning call
    assert busy[3] < busy[1] / 4  # mostly asleep since


def test_the_interceptor_tells_a_call_that_found_the_server_idle():
    """A call that starts after the loop thread slept with nothing in flight (a lone
    caller) may compute on the loop however busy its recent windows were; one that
    starts straight after the last call ended, the loop busy meanwhile (calls queued in
    gRPC's core), or beside another call, may not."""
    from recserve.server.app import IDLE_ARRIVAL_S, ErrorInterceptor

    interceptor = ErrorInterceptor()
    interceptor.begin()
    interceptor.end()
    time.sleep(20 * IDLE_ARRIVAL_S)  # the loop asleep between calls
    interceptor.begin()
    assert interceptor.arrived_idle
    interceptor.begin()  # a second call in flight beside it
    assert not interceptor.arrived_idle
    interceptor.end()
    interceptor.end()
    end = time.thread_time() + IDLE_ARRIVAL_S / 2  # the loop busy until the next call
    while time.thread_time() < end:
        pass
    interceptor.begin()
    assert not interceptor.arrived_idle
    interceptor.end()


# (kwargs of RecommendClient.recommend, status, part of the message)
ERROR_CASES = [
    (dict(model="nope", user_id="1", k=5), grpc.StatusCode.NOT_FOUND, "unknown model 'nope' (models: tiny)"),
    (dict(model="tiny", user_id="1", k=5, version=9), grpc.StatusCode.NOT_FOUND, "has no version 9"),
    (dict(model="tiny", user_id="", k=5), grpc.StatusCode.INVALID_ARGUMENT, "user_id is empty"),
    (dict(model="tiny", user_id="1", k=0), grpc.StatusCode.INVALID_ARGUMENT, "k must be in 1..1000, got 0"),
    (dict(model="tiny", user_id="1", k=1001), grpc.StatusCode.INVALID_ARGUMENT, "got 1001"),
    (dict(model="", user_id="1", k=5), grpc.StatusCode.INVALID_ARGUMENT, "model is empty"),
]


@pytest.mark.parametrize("port", PORTS)
@pytest.mark.parametrize("kwargs, code, message", ERROR_CASES)
def test_error_statuses_and_messages(server, kwargs, code, message, port):
    with RecommendClient(target_of(server, port)) as client:
        with pytest.raises(grpc.RpcError) as e:
            kwargs = dict(kwargs)
            client.recommend(kwargs.pop("model"), kwargs.pop("user_id"), **kwargs)
    assert e.value.code() == code
    assert message in e.value.details()


@pytest.mark.parametrize("port", PORTS)
def test_batch_errors_name_the_request(server, port):
    with RecommendClient(target_of(server, port)) as client:
        with pytest.raises(grpc.RpcError) as e:
            client.batch_recommend("tiny", ["a", ""], k=3)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("requests[1]: user_id is empty (request id ")


# What reflection lists on each port (grpcurl list): the native port serves RecommendService only.
LISTED = {"main": ({"recserve.v1.RecommendService", "recserve.v1.ModelService", "recserve.v1.FeatureService",
                    "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}, set()),
          "native": ({"recserve.v1.RecommendService", "grpc.health.v1.Health"}, {"recserve.v1.ModelService"})}


@pytest.mark.parametrize("port", PORTS)
def test_health_and_reflection(server, port):
    channel = grpc.insecure_channel(target_of(server, port))
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "recserve.v1.RecommendService"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    services = {s.name for r in responses for s in r.list_services_response.service}
    listed, absent = LISTED[port]
    assert listed <= services and not absent & services
    # ghz resolves the method it calls (grpc/grpc#34743: the pool alone does not)
    for symbol, found in (("recserve.v1.RecommendService.Recommend", True), ("recserve.v1.RecommendService", True),
                          ("recserve.v1.RecommendService.Nope", False), ("no.such.Thing", False)):
        (reply,) = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol=symbol)]))
        assert reply.HasField("file_descriptor_response") == found, symbol
        if found:
            assert any(b"recommend.proto" in f for f in reply.file_descriptor_response.file_descriptor_proto)
    channel.close()


class BlockingFeatures:
    """The request feature source, held closed by the test: batches wait in compute."""

    def __init__(self):
        import threading

        from recserve.server.recommend import RequestFeatures

        self.open = threading.Event()
        self.inner = RequestFeatures()

    def user_features(self, queries, spec=None):
        self.open.wait(10)
        return self.inner.user_features(queries, spec)


def test_a_full_queue_answers_resource_exhausted_at_once(repo):
    # (Deadline drops, cancellation and batch forming are unit-tested in test_batcher.py.)
    # inline_compute_us=0: the held batch must compute off the event loop
    with ServerThread(server_config(repo, max_batch_size=1, max_queue_size=2, inline_compute_us=0)) as s, \
            RecommendClient(s.target) as client, ThreadPoolExecutor(3) as pool:
        gate = BlockingFeatures()
        s.server.registry.features = gate
        batcher = s.server.registry.get("tiny").batcher
        waiting = [pool.submit(client.recommend, "tiny", str(i), 3) for i in range(3)]  # 1 computing + 2 queued
        deadline = time.monotonic() + 10
        while batcher.queued < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as e:
            client.recommend("tiny", "3", k=3)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_queue_size 2" in e.value.details()
        gate.open.set()
        assert all(len(f.result(10).item_ids) == 3 for f in waiting)  # the queued ones are answered


def test_batch_recommend_larger_than_the_queue_is_refused(repo):
    with ServerThread(server_config(repo, max_queue_size=4)) as s, RecommendClient(s.target) as client:
        with pytest.raises(grpc.RpcError) as e:
            client.batch_recommend("tiny", [str(i) for i in range(5)], k=3)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "requests must hold 1..4 requests (max_queue_size), got 5" in e.value.details()
        assert len(client.batch_recommend("tiny", [str(i) for i in range(4)], k=3)) == 4


def test_float16_item_matrix_serves_and_passes_the_golden_check(repo):
    from dataclasses import replace

    with ServerThread(replace(server_config(repo), item_dtype="float16")) as s, RecommendClient(s.target) as client:
        served = s.server.registry.get("tiny")
        assert served.model.item_matrix.dtype.name == "float16"
        g = golden(repo)[0]
        rec = client.recommend("tiny", g["request"]["user_id"], k=g["k"], recent_items=g["request"]["history"])
        assert rec.scores == pytest.approx(g["scores"], abs=2e-3)


def test_drain_does_not_wait_for_health_watch_streams(repo):
    import threading

    from dataclasses import replace

    with ServerThread(replace(server_config(repo), drain_timeout_s=20)) as s:
        channel = grpc.insecure_channel(s.target)
        statuses = []
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))

        def watch():
            try:
                for response in stream:
                    statuses.append(response.status)
            except grpc.RpcError:
                pass

        watcher = threading.Thread(target=watch)
        watcher.start()
        time.sleep(0.3)
        started = time.monotonic()
        s.call(s.server.drain())
        assert time.monotonic() - started < 5  # not the 20 s drain timeout
        watcher.join(10)
        channel.close()
    assert statuses[0] == health_pb2.HealthCheckResponse.SERVING
    assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses


def test_a_taken_port_is_a_one_line_error(server, repo):
    import subprocess
    import sys

    port = server.target.rsplit(":", 1)[1]
    proc = subprocess.run([sys.executable, "-m", "recserve.cli", "serve", "--repository", str(repo), "--host",
                           "localhost", "--port", port], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("recserve serve: error:") and port in last


def test_a_model_without_a_loadable_version_is_unavailable_with_the_reason(repo, tmp_path):
    broken = tmp_path / "repo"
    shutil.copytree(repo, broken)
    manifest = broken / "tiny/1/manifest.json"
    m = json.loads(manifest.read_text())
    m["golden"][0]["user_vector"][0] += 0.5
    manifest.write_text(json.dumps(m))
    with ServerThread(server_config(broken)) as s, RecommendClient(s.target) as client:
        with pytest.raises(grpc.RpcError) as e:
            client.recommend("tiny", "1", k=3)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no loadable version" in e.value.details() and "user vector differs" in e.value.details()
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(s.target))
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_sigterm_drains_in_flight_requests_then_exits(repo):
    import os
    import signal
    import sys

    from recserve.server.process import start_server_process

    proc, port = start_server_process(
        [sys.executable, "-m", "recserve.cli", "serve", "--repository", str(repo), "--host", "localhost",
         "--port", "0", "--max-queue-delay-us", "2000000"], marker="serving tiny on port")
    try:
        target = f"localhost:{port}"
        with RecommendClient(target) as client, ThreadPoolExecutor(8) as pool:
            in_flight = [pool.submit(client.recommend, "tiny", str(i), 4, timeout=10) for i in range(8)]
            time.sleep(0.5)  # they now wait in the batcher (a 2 s batching window)
            os.kill(proc.pid, signal.SIGTERM)
            assert [len(f.result(10).item_ids) for f in in_flight] == [4] * 8
        assert proc.wait(15) == 0
        with RecommendClient(target) as client, pytest.raises(grpc.RpcError) as e:
            client.recommend("tiny", "1", k=3, timeout=2)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        if proc.poll() is None:
            proc.kill()


def _with_fake_plan(repo, tmp_path):
    """The repo with a version whose manifest also lists a TensorRT plan (garbage bytes)."""
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy)
    manifest = copy / "tiny/1/manifest.json"
    m = json.loads(manifest.read_text())
    (copy / "tiny/1/engine/user_tower.plan").write_bytes(b"not a plan")
    m["engines"]["tensorrt"] = {"file": "engine/user_tower.plan", "precision": "fp16"}
    manifest.write_text(json.dumps(m))
    return copy


def test_auto_engine_falls_back_to_onnx_when_tensorrt_cannot_run(repo, tmp_path):
    with ServerThread(server_config(_with_fake_plan(repo, tmp_path))) as s, RecommendClient(s.target) as client:
        assert s.server.registry.get("tiny").model.engine.backend == "onnx"
        assert len(client.recommend("tiny", "1", k=3).item_ids) == 3


def test_an_engine_the_version_lacks_makes_it_unavailable(repo):
    from dataclasses import replace

    with ServerThread(replace(server_config(repo), engine="tensorrt")) as s, RecommendClient(s.target) as client:
        with pytest.raises(grpc.RpcError) as e:
            client.recommend("tiny", "1", k=3)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no 'tensorrt' engine (has: onnx)" in e.value.details()


def test_tensorrt_engine_serves_the_golden_answers(repo, tmp_path):
    from recserve.trainer.tensorrt_engine import unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(f"serving with TensorRT needs tensorrt, cupy and a GPU: {reason}")
    from dataclasses import replace

    from recserve.trainer.export import export_run

    run = next(repo.parent.glob("server-run*"))
    trt_repo = tmp_path / "trt"
    export_run(run, trt_repo, "tiny", backends=("onnx", "tensorrt"), log=lambda *_: None)
    with ServerThread(replace(server_config(trt_repo), engine="tensorrt")) as s, \
            RecommendClient(s.target) as client:
        assert s.server.registry.get("tiny").model.engine.backend == "tensorrt"
        for g in golden(trt_repo):
            rec = client.recommend("tiny", g["request"]["user_id"], k=g["k"], recent_items=g["request"]["history"])
            assert rec.scores == pytest.approx(g["scores"], abs=0.05)


def test_worker_processes_share_the_port_and_drain_together(repo):
    import socket
    import sys

    with socket.socket() as probe:  # a free port for the workers to share
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    with WorkerServer([sys.executable, "-m", "recserve.cli", "serve", "--repository", str(repo), "--host",
                       "localhost", "--port", str(port), "--workers", "2", "--metrics-port", "0"]) as server:
        pids = {line.split("pid ")[1].split(")")[0] for line in server.lines(2)}
        assert len(pids) == 2  # two processes, each serving on the one port
        answered = set()
        for _ in range(8):  # fresh connections land on either worker
            channel = grpc.insecure_channel(f"localhost:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
            with RecommendClient("", channel=channel) as client:
                answered.add(tuple(client.recommend("tiny", "7", k=3, timeout=10).item_ids))
        assert len(answered) == 1  # the same model answers identically wherever it lands
        assert server.stop() == 0


def test_workers_exit_when_their_parent_is_killed(repo):
    import os
    import signal
    import socket
    import sys
    import time

    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    with WorkerServer([sys.executable, "-m", "recserve.cli", "serve", "--repository", str(repo), "--host",
                       "localhost", "--port", str(port), "--workers", "2", "--metrics-port", "off"]) as server:
        pids = [int(line.split("pid ")[1].split(")")[0]) for line in server.lines(2)]
        os.kill(server.proc.pid, signal.SIGKILL)  # no chance to stop them itself
        server.proc.wait()

        def alive(pid: int) -> bool:
            try:
                return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"  # Z: exited
            except FileNotFoundError:
                return False

        deadline = time.monotonic() + 30
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(p) for p in pids), "workers kept running after their parent was killed"


def test_workers_need_a_fixed_port(repo):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "recserve.cli", "serve", "--repository", str(repo), "--port", "0",
                           "--workers", "2"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith("--workers > 1 needs a fixed --port (the workers share it)")
