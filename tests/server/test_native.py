"""The native data plane (server/native.py on recserve._frontend, gRPC C++): RecommendService
on a second port, driven through the real client: deadlines, cancellation, health,
drain, config and CLI. (Answers, batching, error statuses, health and reflection on both ports:
test_grpc.py, parametrized over the ports.)"""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recserve.clients import RecommendClient
from recserve.server.config import ServerConfig
from recserve.v1 import model_service_pb2, model_service_pb2_grpc, recommend_pb2, recommend_pb2_grpc
from tests.server.conftest import (ServerThread, WorkerServer, metric, server_config, skip_without_native,
                                   target_of)


@pytest.fixture(autouse=True)
def _native_built():
    skip_without_native()


def native_config(repo, **batching) -> ServerConfig:
    return dataclasses.replace(server_config(repo, **batching), native_port=0)


def native_target(s: ServerThread) -> str:
    return target_of(s, "native")


def test_both_ports_answer_alike(server):
    users = [str(u) for u in range(30)]
    histories = [[f"I{(u * 3 + j) % 120:03d}" for j in range(u % 4)] for u in range(30)]
    with RecommendClient(native_target(server)) as fast, RecommendClient(server.target) as main:
        assert fast.batch_recommend("tiny", users, k=6, recent_items=histories) == \
            main.batch_recommend("tiny", users, k=6, recent_items=histories)
        assert fast.recommend("tiny", "5", k=4, exclude=["I001"]) == main.recommend("tiny", "5", k=4, exclude=["I001"])


def test_errors_carry_the_callers_request_id(server):
    stub = recommend_pb2_grpc.RecommendServiceStub(grpc.insecure_channel(native_target(server)))
    with pytest.raises(grpc.RpcError) as e:
        stub.Recommend(recommend_pb2.RecommendRequest(model="tiny", user_id="", k=3),
                       metadata=(("x-request-id", "req-42"),))
    assert e.value.details() == "user_id is empty (request id req-42)"
    assert ("x-request-id", "req-42") in e.value.trailing_metadata()


def test_a_malformed_request_is_internal_and_the_server_goes_on(server):
    channel = grpc.insecure_channel(native_target(server))
    raw = channel.unary_unary("/recserve.v1.RecommendService/Recommend")  # bytes in, bytes out
    with pytest.raises(grpc.RpcError) as e:
        raw(b"\x12\x09tru", timeout=10)  # field 2, 9 bytes announced, 3 sent
    assert e.value.code() == grpc.StatusCode.INTERNAL
    assert e.value.details() == "failed to parse the request message"
    with RecommendClient("", channel=channel) as client:
        assert len(client.recommend("tiny", "1", k=3).item_ids) == 3


def test_other_services_are_unimplemented_here_with_a_pointer_to_the_main_port(server):
    stub = model_service_pb2_grpc.ModelServiceStub(grpc.insecure_channel(native_target(server)))
    with pytest.raises(grpc.RpcError) as e:
        stub.ListModels(model_service_pb2.ListModelsRequest(), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert e.value.details() == ("method /recserve.v1.ModelService/ListModels is not served on the native port; "
                                 "use the server's main port")


def test_native_calls_are_counted_and_traced_like_the_main_ports(repo):
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    spans = InMemorySpanExporter()
    config = dataclasses.replace(native_config(repo), trace_sample_ratio=0.0)  # only what callers sampled
    with ServerThread(config, span_exporter=spans) as s:
        stub = recommend_pb2_grpc.RecommendServiceStub(grpc.insecure_channel(native_target(s)))
        stub.Recommend(recommend_pb2.RecommendRequest(model="tiny", user_id="u1", k=2),
                       metadata=(("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),))
        with pytest.raises(grpc.RpcError):
            stub.Recommend(recommend_pb2.RecommendRequest(model="nope", user_id="u1", k=2))
        assert metric(s, "recserve_requests_total", model="tiny", code="OK") == 1
        assert metric(s, "recserve_requests_total", model="nope", code="NOT_FOUND") == 1
    (request,) = [x for x in spans.get_finished_spans() if x.name == "recserve.Recommend"]
    assert format(request.context.trace_id, "032x") == trace_id


def test_client_deadlines_are_honoured_before_compute(repo):
    """A call whose deadline passes while it waits for its batch is dropped, not computed."""
    with ServerThread(native_config(repo, max_batch_size=32, max_queue_delay_us=1_500_000)) as s, \
            RecommendClient(native_target(s)) as client, ThreadPoolExecutor(2) as pool:
        batcher = s.server.registry.get("tiny").batcher
        items_before = batcher.items
        patient = pool.submit(client.recommend, "tiny", "1", 3, timeout=20)
        with pytest.raises(grpc.RpcError) as e:
            client.recommend("tiny", "2", k=3, timeout=0.3)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert len(patient.result(20).item_ids) == 3
        assert batcher.items - items_before == 1  # the expired one never reached compute


def test_a_call_its_client_cancels_is_dropped_before_compute(repo):
    with ServerThread(native_config(repo, max_batch_size=32, max_queue_delay_us=1_000_000)) as s, \
            RecommendClient(native_target(s)) as client:
        batcher = s.server.registry.get("tiny").batcher
        items_before = batcher.items
        stub = recommend_pb2_grpc.RecommendServiceStub(grpc.insecure_channel(native_target(s)))
        future = stub.Recommend.future(recommend_pb2.RecommendRequest(model="tiny", user_id="1", k=3))
        deadline = time.monotonic() + 10
        while s.server.interceptor.in_flight < 1:  # it waits in the batcher's 1 s window
            assert time.monotonic() < deadline
            time.sleep(0.01)
        future.cancel()
        cancelled_at = time.monotonic()
        while s.server.interceptor.in_flight > 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert time.monotonic() - cancelled_at < 0.9  # its handler stopped, not answered by the batch
        assert len(client.recommend("tiny", "2", k=3).item_ids) == 3  # after the window closed
        assert batcher.items - items_before == 1  # only the second call was computed


def test_drain_answers_in_flight_calls_then_refuses(repo):
    """Drain: health NOT_SERVING on the native port at once, calls in flight there still
    answered, then the port closes (new calls UNAVAILABLE)."""
    with ServerThread(native_config(repo, max_batch_size=32, max_queue_delay_us=1_000_000)) as s, \
            RecommendClient(native_target(s)) as client, ThreadPoolExecutor(8) as pool:
        target = native_target(s)
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
        in_flight = [pool.submit(client.recommend, "tiny", str(i), 4, timeout=20) for i in range(6)]
        deadline = time.monotonic() + 10
        while s.server.interceptor.in_flight < 6:  # they wait in the batcher's 1 s window
            assert time.monotonic() < deadline
            time.sleep(0.01)
        drained = threading.Thread(target=lambda: s.call(s.server.drain()))
        drained.start()
        deadline = time.monotonic() + 5
        while health.Check(health_pb2.HealthCheckRequest(service="")).status != \
                health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert [len(f.result(20).item_ids) for f in in_flight] == [4] * 6
        drained.join(20)
        with pytest.raises(grpc.RpcError) as e:
            client.recommend("tiny", "1", k=3, timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("value, message", [
    (True, "native_port must be 0..65535 or null, got True"),
    (70000, "native_port must be 0..65535 or null, got 70000"),
    ("8510", "native_port must be 0..65535 or null, got '8510'"),
])
def test_bad_native_ports_are_config_errors(value, message):
    with pytest.raises(ValueError, match=message):
        ServerConfig(repository="r", native_port=value)
    with pytest.raises(ValueError, match="native_port and port must differ, both are 8500"):
        ServerConfig(repository="r", port=8500, native_port=8500)


def test_a_taken_native_port_is_an_error(server, repo):
    taken = server.server.native.port
    with pytest.raises(RuntimeError, match=f"could not listen on localhost:{taken}"):
        with ServerThread(dataclasses.replace(server_config(repo), native_port=taken)):
            pass
    proc = subprocess.run([sys.executable, "-m", "recserve.cli", "serve", "--repository", str(repo), "--host",
                           "localhost", "--port", "0", "--native-port", str(taken), "--metrics-port", "off"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("recserve serve: error: could not listen on localhost:") and str(taken) in last


def test_the_cli_serves_the_native_port_and_sigterm_drains_in_flight_calls(repo):
    import re
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-m", "recserve.cli", "serve", "--repository", str(repo), "--host", "localhost",
         "--port", "0", "--native-port", "0", "--metrics-port", "off", "--max-queue-delay-us", "1000000"],
        stdout=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline().strip()  # printed once the models are loaded (or it exits)
        found = re.search(r"serving tiny \(native port (\d+)\) on port (\d+)$", first)
        assert found, first
        with RecommendClient(f"localhost:{found[1]}") as client, ThreadPoolExecutor(4) as pool:
            in_flight = [pool.submit(client.recommend, "tiny", str(i), 4, timeout=20) for i in range(4)]
            time.sleep(0.5)  # they wait in the batcher's 1 s window
            proc.send_signal(signal.SIGTERM)
            assert [len(f.result(20).item_ids) for f in in_flight] == [4] * 4
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_worker_processes_share_the_native_port(repo):
    sockets = [socket.socket() for _ in range(2)]
    for probe in sockets:  # two free ports for the workers to share
        probe.bind(("localhost", 0))
    port, native_port = (probe.getsockname()[1] for probe in sockets)
    for probe in sockets:
        probe.close()
    with WorkerServer([sys.executable, "-m", "recserve.cli", "serve", "--repository", str(repo), "--host",
                       "localhost", "--port", str(port), "--native-port", str(native_port), "--workers", "2",
                       "--metrics-port", "off"]) as server:
        lines = server.lines(2)
        assert all(f"(native port {native_port}) on port {port}" in line for line in lines), lines
        assert len({line.split("pid ")[1].split(")")[0] for line in lines}) == 2
        answered = set()
        for _ in range(8):  # fresh connections land on either worker
            channel = grpc.insecure_channel(f"localhost:{native_port}",
                                            options=[("grpc.use_local_subchannel_pool", 1)])
            with RecommendClient("", channel=channel) as client:
                answered.add(tuple(client.recommend("tiny", "7", k=3, timeout=10).item_ids))
        assert len(answered) == 1
        assert server.stop() == 0


def test_workers_need_a_fixed_native_port(repo):
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "recserve.cli", "serve", "--repository", str(repo), "--port",
                           str(port), "--native-port", "0", "--workers", "2"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith("--workers > 1 needs a fixed --native-port (the workers share it)")


def test_calls_handed_over_together_batch_even_on_a_quiet_server(repo):
    """A quiet server computes a lone request in its handler, whatever it costs. Calls that
    wait in the front end count in flight, and those taken together count from then on: the
    first of them must not compute alone while the others wait (each would look alone in
    turn). Here the loop thread is held while 8 calls arrive, then they form one batch."""
    with ServerThread(native_config(repo)) as s:  # default batching: no queue delay
        batcher = s.server.registry.get("tiny").batcher
        hold = threading.Event()
        s.loop.call_soon_threadsafe(hold.wait, 10)  # the event loop thread blocks; calls queue in C++
        with RecommendClient(native_target(s)) as client, ThreadPoolExecutor(8) as pool:
            batches, items = batcher.batches, batcher.items
            futures = [pool.submit(client.recommend, "tiny", str(u), 3) for u in range(8)]
            deadline = time.monotonic() + 10
            while s.server.native.waiting < 8:
                assert time.monotonic() < deadline, f"only {s.server.native.waiting} calls arrived"
                time.sleep(0.01)
            assert s.server._in_flight() == 8  # waiting calls are company
            hold.set()
            assert all(len(f.result(10).item_ids) == 3 for f in futures)
        assert (batcher.batches - batches, batcher.items - items) == (1, 8)
