"""The feature store in the serving path, through a real server: stored histories feed
Recommend, PushEvents updates them (durably), schema checks gate model versions."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import grpc
import pytest

from recserve.clients import FeatureClient, RecommendClient
from recserve.features.ingest import ingest_interactions
from recserve.features.serving import HistoryBuckets
from recserve.features.store import FeatureStore
from recserve.server.retrieval import RetrievalModel
from tests.server.conftest import ServerThread, metric, server_config


@pytest.fixture
def store_path(tiny_data, tmp_path):
    """A store holding the tiny data's users (history, counts), as `recserve features ingest` makes it."""
    path = tmp_path / "features.lmdb"
    with FeatureStore.open(path, create=True, max_history=20) as store:
        ingest_interactions(store, tiny_data / "interactions.csv.gz", progress=False)
    return path


def stored(where, user_id: str) -> dict:
    """A user's stored record: from a running server's store, or by opening the store
    (LMDB allows one open environment per process)."""
    if isinstance(where, ServerThread):
        return where.server.store.user_records([user_id])[0]
    with FeatureStore.open(where) as store:
        return store.user_records([user_id])[0]


def store_config(repo, path, **changes):
    return replace(server_config(repo), feature_store=str(path), **changes)


def test_recommend_reads_the_stored_history(repo, store_path, monkeypatch):
    offline = RetrievalModel.load(repo / "tiny/1")
    users = [stored(store_path, u) for u in ("0", "1", "17")]
    assert all(u["history"] for u in users)
    gathered = []  # batches whose history bags came from the codes (the columnar path)
    bags = HistoryBuckets.bags
    monkeypatch.setattr(HistoryBuckets, "bags",
                        lambda self, batch: gathered.append(batch.user_ids) or bags(self, batch))
    with ServerThread(store_config(repo, store_path)) as s, RecommendClient(s.target) as client:
        for u in users:
            rec = client.recommend("tiny", u["user_id"], k=5)
            expected = offline.recommend([{"user_id": u["user_id"], "history": u["history"]}], k=5)[0]
            assert rec.item_ids == expected[0]
        assert [u["user_id"] for u in users] == [ids[0] for ids in gathered[-3:]]
        # the request's own recent items count as newer than the stored ones
        rec = client.recommend("tiny", "0", k=5, recent_items=["I005"])
        merged = ["I005"] + [i for i in users[0]["history"] if i != "I005"]
        assert rec.item_ids == offline.recommend([{"user_id": "0", "history": merged[:20]}], k=5)[0][0]
        # an unknown user takes the cold-start path (empty history) and is counted
        missing = metric(s, "recserve_feature_reads_total", view="users", outcome="missing")
        cold = client.recommend("tiny", "never-seen", k=5)
        assert cold.item_ids == offline.recommend([{"user_id": "never-seen", "history": []}], k=5)[0][0]
        assert metric(s, "recserve_feature_reads_total", view="users", outcome="missing") == missing + 1


def test_push_events_then_recommend_sees_them_and_they_survive_a_restart(repo, store_path):
    offline = RetrievalModel.load(repo / "tiny/1")
    now = time.time()
    events = [("42", "I007", now - 2, "view"), ("42", "I011", now - 1, "purchase"), ("new-user", "I003", now, "")]
    with ServerThread(store_config(repo, store_path)) as s, RecommendClient(s.target) as client, \
            FeatureClient(s.target) as features:
        before = stored(s, "42")["history"]
        assert features.push(events) == 3
        rec = client.recommend("tiny", "42", k=5)
        history = ["I011", "I007"] + [i for i in before if i not in ("I011", "I007")]
        assert rec.item_ids == offline.recommend([{"user_id": "42", "history": history[:20]}], k=5)[0][0]
        assert client.recommend("tiny", "new-user", k=3).item_ids == \
            offline.recommend([{"user_id": "new-user", "history": ["I003"]}], k=3)[0][0]
        assert features.stream([[("42", "I001", now, "click")], [("43", "I002", now, "click")]]) == 2
    # a new server on the same store (the old one is gone): every acknowledged event is there
    with ServerThread(store_config(repo, store_path)) as s, RecommendClient(s.target) as client:
        assert stored(s, "42")["history"][:3] == ["I001", "I011", "I007"]
        assert stored(s, "43")["history"][0] == "I002"
        history = ["I001", "I011", "I007"] + [i for i in before if i not in ("I001", "I011", "I007")]
        assert client.recommend("tiny", "42", k=5).item_ids == \
            offline.recommend([{"user_id": "42", "history": history[:20]}], k=5)[0][0]


def test_concurrent_pushes_share_write_transactions(repo, store_path):
    now = time.time()
    with ServerThread(store_config(repo, store_path)) as s, FeatureClient(s.target) as features, \
            ThreadPoolExecutor(16) as pool:
        accepted = list(pool.map(lambda i: features.push([(f"c{i}", f"I{i % 100:03d}", now, "click")] * 2),
                                 range(64)))
        writes = s.server.features.writer.writes
    assert accepted == [2] * 64
    assert writes < 64  # calls that arrived during a commit went into the next one together
    assert all(stored(store_path, f"c{i}")["history"] == [f"I{i % 100:03d}"] for i in range(64))


@pytest.mark.parametrize("event, message", [
    (("", "I001", 1.0, "view"), "event 1: user_id is empty"),
    (("u", "I001", -5.0, "view"), "event 1: timestamp -5.0 is not a valid unix time"),
    (("u", "I001", 1.0, "teleport"), "event 1: event_type 'teleport' is not one of"),
    (("u", "I001", time.time() + 10 * 86400, "view"), "more than 86400 s in the future"),
])
def test_bad_events_are_refused_by_name_and_nothing_of_the_call_is_written(repo, store_path, event, message):
    with ServerThread(store_config(repo, store_path)) as s, FeatureClient(s.target) as features:
        with pytest.raises(grpc.RpcError) as e:
            features.push([("first", "I001", time.time(), "view"), event])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            features.stream([[("first", "I002", time.time(), "view")], [event]])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith("batch 1: ") and "(1 events of earlier batches were written)" in \
            e.value.details()
    assert stored(store_path, "first")["history"] == ["I002"]  # the push wrote nothing; the stream's batch 0 did


def test_without_a_store_push_events_is_a_failed_precondition(repo):
    with ServerThread(server_config(repo)) as s, FeatureClient(s.target) as features:
        with pytest.raises(grpc.RpcError) as e:
            features.push([("u", "I001", time.time(), "view")])
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "--feature-store" in e.value.details()


def test_a_model_the_store_cannot_feed_is_refused_with_the_difference(repo, tiny_data, tmp_path):
    path = tmp_path / "short.lmdb"
    with FeatureStore.open(path, create=True, max_history=3) as store:  # the model's history is 10 long
        ingest_interactions(store, tiny_data / "interactions.csv.gz", progress=False)
    with ServerThread(store_config(repo, path)) as s, RecommendClient(s.target) as client:
        with pytest.raises(grpc.RpcError) as e:
            client.recommend("tiny", "0", k=3)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "SchemaMismatch" in e.value.details() and "history" in e.value.details()


def test_a_store_that_cannot_be_opened_stops_the_server_with_one_line(repo, tmp_path):
    import subprocess
    import sys

    (tmp_path / "not-a-store").write_text("hello")
    out = subprocess.run([sys.executable, "-m", "recserve.cli", "serve", "--repository", str(repo), "--port", "0",
                          "--metrics-port", "off", "--feature-store", str(tmp_path / "not-a-store")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("recserve serve: error: ")
