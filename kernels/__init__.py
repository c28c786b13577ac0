"""recserve.kernels: the kernel API shared by the server and the trainer.

Usage::

    import numpy as np
    from recserve import kernels

    ids = kernels.hash_features(["user_id=42", "country=NL"], seed=0, num_buckets=1 << 20)
    pooled = kernels.embedding_bag(table, ids, np.array([0, 2]), mode="sum")   # float32[1, d]
    scores, item_ids = kernels.topk_inner_product(pooled, items, k=100)
    served = kernels.prepare_items(items)          # once, for a matrix searched many times
    scores, item_ids = kernels.topk_inner_product(pooled, served, k=100)   # same result

Every op takes NumPy arrays (computed by recserve._C on all cores, GIL released) or,
when recserve was built with CUDA, CuPy arrays / torch CUDA tensors (computed on
their device, on the library's current stream) and returns arrays of the same kind.
Bad input raises ValueError naming the argument. ``reference.py`` is the
specification each op is tested against.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from recserve import _C

__all__ = [
    "murmur3_32",
    "hash_features",
    "embedding_bag",
    "topk_inner_product",
    "prepare_items",
    "build_info",
]


def _is_cuda_array(x: Any) -> bool:
    if x is None:
        return False
    # torch raises (not AttributeError) on __cuda_array_interface__ for tensors
    # that require grad, so ask torch tensors directly.
    is_cuda = getattr(x, "is_cuda", None)
    if isinstance(is_cuda, bool) and type(x).__module__.startswith("torch"):
        return is_cuda
    return hasattr(x, "__cuda_array_interface__")


def _on_cuda(op: str, **arrays: Any) -> bool:
    """True if the arrays are CUDA arrays, False if host arrays; ValueError if mixed."""
    if all(a is None or isinstance(a, np.ndarray) for a in arrays.values()):
        return False  # the common case, decided without probing attributes
    where = {name: _is_cuda_array(a) for name, a in arrays.items() if a is not None}
    if not any(where.values()):
        return False
    if all(where.values()):
        return True
    host = next(n for n, c in where.items() if not c)
    dev = next(n for n, c in where.items() if c)
    raise ValueError(f"{op}: {dev} is a CUDA array but {host} is on the host; "
                     "pass all arrays on the same device")


def murmur3_32(data: bytes | str, seed: int = 0) -> int:
    """MurmurHash3_x86_32 of ``data`` (str is hashed as UTF-8), unsigned."""
    return _C.murmur3_32(data, seed)


def _check_validate(op: str, validate) -> None:
    if not isinstance(validate, (bool, np.bool_)):
        raise ValueError(f"{op}: validate must be True or False, got {validate!r}")


def hash_features(tokens, *, seed: int, num_buckets: int, validate: bool = True):
    """Bucket ids ``murmur3_32(utf8(token), seed) % num_buckets`` as int64[n].

    ``tokens``: a list/tuple of str or bytes, a 1-D NumPy array of dtype ``U``, ``S``
    or object, or the flat form ``(data uint8[M], offsets int64[n + 1])``; the flat
    form may hold CUDA arrays, which hashes on the GPU (one thread per token).
    ``validate=False``: the caller guarantees valid offsets; see ``embedding_bag``.
    """
    _check_validate("hash_features", validate)
    if isinstance(tokens, tuple) and len(tokens) == 2 and _on_cuda(
        "hash_features", **{"tokens data": tokens[0], "tokens offsets": tokens[1]}
    ):
        from recserve.kernels import _cuda

        return _cuda.hash_flat(tokens[0], tokens[1], seed=seed, num_buckets=num_buckets,
                               validate=bool(validate))
    return _C.hash_features(tokens, seed=seed, num_buckets=num_buckets)


def embedding_bag(table, indices, offsets, *, mode: str = "sum", weights=None, validate: bool = True):
    """Pooled embedding rows per bag, float32[B, d].

    ``table`` [N, d] float32/float16 (may be a read-only ``np.memmap``), ``indices``
    int64[M], ``offsets`` int64[B + 1] with offsets[0] = 0, non-decreasing and
    offsets[B] = M. ``mode`` is "sum" or "mean"; ``weights`` float32[M] scale each
    row (sum only). Empty bags give zeros; accumulation is float32.

    ``validate=False`` (every op has it): the caller guarantees the data-dependent
    conditions (offsets, index ranges, exclusion ids). Shapes, dtypes and devices are
    still checked. On CUDA arrays the op then never synchronises the stream (the
    device-side value checks are not read back); a broken guarantee never reads or
    writes out of bounds, but its result is unspecified. On NumPy arrays the values are
    checked anyway (the checks are part of the compute), so nothing changes there.
    """
    _check_validate("embedding_bag", validate)
    if _on_cuda("embedding_bag", table=table, indices=indices, offsets=offsets, weights=weights):
        from recserve.kernels import _cuda

        return _cuda.embedding_bag(table, indices, offsets, mode=mode, weights=weights,
                                   validate=bool(validate))
    return _C.embedding_bag(table, indices, offsets, mode=mode, weights=weights)


def topk_inner_product(queries, items, k: int, *, exclude_indptr=None, exclude_ids=None,
                       validate: bool = True):
    """The k items with the largest inner product per query, fused (no [B, N] matrix).

    ``queries`` float32[B, d], ``items`` float32/float16[N, d]. Returns
    ``(scores float32[B, k], ids int64[B, k])`` sorted by score descending, ties to
    the smaller id. ``exclude_indptr`` int64[B + 1] / ``exclude_ids`` int64 (CSR)
    list item ids never to return per query. Slots beyond the eligible items hold
    id -1 and score -inf. ``validate=False``: the caller guarantees valid exclusions
    (see ``embedding_bag``); on CUDA arrays the op then never synchronises.
    """
    _check_validate("topk_inner_product", validate)
    if isinstance(items, _C.PreparedItems):
        if _on_cuda("topk_inner_product", queries=queries, exclude_indptr=exclude_indptr, exclude_ids=exclude_ids):
            raise ValueError("topk_inner_product: the prepared items are on the host but queries are CUDA "
                             "arrays; pass all arrays on the same device")
    elif _on_cuda("topk_inner_product", queries=queries, items=items,
                exclude_indptr=exclude_indptr, exclude_ids=exclude_ids):
        from recserve.kernels import _cuda

        return _cuda.topk_inner_product(queries, items, k, exclude_indptr=exclude_indptr,
                                        exclude_ids=exclude_ids, validate=bool(validate))
    return _C.topk_inner_product(queries, items, k, exclude_indptr=exclude_indptr,
                                 exclude_ids=exclude_ids)


def prepare_items(items):
    """``items`` made ready for many ``topk_inner_product`` calls (a served model's item
    matrix): pass the result as their ``items``; results are the same bits.

    On a CPU whose top-k uses the bfloat16 pre-filter (AVX512_BF16) this makes the
    filter's bfloat16 rows once (half the float32 matrix's bytes, ``.nbytes``) instead of
    converting every tile in every call (about a fifth of a large batch's time), and lets
    one to three queries be filtered too, reading half the bytes (B = 1 over 1M items:
    2.3-2.7x faster). On AVX2 without bfloat16 it makes an int8 form instead (a quarter
    of the bytes), which both filters read (1M items: B = 64 1.45x, B = 1 3x faster).
    Elsewhere it holds the items as they are (``.bfloat16`` / ``.int8`` say which).
    The items must not change afterwards. CUDA arrays are returned unchanged.
    """
    if _on_cuda("prepare_items", items=items):
        return items
    return _C.prepare_items(items)


def build_info() -> dict:
    """How this build was made and what it can use.

    ``{"cuda": bool, "cuda_archs": [...], "version": str, ...}``: ``cuda`` says the
    CUDA kernels were built; ``cuda_devices`` how many GPUs they can see now;
    ``cpu_isa`` the SIMD path the CPU kernels use.
    """
    from recserve.kernels import _cuda

    info = dict(_C.build_info())
    info.update(_cuda.build_info())
    return info
