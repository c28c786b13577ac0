"""Tracing (a span per query, a child per pipeline stage), per-stage metrics, JSON logs
with request ids — through a real server."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import grpc
import pytest

from recserve.clients import RecommendClient
from tests.server.conftest import ServerThread, metric, server_config

STAGES = ["features", "hash", "lookup", "engine", "topk"]


@pytest.fixture
def spans():
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    return InMemorySpanExporter()


def test_each_query_gets_a_span_with_one_child_per_stage(repo, spans):
    config = replace(server_config(repo), trace_sample_ratio=1.0)
    with ServerThread(config, span_exporter=spans) as s, RecommendClient(s.target) as client:
        client.recommend("tiny", "u1", k=4, recent_items=["I001"])
        client.batch_recommend("tiny", ["u2", "u3"], k=2)
        with pytest.raises(grpc.RpcError):
            client.recommend("tiny", "u4", k=4, version=77)
    finished = spans.get_finished_spans()
    requests = [x for x in finished if x.name == "recserve.Recommend"]
    assert len(requests) == 4
    ok = [r for r in requests if r.attributes["rpc.grpc.status_code"] == "OK"]
    assert len(ok) == 3 and all(r.attributes["recserve.version"] == 1 for r in ok)
    for r in ok:
        children = sorted((x for x in finished if x.parent and x.parent.span_id == r.context.span_id),
                          key=lambda x: x.start_time)
        assert [c.name for c in children] == [f"recserve.{n}" for n in STAGES]
        assert all(r.start_time <= c.start_time <= c.end_time <= r.end_time for c in children)
    failed = [r for r in requests if r.attributes["rpc.grpc.status_code"] != "OK"]
    assert failed[0].attributes["rpc.grpc.status_code"] == "NOT_FOUND" and not failed[0].status.is_ok


def test_a_callers_trace_continues_and_sampling_zero_keeps_nothing(repo, spans):
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    config = replace(server_config(repo), trace_sample_ratio=0.0)
    with ServerThread(config, span_exporter=spans) as s, RecommendClient(s.target) as client:
        client.recommend("tiny", "u1", k=2)  # not sampled: nothing exported
        assert spans.get_finished_spans() == ()
        stub_metadata = (("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),)  # sampled upstream
        from recserve.v1 import recommend_pb2, recommend_pb2_grpc

        stub = recommend_pb2_grpc.RecommendServiceStub(grpc.insecure_channel(s.target))
        stub.Recommend(recommend_pb2.RecommendRequest(model="tiny", user_id="u1", k=2), metadata=stub_metadata)
    (request,) = [x for x in spans.get_finished_spans() if x.name == "recserve.Recommend"]
    assert format(request.context.trace_id, "032x") == trace_id


def test_tracing_off_by_default_and_stage_metrics_on(repo):
    with ServerThread(server_config(repo)) as s, RecommendClient(s.target) as client:
        assert not s.server.tracing.enabled and s.server.tracing.tracer is None
        client.recommend("tiny", "u1", k=2)
        for stage in STAGES:
            assert metric(s, "recserve_stage_duration_seconds_count", model="tiny", stage=stage) >= 1


def test_json_logs_and_error_messages_carry_the_request_id(repo):
    from recserve.server.process import start_server_process

    proc, port = start_server_process(
        [sys.executable, "-m", "recserve.cli", "serve", "--repository", str(repo), "--host", "localhost",
         "--port", "0", "--metrics-port", "off", "--log-format", "json"], stderr=subprocess.PIPE)
    try:
        from recserve.v1 import recommend_pb2, recommend_pb2_grpc

        stub = recommend_pb2_grpc.RecommendServiceStub(grpc.insecure_channel(f"localhost:{port}"))
        with pytest.raises(grpc.RpcError) as given:
            stub.Recommend(recommend_pb2.RecommendRequest(model="nope", user_id="u", k=1),
                           metadata=(("x-request-id", "abc-123"),))
        with pytest.raises(grpc.RpcError) as made:
            stub.Recommend(recommend_pb2.RecommendRequest(model="tiny", user_id="", k=1))
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert given.value.details().endswith("(request id abc-123)")
    assert dict(given.value.trailing_metadata())["x-request-id"] == "abc-123"
    made_id = dict(made.value.trailing_metadata())["x-request-id"]
    assert made.value.details().endswith(f"(request id {made_id})") and len(made_id) == 16
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert lines and all({"ts", "level", "logger", "message"} <= set(x) for x in lines)
    by_id = {x.get("request_id"): x for x in lines}
    assert by_id["abc-123"]["code"] == "NOT_FOUND" and "unknown model 'nope'" in by_id["abc-123"]["message"]
    assert by_id[made_id]["code"] == "INVALID_ARGUMENT"
