"""Export a trained run as a new version of a model in a repository (architecture.md section 5).

    recserve export runs/retail --repository models --model retail [--backend onnx,tensorrt]
    version = export_run(Path("runs/retail"), Path("models"), "retail")

Writes ``<repository>/<model>/<version>/`` atomically (see ``server.repository``):
  engine/user_tower.onnx     the user tower (pooled embeddings -> user vector), opset 18,
                             dynamic batch; checked against torch (relative error <= 1e-5)
  engine/user_tower.plan     TensorRT engine, when asked for (needs tensorrt and a GPU)
  tables/<table>.npy         float32 embedding tables, memory-mapped by the server
  items/ids.npy              catalogue item ids, sorted (row i of the matrices below)
  items/embeddings_f32.npy   item tower output per item (and _f16 for half the bytes)
  ATTRIBUTION.md             the training data's source and licence, when it has one
  manifest.json              spec + fingerprint, signature, files with sha256, training
                             metrics, created_at and golden requests computed by the
                             server's own RetrievalModel from the files above
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from recserve.features.logs import data_attribution
from recserve.server import repository
from recserve.server.retrieval import RetrievalModel
from recserve.trainer.data import user_records
from recserve.trainer.evaluate import item_matrix, numpy_tables
from recserve.trainer.train import METRICS, load_trained

BACKENDS = ("onnx", "tensorrt")
ONNX_OPSET = 18
ONNX_RTOL = 1e-5
TENSORRT_ATOL = 2e-2  # FP16 kernels on unit-norm outputs
GOLDEN_USERS = 4
GOLDEN_K = 20
OUTPUT_NAME = "user_vector"
CPU_ONLY = {"providers": ["CPUExecutionProvider"]}
ENGINE_ONNX, ENGINE_PLAN = "engine/user_tower.onnx", "engine/user_tower.plan"


def _export_onnx(tower: torch.nn.Module, names: list[str], dims: list[int], path: Path) -> None:
    # The exporter logs optional-op registration (torchvision) and renaming notes that
    # are not about this model; keep the export's own output to what the user asked.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"torch\.onnx")
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    example = tuple(torch.randn(4, d) for d in dims)
    torch.onnx.export(tower, example, str(path), dynamo=True, opset_version=ONNX_OPSET, input_names=names,
                      output_names=[OUTPUT_NAME],
                      # forward(*pooled): one varargs entry holding a spec per input
                      dynamic_shapes=(tuple({0: batch} for _ in names),),
                      external_data=False, verbose=False)


def _check_onnx(tower: torch.nn.Module, names: list[str], dims: list[int], path: Path) -> float:
    """Max relative error of ONNX Runtime vs torch on random pooled inputs of several batch sizes."""
    from recserve.server.engines import load_engine

    engine = load_engine("onnx", path, threads=1, **CPU_ONLY)
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for batch in (1, 7, 256):
        inputs = [torch.randn(batch, d, generator=generator) for d in dims]
        with torch.no_grad():
            expected = tower(*inputs).numpy()
        got = engine.run({n: x.numpy() for n, x in zip(names, inputs)})[OUTPUT_NAME]
        worst = max(worst, float(np.max(np.abs(got - expected)) / max(np.max(np.abs(expected)), 1e-30)))
    if worst > ONNX_RTOL:
        raise RuntimeError(f"{path}: ONNX Runtime differs from torch by {worst:.3g} (limit {ONNX_RTOL})")
    return worst


def _golden_users(data) -> tuple[np.ndarray, np.ndarray]:
    """A few test users spread over the id range (deterministic), with the held-out event
    whose context columns their requests carry."""
    split = data.split
    picks = np.unique(np.linspace(0, len(split.test_users) - 1, num=min(GOLDEN_USERS, len(split.test_users)))
                      .round().astype(int))
    return split.test_users[picks], split.test_context_event[picks]


def export_run(run_dir: Path, repo: Path, model_name: str, backends: tuple[str, ...] = ("onnx",),
               log=print) -> int:
    repository.validate_model_name(model_name)
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"--backend: unknown backend {unknown[0]!r} (choose from {', '.join(BACKENDS)})")
    if "onnx" not in backends:
        raise ValueError("--backend: onnx is always exported (the reference engine); add it to the list")
    if "tensorrt" in backends:
        from recserve.trainer.tensorrt_engine import unavailable_reason

        reason = unavailable_reason()
        if reason:
            raise RuntimeError(f"cannot export a TensorRT engine: {reason}")
    cfg, spec, data, model = load_trained(run_dir)
    metrics = json.loads((Path(run_dir) / METRICS).read_text()) if (Path(run_dir) / METRICS).exists() else {}

    def build(tmp: Path, version: int) -> None:
        for sub in ("engine", "tables", "items"):
            (tmp / sub).mkdir()
        user_fields = spec.side_fields("user")
        names = [f.name for f in user_fields]
        dims = [spec.table(f.table).dim for f in user_fields]
        log(f"exporting the user tower to ONNX (opset {ONNX_OPSET})")
        _export_onnx(model.user_tower, names, dims, tmp / ENGINE_ONNX)
        rel_err = _check_onnx(model.user_tower, names, dims, tmp / ENGINE_ONNX)
        engines = {"onnx": {"file": ENGINE_ONNX, "opset": ONNX_OPSET, "max_rel_error_vs_torch": rel_err}}
        if "tensorrt" in backends:
            engines["tensorrt"] = _export_tensorrt(tmp, dict(zip(names, dims)), log)

        tables = {}
        for name, weights in numpy_tables(model).items():
            np.save(tmp / f"tables/{name}.npy", weights.astype(np.float32))
            tables[name] = {"file": f"tables/{name}.npy", "shape": list(weights.shape), "dtype": "float32"}
        log(f"computing item embeddings for {len(data.catalog):,} items")
        matrix = item_matrix(model, spec, data).astype(np.float32)
        np.save(tmp / "items/ids.npy", data.catalog.ids.astype(str))
        np.save(tmp / "items/embeddings_f32.npy", matrix)
        np.save(tmp / "items/embeddings_f16.npy", matrix.astype(np.float16))
        attribution = data_attribution(cfg.interactions)
        if attribution:
            (tmp / "ATTRIBUTION.md").write_text(f"# Training data attribution\n\n{attribution}\n")

        manifest = {
            "schema_version": repository.MANIFEST_SCHEMA_VERSION,
            "kind": "retrieval",
            "model": model_name,
            "version": version,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "feature_spec": spec.to_dict(),
            "feature_fingerprint": spec.fingerprint(),
            "signature": {
                "inputs": [{"name": n, "dtype": "float32", "shape": [-1, d]} for n, d in zip(names, dims)],
                "outputs": [{"name": OUTPUT_NAME, "dtype": "float32", "shape": [-1, int(matrix.shape[1])]}],
            },
            "engines": engines,
            "tables": tables,
            "items": {"ids": "items/ids.npy", "count": len(matrix), "dim": int(matrix.shape[1]),
                      "embeddings": {"float32": "items/embeddings_f32.npy", "float16": "items/embeddings_f16.npy"}},
            "training": {"config": cfg.to_dict(), "metrics": metrics.get("final")},
            "data": {"interactions": Path(cfg.interactions).name,
                     "items": Path(cfg.items).name if cfg.items else None, "attribution": attribution},
            "files": repository.file_entries(tmp),
            "golden": [],
        }
        repository.write_json(tmp / repository.MANIFEST, manifest)
        # Golden outputs come from the server's own code reading the files just written,
        # on the CPU provider: the reference any server (CPU or GPU) is checked against.
        served = RetrievalModel.load(tmp, verify=True, engine_options=CPU_ONLY)
        users, context_events = _golden_users(data)
        records = user_records(data, users, cfg.history_len, context_events)
        vectors = served.user_vectors(records)
        results = served.recommend(records, k=GOLDEN_K)
        manifest["golden"] = [
            {"request": r, "k": GOLDEN_K, "user_vector": v.tolist(), "items": ids, "scores": scores}
            for r, v, (ids, scores) in zip(records, vectors, results)
        ]
        repository.write_json(tmp / repository.MANIFEST, manifest)
        RetrievalModel.load(tmp, engine_options=CPU_ONLY).check_golden()

    return repository.publish_version(Path(repo), model_name, build)


def _export_tensorrt(tmp: Path, inputs: dict[str, int], log) -> dict:
    from recserve.server.engines import load_engine
    from recserve.trainer.tensorrt_engine import build_plan

    log("building the TensorRT engine (FP16, batch 1..1024)")
    build_plan(tmp / ENGINE_ONNX, tmp / ENGINE_PLAN, inputs)
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((33, d), dtype=np.float32) for n, d in inputs.items()}
    expected = load_engine("onnx", tmp / ENGINE_ONNX, **CPU_ONLY).run(feeds)[OUTPUT_NAME]
    got = load_engine("tensorrt", tmp / ENGINE_PLAN).run(feeds)[OUTPUT_NAME]
    err = float(np.max(np.abs(got - expected)))
    if err > TENSORRT_ATOL:
        raise RuntimeError(f"TensorRT engine differs from ONNX Runtime by {err:.3g} (limit {TENSORRT_ATOL})")
    return {"file": ENGINE_PLAN, "precision": "fp16", "max_batch": 1024, "max_abs_error_vs_onnx": err}
