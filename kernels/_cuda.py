"""CUDA dispatch for ``recserve.kernels``: CuPy arrays and torch CUDA tensors.

Usage (through the public API, which calls this module for CUDA arrays)::

    import torch
    from recserve import kernels

    items = torch.randn(1_000_000, 64, device="cuda")
    scores, ids = kernels.topk_inner_product(items[:4], items, k=100)   # torch, on cuda

Each op allocates its outputs with the inputs' array library on their device and
runs on that library's current stream (``torch.cuda.current_stream(device)`` /
``cupy.cuda.get_current_stream()``), so results are ordered like any other work
of the caller. Only ops that must validate data on the device (offsets, indices,
exclusions) synchronise that stream, once, to report a ValueError; with
``validate=False`` (the caller guarantees the values) no op synchronises.

Importing this module is cheap: the extension, torch and CuPy are imported on
first use.
"""

from __future__ import annotations

import contextlib
import importlib.util
import operator
from typing import Any

_NOT_BUILT = "recserve was built without CUDA kernels; rebuild with RECSERVE_CUDA=ON (see README)"

_ext: Any = None
_ext_error: str | None = None
_ext_tried = False


def _load() -> Any:
    """recserve._C_cuda, or None; the import is attempted once."""
    global _ext, _ext_error, _ext_tried
    if not _ext_tried:
        _ext_tried = True
        try:
            from recserve import _C_cuda

            _ext = _C_cuda
        except Exception as exc:  # noqa: BLE001 - reported through build_info()
            try:
                built = importlib.util.find_spec("recserve._C_cuda") is not None
            except (ImportError, ValueError):
                built = False
            if built:
                _ext_error = f"{type(exc).__name__}: {exc}"
    return _ext


def _require() -> Any:
    ext = _load()
    if ext is None:
        if _ext_error is not None:
            raise RuntimeError(f"recserve's CUDA kernels failed to import ({_ext_error})")
        raise RuntimeError(_NOT_BUILT)
    return ext


def build_info() -> dict:
    """``cuda`` (kernels importable), ``cuda_archs``, ``cuda_version``, ``cuda_devices``;
    ``cuda_error`` when the extension exists but does not import."""
    ext = _load()
    info: dict = {"cuda": ext is not None, "cuda_archs": [], "cuda_version": None, "cuda_devices": 0}
    if ext is not None:
        built = ext.build_info()
        info["cuda_archs"] = list(built["cuda_archs"])
        info["cuda_version"] = built["cuda_version"]
        info["cuda_devices"] = int(ext.device_count())
    elif _ext_error is not None:
        info["cuda_error"] = _ext_error
    return info


# ---- array libraries ------------------------------------------------------------

def _library_of(x: Any) -> str | None:
    module = type(x).__module__
    if module.startswith("torch"):
        return "torch"
    if module.startswith("cupy"):
        return "cupy"
    return None


class _Torch:
    name = "torch"

    def __init__(self, first: Any):
        import torch

        self.torch = torch
        self.device = first.device
        # dtypes torch can describe with __cuda_array_interface__ (others raise KeyError).
        names = ("float16", "bfloat16", "float32", "float64", "complex64", "complex128", "bool",
                 "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64")
        self.cai_dtypes = {getattr(torch, n) for n in names if hasattr(torch, n)}

    def check(self, op: str, name: str, x: Any, first_name: str) -> Any:
        if not x.is_cuda:
            raise ValueError(f"{op}: {name} is a CPU tensor; pass all arrays on the same CUDA device")
        if x.device != self.device:
            raise ValueError(f"{op}: {name} is on {x.device} but {first_name} is on {self.device}; "
                             "pass all arrays on the same device")
        if x.dtype not in self.cai_dtypes:
            raise ValueError(f"{op}: {name} has dtype {x.dtype}, which recserve's CUDA kernels "
                             "do not support")
        return x.detach()  # __cuda_array_interface__ refuses tensors that require grad

    def context(self):
        return contextlib.nullcontext()

    def contiguous(self, x: Any) -> Any:
        return x.contiguous()

    def rows_contiguous(self, x: Any) -> Any:
        # Matrices whose rows are contiguous keep their row stride (a slice of a
        # wider table is used in place); anything else is copied.
        if x.dim() == 2:
            rows, cols = x.shape
            if (cols > 1 and x.stride(1) != 1) or (rows > 1 and x.stride(0) < 1):
                return x.contiguous()
        return x

    def empty(self, shape: tuple, dtype: str) -> Any:
        return self.torch.empty(shape, dtype=getattr(self.torch, dtype), device=self.device)

    def stream(self) -> int:
        return self.torch.cuda.current_stream(self.device).cuda_stream


class _Cupy:
    name = "cupy"

    def __init__(self, first: Any):
        import cupy

        self.cupy = cupy
        self.device = first.device

    def check(self, op: str, name: str, x: Any, first_name: str) -> Any:
        if x.device.id != self.device.id:
            raise ValueError(f"{op}: {name} is on cuda:{x.device.id} but {first_name} is on "
                             f"cuda:{self.device.id}; pass all arrays on the same device")
        return x

    def context(self):
        return self.device  # cupy.cuda.Device is a context manager

    def contiguous(self, x: Any) -> Any:
        return self.cupy.ascontiguousarray(x)

    def rows_contiguous(self, x: Any) -> Any:
        if x.ndim == 2:
            rows, cols = x.shape
            item = x.itemsize
            if (cols > 1 and x.strides[1] != item) or (
                rows > 1 and (x.strides[0] < item or x.strides[0] % item != 0)
            ):
                return self.cupy.ascontiguousarray(x)
        return x

    def empty(self, shape: tuple, dtype: str) -> Any:
        return self.cupy.empty(shape, dtype=dtype)

    def stream(self) -> int:
        return self.cupy.cuda.get_current_stream().ptr


def _library(op: str, named: list[tuple[str, Any]]) -> tuple[Any, list[Any]]:
    """The array library of the (non-None) arguments, and the arguments ready for
    _C_cuda (on one device, torch tensors detached). ValueError naming the argument
    when they are not all CuPy arrays or all torch CUDA tensors on one device."""
    present = [(name, x) for name, x in named if x is not None]
    first_name, first = present[0]
    kind = _library_of(first)
    if kind is None:
        raise ValueError(f"{op}: {first_name} must be a CuPy array or a torch CUDA tensor, "
                         f"got {type(first).__module__}.{type(first).__name__}")
    lib = _Torch(first) if kind == "torch" else _Cupy(first)
    out = []
    for name, x in named:
        if x is None:
            out.append(None)
            continue
        if _library_of(x) != kind:
            raise ValueError(f"{op}: {name} is a {type(x).__module__}.{type(x).__name__} but "
                             f"{first_name} is a {kind} array; pass all arrays from one library")
        out.append(lib.check(op, name, x, first_name))
    return lib, out


def _rows(x: Any, ndim: int) -> int:
    """Leading extent when x has the expected rank (else 0: the native checks report it)."""
    shape = tuple(x.shape)
    return int(shape[0]) if len(shape) == ndim and len(shape) > 0 else 0


# ---- ops ---------------------------------------------------------------------------

def hash_flat(data, offsets, *, seed: int, num_buckets: int, validate: bool = True):
    """``murmur3_32(data[offsets[i]:offsets[i + 1]], seed) % num_buckets`` -> int64[n]."""
    ext = _require()
    op = "hash_features"
    lib, (data, offsets) = _library(op, [("tokens data", data), ("tokens offsets", offsets)])
    with lib.context():
        data, offsets = lib.contiguous(data), lib.contiguous(offsets)
        n = max(_rows(offsets, 1) - 1, 0)
        out = lib.empty((n,), "int64")
        ext.hash_flat(data, offsets, seed, num_buckets, out, lib.stream(), validate)
    return out


def embedding_bag(table, indices, offsets, *, mode: str = "sum", weights=None, validate: bool = True):
    """Pooled rows per bag -> float32[B, d] (see recserve.kernels.embedding_bag)."""
    ext = _require()
    op = "embedding_bag"
    lib, (table, indices, offsets, weights) = _library(
        op, [("table", table), ("indices", indices), ("offsets", offsets), ("weights", weights)]
    )
    with lib.context():
        table = lib.rows_contiguous(table)
        indices, offsets = lib.contiguous(indices), lib.contiguous(offsets)
        if weights is not None:
            weights = lib.contiguous(weights)
        num_bags = max(_rows(offsets, 1) - 1, 0)
        d = int(table.shape[1]) if len(tuple(table.shape)) == 2 else 0
        out = lib.empty((num_bags, d), "float32")
        ext.embedding_bag(table, indices, offsets, weights, mode, out, lib.stream(), validate)
    return out


def topk_inner_product(queries, items, k: int, *, exclude_indptr=None, exclude_ids=None,
                       validate: bool = True):
    """Top-k items by inner product -> (float32[B, k], int64[B, k])."""
    ext = _require()
    op = "topk_inner_product"
    lib, (queries, items, exclude_indptr, exclude_ids) = _library(
        op, [("queries", queries), ("items", items), ("exclude_indptr", exclude_indptr),
             ("exclude_ids", exclude_ids)]
    )
    with lib.context():
        queries = lib.contiguous(queries)
        items = lib.rows_contiguous(items)
        if exclude_indptr is not None:
            exclude_indptr = lib.contiguous(exclude_indptr)
        if exclude_ids is not None:
            exclude_ids = lib.contiguous(exclude_ids)
        num_queries = _rows(queries, 2)
        # An out-of-range k is reported by the native checks; don't allocate for it.
        try:
            width = operator.index(k)
        except TypeError:
            width = 0
        width = width if 1 <= width <= ext.MAX_TOPK else 0
        scores = lib.empty((num_queries, width), "float32")
        ids = lib.empty((num_queries, width), "int64")
        ext.topk_inner_product(queries, items, k, exclude_indptr, exclude_ids, scores, ids,
                               lib.stream(), validate)
    return scores, ids
