"""murmur3_32 and hash_features against mmh3, scikit-learn and reference.py."""

from __future__ import annotations

import mmh3
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sklearn.utils import murmurhash3_32

from recserve import kernels
from recserve.kernels import reference as ref

seeds = st.integers(min_value=0, max_value=2**32 - 1)


@given(data=st.binary(max_size=64), seed=seeds)
def test_murmur3_matches_mmh3_on_bytes(data, seed):
    assert kernels.murmur3_32(data, seed) == mmh3.hash(data, seed, signed=False)


@given(text=st.text(max_size=32), seed=st.integers(min_value=0, max_value=2**31 - 1))
def test_murmur3_matches_mmh3_and_sklearn_on_utf8_text(text, seed):
    expected = mmh3.hash(text.encode("utf-8"), seed, signed=False)
    assert kernels.murmur3_32(text.encode("utf-8"), seed) == expected
    assert kernels.murmur3_32(text, seed) == expected
    assert murmurhash3_32(text, seed=seed, positive=True) == expected


def test_murmur3_many_random_strings_and_edge_cases():
    rng = np.random.default_rng(7)
    cases = [b"", "é".encode(), "日本語".encode(), "😀".encode(), b"\x00", b"\x00\x00\x00\x00\x00"]
    cases += [rng.bytes(int(n)) for n in rng.integers(0, 40, size=2000)]
    for i, data in enumerate(cases):
        seed = int(rng.integers(0, 2**32))
        got = kernels.murmur3_32(data, seed)
        assert got == mmh3.hash(data, seed, signed=False), (data, seed)
        assert got == ref.murmur3_32(data, seed)
        if seed < 2**31:
            assert got == murmurhash3_32(data, seed=seed, positive=True)


def test_murmur3_known_vectors():
    # Published MurmurHash3_x86_32 test vectors (SMHasher).
    assert kernels.murmur3_32(b"", 0) == 0
    assert kernels.murmur3_32(b"", 1) == 0x514E28B7
    assert kernels.murmur3_32(b"", 0xFFFFFFFF) == 0x81F16F39
    assert kernels.murmur3_32(b"\xff\xff\xff\xff", 0) == 0x76293B50
    assert kernels.murmur3_32(b"Hello, world!", 1234) == 0xFAF6CDB3


token_lists = st.lists(st.text(max_size=20), max_size=50)


@given(tokens=token_lists, seed=seeds, buckets=st.integers(min_value=1, max_value=2**40))
def test_hash_features_list_of_str_matches_reference(tokens, seed, buckets):
    got = kernels.hash_features(tokens, seed=seed, num_buckets=buckets)
    assert got.dtype == np.int64 and got.shape == (len(tokens),)
    np.testing.assert_array_equal(got, ref.hash_features(tokens, seed=seed, num_buckets=buckets))


def _layouts(tokens: list[str]):
    """The same tokens in every layout hash_features accepts."""
    encoded = [t.encode("utf-8") for t in tokens]
    offsets = np.zeros(len(tokens) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(e) for e in encoded])
    flat = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
    return {
        "list[str]": tokens,
        "tuple[str]": tuple(tokens),
        "list[bytes]": encoded,
        "mixed str/bytes": [t if i % 2 else e for i, (t, e) in enumerate(zip(tokens, encoded))],
        "np.str_ array": np.array(tokens, dtype=str),
        "np.bytes_ array": np.array(encoded, dtype=bytes),
        "object array": np.array(tokens, dtype=object),
        "flat (data, offsets)": (flat, offsets),
        "non-contiguous U array": np.repeat(np.array(tokens, dtype=str), 2)[::2],
    }


@pytest.mark.parametrize("layout", list(_layouts(["a"]).keys()))
def test_hash_features_every_layout_agrees(layout):
    tokens = ["user_id=123456", "country=NL", "", "q=naïve café", "emoji=😀", "cjk=日本語", "x" * 100]
    expected = ref.hash_features(tokens, seed=17, num_buckets=1_000_003)
    got = kernels.hash_features(_layouts(tokens)[layout], seed=17, num_buckets=1_000_003)
    np.testing.assert_array_equal(got, expected)


def test_hash_features_large_input_matches_mmh3_in_every_layout():
    tokens = [f"user_id={i}" for i in range(200_000)]
    got = kernels.hash_features(tokens, seed=3, num_buckets=1 << 20)
    sample = np.random.default_rng(0).integers(0, len(tokens), size=500)
    for i in sample:
        assert got[i] == mmh3.hash(tokens[i], 3, signed=False) % (1 << 20)
    np.testing.assert_array_equal(got, kernels.hash_features(np.array(tokens), seed=3, num_buckets=1 << 20))


def test_hash_features_empty():
    for tokens in ([], np.array([], dtype=str), (np.zeros(0, np.uint8), np.zeros(1, np.int64))):
        out = kernels.hash_features(tokens, seed=0, num_buckets=10)
        assert out.dtype == np.int64 and out.shape == (0,)


def test_hash_features_flat_on_device(device):
    tokens = [f"item_id={i}" for i in range(1000)] + ["", "é"]
    flat, offsets = _layouts(tokens)["flat (data, offsets)"]
    got = kernels.hash_features((device.put(flat), device.put(offsets)), seed=5, num_buckets=999)
    np.testing.assert_array_equal(device.get(got), ref.hash_features(tokens, seed=5, num_buckets=999))


@pytest.mark.parametrize(
    "tokens, kwargs, message",
    [
        (["a", 3], {}, r"tokens\[1\] must be str or bytes, got int"),
        ("user_id=1", {}, "not a single str"),
        (12, {}, "tokens must be a list/array"),
        (np.arange(3), {}, "dtype U, S or object"),
        (np.array([["a"]]), {}, "tokens must be 1-D"),
        (["a"], {"seed": -1}, r"seed must be in \[0, 2\*\*32\)"),
        (["a"], {"seed": 2**32}, r"seed must be in \[0, 2\*\*32\)"),
        (["a"], {"num_buckets": 0}, "num_buckets must be >= 1"),
        (["\ud800"], {}, r"tokens\[0\] is not valid Unicode"),
        (np.array(["ok", "\ud800"]), {}, r"tokens\[1\] contains a code point"),
        ((np.zeros(4, np.uint8), np.array([0, 2, 1, 4])), {}, "tokens offsets must be non-decreasing"),
        ((np.zeros(4, np.uint8), np.array([0, 2, 3])), {}, r"tokens offsets\[-1\] must equal len\(tokens data\) = 4"),
        ((np.zeros(4, np.uint8), np.array([1, 4])), {}, r"tokens offsets\[0\] must be 0"),
        ((np.zeros(4, np.int32), np.array([0, 4])), {}, "tokens data must be uint8, got int32"),
        ((np.zeros(4, np.uint8), np.array([0, 4], np.int32)), {}, "tokens offsets must be int64, got int32"),
    ],
)
def test_hash_features_bad_input_raises_value_error(tokens, kwargs, message):
    args = {"seed": 0, "num_buckets": 100} | kwargs
    with pytest.raises(ValueError, match=message):
        kernels.hash_features(tokens, **args)


def test_murmur3_bad_input():
    with pytest.raises(ValueError, match="data must be str or bytes, got int"):
        kernels.murmur3_32(5)
    with pytest.raises(ValueError, match="seed"):
        kernels.murmur3_32(b"x", -5)
    assert kernels.murmur3_32(bytearray(b"abc"), 9) == mmh3.hash(b"abc", 9, signed=False)
