"""Feature spec: tokens, hashing, encoding and pooling are the documented functions."""

from __future__ import annotations

import mmh3
import numpy as np
import pytest

from recserve.features.spec import FeatureSpec, Field, Table
from recserve.kernels import reference


def make_spec(seed: int = 7) -> FeatureSpec:
    return FeatureSpec(
        seed=seed,
        tables=(Table("user_id", 1000, 4), Table("item_id", 500, 4), Table("description", 300, 3),
                Table("price", 4, 2), Table("country", 50, 2)),
        fields=(
            Field("user_id", "user", "categorical", "user_id"),
            Field("history", "user", "sequence", "item_id", max_len=3),
            Field("country", "user", "categorical", "country", source="ctx_country", pooling="sum"),
            Field("item_id", "item", "categorical", "item_id"),
            Field("description", "item", "text", "description", max_len=4),
            Field("price", "item", "bucketized", "price", boundaries=(1.0, 2.5, 10.0)),
        ),
    )


def test_tokens_per_kind():
    spec = make_spec()
    assert spec.field("user_id").tokens(17850) == ["user_id=17850"]
    assert spec.field("user_id").tokens("") == []
    assert spec.field("user_id").tokens(None) == []
    # newest first; only the first max_len are kept; shared table -> shared namespace
    assert spec.field("history").tokens(["A", "B", "C", "D"]) == ["item_id=A", "item_id=B", "item_id=C"]
    assert spec.field("description").tokens("WHITE Hanging-HEART t-light holder") == [
        "description=white", "description=hanging", "description=heart", "description=t"]
    # repeats in a sequence are dropped before truncation (history is distinct items)
    assert spec.field("history").tokens(["A", "A", "B", "A", "C", "D"]) == ["item_id=A", "item_id=B", "item_id=C"]


def test_bucketized_values_are_their_bin_rows_never_hashed():
    spec = make_spec()
    ids, offsets = spec.encode_field("price", [0.5, 1.0, None, 2.49, 2.5, float("nan"), 99])
    assert ids.tolist() == [0, 1, 1, 2, 3] and offsets.tolist() == [0, 1, 2, 2, 3, 4, 4, 5]
    # every bin has its own row: hashing a handful of bins into as many buckets would merge some
    many = FeatureSpec(seed=0, tables=(Table("u", 8, 2), Table("p", 17, 2)), fields=(
        Field("u", "user", "categorical", "u"),
        Field("p", "item", "bucketized", "p", boundaries=tuple(range(1, 17)))))
    ids, _ = many.encode_field("p", [x + 0.5 for x in range(17)])
    assert ids.tolist() == list(range(17))


def test_bad_raw_values_name_the_field():
    spec = make_spec()
    with pytest.raises(ValueError, match="'history'.*list"):
        spec.field("history").tokens("A")
    with pytest.raises(ValueError, match="'price'.*number"):
        spec.encode_field("price", [1.0, "cheap"])


def test_hashing_is_murmur3_of_the_token_mod_buckets():
    spec = make_spec(seed=123)
    ids = spec.hash_values("history", ["85123A", "71053"])
    expected = [mmh3.hash(t, 123, signed=False) % 500 for t in ("item_id=85123A", "item_id=71053")]
    assert ids.tolist() == expected
    # an item id hashes to the same bucket whether it is the item's id or in a history
    assert spec.hash_values("item_id", ["85123A"])[0] == ids[0]


def test_encode_and_pool_match_the_reference():
    spec = make_spec()
    records = [
        {"user_id": "u1", "history": ["a", "b", "c", "d"], "ctx_country": "NL"},
        {"user_id": "u2", "history": [], "ctx_country": None},
    ]
    bags = spec.encode("user", records)
    assert list(bags) == ["user_id", "history", "country"]
    idx, off = bags["history"]
    assert off.tolist() == [0, 3, 3]
    assert idx.tolist() == spec.hash_values("history", ["a", "b", "c"]).tolist()
    rng = np.random.default_rng(0)
    tables = {t.name: rng.standard_normal((t.num_buckets, t.dim)).astype(np.float32) for t in spec.tables}
    pooled = spec.pool("user", bags, tables)
    for f in spec.side_fields("user"):
        want = reference.embedding_bag(tables[f.table], *bags[f.name], mode=f.pooling)
        np.testing.assert_array_equal(pooled[f.name], want)
    assert np.all(pooled["history"][1] == 0) and np.all(pooled["country"][1] == 0)


def test_fingerprint_round_trip_and_sensitivity():
    spec = make_spec()
    again = FeatureSpec.from_dict(spec.to_dict())
    assert again == spec and again.fingerprint() == spec.fingerprint()
    assert make_spec(seed=8).fingerprint() != spec.fingerprint()
    d = spec.to_dict()
    d["fields"][1]["max_len"] = 4
    assert FeatureSpec.from_dict(d).fingerprint() != spec.fingerprint()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["fields"][0].update(table="nope"), "unknown table 'nope'"),
        (lambda d: d["fields"][0].update(side="middle"), "side must be"),
        (lambda d: d["fields"][0].update(kind="image"), "kind must be"),
        (lambda d: d["fields"][5].update(boundaries=[3.0, 1.0]), "strictly increasing"),
        (lambda d: d["fields"][5].update(boundaries=[1.0, 2.0]), "needs exactly 3 buckets"),
        (lambda d: d["fields"].append(dict(d["fields"][0])), "duplicate field"),
        (lambda d: d.update(fields=[f for f in d["fields"] if f["side"] == "user"]), "no item fields"),
        (lambda d: d.update(version=99), "version 99"),
        (lambda d: d.pop("tables"), "malformed"),
    ],
)
def test_invalid_specs_are_rejected(change, message):
    d = make_spec().to_dict()
    change(d)
    with pytest.raises(ValueError, match=message):
        FeatureSpec.from_dict(d)
