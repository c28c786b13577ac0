"""topk_inner_product against reference.py: ties, tails, exclusions, dtypes, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from recserve import kernels
from recserve.kernels import reference as ref

small_ints = st.integers(-3, 3).map(float)


@st.composite
def topk_problems(draw):
    """Small-integer data: scores are exact in any summation order and full of ties."""
    d = draw(st.integers(1, 24))
    num_items = draw(st.integers(1, 300))
    num_queries = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from([np.float32, np.float16]))
    items = draw(hnp.arrays(dtype, (num_items, d), elements=small_ints))
    queries = draw(hnp.arrays(np.float32, (num_queries, d), elements=small_ints))
    k = draw(st.integers(1, num_items + 5))  # k > N exercises the -1 / -inf tail
    indptr = ids = None
    if draw(st.booleans()):
        counts = draw(st.lists(st.integers(0, 6), min_size=num_queries, max_size=num_queries))
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        ids = np.array(draw(st.lists(st.integers(0, num_items - 1), min_size=int(indptr[-1]),
                                     max_size=int(indptr[-1]))), dtype=np.int64)
    return queries, items, k, indptr, ids


def _check_exact(got, expected):
    (gs, gi), (es, ei) = got, expected
    assert gs.dtype == np.float32 and gi.dtype == np.int64 and gs.shape == es.shape == gi.shape
    np.testing.assert_array_equal(gi, ei)
    np.testing.assert_array_equal(gs, es)


@given(problem=topk_problems())
def test_topk_matches_reference_exactly(problem, cpu_isa):
    queries, items, k, indptr, ids = problem
    got = kernels.topk_inner_product(queries, items, k, exclude_indptr=indptr, exclude_ids=ids)
    _check_exact(got, ref.topk_inner_product(queries, items, k, exclude_indptr=indptr, exclude_ids=ids))


@given(problem=topk_problems())
def test_topk_matches_reference_exactly_on_device(problem, device):
    queries, items, k, indptr, ids = problem
    if device.is_cuda and k > 1024:
        k = 1024
    got = kernels.topk_inner_product(device.put(queries), device.put(items), k,
                                     exclude_indptr=device.put(indptr), exclude_ids=device.put(ids))
    expected = ref.topk_inner_product(queries, items, k, exclude_indptr=indptr, exclude_ids=ids)
    _check_exact(tuple(device.get(a) for a in got), expected)


def _check_close(got, queries, items, k, indptr=None, ids=None):
    """Float data: the returned ids must be a valid top-k (scores within rounding)."""
    gs, gi = got
    es, _ = ref.topk_inner_product(queries, items, k, exclude_indptr=indptr, exclude_ids=ids)
    np.testing.assert_allclose(gs, es, rtol=1e-5, atol=1e-5)
    exact = queries.astype(np.float64) @ items.astype(np.float64).T
    for b in range(len(queries)):
        valid = gi[b] >= 0
        assert len(set(gi[b][valid])) == valid.sum(), "duplicate ids"
        np.testing.assert_allclose(gs[b][valid], exact[b, gi[b][valid]], rtol=1e-5, atol=1e-5)
        assert np.all(np.diff(gs[b][valid]) <= 0), "scores not sorted"
        if indptr is not None:
            assert not set(gi[b][valid]) & set(ids[indptr[b]:indptr[b + 1]]), "excluded id returned"


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("num_queries", [1, 3, 16, 37])
def test_topk_random_floats_multithreaded(device, cpu_isa_best, dtype, num_queries):
    rng = np.random.default_rng(num_queries)
    items = rng.standard_normal((60_000, 64)).astype(dtype)
    queries = rng.standard_normal((num_queries, 64)).astype(np.float32)
    got = kernels.topk_inner_product(device.put(queries), device.put(items), 100)
    _check_close(tuple(device.get(a) for a in got), queries, items, 100)


def test_exclusions_remove_the_top_items(device):
    rng = np.random.default_rng(5)
    items = rng.standard_normal((5000, 32)).astype(np.float32)
    queries = rng.standard_normal((4, 32)).astype(np.float32)
    _, top = ref.topk_inner_product(queries, items, 50)
    # Exclude each query's 30 best items (shuffled, with a duplicate).
    excluded = [np.concatenate([rng.permutation(top[b, :30]), top[b, :1]]) for b in range(4)]
    indptr = np.concatenate([[0], np.cumsum([len(e) for e in excluded])]).astype(np.int64)
    ids = np.concatenate(excluded).astype(np.int64)
    gs, gi = (device.get(a) for a in kernels.topk_inner_product(
        device.put(queries), device.put(items), 20, exclude_indptr=device.put(indptr), exclude_ids=device.put(ids)))
    np.testing.assert_array_equal(gi, top[:, 30:50])
    _check_close((gs, gi), queries, items, 20, indptr, ids)


def test_tail_when_fewer_items_than_k(device):
    items = np.eye(3, dtype=np.float32)
    queries = np.array([[1, 2, 3]], dtype=np.float32)
    indptr, ids = np.array([0, 1], np.int64), np.array([2], np.int64)
    gs, gi = (device.get(a) for a in kernels.topk_inner_product(
        device.put(queries), device.put(items), 5, exclude_indptr=device.put(indptr), exclude_ids=device.put(ids)))
    np.testing.assert_array_equal(gi, [[1, 0, -1, -1, -1]])
    np.testing.assert_array_equal(gs, [[2, 1, -np.inf, -np.inf, -np.inf]])


def test_ties_go_to_the_smaller_id(device, cpu_isa_best):
    items = np.ones((50_000, 8), dtype=np.float32)  # every score equal, across threads
    gs, gi = (device.get(a) for a in kernels.topk_inner_product(device.put(np.ones((2, 8), np.float32)), device.put(items), 10))
    np.testing.assert_array_equal(gi, np.tile(np.arange(10), (2, 1)))
    np.testing.assert_array_equal(gs, 8)


def test_nan_and_minus_inf_scores_are_never_returned(device):
    items = np.array([[1.0], [np.nan], [-np.inf], [2.0], [np.inf]], dtype=np.float32)
    gs, gi = (device.get(a) for a in kernels.topk_inner_product(device.put(np.ones((1, 1), np.float32)), device.put(items), 5))
    np.testing.assert_array_equal(gi, [[4, 3, 0, -1, -1]])
    np.testing.assert_array_equal(gs, [[np.inf, 2, 1, -np.inf, -np.inf]])


def test_k_equals_num_items_returns_a_full_ranking():
    rng = np.random.default_rng(6)
    items = rng.integers(-5, 5, size=(777, 12)).astype(np.float32)
    queries = rng.integers(-5, 5, size=(5, 12)).astype(np.float32)
    _check_exact(kernels.topk_inner_product(queries, items, 777), ref.topk_inner_product(queries, items, 777))


def test_memmap_fp16_items_and_non_contiguous_queries(tmp_path):
    rng = np.random.default_rng(8)
    items = rng.integers(-4, 4, size=(3000, 20)).astype(np.float16)
    np.save(tmp_path / "items.npy", items)
    mm = np.load(tmp_path / "items.npy", mmap_mode="r")
    queries = np.asfortranarray(rng.integers(-4, 4, size=(9, 20)).astype(np.float32))
    _check_exact(kernels.topk_inner_product(queries, mm, 25), ref.topk_inner_product(queries, items, 25))
    wide = np.zeros((3000, 32), np.float16)
    wide[:, 4:24] = items
    _check_exact(kernels.topk_inner_product(queries, wide[:, 4:24], 25), ref.topk_inner_product(queries, items, 25))


def test_empty_inputs():
    s, i = kernels.topk_inner_product(np.zeros((0, 4), np.float32), np.ones((10, 4), np.float32), 3)
    assert s.shape == i.shape == (0, 3)
    s, i = kernels.topk_inner_product(np.ones((2, 4), np.float32), np.zeros((0, 4), np.float32), 3)
    np.testing.assert_array_equal(i, -1)
    np.testing.assert_array_equal(s, -np.inf)


def _topk_args(**override):
    args = {"queries": np.zeros((2, 4), np.float32), "items": np.zeros((10, 4), np.float32), "k": 3}
    args.update(override)
    return args


@pytest.mark.parametrize(
    "override, message",
    [
        ({"queries": np.zeros((2, 4), np.float64)}, "queries must be float32, got float64"),
        ({"queries": np.zeros(4, np.float32)}, "queries must be 2-D, got 1-D"),
        ({"items": np.zeros((10, 4), np.int64)}, "items must be float32 or float16, got int64"),
        ({"items": np.zeros((10, 5), np.float32)}, "queries has d=4 but items has d=5"),
        ({"k": 0}, "k must be >= 1, got 0"),
        ({"k": -3}, "k must be >= 1, got -3"),
        ({"exclude_indptr": np.array([0, 1, 1], np.int64)}, "must be given together"),
        ({"exclude_indptr": np.array([0, 1], np.int64), "exclude_ids": np.array([1], np.int64)},
         r"exclude_indptr must have B \+ 1 = 3 elements, got 2"),
        ({"exclude_indptr": np.array([0, 2, 1], np.int64), "exclude_ids": np.array([1], np.int64)},
         "exclude_indptr must be non-decreasing"),
        ({"exclude_indptr": np.array([0, 1, 2], np.int64), "exclude_ids": np.array([1], np.int64)},
         r"exclude_indptr\[-1\] must equal len\(exclude_ids\) = 1, got 2"),
        ({"exclude_indptr": np.array([0, 1, 2], np.int64), "exclude_ids": np.array([1, 10], np.int64)},
         r"exclude_ids\[1\] = 10 is not an item id in \[0, 10\)"),
        ({"exclude_indptr": np.array([0, 1, 1], np.int64), "exclude_ids": np.array([1], np.int32)},
         "exclude_ids must be int64, got int32"),
    ],
)
def test_topk_bad_input_raises_value_error(override, message):
    with pytest.raises(ValueError, match=message):
        kernels.topk_inner_product(**_topk_args(**override))


def test_mixed_host_and_device_arrays_raise(cuda_device):
    device = cuda_device
    with pytest.raises(ValueError, match="items is a CUDA array but queries is on the host"):
        kernels.topk_inner_product(np.zeros((1, 4), np.float32), device.put(np.zeros((3, 4), np.float32)), 1)


def test_cuda_k_limit(cuda_device):
    device = cuda_device
    with pytest.raises(ValueError, match="k must be <= 1024 on CUDA"):
        kernels.topk_inner_product(device.put(np.zeros((1, 4), np.float32)), device.put(np.zeros((3, 4), np.float32)), 1025)


def test_concurrent_calls_from_python_threads_agree():
    """The server calls kernels from executor threads at once (GIL released)."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(11)
    items = rng.integers(-3, 3, size=(40_000, 16)).astype(np.float32)
    queries = rng.integers(-3, 3, size=(5, 16)).astype(np.float32)
    expected = ref.topk_inner_product(queries, items, 50)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: kernels.topk_inner_product(queries, items, 50), range(24)))
    for got in results:
        _check_exact(got, expected)
