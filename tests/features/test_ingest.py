"""Bulk ingest (derived users view, item tables), kill -9 recovery, snapshot and the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recserve.cli.main import main
from recserve.features.history import history_at_end, push_history, sort_events
from recserve.features.ingest import ingest_interactions, ingest_items
from recserve.features.logs import DataError
from recserve.features.store import FeatureStore, StoreError, cold_start
from tests.features.conftest import T0, write_log


def stored(store: FeatureStore, user_ids) -> dict:
    """user id -> (history, event_count, last_seen) of the users the store holds."""
    recs = store.user_records(list(user_ids))
    return {r["user_id"]: (r["history"], r["event_count"], r["last_seen"]) for r in recs if r["updated_at"]}


def test_derived_users_view_equals_history_at_end_and_a_live_replay(tmp_path):
    log = write_log(tmp_path / "log.csv", users=40, events_per_user=12, items=9)
    with FeatureStore.open(tmp_path / "s", create=True, max_history=4) as store:
        report = ingest_interactions(store, log, chunk_rows=7, progress=False)
        assert (report.total, report.written, report.rows) == (40, 40, 480)
        got = stored(store, [f"u{u:05d}" for u in range(40)])
    # Reference 1: history_at_end on the log, sorted the trainer's way.
    lines = [line.split(",") for line in log.read_text().splitlines()[1:]]
    user = np.array([int(u[1:]) for u, _, _ in lines])
    item = np.array([i for _, i, _ in lines])
    ts = np.array([int(t) for _, _, t in lines])
    order = sort_events(user, ts)
    codes, item_of = np.unique(item, return_inverse=True)
    idx, off, users = history_at_end(user[order], item_of[order], 4)
    # Reference 2: push_history event by event in (time, file order): the live-update definition.
    live = {}
    for e in order.tolist():
        key = f"u{user[e]:05d}"
        hist, n, last = live.get(key, ([], 0, 0))
        live[key] = (push_history(hist, [item[e]], 4), n + 1, max(last, ts[e]))
    assert len(got) == 40
    for b, u in enumerate(users.tolist()):
        key = f"u{u:05d}"
        assert got[key][0] == codes[idx[off[b]:off[b + 1]]].tolist() == live[key][0]
        assert got[key][1:] == live[key][1:]
    assert any(len(set(item[user == u])) > 4 for u in range(40))  # histories were cut to 4


def test_item_table_columns_round_trip_with_their_types(tmp_path):
    path = tmp_path / "items.jsonl"
    rows = [{"item_id": "007", "description": "red mug", "price": 4.5, "stock": 3, "new": True,
             "tags": ["kitchen", "red"], "added": "2011-12-09T12:50:00"},
            {"item_id": "A1", "description": None, "price": None, "stock": None, "new": False, "tags": [],
             "added": "2011-12-10T00:00:00"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with FeatureStore.open(tmp_path / "s", create=True) as store:
        ingest_items(store, path, progress=False)
        fields = {f.name: f.type for f in store.view("items").fields}
        recs = store.item_records(["007", "A1", "nope"])
    assert fields == {"description": "string", "price": "float64", "stock": "int64", "new": "int64",
                      "tags": "string_list", "added": "int64"}
    assert {k: recs[0][k] for k in fields} == {"description": "red mug", "price": 4.5, "stock": 3, "new": 1,
                                               "tags": ["kitchen", "red"], "added": 1323435000}
    assert (recs[1]["description"], recs[1]["price"], recs[1]["stock"], recs[1]["tags"]) == (None, None, None, [])
    assert recs[0]["item_id"] == "007" and recs[2] is None


def test_csv_string_columns_keep_codes_as_text(tmp_path):
    path = tmp_path / "items.csv"
    path.write_text("item_id,category,price\n1,007,2.5\n2,010,3\n")
    with FeatureStore.open(tmp_path / "s", create=True) as store:
        ingest_items(store, path, string_columns=("category",), progress=False)
        assert [r["category"] for r in store.item_records(["1", "2"])] == ["007", "010"]


@pytest.mark.parametrize("text, words", [
    ("user_id,item_id\nu1,a\n", r"log.csv, column 'timestamp': missing"),
    ("user_id,item_id,timestamp\nu1,a,1\nu2,b,2011-13-45\n", r"log.csv line 3, column 'timestamp': cannot parse"),
    ("user_id,item_id,timestamp\nu1,,1\n", r"log.csv line 2, column 'item_id': missing value"),
    ("", r"log.csv: empty file"),
])
def test_bad_interaction_logs_get_one_line_errors(tmp_path, text, words):
    (tmp_path / "log.csv").write_text(text)
    with FeatureStore.open(tmp_path / "s", create=True) as store, pytest.raises(DataError, match=words) as info:
        ingest_interactions(store, tmp_path / "log.csv", progress=False)
    assert "\n" not in str(info.value)


def test_bad_item_tables_get_one_line_errors(tmp_path):
    with FeatureStore.open(tmp_path / "s", create=True) as store:
        (tmp_path / "dup.csv").write_text("item_id,price\na,1\nb,2\na,3\n")
        with pytest.raises(DataError, match=r"dup.csv line 4, column 'item_id': duplicate id 'a'"):
            ingest_items(store, tmp_path / "dup.csv", progress=False)
        (tmp_path / "nested.jsonl").write_text('{"item_id": "a", "dims": {"w": 1}}\n')
        with pytest.raises(DataError, match=r"column 'dims': type struct.* is not supported"):
            ingest_items(store, tmp_path / "nested.jsonl", progress=False)
        (tmp_path / "sep.jsonl").write_text('{"item_id": "a", "tags": ["x"]}\n{"item_id": "b", "tags": ["x\\u001fy"]}\n')
        with pytest.raises(DataError, match=r"sep.jsonl row 1: field 'tags'"):
            ingest_items(store, tmp_path / "sep.jsonl", progress=False)
        assert "items" not in store.schema.views  # nothing was written by the failed ingests
        (tmp_path / "a.csv").write_text("item_id,price\na,1.5\n")
        (tmp_path / "b.csv").write_text("item_id,description\na,mug\n")
        ingest_items(store, tmp_path / "a.csv", progress=False)
        with pytest.raises(StoreError, match=r"items view has fields \(price: float64\); the new data has "
                                             r"\(description: string\)"):
            ingest_items(store, tmp_path / "b.csv", progress=False)


def test_a_rerun_of_a_finished_ingest_is_a_no_op_and_a_changed_file_is_ingested(tmp_path):
    log = write_log(tmp_path / "log.csv", users=5, events_per_user=3, items=4)
    with FeatureStore.open(tmp_path / "s", create=True) as store:
        assert ingest_interactions(store, log, progress=False).written == 5
        again = ingest_interactions(store, log, progress=False)
        assert (again.written, again.resumed_at) == (0, 5) and "nothing to do" in again.summary()
        log.write_text(log.read_text() + f"u00099,I001,{T0}\n")
        assert ingest_interactions(store, log, progress=False).written == 6
        assert ingest_interactions(store, log, restart=True, progress=False).written == 6


def test_ingest_grows_a_tiny_map(tmp_path):
    log = write_log(tmp_path / "log.csv", users=800, events_per_user=6, items=300)
    with FeatureStore.open(tmp_path / "s", create=True, map_size=64 << 10) as store:
        ingest_interactions(store, log, chunk_rows=500, progress=False)
        assert store.count("users") == 800 and store.counters()["map_resizes"] >= 1


def test_kill_during_ingest_leaves_a_consistent_store_and_a_rerun_completes_it(tmp_path):
    log = write_log(tmp_path / "log.csv", users=3000, events_per_user=3, items=50)
    user_ids = [f"u{u:05d}" for u in range(3000)]
    with FeatureStore.open(tmp_path / "clean", create=True, max_history=5) as clean:
        ingest_interactions(clean, log, progress=False)
        expected = stored(clean, user_ids)
    path = tmp_path / "killed"
    cmd = [sys.executable, "-m", "recserve.cli.main", "features", "ingest", "--store", str(path), "--view", "users",
           "--input", str(log), "--max-history", "5", "--chunk-rows", "1", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done, deadline = None, time.monotonic() + 60
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                with FeatureStore.open(path) as store:
                    progress = store.ingest_progress("users")
            except StoreError:  # not created yet
                progress = None
            if progress and progress["done"] >= 100:
                os.kill(proc.pid, signal.SIGKILL)  # mid-ingest: one commit per user
                break
            time.sleep(0.005)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the ingest ended before it could be killed ({proc.returncode})"
    with FeatureStore.open(path) as store:
        progress = store.ingest_progress("users")
        done = progress["done"]
        assert 100 <= done < 3000 and progress["total"] == 3000
        got = stored(store, user_ids)
    # Consistent: exactly the first `done` users (sorted order), each equal to a clean ingest.
    assert sorted(got) == user_ids[:done]
    assert all(got[u] == expected[u] for u in got)
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"wrote {3000 - done} of 3000 entities, resumed after {done}" in rerun.stdout
    with FeatureStore.open(path) as store:
        assert stored(store, user_ids) == expected
        assert store.ingest_progress("users")["done"] == 3000


def test_cli_ingest_snapshot_and_info(tmp_path, capsys):
    log = write_log(tmp_path / "log.csv", users=30, events_per_user=4, items=10)
    pq.write_table(pa.table({"item_id": [f"I{i:03d}" for i in range(10)], "price": np.arange(10) * 1.5}),
                   tmp_path / "items.parquet")
    store = str(tmp_path / "s")
    assert main(["features", "ingest", "--store", store, "--view", "users", "--input", str(log),
                 "--max-history", "3", "--ttl-s", "3600", "--quiet"]) == 0
    assert main(["features", "ingest", "--store", store, "--view", "items", "--input",
                 str(tmp_path / "items.parquet"), "--quiet"]) == 0
    assert "users: wrote 30 of 30 entities" in capsys.readouterr().out
    assert main(["features", "snapshot", "--store", store, "--out", str(tmp_path / "copy")]) == 0
    assert capsys.readouterr().out.strip() == f"snapshot {tmp_path / 'copy'}: items 10, users 30"
    with FeatureStore.open(store) as a, FeatureStore.open(tmp_path / "copy") as b:
        ids = [f"u{u:05d}" for u in range(30)]
        assert a.user_records(ids) == b.user_records(ids)
        assert a.item_records(["I003"]) == b.item_records(["I003"])
        assert b.fingerprint == a.fingerprint and b.view("users").ttl_s == 3600
    assert main(["features", "info", "--store", str(tmp_path / "copy")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["views"]["users"]["entities"] == 30 and info["views"]["users"]["fields"][0]["max_len"] == 3
    # Errors: one line, exit 1.
    assert main(["features", "snapshot", "--store", store, "--out", str(tmp_path / "copy")]) == 1
    assert main(["features", "info", "--store", str(tmp_path / "missing")]) == 1
    assert main(["features", "ingest", "--store", store, "--view", "users", "--input", str(tmp_path / "no.csv"),
                 "--quiet"]) == 1
    assert main(["features", "ingest", "--store", store, "--view", "users", "--input", str(log),
                 "--max-history", "9", "--quiet"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and all(line.startswith("recserve features: error: ") for line in err)
    assert "already exists" in err[0] and "no feature store here" in err[1] and "no such file" in err[2]
    assert "keeps 3 recent items per user, not 9" in err[3]


def test_cli_help_documents_the_flags(capsys):
    with pytest.raises(SystemExit):
        main(["features", "ingest", "--help"])
    text = capsys.readouterr().out
    for flag in ("--store", "--view", "--input", "--max-history", "--ttl-s", "--chunk-rows", "--string-columns",
                 "--restart", "--quiet"):
        assert flag in text


def test_cold_start_for_users_missing_from_the_log(tmp_path):
    log = write_log(tmp_path / "log.csv", users=3, events_per_user=2, items=3)
    with FeatureStore.open(tmp_path / "s", create=True) as store:
        ingest_interactions(store, log, progress=False)
        assert store.user_records(["stranger"]) == [cold_start("stranger")]
