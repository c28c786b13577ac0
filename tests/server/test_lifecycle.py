"""Model lifecycle through a real server: hot-swap under load, rejected versions, version
policies, rollback, admin auth, A/B traffic split and the shadow variant."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest

from recserve.clients import ModelClient, RecommendClient
from recserve.server.repository import file_entries, publish_version, read_manifest, write_json
from recserve.server.serving_config import TrafficSplit, Variant
from tests.server.conftest import ServerThread, metric, server_config

TOKEN = "test-admin-token-0123456789"


def lifecycle_config(repo: Path, **changes):
    return replace(server_config(repo), poll_interval_s=0.2, admin_token=TOKEN, **changes)


@pytest.fixture
def fresh_repo(repo, tmp_path) -> Path:
    """A private copy of the session repository (tiny, version 1)."""
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy)
    return copy


def export(server_run, repo: Path) -> int:
    from recserve.trainer.export import export_run

    return export_run(server_run, repo, "tiny", log=lambda *_: None)


def publish_changed(repo: Path, change, fix_checksums: bool = True) -> int:
    """Publish a copy of version 1 after ``change(version_dir, manifest)``; with
    ``fix_checksums`` the manifest's checksums are recomputed, so that only the later
    checks (engine, tables, golden) can catch the fault."""
    source = repo / "tiny" / "1"

    def build(tmp: Path, version: int) -> None:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        manifest = read_manifest(tmp)
        manifest["version"] = version
        change(tmp, manifest)
        if fix_checksums:
            manifest["files"] = file_entries(tmp)
        write_json(tmp / "manifest.json", manifest)

    return publish_version(repo, "tiny", build)


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def version_state(admin: ModelClient, version: int):
    return admin.list_models("tiny")[0].version(version)


class Load:
    """Closed-loop Recommend traffic from ``clients`` threads until stopped."""

    def __init__(self, target: str, clients: int = 16):
        self.target, self.clients = target, clients
        self.errors: list[str] = []
        self.versions: Counter = Counter()
        self.answers = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, i: int) -> None:
        with RecommendClient(self.target) as client:
            n = 0
            while not self._stop.is_set():
                try:
                    rec = client.recommend("tiny", f"user-{i}-{n % 50}", k=5, timeout=10)
                    self.versions[rec.version] += 1
                    self.answers += 1
                except grpc.RpcError as e:
                    self.errors.append(f"{e.code().name}: {e.details()}")
                n += 1

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


def test_ten_versions_published_under_load_swap_with_zero_failed_requests(fresh_repo, server_run):
    with ServerThread(lifecycle_config(fresh_repo)) as s, ModelClient(s.target, TOKEN) as admin, Load(s.target) as load:
        wait_for(lambda: load.answers > 50, what="traffic")
        published = []
        for _ in range(10):
            version = export(server_run, fresh_repo)
            published.append(version)
            at = time.monotonic()
            wait_for(lambda: admin.list_models("tiny")[0].serving_version == version, what=f"version {version}")
            assert time.monotonic() - at < 10, f"version {version} took {time.monotonic() - at:.1f} s to serve"
            served_before = load.versions[version]
            wait_for(lambda: load.versions[version] > served_before, what=f"answers from version {version}")
        final = admin.list_models("tiny")[0]
    assert load.errors == [], load.errors[:5]
    assert set(load.versions) <= {1, *published}  # every answer came from a version that was READY
    assert final.serving_version == published[-1]
    states = {v.version: v.state for v in final.versions}
    assert states[published[-1]] == "READY"
    assert all(states[v] in ("UNAVAILABLE", "UNLOADING") for v in [1, *published[:-1]])  # latest 1 by default


def _truncate_table(d: Path, m: dict) -> None:
    path = d / m["tables"][next(iter(m["tables"]))]["file"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _corrupt_onnx(d: Path, m: dict) -> None:
    path = d / m["engines"]["onnx"]["file"]
    path.write_bytes(b"\x08\x07garbage" + path.read_bytes()[100:])


def _golden_mismatch(d: Path, m: dict) -> None:
    m["golden"][0]["scores"] = [s + 0.5 for s in m["golden"][0]["scores"]]


def _signature_mismatch(d: Path, m: dict) -> None:
    m["signature"]["inputs"][0]["name"] = "renamed"


def _missing_file(d: Path, m: dict) -> None:
    (d / m["items"]["ids"]).unlink()


def _checksum_mismatch(d: Path, m: dict) -> None:
    path = d / m["items"]["embeddings"]["float32"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # one bit of one item vector
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("change, fix_checksums, reason", [
    (_corrupt_onnx, True, "onnx"),
    (_truncate_table, True, "tables/"),
    (_checksum_mismatch, False, "sha256 does not match"),
    (_golden_mismatch, True, "golden request 0"),
    (_signature_mismatch, True, "do not match the manifest signature"),
    (_missing_file, False, "missing"),
], ids=["corrupt-onnx", "truncated-table", "checksum-mismatch", "golden-mismatch", "signature-mismatch",
        "missing-file"])
def test_a_bad_version_is_rejected_with_its_reason_and_the_old_one_keeps_serving(fresh_repo, change, fix_checksums,
                                                                                 reason):
    with ServerThread(lifecycle_config(fresh_repo)) as s, ModelClient(s.target, TOKEN) as admin, \
            RecommendClient(s.target) as client, Load(s.target, clients=4) as load:
        bad = publish_changed(fresh_repo, change, fix_checksums)
        state = wait_for(lambda: (v := version_state(admin, bad)) and v.state == "UNAVAILABLE" and v,
                         what="the rejection")
        assert reason in state.reason.lower() or reason in state.reason, state.reason
        assert admin.list_models("tiny")[0].serving_version == 1
        assert client.recommend("tiny", "u", k=3).version == 1
        with pytest.raises(grpc.RpcError) as e:
            client.recommend("tiny", "u", k=3, version=bad)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and reason.split()[0] in e.value.details().lower()
        time.sleep(0.5)  # several rescans: the bad version is not retried in a loop
        assert metric(s, "recserve_model_events_total", event="rejected", model="tiny", version=str(bad)) == 1
    assert load.errors == []


def test_version_policy_rollback_and_unload(fresh_repo, server_run):
    write_json(fresh_repo / "tiny" / "serving.json", {"version_policy": {"latest": 2}})
    export(server_run, fresh_repo)  # version 2
    with ServerThread(lifecycle_config(fresh_repo)) as s, ModelClient(s.target, TOKEN) as admin, \
            RecommendClient(s.target) as client:
        m = admin.list_models("tiny")[0]
        assert [(v.version, v.state) for v in m.versions] == [(1, "READY"), (2, "READY")]
        assert m.serving_version == 2 and client.recommend("tiny", "u", k=3).version == 2
        assert client.recommend("tiny", "u", k=3, version=1).version == 1  # a pinned request

        m = admin.load("tiny", version=1)  # rollback: the default route goes to version 1
        assert m.serving_version == 1 and m.pinned_version == 1
        assert client.recommend("tiny", "u", k=3).version == 1
        m = admin.load("tiny")  # unpin
        assert m.serving_version == 2 and m.pinned_version is None

        admin.unload("tiny", 1)
        wait_for(lambda: version_state(admin, 1).state == "UNAVAILABLE", what="unload")
        assert "unloaded by request" in version_state(admin, 1).reason
        time.sleep(0.5)  # the watcher does not load it back
        assert version_state(admin, 1).state == "UNAVAILABLE"
        with pytest.raises(grpc.RpcError) as e:
            admin.unload("tiny", 2)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "only READY version" in e.value.details()

        write_json(fresh_repo / "tiny" / "serving.json", {"version_policy": {"specific": [1]}})
        assert admin.load("tiny").serving_version == 1  # LoadModel() forgets the unload, applies the policy
        wait_for(lambda: version_state(admin, 2).state == "UNAVAILABLE", what="version 2 retired")

        write_json(fresh_repo / "tiny" / "serving.json", {"version_policy": {"latest": 0}})
        m = wait_for(lambda: (x := admin.list_models("tiny")[0]).policy_error and x, what="the policy error")
        assert "version_policy.latest must be an integer >= 1" in m.policy_error and m.serving_version == 1


def test_admin_calls_need_the_token_and_are_off_without_one(fresh_repo):
    with ServerThread(lifecycle_config(fresh_repo)) as s:
        for token, code in ((None, grpc.StatusCode.UNAUTHENTICATED), ("wrong-token-wrong-token", grpc.StatusCode.UNAUTHENTICATED)):
            with ModelClient(s.target, token) as admin, pytest.raises(grpc.RpcError) as e:
                admin.list_models()
            assert e.value.code() == code
        with ModelClient(s.target, TOKEN) as admin:
            assert [m.name for m in admin.list_models()] == ["tiny"]
            with pytest.raises(grpc.RpcError) as e:
                admin.load("nope")
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with ServerThread(server_config(fresh_repo)) as s, ModelClient(s.target, TOKEN) as admin:
        with pytest.raises(grpc.RpcError) as e:
            admin.list_models()
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "admin API is disabled" in e.value.details()


def test_traffic_split_assignment_is_sticky_and_within_two_points_of_the_weights():
    split = TrafficSplit(salt="exp-1", variants=(Variant("a", version=1, weight=70), Variant("b", version=2, weight=20),
                                                 Variant("c", version=3, weight=10)))
    users = [f"user-{i}" for i in range(10_000)]
    counts = Counter(split.pick(u).name for u in users)
    for name, weight in (("a", 0.7), ("b", 0.2), ("c", 0.1)):
        assert abs(counts[name] / len(users) - weight) < 0.02, counts
    assert [split.pick(u).name for u in users[:500]] == [split.pick(u).name for u in users[:500]]
    reshuffled = TrafficSplit(salt="exp-2", variants=split.variants)
    assert sum(split.pick(u) != reshuffled.pick(u) for u in users) > 3000  # a new salt reassigns users
    # a variant that cannot serve gives its share to the others
    assert {split.pick(u, ready={"a": True, "b": False, "c": True}).name for u in users[:2000]} == {"a", "c"}


def test_a_b_split_and_shadow_through_the_server(fresh_repo, server_run):
    export(server_run, fresh_repo)  # version 2
    export(server_run, fresh_repo)  # version 3: the shadow
    write_json(fresh_repo / "tiny" / "serving.json", {"traffic": {
        "salt": "exp-9", "variants": [{"name": "control", "version": 1, "weight": 50},
                                      {"name": "treatment", "version": 2, "weight": 50}],
        "shadow": {"name": "candidate", "version": 3}}})
    split = TrafficSplit.from_dict(json.loads((fresh_repo / "tiny" / "serving.json").read_text())["traffic"], "t")
    with ServerThread(lifecycle_config(fresh_repo)) as s, RecommendClient(s.target) as client, \
            ModelClient(s.target, TOKEN) as admin:
        users = [f"user-{i}" for i in range(200)]
        first = {u: client.recommend("tiny", u, k=5) for u in users}
        for u, rec in first.items():
            expected = split.pick(u)
            assert (rec.variant, rec.version) == (expected.name, expected.version)
        assert {r.variant for r in first.values()} == {"control", "treatment"}
        assert all(client.recommend("tiny", u, k=5).variant == first[u].variant for u in users[:50])  # sticky
        forced = client.recommend("tiny", users[0], k=5, variant="treatment")
        assert (forced.variant, forced.version) == ("treatment", 2)
        with pytest.raises(grpc.RpcError) as e:
            client.recommend("tiny", users[0], k=5, variant="nope")
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no variant 'nope'" in e.value.details()
        assert all(r.version in (1, 2) for r in first.values())  # the shadow's answers are never returned

        wait_for(lambda: metric(s, "recserve_shadow_requests_total", outcome="ok", variant="candidate") >= 250,
                 what="shadow copies")
        m = admin.set_traffic("tiny", [{"name": "only", "version": 2, "weight": 1}], salt="x")
        assert m.traffic["variants"] == [{"name": "only", "version": 2, "weight": 1.0}]
        assert {client.recommend("tiny", u, k=5).variant for u in users[:20]} == {"only"}
        with pytest.raises(grpc.RpcError) as e:
            admin.set_traffic("tiny", [{"name": "x", "version": 99, "weight": 1}])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "has no version 99" in e.value.details()
        assert admin.set_traffic("tiny", []).traffic["salt"] == "exp-9"  # back to serving.json's
        for variant in ("control", "treatment"):
            assert metric(s, "recserve_requests_total", model="tiny", variant=variant, code="OK") > 50
        assert metric(s, "recserve_shadow_overlap_count", variant="candidate") >= 250


def test_serving_json_errors_name_the_file_and_the_key(tmp_path):
    from recserve.server.repository import RepositoryError
    from recserve.server.serving_config import ServingPolicy

    cases = [({"version_policy": {"newest": 1}}, 'version_policy must be {"latest": N}'),
             ({"traffic": {"variants": [{"name": "a", "weight": 1}]}}, "variant 'a' needs a version, a model"),
             ({"traffic": {"variants": [{"name": "a", "version": 1, "weight": 0}]}}, "weights must not all be 0"),
             ({"traffic": {"variants": [{"name": "a", "version": 1}, {"name": "a", "version": 2}]}}, "unique"),
             ({"colour": 1}, "unknown key 'colour'")]
    for body, message in cases:
        (tmp_path / "serving.json").write_text(json.dumps(body))
        with pytest.raises(RepositoryError, match=message) as e:
            ServingPolicy.read(tmp_path)
        assert "serving.json" in str(e.value) or "traffic" in str(e.value)
    np.testing.assert_equal(ServingPolicy.read(tmp_path / "absent").versions.latest, 1)


def test_models_cli_lists_loads_and_explains_errors(fresh_repo, tmp_path):
    import subprocess
    import sys

    from recserve.server.process import start_server_process

    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN + "\n")
    proc, port = start_server_process(
        [sys.executable, "-m", "recserve.cli", "serve", "--repository", str(fresh_repo), "--host", "localhost",
         "--port", "0", "--metrics-port", "off", "--admin-token-file", str(token_file)], marker="on port")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "recserve.cli", "models", *args, "--target",
                               f"localhost:{port}"], capture_output=True, text=True, timeout=60)

    try:
        listed = cli("list", "--token-file", str(token_file))
        assert listed.returncode == 0, listed.stderr
        assert "tiny: serving version 1" in listed.stdout and "READY" in listed.stdout
        pinned = cli("load", "tiny", "--version", "1", "--token-file", str(token_file))
        assert pinned.returncode == 0 and "pinned 1" in pinned.stdout
        denied = cli("list")
        assert denied.returncode == 1
        assert denied.stderr.strip().startswith("recserve models: error: UNAUTHENTICATED")
        missing = cli("unload", "tiny", "--version", "7", "--token-file", str(token_file))
        assert missing.returncode == 1 and "FAILED_PRECONDITION" in missing.stderr
    finally:
        proc.terminate()
        proc.wait(30)


def test_the_loader_thread_runs_kernels_on_one_thread_at_a_lower_priority():
    """Verifying a new version (golden top-k, warm-up) must leave the serving path the cores."""
    import os
    import threading

    from recserve import _C
    from recserve.server.models import LOADER_NICE, _lower_priority

    seen = {}

    def loader():
        _lower_priority()
        seen["threads"] = _C._calling_thread_limit()
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = _C._calling_thread_limit()
    t = threading.Thread(target=loader)
    t.start()
    t.join()
    assert seen["threads"] == 1 and seen["nice"] >= LOADER_NICE
    assert _C._calling_thread_limit() == before  # this thread keeps its limit
