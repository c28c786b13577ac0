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


# -- the pre-filters: bfloat16 (AVX512_BF16 CPUs), int8 (AVX2) ------------------------

def _filter_problems():
    """Data that stresses the filters' error bounds: unit vectors (scores packed near the
    threshold), heavy-tailed norms, tiny magnitudes (bfloat16 subnormals flush to zero),
    near-duplicate rows (ties within the bound), odd and narrow widths, and outliers
    that make a tile's (or a query's) int8 scale coarse for everything else in it."""
    rng = np.random.default_rng(21)
    unit = rng.standard_normal((40_000, 64)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    yield "unit", unit, rng.standard_normal((37, 64)).astype(np.float32)
    heavy = (rng.standard_normal((30_000, 33)) * np.exp(rng.standard_normal((30_000, 1)) * 2)).astype(np.float32)
    yield "heavy-tailed, d=33", heavy, rng.standard_normal((16, 33)).astype(np.float32)
    yield "tiny", (unit[:20_000] * 1e-36).astype(np.float32), rng.standard_normal((20, 64)).astype(np.float32)
    base = rng.standard_normal((1, 48)).astype(np.float32)
    near = (base + rng.standard_normal((25_000, 48)).astype(np.float32) * 1e-3).astype(np.float32)
    yield "near-duplicates", near, (base + rng.standard_normal((64, 48)) * 0.1).astype(np.float32)
    yield "d=7", rng.standard_normal((30_000, 7)).astype(np.float32), rng.standard_normal((24, 7)).astype(np.float32)
    # 16 bfloat16 pairs per row, the last one half padding (odd d), and a ragged last block
    # of rows
    yield "d=31", rng.standard_normal((10_007, 31)).astype(np.float32), rng.standard_normal((20, 31)).astype(np.float32)
    # AMX tiles: 32 dimensions per step, a row count off the 32-row blocks, three lane groups
    wide = (rng.standard_normal((20_003, 128)) * np.exp(rng.standard_normal((20_003, 1)))).astype(np.float32)
    yield "heavy-tailed, d=128", wide, rng.standard_normal((45, 128)).astype(np.float32)
    outliers = rng.standard_normal((30_000, 40)).astype(np.float32)
    outliers[::97, 3] *= 300  # most tiles hold a row whose coordinate sets the tile's scale
    spiky = rng.standard_normal((12, 40)).astype(np.float32)
    spiky[:, 5] *= 50
    yield "outliers", outliers, spiky


class Prefilter:
    """A pre-filter kernel and the ISA it runs on: ``one_query`` (one to three queries,
    over prepared rows) or the lanes kernel (four or more); the int8 filter reads
    prepared rows only. ``plain_isa``: the same float32 kernels without any filter."""

    def __init__(self, isa: str, kernel: str):
        self.isa, self.kernel = isa, kernel
        self.one_query = kernel.endswith("row")
        self.int8 = kernel.startswith("int8")
        self.needs_prepared = self.one_query or self.int8
        self.plain_isa = "avx2" if isa == "avx2" else "avx512"

    def source(self, items):
        return kernels.prepare_items(items) if self.needs_prepared else items

    def __repr__(self):
        return f"{self.kernel} on {self.isa}"


@pytest.fixture(params=[("avx2", "int8 lanes"), ("avx2", "int8 row"), ("avx512bf16", "bf16 lanes"),
                        ("avx512bf16", "bf16 row"), ("amx", "bf16 lanes")], ids=lambda p: f"{p[1]}-{p[0]}")
def prefilter(request):
    """Each pre-filter kernel on each ISA that has it: int8 on AVX2 (lanes and one-query),
    bfloat16 on AVX512_BF16 (both) and the AMX tile unit's form of the lanes kernel."""
    from recserve import _C

    isa, kernel = request.param
    supported = _C.build_info()["cpu_isas_supported"]
    if isa not in supported:
        pytest.skip(f"this CPU (or kernel) has no {isa}, so its {kernel} filter never runs here "
                    f"(supports {supported})")
    return Prefilter(isa, kernel)


@pytest.fixture(params=["avx512bf16", "amx"])
def bf16_isa(request):
    """Each ISA whose bfloat16 lanes filter can convert rows per call (no prepared items)."""
    from recserve import _C

    supported = _C.build_info()["cpu_isas_supported"]
    if request.param not in supported:
        pytest.skip(f"this CPU (or kernel) has no {request.param}, so that pre-filter never runs here "
                    f"(supports {supported})")
    return request.param


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_prefilter_never_drops_a_row_that_beats_the_threshold(dtype, prefilter):
    """Soundness of the error bound, tested on the filter itself: thresholds sit at each
    query's 99.5th percentile score, so thousands of rows lie within the filter's error
    of them; every row scoring above (by more than float32 rounding) must pass. The
    one-query kernels (one to three queries) sum in another order than the lanes ones."""
    from recserve import _C

    for name, items, queries in _filter_problems():
        items = items.astype(dtype)
        if prefilter.one_query:
            queries = queries[:3]
        x = items.astype(np.float64)
        exact = queries.astype(np.float64) @ x.T
        thr = np.percentile(exact, 99.5, axis=1).astype(np.float32)
        # float32 rounding of the kernel's own scores: below d * 2^-23 * |q| |x|
        rounding = queries.shape[1] * 2.0**-23 * np.outer(np.linalg.norm(queries, axis=1), np.linalg.norm(x, axis=1))
        must_pass = np.flatnonzero(np.any(exact > thr[:, None] + rounding, axis=0))
        try:
            _C._set_isa(prefilter.isa)
            passed = _C._topk_filter(queries, prefilter.source(items), thr, one_query=prefilter.one_query)
        finally:
            _C._set_isa("best")
        missed = np.setdiff1d(must_pass, passed)
        assert len(missed) == 0, f"{name}: {len(missed)} rows above the threshold were filtered out"
        if name == "unit":  # and it is a filter: few rows pass that need not
            limit = 3 if prefilter.int8 else 2  # int8's bound is wider than bfloat16's
            assert len(passed) < limit * len(must_pass), f"{name}: {len(passed)} rows passed, {len(must_pass)} needed to"


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("k", [1, 20, 300])
def test_prefilter_gives_the_float32_results_bit_for_bit(dtype, k, prefilter):
    """The filter only decides which rows the float32 kernel scores: ids and scores must
    be the same bits as with the plain kernels, and the filter must actually have run.
    The bfloat16 lanes filter converts rows per call or reads prepared ones; the others
    read prepared rows (kernels.prepare_items), the one-query kernels with 1 or 3 queries."""
    from recserve import _C

    cases = ([(1, True), (3, True)] if prefilter.one_query else [(None, True)] if prefilter.int8
             else [(None, False), (None, True)])
    for num_queries, prepared in cases:
        for name, items, queries in _filter_problems():
            items, queries = items.astype(dtype), queries[:num_queries]
            rng = np.random.default_rng(len(queries))
            counts = rng.integers(0, 5, len(queries))
            indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            ids = rng.integers(0, len(items), int(indptr[-1])).astype(np.int64)
            try:
                _C._set_isa(prefilter.plain_isa)
                expected = kernels.topk_inner_product(queries, items, k, exclude_indptr=indptr, exclude_ids=ids)
                _C._set_isa(prefilter.isa)
                searched = kernels.prepare_items(items) if prepared else items
                before = _C._topk_filtered_tiles()
                got = kernels.topk_inner_product(queries, searched, k, exclude_indptr=indptr, exclude_ids=ids)
                filtered = _C._topk_filtered_tiles() - before
            finally:
                _C._set_isa("best")
            if prepared:
                row_bytes = (items.shape[1] + 3) // 4 * 4 if prefilter.int8 else (items.shape[1] + 1) // 2 * 4
                assert (searched.int8 if prefilter.int8 else searched.bfloat16)
                assert searched.nbytes >= items.shape[0] * row_bytes
            np.testing.assert_array_equal(got[1], expected[1], err_msg=name)
            np.testing.assert_array_equal(got[0], expected[0], err_msg=name)
            # The int8 lanes filter runs only where the heaps warm early in each thread's share.
            warm = not prefilter.int8 or prefilter.one_query or (
                len(items) >= 16 * len(queries) * k * _C._calling_thread_limit())
            # (Not "outliers": a tile's bound grows with its largest row, so most of those pass.)
            if name in ("unit", "heavy-tailed, d=33", "d=7", "d=31", "heavy-tailed, d=128") and k <= 20 and warm:
                assert filtered > 0, f"{name}: the filter never decided a tile"


def test_prefilter_falls_back_on_non_finite_rows_and_queries(prefilter):
    from recserve import _C

    rng = np.random.default_rng(22)
    items = rng.standard_normal((20_000, 32)).astype(np.float32)
    items[[5, 7_000, 19_999]] = np.array([np.nan, np.inf, -np.inf], np.float32)[:, None]
    finite = rng.standard_normal((16, 32)).astype(np.float32)
    with_inf = finite.copy()
    with_inf[3, 4] = np.inf
    for queries in (finite, with_inf):  # bad rows alone; bad rows and a bad query
        if prefilter.one_query:
            queries = queries[2:5]
        try:
            _C._set_isa(prefilter.plain_isa)
            expected = kernels.topk_inner_product(queries, items, 10)
            _C._set_isa(prefilter.isa)
            got = kernels.topk_inner_product(queries, prefilter.source(items), 10)
        finally:
            _C._set_isa("best")
        np.testing.assert_array_equal(got[1], expected[1])
        np.testing.assert_array_equal(got[0], expected[0])


# -- prepared items (kernels.prepare_items) --------------------------------------------

@given(problem=topk_problems())
def test_prepared_items_match_reference_exactly(problem, cpu_isa):
    queries, items, k, indptr, ids = problem
    prepared = kernels.prepare_items(items)
    assert prepared.bfloat16 == (cpu_isa in ("avx512bf16", "amx"))
    assert prepared.int8 == (cpu_isa == "avx2")
    got = kernels.topk_inner_product(queries, prepared, k, exclude_indptr=indptr, exclude_ids=ids)
    _check_exact(got, ref.topk_inner_product(queries, items, k, exclude_indptr=indptr, exclude_ids=ids))


def test_prepared_filter_passes_the_same_rows_as_the_per_call_filter(bf16_isa):
    from recserve import _C

    for name, items, queries in _filter_problems():
        exact = queries.astype(np.float64) @ items.astype(np.float64).T
        thr = np.percentile(exact, 99.5, axis=1).astype(np.float32)
        try:
            _C._set_isa(bf16_isa)
            plain = _C._topk_filter(queries, items, thr)
            prepared = _C._topk_filter(queries, kernels.prepare_items(items), thr)
        finally:
            _C._set_isa("best")
        np.testing.assert_array_equal(prepared, plain, err_msg=name)


def test_prepared_items_serve_under_any_isa():
    """Made with a filter's form (bfloat16 or int8), used where the selected ISA has
    another filter or none (and the other way round): the form is then ignored (or the
    bfloat16 rows made per call), results unchanged."""
    from recserve import _C

    supported = _C.build_info()["cpu_isas_supported"]
    rng = np.random.default_rng(23)
    items = rng.integers(-3, 4, size=(5_000, 24)).astype(np.float32)
    queries = rng.integers(-3, 4, size=(20, 24)).astype(np.float32)
    expected = ref.topk_inner_product(queries, items, 15)
    try:
        for made_on in supported:
            _C._set_isa(made_on)
            prepared = kernels.prepare_items(items)
            for used_on in supported:
                _C._set_isa(used_on)
                _check_exact(kernels.topk_inner_product(queries, prepared, 15), expected)
                _check_exact(kernels.topk_inner_product(queries[:2], prepared, 15), tuple(a[:2] for a in expected))
    finally:
        _C._set_isa("best")


def test_prepared_items_with_non_finite_rows_and_strided_input():
    from recserve import _C

    rng = np.random.default_rng(24)
    items = rng.standard_normal((20_000, 32)).astype(np.float32)
    items[[5, 7_000, 19_999]] = np.array([np.nan, np.inf, -np.inf], np.float32)[:, None]
    queries = rng.standard_normal((16, 32)).astype(np.float32)
    expected = kernels.topk_inner_product(queries, items, 10)
    prepared = kernels.prepare_items(np.asfortranarray(items))  # copied once into contiguous rows
    assert prepared.items.flags.c_contiguous
    got = kernels.topk_inner_product(queries, prepared, 10)
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(got[0], expected[0])
    isa = _C.build_info()["cpu_isa"]
    assert prepared.bfloat16 == (isa in ("avx512bf16", "amx")) and prepared.int8 == (isa == "avx2")


@pytest.mark.parametrize("items, message", [
    (np.zeros((4, 3), np.int32), "items"),
    (np.zeros(4, np.float32), "items"),
])
def test_prepare_items_bad_input_raises_value_error(items, message):
    with pytest.raises(ValueError, match=f"prepare_items.*{message}"):
        kernels.prepare_items(items)


def test_prepared_items_with_mismatched_queries_raise():
    prepared = kernels.prepare_items(np.ones((10, 8), np.float32))
    with pytest.raises(ValueError, match="queries has d=4 but items has d=8"):
        kernels.topk_inner_product(np.ones((2, 4), np.float32), prepared, 3)


def test_prepare_items_leaves_cuda_arrays_as_they_are(cuda_device):
    items = cuda_device.put(np.ones((10, 8), np.float32))
    assert kernels.prepare_items(items) is items
    prepared = kernels.prepare_items(np.ones((10, 8), np.float32))
    with pytest.raises(ValueError, match="prepared items are on the host"):
        kernels.topk_inner_product(cuda_device.put(np.ones((2, 8), np.float32)), prepared, 3)
