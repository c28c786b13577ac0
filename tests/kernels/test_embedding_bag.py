"""embedding_bag against reference.py: layouts, dtypes, memmaps, edge cases, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from recserve import kernels
from recserve.kernels import reference as ref


def _bags(rng, num_rows: int, num_bags: int, max_bag: int):
    sizes = rng.integers(0, max_bag + 1, size=num_bags)
    offsets = np.zeros(num_bags + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(sizes)
    indices = rng.integers(0, num_rows, size=int(offsets[-1]), dtype=np.int64)
    return indices, offsets


@st.composite
def bag_problems(draw):
    """Small-integer tables: every sum is exact in float32, so parity is exact."""
    num_rows = draw(st.integers(1, 50))
    d = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from([np.float32, np.float16]))
    table = draw(hnp.arrays(dtype, (num_rows, d), elements=st.integers(-8, 8).map(float)))
    seed = draw(st.integers(0, 2**32 - 1))
    num_bags = draw(st.integers(0, 12))
    indices, offsets = _bags(np.random.default_rng(seed), num_rows, num_bags, draw(st.integers(0, 6)))
    mode = draw(st.sampled_from(["sum", "mean"]))
    weights = None
    if mode == "sum" and draw(st.booleans()):
        weights = draw(hnp.arrays(np.float32, indices.shape, elements=st.integers(-3, 3).map(float)))
    return table, indices, offsets, mode, weights


@given(problem=bag_problems())
def test_embedding_bag_matches_reference_exactly(problem, cpu_isa):
    table, indices, offsets, mode, weights = problem
    got = kernels.embedding_bag(table, indices, offsets, mode=mode, weights=weights)
    assert got.dtype == np.float32 and got.shape == (len(offsets) - 1, table.shape[1])
    np.testing.assert_array_equal(got, ref.embedding_bag(table, indices, offsets, mode=mode, weights=weights))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_embedding_bag_random_floats_on_device(device, dtype, mode):
    rng = np.random.default_rng(1)
    table = rng.standard_normal((5000, 72)).astype(dtype)
    indices, offsets = _bags(rng, 5000, 3000, 25)  # large enough to run multi-threaded
    got = device.get(kernels.embedding_bag(device.put(table), device.put(indices), device.put(offsets), mode=mode))
    # Every backend sums each column in bag order with float32 roundings: exact.
    np.testing.assert_array_equal(got, ref.embedding_bag(table, indices, offsets, mode=mode))


def test_embedding_bag_weights_on_device(device):
    rng = np.random.default_rng(2)
    table = rng.standard_normal((300, 16)).astype(np.float32)
    indices, offsets = _bags(rng, 300, 50, 8)
    weights = rng.random(len(indices)).astype(np.float32)
    got = kernels.embedding_bag(device.put(table), device.put(indices), device.put(offsets), weights=device.put(weights))
    np.testing.assert_array_equal(device.get(got), ref.embedding_bag(table, indices, offsets, weights=weights))


def test_empty_bags_give_zeros_in_sum_and_mean(device):
    table = np.arange(12, dtype=np.float32).reshape(4, 3)
    offsets = np.array([0, 0, 2, 2], dtype=np.int64)
    indices = np.array([1, 3], dtype=np.int64)
    for mode in ("sum", "mean"):
        got = device.get(kernels.embedding_bag(device.put(table), device.put(indices), device.put(offsets), mode=mode))
        np.testing.assert_array_equal(got[0], 0)
        np.testing.assert_array_equal(got[2], 0)
        np.testing.assert_array_equal(got[1], (table[1] + table[3]) / (2 if mode == "mean" else 1))


def test_no_bags_and_no_indices():
    table = np.ones((3, 5), np.float32)
    out = kernels.embedding_bag(table, np.zeros(0, np.int64), np.zeros(1, np.int64))
    assert out.shape == (0, 5) and out.dtype == np.float32


def test_non_contiguous_inputs_and_row_strided_table():
    rng = np.random.default_rng(3)
    wide = rng.standard_normal((400, 64)).astype(np.float32)
    table = wide[:, 8:40]  # rows contiguous, row stride 64: used in place
    indices, offsets = _bags(rng, 400, 30, 5)
    strided_indices = np.repeat(indices, 2)[::2]
    col_strided = np.asfortranarray(table)  # columns contiguous: copied
    expected = ref.embedding_bag(table, indices, offsets)
    np.testing.assert_array_equal(kernels.embedding_bag(table, strided_indices, offsets), expected)
    np.testing.assert_array_equal(kernels.embedding_bag(col_strided, indices, offsets), expected)
    reversed_rows = table[::-1]  # negative row stride: copied, never read backwards
    np.testing.assert_array_equal(kernels.embedding_bag(reversed_rows, indices, offsets),
                                  ref.embedding_bag(reversed_rows, indices, offsets))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_read_only_memmap_table(tmp_path, dtype):
    rng = np.random.default_rng(4)
    table = rng.standard_normal((1000, 24)).astype(dtype)
    path = tmp_path / "table.npy"
    np.save(path, table)
    mm = np.load(path, mmap_mode="r")
    assert isinstance(mm, np.memmap) and not mm.flags.writeable
    indices, offsets = _bags(rng, 1000, 100, 10)
    np.testing.assert_array_equal(kernels.embedding_bag(mm, indices, offsets), ref.embedding_bag(table, indices, offsets))


def test_memmap_table_larger_than_ram(tmp_path):
    """A sparse 32 GiB table (more than this machine's RAM): only touched pages are read."""
    rows, d = 128 * 1024 * 1024, 64  # 128 Mi rows x 64 float32 = 32 GiB
    path = tmp_path / "huge.f32"
    with open(path, "wb") as f:
        f.truncate(rows * d * 4)
    picked = np.array([0, 12_345_678, rows // 2, rows - 1], dtype=np.int64)
    writer = np.memmap(path, dtype=np.float32, mode="r+", shape=(rows, d))
    for n, r in enumerate(picked):
        writer[r] = np.arange(d, dtype=np.float32) + n
    writer.flush()
    del writer
    table = np.memmap(path, dtype=np.float32, mode="r", shape=(rows, d))
    indices = np.array([picked[1], picked[3], 5, picked[2]], dtype=np.int64)
    offsets = np.array([0, 2, 4], dtype=np.int64)
    got = kernels.embedding_bag(table, indices, offsets)
    np.testing.assert_array_equal(got[0], 2 * np.arange(d) + 1 + 3)
    np.testing.assert_array_equal(got[1], np.arange(d) + 2)  # row 5 is a hole: zeros


def _eb_args(**override):
    args = {
        "table": np.zeros((10, 4), np.float32),
        "indices": np.array([0, 1, 2], np.int64),
        "offsets": np.array([0, 1, 3], np.int64),
    }
    args.update(override)
    return args


@pytest.mark.parametrize(
    "override, kwargs, message",
    [
        ({"table": np.zeros((10, 4), np.float64)}, {}, "table must be float32 or float16, got float64"),
        ({"table": np.zeros(10, np.float32)}, {}, "table must be 2-D, got 1-D"),
        ({"indices": np.array([0, 1, 2], np.int32)}, {}, "indices must be int64, got int32"),
        ({"indices": np.zeros((3, 1), np.int64)}, {}, "indices must be 2-D|indices must be 1-D, got 2-D"),
        ({"offsets": np.array([0, 1, 3], np.float32)}, {}, "offsets must be int64, got float32"),
        ({"indices": np.array([0, 10, 2], np.int64)}, {}, r"indices\[1\] = 10 is out of range for a table with 10 rows"),
        ({"indices": np.array([0, 1, -1], np.int64)}, {}, r"indices\[2\] = -1 is out of range"),
        ({"offsets": np.array([0, 2, 1, 3], np.int64)}, {}, "offsets must be non-decreasing"),
        ({"offsets": np.array([0, 1, 2], np.int64)}, {}, r"offsets\[-1\] must equal len\(indices\) = 3, got 2"),
        ({"offsets": np.array([1, 3], np.int64)}, {}, r"offsets\[0\] must be 0, got 1"),
        ({"offsets": np.zeros(0, np.int64)}, {}, "offsets must have at least one element"),
        ({}, {"mode": "max"}, "mode must be 'sum' or 'mean', got 'max'"),
        ({}, {"weights": np.ones(2, np.float32)}, "weights has 2 elements but indices has 3"),
        ({}, {"weights": np.ones(3, np.float64)}, "weights must be float32, got float64"),
        ({}, {"weights": np.ones(3, np.float32), "mode": "mean"}, "weights are only supported with mode='sum'"),
    ],
)
def test_embedding_bag_bad_input_raises_value_error(override, kwargs, message):
    with pytest.raises(ValueError, match=message):
        kernels.embedding_bag(**_eb_args(**override), **kwargs)


def test_bad_index_on_device_raises_value_error(device):
    args = {k: device.put(v) for k, v in _eb_args(indices=np.array([0, 1, 99], np.int64)).items()}
    with pytest.raises(ValueError, match=r"indices\[2\] = 99 is out of range"):
        kernels.embedding_bag(**args)


def test_skewed_bags_split_across_threads():
    """Empty bags, one huge bag and many singletons: every thread split must still
    cover each bag exactly once."""
    rng = np.random.default_rng(9)
    table = rng.standard_normal((20_000, 40)).astype(np.float32)
    sizes = [0] * 100 + [30_000] + [1] * 3000 + [0] * 50 + [7] * 400
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    indices = rng.integers(0, 20_000, size=int(offsets[-1]), dtype=np.int64)
    for mode in ("sum", "mean"):
        got = kernels.embedding_bag(table, indices, offsets, mode=mode)
        np.testing.assert_array_equal(got, ref.embedding_bag(table, indices, offsets, mode=mode))
