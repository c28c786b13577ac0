"""A loaded retrieval model version: the computation the server runs for Recommend.

    model = RetrievalModel.load(Path("repo/retail/3"))
    vectors = model.user_vectors([{"user_id": "17850", "history": ["85123A", "71053"]}])
    results = model.recommend(records, k=20, exclude=[["85123A"]])   # [(ids, scores), ...]
    model.check_golden()      # the manifest's golden requests, reproduced from the files

Pipeline per batch: feature spec encode (hash_features) -> embedding_bag on memory-mapped
tables -> dense engine (user tower) -> topk_inner_product over the item matrix. The
trainer's export computes its golden outputs through this class, so what the manifest
promises is exactly what the server computes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
import time
from pathlib import Path

import numpy as np

from recserve import kernels
from recserve.features.csr import find_sorted
from recserve.features.spec import FeatureSpec
from recserve.server.engines import load_engine
from recserve.server.repository import RepositoryError, read_manifest, verify_files

GOLDEN_ATOL = 1e-5
RETRIEVAL_KEYS = ("feature_spec", "feature_fingerprint", "signature", "engines", "tables", "items")


def check_signature(engine, signature: Mapping, path: Path) -> None:
    """The engine's inputs and outputs are the ones the manifest's signature names."""
    want_in = sorted(i["name"] for i in signature["inputs"])
    want_out = sorted(o["name"] for o in signature["outputs"])
    if sorted(engine.input_names) != want_in or not set(want_out) <= set(engine.output_names):
        raise RepositoryError(f"{path}: engine inputs {sorted(engine.input_names)} / outputs "
                              f"{sorted(engine.output_names)} do not match the manifest signature "
                              f"(inputs {want_in}, outputs {want_out})")


def load_array(path: Path, mmap: bool = False) -> np.ndarray:
    """An .npy file (memory-mapped read-only with ``mmap``); a bad file is a RepositoryError naming it."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise RepositoryError(f"{path}: missing") from None
    except (ValueError, OSError, EOFError) as e:
        raise RepositoryError(f"{path}: not a readable .npy array ({e})") from None


@dataclass
class RetrievalModel:
    version_dir: Path
    manifest: dict
    spec: FeatureSpec
    tables: dict  # table name -> read-only memmap [buckets, dim]
    engine: object
    item_ids: np.ndarray  # sorted ascending; row i of item_matrix is item_ids[i]
    item_matrix: np.ndarray
    _max_item_norm: float | None = None
    takes_bags = True  # recommend(bags=...): user fields already encoded (recommend_batch)

    @classmethod
    def load(cls, version_dir: Path, *, backend: str = "onnx", item_dtype: str = "float32",
             verify: bool = True, engine_options: Mapping | None = None) -> RetrievalModel:
        version_dir = Path(version_dir)
        manifest = read_manifest(version_dir)
        if manifest["kind"] != "retrieval":
            raise RepositoryError(f"{version_dir}: kind is {manifest['kind']!r}, not 'retrieval'")
        missing = [k for k in RETRIEVAL_KEYS if k not in manifest]
        if missing:
            raise RepositoryError(f"{version_dir / 'manifest.json'}: missing {', '.join(missing)}")
        if verify:
            verify_files(version_dir, manifest)
        try:
            spec = FeatureSpec.from_dict(manifest["feature_spec"])
        except ValueError as e:
            raise RepositoryError(f"{version_dir}: {e}") from None
        if spec.fingerprint() != manifest["feature_fingerprint"]:
            raise RepositoryError(f"{version_dir}: feature spec does not match its fingerprint")
        absent = [t.name for t in spec.tables if t.name not in manifest["tables"]]
        if absent:
            raise RepositoryError(f"{version_dir}: no file for embedding table {absent[0]!r}")
        tables = {}
        for t in spec.tables:
            entry = manifest["tables"][t.name]
            table = load_array(version_dir / entry["file"], mmap=True)
            if table.shape != (t.num_buckets, t.dim):
                raise RepositoryError(
                    f"{version_dir / entry['file']}: shape {table.shape}, spec says {(t.num_buckets, t.dim)}"
                )
            tables[t.name] = table
        engines = manifest["engines"]
        if backend not in engines:
            raise RepositoryError(f"{version_dir}: no {backend!r} engine (has: {', '.join(engines)})")
        engine = load_engine(backend, version_dir / engines[backend]["file"], **(engine_options or {}))
        check_signature(engine, manifest["signature"], version_dir / engines[backend]["file"])
        items = manifest["items"]
        if item_dtype not in items["embeddings"]:
            raise RepositoryError(f"{version_dir}: no {item_dtype} item matrix")
        item_ids = load_array(version_dir / items["ids"])
        item_matrix = load_array(version_dir / items["embeddings"][item_dtype], mmap=True)
        if len(item_ids) != len(item_matrix):
            raise RepositoryError(f"{version_dir}: {len(item_ids)} item ids but {len(item_matrix)} item rows")
        return cls(version_dir, manifest, spec, tables, engine, item_ids, item_matrix)

    @cached_property
    def search_items(self):
        """The item matrix as top-k searches it: ``kernels.prepare_items`` (the bfloat16 or
        int8 pre-filter's rows made once per version, not in every batch), made on first use --
        the golden check at load, so never in a request. Results equal the plain matrix's."""
        return kernels.prepare_items(self.item_matrix)

    @property
    def signature(self) -> dict:
        return self.manifest["signature"]

    def user_vectors(self, records: Sequence[Mapping], stages: list | None = None,
                     bags: Mapping | None = None) -> np.ndarray:
        """Raw user records (keyed by each user field's source) -> float32 [B, d]. With
        ``stages``, appends (stage, start ns, end ns) for hash, lookup and engine. ``bags``:
        fields already encoded (``FeatureSpec.encode``'s ``given``)."""
        t0 = time.time_ns()
        bags = self.spec.encode("user", records, given=bags)
        t1 = time.time_ns()
        pooled = self.spec.pool("user", bags, self.tables)
        t2 = time.time_ns()
        vectors = self.engine.run(pooled)[self.signature["outputs"][0]["name"]]
        if stages is not None:
            stages += [("hash", t0, t1), ("lookup", t1, t2), ("engine", t2, time.time_ns())]
        return vectors

    def item_rows(self, ids: Sequence[str]) -> np.ndarray:
        """Rows of known item ids (unknown ids are skipped: they can never be returned)."""
        pos, known = find_sorted(self.item_ids, np.asarray(list(ids), dtype=str))  # own width: no truncation
        return pos[known]

    def recommend(self, records: Sequence[Mapping], k: int, exclude: Sequence[Sequence[str]] | None = None,
                  stages: list | None = None, bags: Mapping | None = None) -> list[tuple[list[str], list[float]]]:
        vectors = self.user_vectors(records, stages, bags)
        t0 = time.time_ns()
        indptr = ids = None
        if exclude is not None:
            rows = [self.item_rows(e) for e in exclude]
            indptr = np.zeros(len(rows) + 1, dtype=np.int64)
            np.cumsum([len(r) for r in rows], out=indptr[1:])
            ids = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        scores, rows = kernels.topk_inner_product(
            vectors, self.search_items, min(k, len(self.item_ids)), exclude_indptr=indptr, exclude_ids=ids
        )
        out = []
        for s, r in zip(scores, rows):
            keep = r >= 0
            out.append((self.item_ids[r[keep]].tolist(), s[keep].tolist()))
        if stages is not None:
            stages.append(("topk", t0, time.time_ns()))
        return out

    @property
    def golden_atol(self) -> float:
        """1e-5 for the reference engine; a reduced-precision engine (TensorRT FP16) is held
        to twice the error export measured for it against ONNX Runtime."""
        measured = self.manifest["engines"].get(self.engine.backend, {}).get("max_abs_error_vs_onnx", 0.0)
        return max(GOLDEN_ATOL, 2 * measured)

    def check_golden(self, atol: float | None = None) -> None:
        """Reproduce every golden request; a mismatch raises RepositoryError naming it.

        User vectors and top-k scores must match within ``atol``. Ids must match too,
        except that items whose scores tie within ``atol`` may come in either order (a
        different engine or CPU may break a near-tie the other way): each expected item
        must score, here, within ``atol`` of its expected score.
        """
        atol = self.golden_atol if atol is None else atol
        golden = self.manifest.get("golden", [])
        if not golden:
            raise RepositoryError(f"{self.version_dir}: manifest has no golden requests")
        records = [g["request"] for g in golden]
        vectors = self.user_vectors(records)
        results = self.recommend(records, k=max(g["k"] for g in golden))
        for i, (g, vec, (ids, scores)) in enumerate(zip(golden, vectors, results)):
            where = f"{self.version_dir}: golden request {i}"
            err = float(np.max(np.abs(vec - np.asarray(g["user_vector"], np.float32))))
            if err > atol:
                raise RepositoryError(f"{where}: user vector differs by {err:.3g}")
            if len(ids[: g["k"]]) != len(g["items"]):
                raise RepositoryError(f"{where}: {len(ids[: g['k']])} items, expected {len(g['items'])}")
            score_atol = atol + self._score_rounding(vec)
            err = float(np.max(np.abs(np.asarray(scores[: g["k"]]) - np.asarray(g["scores"])), initial=0.0))
            if err > score_atol:
                raise RepositoryError(f"{where}: top-k scores differ by {err:.3g}")
            if ids[: g["k"]] != g["items"]:
                rows = self.item_rows(g["items"])
                here = np.asarray(self.item_matrix[rows], np.float32) @ vec
                if len(rows) != len(g["items"]) or np.max(np.abs(here - np.asarray(g["scores"]))) > score_atol:
                    raise RepositoryError(f"{where}: top-k ids differ")

    def _score_rounding(self, vec: np.ndarray) -> float:
        """Bound on |q.x - q.fl16(x)| when the item matrix is float16 (golden scores are
        float32): each component rounds by at most 2^-11 relative, so the error is at most
        2^-11 * |q| * |x| (Cauchy-Schwarz)."""
        if self.item_matrix.dtype != np.float16:
            return 0.0
        if self._max_item_norm is None:  # in chunks: no float32 copy of a large matrix
            step = 1 << 16
            self._max_item_norm = max(
                float(np.sqrt(np.max(np.sum(np.square(self.item_matrix[i:i + step], dtype=np.float32), axis=1))))
                for i in range(0, len(self.item_matrix), step))
        return 2.0 ** -11 * float(np.linalg.norm(vec)) * self._max_item_norm
