"""Export: atomic versions, ONNX == torch, golden outputs reproduced from the files alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
import pytest
import torch

from recserve.features.spec import FeatureSpec
from recserve.server.repository import RepositoryError, list_versions, read_manifest, sha256_file
from recserve.server.retrieval import RetrievalModel
from recserve.trainer.evaluate import item_matrix
from recserve.trainer.export import ENGINE_ONNX, export_run
from recserve.trainer.tensorrt_engine import unavailable_reason
from recserve.trainer.train import load_trained


@pytest.fixture(scope="module")
def repo(tiny_run, tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    assert export_run(tiny_run, repo, "tiny", log=lambda *_: None) == 1
    return repo


def test_version_layout_and_manifest(repo, tiny_run):
    version = repo / "tiny" / "1"
    assert sorted(p.name for p in (repo / "tiny").iterdir()) == ["1"]  # no temp dir left
    m = read_manifest(version)
    assert m["kind"] == "retrieval" and m["version"] == 1 and m["model"] == "tiny"
    assert m["feature_fingerprint"] == FeatureSpec.from_dict(m["feature_spec"]).fingerprint()
    assert FeatureSpec.from_dict(m["feature_spec"]) == load_trained(tiny_run)[1]
    assert [i["name"] for i in m["signature"]["inputs"]] == ["user_id", "history"]
    assert m["signature"]["outputs"][0]["shape"] == [-1, 16]
    assert m["training"]["metrics"]["eval"]["recall@10"] > 0
    assert "CC0" in m["data"]["attribution"] and (version / "ATTRIBUTION.md").is_file()
    for rel, entry in m["files"].items():
        assert sha256_file(version / rel) == entry["sha256"], rel
    assert {"engine/user_tower.onnx", "items/ids.npy", "items/embeddings_f32.npy", "items/embeddings_f16.npy",
            "tables/user_id.npy", "tables/item_id.npy"} <= set(m["files"])
    ids = np.load(version / "items/ids.npy")
    assert np.all(ids[:-1] < ids[1:])  # sorted: the server binary-searches exclusions


def test_onnx_engine_matches_torch(repo, tiny_run):
    _, spec, _, model = load_trained(tiny_run)
    session = ort.InferenceSession(str(repo / "tiny/1" / ENGINE_ONNX), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"  # dynamic batch
    assert session.get_outputs()[0].name == "user_vector"
    rng = np.random.default_rng(1)
    for batch in (1, 5, 300):
        feeds = {i.name: rng.standard_normal((batch, i.shape[1]), dtype=np.float32) for i in session.get_inputs()}
        got = session.run(None, feeds)[0]
        with torch.no_grad():
            want = model.user_tower(*[torch.from_numpy(feeds[f.name]) for f in spec.side_fields("user")]).numpy()
        assert np.max(np.abs(got - want)) / np.max(np.abs(want)) <= 1e-5


def test_golden_requests_reproduce_from_the_files_alone(repo, tiny_run):
    version = repo / "tiny" / "1"
    model = RetrievalModel.load(version)
    model.check_golden()
    golden = model.manifest["golden"]
    assert len(golden) >= 3 and all(len(g["items"]) == g["k"] for g in golden)
    # ... and they are what the trained torch model computes (zero train/serve skew):
    # torch's own pooling (F.embedding_bag, as in training) of the same bags
    cfg, spec, data, torch_model = load_trained(tiny_run)
    records = [g["request"] for g in golden]
    bags = {name: (torch.from_numpy(i), torch.from_numpy(o)) for name, (i, o) in spec.encode("user", records).items()}
    with torch.no_grad():
        trained = torch_model.encode("user", bags).numpy()
    np.testing.assert_allclose(trained, np.array([g["user_vector"] for g in golden]), atol=1e-5)
    np.testing.assert_allclose(model.user_vectors(records), trained, atol=1e-5)
    items = item_matrix(torch_model, spec, data)
    np.testing.assert_allclose(items, np.load(version / "items/embeddings_f32.npy"), atol=1e-6)
    scores = trained @ items.T
    for g, s in zip(golden, scores):
        top = data.catalog.ids[np.argsort(-s, kind="stable")[: g["k"]]].tolist()
        assert top == g["items"]


def test_recommend_excludes_items_and_ignores_unknown_ids(repo):
    model = RetrievalModel.load(repo / "tiny" / "1")
    request = model.manifest["golden"][0]["request"]
    (ids, scores), = model.recommend([request], k=5)
    longer = ids[0] + "X"  # must not match ids[0] by truncation
    (ids2, _), = model.recommend([request], k=5, exclude=[[ids[0], longer, "nope"]])
    assert ids2[:4] == ids[1:] and ids[0] not in ids2
    assert scores == sorted(scores, reverse=True)


def test_tampered_versions_are_refused(repo, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(repo / "tiny" / "1", bad)
    table = bad / "tables/item_id.npy"
    raw = bytearray(table.read_bytes())
    raw[-1] ^= 0xFF
    table.write_bytes(bytes(raw))
    with pytest.raises(RepositoryError, match="item_id.npy: sha256 does not match"):
        RetrievalModel.load(bad)
    shutil.copy(repo / "tiny/1/tables/item_id.npy", table)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["golden"][0]["items"] = manifest["golden"][0]["items"][::-1]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RepositoryError, match="golden request 0: top-k ids differ"):
        RetrievalModel.load(bad).check_golden()


def test_second_export_is_the_next_version(repo, tiny_run):
    assert export_run(tiny_run, repo, "tiny", log=lambda *_: None) == 2
    assert list_versions(repo / "tiny") == [1, 2]
    assert read_manifest(repo / "tiny" / "2")["version"] == 2


def test_killed_export_leaves_no_version_behind(tiny_run, tmp_path):
    repo = tmp_path / "repo"
    cmd = [sys.executable, "-m", "recserve.cli.main", "export", str(tiny_run), "--repository", str(repo),
           "--model", "m", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120

    def writing() -> bool:
        return bool(list(repo.glob("m/.tmp-*/engine")))

    # Kill -9 once the export has started writing its temp directory.
    while not writing():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list_versions(repo / "m") == []
    assert [p.name.startswith(".tmp-") for p in (repo / "m").iterdir()] == [True]
    # The next export publishes version 1 and removes the dead writer's temp dir.
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"
    assert sorted(p.name for p in (repo / "m").iterdir()) == ["1"]


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", "", "x" * 200, "sp ace"])
def test_invalid_model_names_are_refused(tiny_run, tmp_path, name):
    with pytest.raises(RepositoryError, match="invalid model name"):
        export_run(tiny_run, tmp_path / "repo", name, log=lambda *_: None)
    assert not (tmp_path / "repo").exists() and not (tmp_path / "evil").exists()


def test_tensorrt_engine_matches_onnx(tiny_run, tmp_path):
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"TensorRT export needs tensorrt and a GPU: {reason}")
    from recserve.server.engines import load_engine

    version_dir = tmp_path / "trt" / str(export_run(tiny_run, tmp_path, "trt", backends=("onnx", "tensorrt"),
                                                     log=lambda *_: None))
    m = read_manifest(version_dir)
    session = ort.InferenceSession(str(version_dir / ENGINE_ONNX), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(5)
    for batch in (1, 64, 1024):  # the optimisation profile's ends and its optimum
        feeds = {i.name: rng.standard_normal((batch, i.shape[1]), dtype=np.float32) for i in session.get_inputs()}
        got = load_engine("tensorrt", version_dir / m["engines"]["tensorrt"]["file"]).run(feeds)["user_vector"]
        assert np.max(np.abs(got - session.run(None, feeds)[0])) <= 2e-2
