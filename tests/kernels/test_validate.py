"""The ``validate`` keyword of every op: the caller's guarantee that data-dependent values are
valid, which lets the CUDA ops skip their one stream synchronisation.

On NumPy arrays (and in reference.py) it changes nothing: the same results, and bad values
still raise. On CUDA arrays the results on valid data are the same, the op can be captured
into a CUDA graph (a synchronisation during capture is an error), and bad values neither
crash nor poison later calls.
"""

from __future__ import annotations

import numpy as np
import pytest

from recserve import kernels
from recserve.kernels import reference as ref


def _flat(tokens: list[str]):
    data = "".join(tokens).encode()
    offsets = np.zeros(len(tokens) + 1, np.int64)
    np.cumsum([len(t.encode()) for t in tokens], out=offsets[1:])
    return np.frombuffer(data, np.uint8).copy(), offsets


def _problem(rng):
    """Small-integer data (exact float32 sums, so results compare exactly) with ragged bags."""
    table = rng.integers(-8, 9, size=(300, 24)).astype(np.float32)
    sizes = rng.integers(0, 6, size=17)
    offsets = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    indices = rng.integers(0, len(table), size=int(offsets[-1]), dtype=np.int64)
    queries = rng.integers(-4, 5, size=(5, 24)).astype(np.float32)
    excl_sizes = rng.integers(0, 8, size=len(queries))
    indptr = np.zeros(len(queries) + 1, np.int64)
    np.cumsum(excl_sizes, out=indptr[1:])
    excl = rng.integers(0, len(table), size=int(indptr[-1]), dtype=np.int64)
    return table, indices, offsets, queries, indptr, excl


@pytest.mark.parametrize("validate", [True, False])
def test_same_results_as_reference(device, validate):
    rng = np.random.default_rng(7)
    tokens = [f"t={rng.integers(0, 10**6)}" for _ in range(200)] + ["", "é=ü"]
    data, toff = _flat(tokens)
    got = kernels.hash_features((device.put(data), device.put(toff)), seed=11, num_buckets=1000, validate=validate)
    np.testing.assert_array_equal(device.get(got), ref.hash_features(tokens, seed=11, num_buckets=1000,
                                                                     validate=validate))

    table, indices, offsets, queries, indptr, excl = _problem(rng)
    for mode in ("sum", "mean"):
        got = kernels.embedding_bag(device.put(table), device.put(indices), device.put(offsets), mode=mode,
                                    validate=validate)
        np.testing.assert_array_equal(device.get(got), ref.embedding_bag(table, indices, offsets, mode=mode,
                                                                         validate=validate))
    scores, ids = kernels.topk_inner_product(device.put(queries), device.put(table), 10,
                                             exclude_indptr=device.put(indptr), exclude_ids=device.put(excl),
                                             validate=validate)
    want_scores, want_ids = ref.topk_inner_product(queries, table, 10, exclude_indptr=indptr, exclude_ids=excl,
                                                   validate=validate)
    np.testing.assert_array_equal(device.get(ids), want_ids)
    np.testing.assert_array_equal(device.get(scores), want_scores)


def test_host_ops_check_values_anyway():
    """validate=False is a promise to the CUDA ops; on NumPy arrays the values are still checked."""
    table = np.ones((10, 4), np.float32)
    with pytest.raises(ValueError, match=r"indices\[1\] = 10 is out of range"):
        kernels.embedding_bag(table, np.array([0, 10]), np.array([0, 2]), validate=False)
    with pytest.raises(ValueError, match="offsets"):
        kernels.embedding_bag(table, np.array([0, 1]), np.array([0, 3]), validate=False)
    with pytest.raises(ValueError, match="tokens offsets"):
        kernels.hash_features((np.zeros(3, np.uint8), np.array([0, 5])), seed=0, num_buckets=7, validate=False)
    with pytest.raises(ValueError, match="exclude_ids"):
        kernels.topk_inner_product(np.ones((1, 4), np.float32), table, 3, exclude_indptr=np.array([0, 1]),
                                   exclude_ids=np.array([10]), validate=False)


def test_validate_must_be_a_bool():
    table = np.ones((10, 4), np.float32)
    with pytest.raises(ValueError, match="embedding_bag: validate must be True or False"):
        kernels.embedding_bag(table, np.array([0]), np.array([0, 1]), validate="no")
    with pytest.raises(ValueError, match="hash_features: validate must be True or False"):
        kernels.hash_features(["a"], seed=0, num_buckets=3, validate=None)
    with pytest.raises(ValueError, match="topk_inner_product: validate must be True or False"):
        kernels.topk_inner_product(np.ones((1, 4), np.float32), table, 3, validate=1)


# ---- CUDA only ---------------------------------------------------------------------------

def test_unvalidated_ops_never_synchronise(cuda_device):
    """Captured into a CUDA graph: any stream synchronisation inside the ops would make the
    capture fail. The replayed graph computes what the validated ops compute."""
    if cuda_device.name != "cupy":
        pytest.skip("the capture check is written with CuPy streams")
    import cupy as cp

    rng = np.random.default_rng(3)
    table, indices, offsets, queries, indptr, excl = _problem(rng)
    data, toff = _flat([f"f={i}" for i in range(50)])
    args = [cp.asarray(a) for a in (table, indices, offsets, queries, indptr, excl, data, toff)]
    t, i, o, q, ip, ex, d, to = args

    def ops(validate):
        h = kernels.hash_features((d, to), seed=3, num_buckets=300, validate=validate)
        pooled = kernels.embedding_bag(t, h, cp.arange(51, dtype=cp.int64), mode="sum", validate=validate)
        bag = kernels.embedding_bag(t, i, o, mode="mean", validate=validate)
        s, r = kernels.topk_inner_product(q, t, 10, exclude_indptr=ip, exclude_ids=ex, validate=validate)
        return [pooled, bag, s, r]

    want = [cp.asnumpy(x) for x in ops(True)]
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        ops(False)  # warm: pools and kernel attributes set up outside the capture
        stream.synchronize()
        stream.begin_capture()
        outs = ops(False)
        graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()
    for w, g in zip(want, outs):
        np.testing.assert_array_equal(cp.asnumpy(g), w)


def test_unvalidated_bad_values_stay_in_bounds(cuda_device):
    """A broken guarantee gives an unspecified result, never a fault: later calls still work."""
    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    bad_idx = cuda_device.put(np.array([0, 10**9, -5], np.int64))
    kernels.embedding_bag(cuda_device.put(table), bad_idx, cuda_device.put(np.array([0, 7, 3, 99])),
                          validate=False)
    kernels.hash_features((cuda_device.put(np.zeros(3, np.uint8)), cuda_device.put(np.array([0, 50, -4]))),
                          seed=0, num_buckets=5, validate=False)
    kernels.topk_inner_product(cuda_device.put(table[:2]), cuda_device.put(table), 3,
                               exclude_indptr=cuda_device.put(np.array([0, 9, 1])),
                               exclude_ids=cuda_device.put(np.array([-1, 10**6, 3])), validate=False)
    got = kernels.embedding_bag(cuda_device.put(table), cuda_device.put(np.array([1, 2], np.int64)),
                                cuda_device.put(np.array([0, 2])), validate=True)
    np.testing.assert_array_equal(cuda_device.get(got), table[1:3].sum(0, keepdims=True))
