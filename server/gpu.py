"""GPU serving (``device: cuda``): a retrieval version resident on one GPU, its whole pipeline on
one CUDA stream, one host synchronisation per batch.

    require_cuda(config)                                    # RuntimeError, one line, if this machine cannot
    gpu_model = GpuRetrievalModel.build(cpu_model, device=0, engine="auto")
    gpu_model.check_golden()                                # the manifest's golden top-k, on the device
    results = gpu_model.recommend(records, k=20, exclude=[["85123A"]], stages=stages)

What is resident: every embedding table and the item matrix (CuPy arrays, uploaded once when
the version loads), and the dense engine (server/gpu_engines.py). Per batch:

  host    the feature spec turns records into tokens (``field_tokens``: the spec's own
          ``Field.tokens`` / ``Field.bins``, so bucket ids are the CPU path's), UTF-8 bytes +
          token offsets + bag offsets per field, the exclusions as CSR rows: all packed into
          one pinned buffer (``pack``)
  H2D     one async copy of that buffer; device views slice it (``unpack``)
  device  ``hash_features`` on the flat form per hashed field, ``embedding_bag`` per field, the
          dense engine, ``topk_inner_product`` with the exclusions — every kernel with
          ``validate=False``: offsets are built here and bucket ids are ``% num_buckets`` and
          exclusion rows come from the item index, so they are valid by construction and no
          kernel synchronises
  D2H     scores and ids copied into one pinned buffer, then the one ``stream.synchronize()``

Stage times come from CUDA events recorded on the stream between the stages and read after
that synchronisation (no extra wait); ``stages`` gets (name, start ns, end ns) on the host
clock, the device intervals placed from the host time at which the first event was enqueued.
Nothing here imports CuPy (or torch) until a GPU model is built.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from recserve import kernels
from recserve.features.spec import FeatureSpec, Field
from recserve.server.retrieval import GOLDEN_ATOL, RetrievalModel

CUPY_HINT = "pip install cupy-cuda13x, or cupy-cuda12x for a CUDA 12 driver"
# Device-side stage boundaries (events), in order; "tokens" is the host stage before them.
DEVICE_STAGES = ("hash", "lookup", "engine", "topk", "d2h")


# ---- availability ------------------------------------------------------------------------

def cuda_unavailable_reason(device: int = 0) -> str | None:
    """Why this process cannot serve on CUDA device ``device``; None when it can."""
    info = kernels.build_info()
    if not info["cuda"]:
        if info.get("cuda_error"):
            return f"recserve's CUDA kernels do not import ({info['cuda_error']})"
        return "recserve was built without CUDA kernels (rebuild with RECSERVE_CUDA=ON, see README)"
    try:
        import cupy
    except ImportError as e:
        if getattr(e, "name", None) == "cupy":
            return f"CuPy is not installed: {CUPY_HINT}"
        return f"CuPy does not import ({type(e).__name__}: {e}); reinstall it: {CUPY_HINT}"
    if info["cuda_devices"] == 0:
        return "no CUDA device is visible (no GPU, or no NVIDIA driver)"
    if device >= info["cuda_devices"]:
        return f"cuda_device {device} does not exist ({info['cuda_devices']} visible)"
    try:
        cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - cupy.cuda.runtime.CUDARuntimeError, or a CuPy/driver mismatch
        return f"CuPy cannot use the GPU ({type(e).__name__}: {e})"
    return None


def require_cuda(config) -> None:
    """RuntimeError with one line when ``config`` (device: cuda) cannot be served here."""
    reason = cuda_unavailable_reason(config.cuda_device)
    if reason is not None:
        raise RuntimeError(f"device cuda: {reason}")
    from recserve.kernels import _cuda

    limit = int(_cuda._require().MAX_TOPK)
    if config.max_k > limit:
        raise RuntimeError(f"device cuda: max_k {config.max_k} is above the CUDA top-k limit {limit}")


# ---- host side: tokens and packing (pure NumPy, tested on the CPU) -------------------------

@dataclass(frozen=True)
class FieldInput:
    """One user field of a batch, before hashing: either UTF-8 token bytes + token offsets
    (``data``/``token_offsets``, hashed on the device) or bin ids (bucketized: ``ids``),
    and the bag offsets int64[B + 1]."""

    field: Field
    offsets: np.ndarray
    data: np.ndarray | None = None
    token_offsets: np.ndarray | None = None
    ids: np.ndarray | None = None


def field_tokens(spec: FeatureSpec, name: str, values: Sequence) -> FieldInput:
    """Raw values of one field for B entities -> its tokens in the flat form, not hashed.

    The tokens are the spec's (``Field.tokens``, ``Field.bins``), so hashing them
    (``kernels.hash_features((data, token_offsets), seed=spec.seed, num_buckets=...)``)
    gives exactly ``spec.encode_field(name, values)`` (tested)."""
    f = spec.field(name)
    if f.kind == "bucketized":
        ids, offsets = f.bins(values)
        return FieldInput(f, offsets, ids=ids)
    per_entity = [f.tokens(v) for v in values]
    offsets = np.zeros(len(per_entity) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in per_entity], out=offsets[1:])
    flat = [t for tokens in per_entity for t in tokens]
    text = "".join(flat)
    data = text.encode("utf-8")
    if len(data) == len(text):  # ASCII: one byte per character
        lengths = [len(t) for t in flat]
    else:
        lengths = [len(t.encode("utf-8")) for t in flat]
    token_offsets = np.zeros(len(flat) + 1, dtype=np.int64)
    np.cumsum(lengths, out=token_offsets[1:])
    return FieldInput(f, offsets, data=np.frombuffer(data, dtype=np.uint8), token_offsets=token_offsets)


def user_inputs(spec: FeatureSpec, records: Sequence[Mapping]) -> list[FieldInput]:
    """``field_tokens`` for every user field (the records are keyed by each field's source)."""
    return [field_tokens(spec, f.name, [r.get(f.source) for r in records]) for f in spec.side_fields("user")]


def layout(arrays: Sequence[np.ndarray]) -> tuple[list[tuple[int, int, np.dtype]], int]:
    """Byte offsets for packing ``arrays`` (1-D) into one buffer: each aligned to 8 bytes.
    Returns ([(offset, length, dtype)], total bytes)."""
    slots, pos = [], 0
    for a in arrays:
        pos = (pos + 7) & ~7
        slots.append((pos, len(a), a.dtype))
        pos += a.nbytes
    return slots, max(pos, 8)


def pack(arrays: Sequence[np.ndarray], out: np.ndarray | None = None):
    """``arrays`` copied into one uint8 buffer (``out``, e.g. pinned memory, or a new one)."""
    slots, total = layout(arrays)
    buf = np.empty(total, np.uint8) if out is None else out[:total]
    for (offset, _, _), a in zip(slots, arrays):
        buf[offset:offset + a.nbytes] = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
    return buf, slots


def unpack(buf, slots):
    """Views of a packed buffer (NumPy or CuPy: only slicing and ``view``)."""
    return [buf[offset:offset + n * np.dtype(dtype).itemsize].view(dtype) for offset, n, dtype in slots]


def exclusion_csr(model: RetrievalModel, exclude: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-query exclusions as (indptr int64[B + 1], item rows int64): unknown ids dropped,
    as the CPU path does (``RetrievalModel.item_rows``)."""
    rows = [model.item_rows(e) for e in exclude]
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=indptr[1:])
    ids = np.concatenate(rows).astype(np.int64, copy=False) if rows else np.zeros(0, np.int64)
    return indptr, ids


# ---- the device model ------------------------------------------------------------------------

def _upload(cp, array: np.ndarray, step_bytes: int = 64 << 20):
    """A (possibly memory-mapped) host array copied to the current device in chunks, so a
    large mmap'd matrix is never materialised whole in host memory."""
    out = cp.empty(array.shape, dtype=array.dtype)
    rows = max(1, step_bytes // max(1, array[:1].nbytes)) if array.ndim else 1
    for i in range(0, len(array), rows):
        out[i:i + rows].set(np.ascontiguousarray(array[i:i + rows]))
    return out


class GpuRetrievalModel:
    """A ``RetrievalModel`` resident on a GPU. Everything not overridden here (manifest, spec,
    item ids, the host engine KServe's ModelInfer uses, ...) is the CPU model's."""

    takes_bags = False  # the device pipeline tokenises the records itself (recommend_batch)

    def __init__(self, cpu: RetrievalModel, device: int, engine, stream, tables: dict, items):
        self.cpu = cpu
        self.device_index = device
        self.device_engine = engine
        self.stream = stream
        self.device_tables = tables
        self.device_items = items
        self._lock = threading.Lock()  # one stream, one set of events: one batch at a time
        import cupy as cp

        self._cp = cp
        with cp.cuda.Device(device):
            self._events = [cp.cuda.Event(block=False, disable_timing=False) for _ in range(len(DEVICE_STAGES) + 1)]

    def __getattr__(self, name):  # only called for attributes not found on self
        if name == "cpu":
            raise AttributeError(name)
        return getattr(self.cpu, name)

    @classmethod
    def build(cls, cpu: RetrievalModel, *, device: int = 0, engine: str = "auto",
              max_batch_size: int | None = None) -> GpuRetrievalModel:
        import cupy as cp

        from recserve.server.gpu_engines import load_device_engine

        with cp.cuda.Device(device):
            stream = cp.cuda.Stream(non_blocking=True)
            dense = load_device_engine(cpu.version_dir, cpu.manifest, engine, device=device, stream=stream,
                                       max_batch_size=max_batch_size)
            with stream:
                tables = {name: _upload(cp, t) for name, t in cpu.tables.items()}
                items = _upload(cp, cpu.item_matrix)
            stream.synchronize()
        return cls(cpu, device, dense, stream, tables, items)

    # -- what the registry and the golden check see ---------------------------------------
    @property
    def describe(self) -> str:
        return (f"cuda:{self.device_index}, dense engine {self.device_engine.backend} "
                f"({', '.join(self.device_engine.providers)})")

    @property
    def golden_atol(self) -> float:
        """As the CPU model's, for the engine that runs on the device (TensorRT FP16: twice the
        error export measured; the ONNX tower on the CUDA EP or torch: 1e-5)."""
        entry = self.cpu.manifest["engines"].get(self.device_engine.manifest_backend, {})
        return max(GOLDEN_ATOL, 2 * entry.get("max_abs_error_vs_onnx", 0.0))

    def check_golden(self, atol: float | None = None) -> None:
        """The manifest's golden requests through the device pipeline (the same checks and
        tolerances as ``RetrievalModel.check_golden``)."""
        RetrievalModel.check_golden(self, atol)

    def user_vectors(self, records: Sequence[Mapping], stages: list | None = None) -> np.ndarray:
        return self._run(records, k=None, exclude=None, stages=stages)[2]

    def recommend(self, records: Sequence[Mapping], k: int, exclude: Sequence[Sequence[str]] | None = None,
                  stages: list | None = None, bags: Mapping | None = None) -> list[tuple[list[str], list[float]]]:
        if bags:
            raise ValueError("GpuRetrievalModel.recommend: records only (takes_bags is False)")
        scores, rows, _ = self._run(records, min(k, len(self.cpu.item_ids)), exclude, stages)
        out = []
        for s, r in zip(scores, rows):
            keep = r >= 0
            out.append((self.cpu.item_ids[r[keep]].tolist(), s[keep].tolist()))
        return out

    # -- the pipeline ------------------------------------------------------------------------
    def _run(self, records, k: int | None, exclude, stages: list | None):
        """k None: user vectors only. Returns (scores, item rows, vectors or None) on the host."""
        cp, cpu = self._cp, self.cpu
        t_tokens = time.time_ns()
        fields = user_inputs(cpu.spec, records)  # FeatureValueError: a bad request
        arrays = []
        for fi in fields:
            arrays += [fi.offsets] + ([fi.ids] if fi.ids is not None else [fi.token_offsets, fi.data])
        has_excl = exclude is not None and k is not None
        if has_excl:
            arrays += list(exclusion_csr(cpu, exclude))
        batch = len(records)
        with self._lock, cp.cuda.Device(self.device_index), self.stream:
            stream, ev = self.stream, self._events
            _, total = layout(arrays)
            host = cp.cuda.alloc_pinned_memory(total)
            host_buf, slots = pack(arrays, np.frombuffer(host, np.uint8, total))
            t_enqueue = time.time_ns()
            ev[0].record(stream)
            dev_buf = cp.empty(total, dtype=cp.uint8)
            dev_buf.set(host_buf, stream=stream)  # pinned source: asynchronous
            views = iter(unpack(dev_buf, slots))

            seed = cpu.spec.seed
            bags = []
            for fi in fields:
                offsets = next(views)
                if fi.ids is not None:
                    ids = next(views)
                else:
                    token_offsets, data = next(views), next(views)
                    ids = kernels.hash_features((data, token_offsets), seed=seed, validate=False,
                                                num_buckets=cpu.spec.table(fi.field.table).num_buckets)
                bags.append((fi.field, ids, offsets))
            ev[1].record(stream)
            pooled = {f.name: kernels.embedding_bag(self.device_tables[f.table], ids, offsets, mode=f.pooling,
                                                    validate=False)
                      for f, ids, offsets in bags}
            ev[2].record(stream)
            outputs = self.device_engine.run_device(pooled, stream)
            vectors = cp.ascontiguousarray(outputs[cpu.signature["outputs"][0]["name"]], dtype=cp.float32)
            ev[3].record(stream)
            if k is not None:
                indptr, excl = (next(views), next(views)) if has_excl else (None, None)
                scores, rows = kernels.topk_inner_product(vectors, self.device_items, k, exclude_indptr=indptr,
                                                          exclude_ids=excl, validate=False)
            ev[4].record(stream)
            # Results into one pinned buffer (scores then ids; the user vectors instead when
            # only they were asked for); the batch's only synchronisation follows.
            parts = [vectors] if k is None else [scores, rows]
            sizes = [p.nbytes for p in parts]
            out_host = cp.cuda.alloc_pinned_memory(max(8, sum(sizes)))
            pos = 0
            for p, n in zip(parts, sizes):
                if n:
                    cp.cuda.runtime.memcpyAsync(out_host.ptr + pos, p.data.ptr, n,
                                                cp.cuda.runtime.memcpyDeviceToHost, stream.ptr)
                pos += n
            ev[5].record(stream)
            stream.synchronize()
            t_done = time.time_ns()
            elapsed = [cp.cuda.get_elapsed_time(ev[0], e) for e in ev[1:]]  # ms, all complete
            del dev_buf, host  # the pinned input buffer outlives the copy that read it
        flat = np.frombuffer(out_host, np.uint8, sum(sizes))
        if k is None:
            result = (None, None, flat.view(np.float32).reshape(vectors.shape).copy())
        else:
            n_scores = scores.nbytes
            result = (flat[:n_scores].view(np.float32).reshape(scores.shape).copy(),
                      flat[n_scores:].view(np.int64).reshape(rows.shape).copy(), None)
        if stages is not None:
            stages.append(("tokens", t_tokens, t_enqueue))
            bounds = [t_enqueue] + [t_enqueue + int(ms * 1e6) for ms in elapsed]
            for name, start, end in zip(DEVICE_STAGES, bounds, bounds[1:]):
                if name == "topk" and k is None:
                    continue
                stages.append((name, start, min(end, t_done)))
        return result


def to_device(model: RetrievalModel, config, log=None) -> GpuRetrievalModel:
    """The registry's hook (server/models.py): ``model`` made resident on ``config.cuda_device``
    with ``config.gpu_engine``, and its golden requests checked through the device path
    (RepositoryError on a mismatch) before the version may become READY."""
    gpu_model = GpuRetrievalModel.build(model, device=config.cuda_device, engine=config.gpu_engine,
                                        max_batch_size=config.batching.max_batch_size)
    gpu_model.check_golden()
    if log is not None:
        log(gpu_model.describe)
    return gpu_model
