"""GPU serving (``device: cuda``, server/gpu.py, server/gpu_engines.py).

Runs everywhere: the host half of the device pipeline (tokens equal to the spec's encoding,
the one-buffer packing), the engine selection order and its error messages (pure logic, fed
the reasons a backend is unusable), the config keys, the torch fallback's ONNX conversion
(on the CPU), and ``--device cuda`` on a machine without CUDA (one line). Runs where a GPU,
CuPy and a CUDA build are present (skipped with the reason otherwise): the device pipeline
against the CPU pipeline for golden and random users with exclusions, per dense engine, and
a real server with ``device=cuda`` through the real client.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from recserve import kernels
from recserve.features.spec import FeatureSpec
from recserve.server.config import ServerConfig
from recserve.server.engines import EngineUnavailable
from recserve.server.gpu import cuda_unavailable_reason, field_tokens, layout, pack, unpack, user_inputs
from recserve.server.gpu_engines import (ORDER, engine_candidates, load_device_engine, select_engine,
                                         unavailable_message, why_not)
from recserve.server.retrieval import RetrievalModel
from tests.conftest import _cuda_skip_reason
from tests.server.conftest import ServerThread, metric, server_config


def _version_dir(repo):
    return repo / "tiny" / "1"


def _spec(repo) -> FeatureSpec:
    return FeatureSpec.from_dict(json.loads((_version_dir(repo) / "manifest.json").read_text())["feature_spec"])


def _gpu_reason() -> str | None:
    return _cuda_skip_reason("cupy") or cuda_unavailable_reason(0)


# ---- host half: tokens and packing -----------------------------------------------------------

def _values(field, rng, n):
    """Raw values a field may get: ids, repeats, unicode, empty and missing values, numbers."""
    if field.kind == "bucketized":
        return [None if i % 5 == 0 else float(rng.uniform(-1, 20)) for i in range(n)]
    pool = ["I001", "I002", "0042", "", "ünïcødé", "a b", "12", "I001"]
    if field.kind == "sequence":
        return [[pool[j] for j in rng.integers(0, len(pool), size=rng.integers(0, 14))] for _ in range(n)]
    if field.kind == "text":
        return [None if i % 7 == 0 else " ".join(pool[j] for j in rng.integers(0, len(pool), size=5))
                for i in range(n)]
    return [None if i % 6 == 0 else pool[i % len(pool)] for i in range(n)]


def test_field_tokens_hash_to_the_spec_encoding(repo):
    """The device path's tokens, hashed by the kernel's flat form, are spec.encode_field's ids."""
    spec = _spec(repo)
    rng = np.random.default_rng(0)
    for f in spec.fields:
        for n in (0, 1, 9):
            values = _values(f, rng, n)
            want_ids, want_offsets = spec.encode_field(f.name, values)
            got = field_tokens(spec, f.name, values)
            np.testing.assert_array_equal(got.offsets, want_offsets)
            if f.kind == "bucketized":
                ids = got.ids
            else:
                ids = kernels.hash_features((got.data, got.token_offsets), seed=spec.seed,
                                            num_buckets=spec.table(f.table).num_buckets)
            np.testing.assert_array_equal(ids, want_ids)


def test_user_inputs_cover_every_user_field_in_spec_order(repo):
    spec = _spec(repo)
    fields = user_inputs(spec, [{"user_id": "u1", "history": ["I001", "I002"]}, {}])
    assert [fi.field.name for fi in fields] == [f.name for f in spec.side_fields("user")]
    assert all(len(fi.offsets) == 3 for fi in fields)


def test_pack_round_trip():
    rng = np.random.default_rng(1)
    arrays = [rng.integers(-9, 9, size=n).astype(dt) for n, dt in
              [(5, np.int64), (0, np.int64), (13, np.uint8), (3, np.int64), (0, np.uint8), (1, np.uint8), (4, np.int64)]]
    buf, slots = pack(arrays)
    assert buf.dtype == np.uint8 and len(buf) == layout(arrays)[1]
    assert all(offset % 8 == 0 for offset, _, _ in slots)
    for a, b in zip(arrays, unpack(buf, slots)):
        assert b.dtype == a.dtype
        np.testing.assert_array_equal(a, b)
    out = np.full(len(buf) + 16, 255, np.uint8)  # into a caller's (pinned) buffer
    buf2, slots2 = pack(arrays, out)
    assert slots2 == slots and len(buf2) == len(buf)
    for a, b in zip(arrays, unpack(buf2, slots2)):
        np.testing.assert_array_equal(a, b)


# ---- engine selection --------------------------------------------------------------------------

def test_engine_order():
    assert engine_candidates("auto", has_plan=True) == ["tensorrt", "onnx-cuda", "torch"]
    assert engine_candidates("auto", has_plan=False) == ["onnx-cuda", "torch"]
    assert engine_candidates("torch", has_plan=True) == ["torch"]
    with pytest.raises(EngineUnavailable, match="unknown gpu_engine 'cudnn'"):
        engine_candidates("cudnn", has_plan=True)


def test_select_engine_takes_the_first_usable_backend():
    all_ok = {n: None for n in ORDER}
    assert select_engine("auto", True, all_ok) == "tensorrt"
    assert select_engine("auto", False, all_ok) == "onnx-cuda"  # no plan: TensorRT is not a candidate
    assert select_engine("auto", True, {**all_ok, "tensorrt": "not installed"}) == "onnx-cuda"
    assert select_engine("auto", True, {"tensorrt": "x", "onnx-cuda": "y", "torch": None}) == "torch"
    assert select_engine("torch", True, all_ok) == "torch"


def test_no_usable_engine_is_one_line_naming_what_to_install():
    none = {n: f"{n} is missing" for n in ORDER}
    with pytest.raises(EngineUnavailable) as e:
        select_engine("auto", True, none)
    message = str(e.value)
    assert "\n" not in message
    for needed in ("onnxruntime-gpu", "onnx2torch", "torch", "tensorrt"):
        assert needed in message
    for n in ORDER:
        assert f"{n}: {n} is missing" in message
    with pytest.raises(EngineUnavailable, match=r"gpu_engine onnx-cuda: onnx-cuda is missing; pip install onnxruntime-gpu"):
        select_engine("onnx-cuda", True, none)
    with pytest.raises(EngineUnavailable, match="gpu_engine tensorrt: the version has no TensorRT plan"):
        select_engine("tensorrt", False, {n: None for n in ORDER})
    assert "\n" not in unavailable_message("auto", False, {})


def test_load_device_engine_reports_each_reason(repo):
    """The loader walks the same order; with nothing usable its error has every reason."""
    manifest = json.loads((_version_dir(repo) / "manifest.json").read_text())
    probed = []

    def probe(name, device):
        probed.append((name, device))
        return f"{name} absent"

    with pytest.raises(EngineUnavailable) as e:
        load_device_engine(_version_dir(repo), manifest, "auto", device=3, stream=None, probe=probe)
    assert probed == [("onnx-cuda", 3), ("torch", 3)]  # the tiny model has no TensorRT plan
    assert "tensorrt: the version has no TensorRT plan" in str(e.value)
    assert "onnx-cuda: onnx-cuda absent; torch: torch absent" in str(e.value)


def test_probes_say_why_here():
    """On a machine with the CPU-only onnxruntime the CUDA EP is reported missing, and so on."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "CPU-only onnxruntime" in why_not("onnx-cuda", 0)
    reason = why_not("torch", 0)
    if reason is None:
        assert _gpu_reason() is None or _cuda_skip_reason("torch") is None
    else:
        assert "not installed" in reason or "CUDA" in reason or "device" in reason


def test_torch_fallback_converts_the_tower_exactly_on_the_cpu(repo):
    """The torch engine's module (onnx2torch, opset lowered to 17) computes the ONNX tower:
    checked on the CPU against ONNX Runtime, the reference the golden outputs come from."""
    pytest.importorskip("onnx2torch", reason="onnx2torch is not installed (pip install 'recserve[gpu-torch]')")
    import onnxruntime as ort
    import torch

    from recserve.server.gpu_engines import torch_module_from_onnx

    path = _version_dir(repo) / "engine" / "user_tower.onnx"
    module, inputs, outputs = torch_module_from_onnx(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert inputs == [i.name for i in session.get_inputs()]
    assert outputs == [o.name for o in session.get_outputs()]
    rng = np.random.default_rng(2)
    for batch in (1, 7, 64):
        feeds = {i.name: rng.standard_normal((batch, i.shape[1]), dtype=np.float32) for i in session.get_inputs()}
        want = session.run(None, feeds)[0]
        with torch.no_grad():
            got = module(*[torch.from_numpy(feeds[n]) for n in inputs]).numpy()
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_gpu_modules_import_neither_cupy_nor_torch():
    code = ("import sys; import recserve.server.gpu, recserve.server.gpu_engines, recserve.server.app; "
            "bad = [m for m in ('cupy', 'torch', 'tensorrt', 'onnx2torch') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---- configuration and start-up -----------------------------------------------------------

def test_config_keys(tmp_path):
    base = {"repository": str(tmp_path)}
    cfg = ServerConfig.from_dict({**base, "device": "cuda", "cuda_device": 1, "gpu_engine": "onnx-cuda"})
    assert (cfg.device, cfg.cuda_device, cfg.gpu_engine) == ("cuda", 1, "onnx-cuda")
    assert ServerConfig.from_dict(base).device == "cpu"
    for bad, match in [({"device": "gpu"}, "device must be cpu or cuda"),
                       ({"cuda_device": -1}, "cuda_device must be an integer >= 0"),
                       ({"cuda_device": True}, "cuda_device must be an integer >= 0"),
                       ({"gpu_engine": "cudnn"}, "gpu_engine must be one of auto, tensorrt, onnx-cuda, torch")]:
        with pytest.raises(ValueError, match=match):
            ServerConfig.from_dict({**base, **bad})


def test_serve_device_cuda_without_cuda_is_one_line(repo):
    reason = cuda_unavailable_reason(0)
    if reason is None:
        pytest.skip("this machine can serve on CUDA")
    proc = subprocess.run([sys.executable, "-m", "recserve.cli", "serve", "--repository", str(repo), "--port", "0",
                           "--metrics-port", "off", "--device", "cuda"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"recserve serve: error: device cuda: {reason}"]


def test_server_device_cuda_without_cuda_fails_at_startup(repo):
    reason = cuda_unavailable_reason(0)
    if reason is None:
        pytest.skip("this machine can serve on CUDA")
    from recserve.server.app import RecserveServer

    with pytest.raises(RuntimeError, match=r"^device cuda: ") as e:
        RecserveServer(dataclasses.replace(server_config(repo), device="cuda", metrics_port=None))
    assert "\n" not in str(e.value)


# ---- on a GPU -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpu_repo(server_run, tmp_path_factory):
    """Its own repository: the tiny model ("tiny"), plus a TensorRT-planned export of it
    ("tiny_trt") where tensorrt is installed."""
    reason = _gpu_reason()
    if reason:
        pytest.skip(reason)
    from recserve.trainer.export import export_run

    repo = tmp_path_factory.mktemp("gpu-repo")
    export_run(server_run, repo, "tiny", log=lambda *_: None)
    if why_not("tensorrt", 0) is None:
        export_run(server_run, repo, "tiny_trt", backends=("onnx", "tensorrt"), log=lambda *_: None)
    return repo


@pytest.fixture(scope="module", params=list(ORDER))
def models(request, gpu_repo):
    """(CPU reference model, GPU model) for one dense engine on the GPU."""
    from recserve.server.gpu import GpuRetrievalModel

    name = request.param
    why = why_not(name, 0)
    if why:
        pytest.skip(f"gpu_engine {name}: {why}")
    model_dir = gpu_repo / ("tiny_trt" if name == "tensorrt" else "tiny") / "1"
    if not model_dir.is_dir():
        pytest.skip("no TensorRT-planned version (tensorrt is not installed)")
    cpu = RetrievalModel.load(model_dir)
    return cpu, GpuRetrievalModel.build(cpu, device=0, engine=name)


def _assert_same_results(cpu, gpu, records, k, exclude, atol):
    want = cpu.recommend(records, k, exclude=exclude)
    got = gpu.recommend(records, k, exclude=exclude)
    vectors = cpu.user_vectors(records)
    np.testing.assert_allclose(gpu.user_vectors(records), vectors, atol=atol, rtol=0)
    for i, ((want_ids, want_scores), (ids, scores)) in enumerate(zip(want, got)):
        assert len(ids) == len(want_ids), i
        np.testing.assert_allclose(scores, want_scores, atol=atol, rtol=0)
        if ids != want_ids:  # only near-ties may swap: each item scores its expected score
            rows = cpu.item_rows(ids)
            here = np.asarray(cpu.item_matrix[rows], np.float32) @ vectors[i]
            np.testing.assert_allclose(here, want_scores, atol=atol, rtol=0)
        if exclude is not None:
            assert not set(ids) & set(exclude[i])


def test_device_pipeline_passes_the_golden_check(models):
    cpu, gpu = models
    gpu.check_golden()
    golden = cpu.manifest["golden"]
    records = [g["request"] for g in golden]
    _assert_same_results(cpu, gpu, records, max(g["k"] for g in golden), None, gpu.golden_atol)


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_device_pipeline_equals_cpu_for_random_users_with_exclusions(models, batch):
    cpu, gpu = models
    rng = np.random.default_rng(batch)
    items = [str(i) for i in cpu.item_ids]
    records, exclude = [], []
    for b in range(batch):
        history = [items[j] for j in rng.integers(0, len(items), size=rng.integers(0, 12))]
        records.append({"user_id": f"user-{rng.integers(0, 10**6)}" if b % 3 else "", "history": history + ["nope"]})
        exclude.append([items[j] for j in rng.integers(0, len(items), size=rng.integers(0, 6))] + ["unknown-id"])
    _assert_same_results(cpu, gpu, records, 10, exclude, gpu.golden_atol)
    _assert_same_results(cpu, gpu, records, len(items) + 5, None, gpu.golden_atol)  # k past the catalogue


def test_device_stages_are_timed_in_order(models):
    _, gpu = models
    stages = []
    gpu.recommend([{"user_id": "u1", "history": []}], 5, stages=stages)
    assert [s[0] for s in stages] == ["tokens", "hash", "lookup", "engine", "topk", "d2h"]
    assert all(start <= end for _, start, end in stages)
    assert all(a[2] <= b[1] + 1000 for a, b in zip(stages, stages[1:]))  # consecutive (1 µs rounding)


def test_server_on_cuda_through_the_client(gpu_repo):
    from recserve.clients import RecommendClient

    cpu = RetrievalModel.load(gpu_repo / "tiny" / "1")
    config = dataclasses.replace(server_config(gpu_repo, max_batch_size=32), device="cuda")
    with ServerThread(config) as s, RecommendClient(s.target) as client:
        for g in cpu.manifest["golden"]:
            rec = client.recommend("tiny", str(g["request"].get("user_id", "")), k=g["k"],
                                   recent_items=g["request"].get("history", []))
            assert rec.item_ids == g["items"] or np.allclose(rec.scores, g["scores"], atol=1e-5)
        users = [f"user-{i}" for i in range(40)]
        histories = [[str(cpu.item_ids[i % len(cpu.item_ids)])] for i in range(40)]
        recs = client.batch_recommend("tiny", users, k=6, recent_items=histories)
        want = cpu.recommend([{"user_id": u, "history": h} for u, h in zip(users, histories)], k=6,
                             exclude=None)
        for rec, (ids, scores) in zip(recs, want):
            np.testing.assert_allclose(rec.scores, scores, atol=1e-5)
        rec = client.recommend("tiny", "u1", k=5, exclude=[str(cpu.item_ids[0])])
        assert str(cpu.item_ids[0]) not in rec.item_ids
        for stage in ("tokens", "hash", "lookup", "engine", "topk", "d2h"):
            assert metric(s, "recserve_stage_duration_seconds_count", model="tiny", stage=stage) >= 1
