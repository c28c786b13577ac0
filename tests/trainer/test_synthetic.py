"""Tests of the synthetic implicit-feedback generator (recserve.trainer.synthetic).

The statistical checks compare the data against the law the generator is meant to follow,
recomputed here from the exposed ground truth (clusters, popularity ranks), so a sampler
that drifts from the documented model fails them.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import tracemalloc
from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from recserve.trainer import synthetic as syn
from recserve.trainer.synthetic import SyntheticConfig

BASE = SyntheticConfig(n_users=6000, n_items=2000, n_clusters=20, seed=11, users_per_chunk=1000)


def collect(cfg: SyntheticConfig) -> pa.Table:
    return pa.concat_tables(list(syn.interaction_chunks(cfg))).combine_chunks()


@pytest.fixture(scope="module")
def base() -> pa.Table:
    return collect(BASE)


def cols(t: pa.Table) -> dict[str, np.ndarray]:
    return {name: t.column(name).to_numpy() for name in ("user_id", "timestamp", "invoice")} | {
        "item": np.array([int(s[1:]) for s in t.column("item_id").to_pylist()])
    }


def zipf_law(cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
    """Global item probabilities and each item's probability within its own cluster."""
    rank = syn.item_popularity_rank(cfg)
    clusters = syn.item_clusters(cfg)
    w = (rank + 1.0) ** -cfg.zipf_a
    p_global = w / w.sum()
    p_within = np.empty(cfg.n_items)
    for c in range(cfg.n_clusters):
        members = np.flatnonzero(clusters == c)
        within_rank = np.argsort(np.argsort(rank[members]))
        wc = (within_rank + 1.0) ** -cfg.zipf_a
        p_within[members] = wc / wc.sum()
    return p_global, p_within


# ----------------------------------------------------------------------------- format


def test_schema_dtypes_and_column_order(base):
    assert base.schema.names == ["user_id", "item_id", "timestamp", "invoice"]
    assert [f.type for f in base.schema] == [pa.int64(), pa.string(), pa.int64(), pa.int64()]
    items = syn.item_table(BASE)
    assert items.schema.names == ["item_id", "description", "median_unit_price"]
    assert [f.type for f in items.schema] == [pa.string(), pa.string(), pa.float64()]

    ids = items.column("item_id").to_pylist()
    assert ids == [f"I{i:04d}" for i in range(BASE.n_items)]
    assert set(base.column("item_id").to_pylist()) <= set(ids)
    prices = items.column("median_unit_price").to_numpy()
    assert np.all(prices > 0) and np.all(np.isfinite(prices))
    assert all(len(d.split()) >= 3 for d in items.column("description").to_pylist())


def test_item_id_width_follows_item_count_and_unused_items_are_listed():
    cfg = SyntheticConfig(n_users=20, n_items=5000, n_clusters=10, seed=1)
    items = syn.item_table(cfg)
    assert items.num_rows == 5000
    assert items.column("item_id")[0].as_py() == "I0000"
    assert items.column("item_id")[-1].as_py() == "I4999"
    used = set(collect(cfg).column("item_id").to_pylist())
    assert len(used) < 1000  # 20 users cannot touch 5000 items, yet all are listed

    big = syn.item_table(SyntheticConfig(n_items=1_000_000, n_clusters=50))
    assert big.column("item_id")[42].as_py() == "I0000042"


def test_deterministic_given_seed(base):
    again = collect(BASE)
    assert again.equals(base)
    assert syn.item_table(BASE).equals(syn.item_table(BASE))

    other = SyntheticConfig(**{**BASE.__dict__, "seed": 12})
    assert not collect(other).equals(base)
    assert not syn.item_table(other).equals(syn.item_table(BASE))
    assert not np.array_equal(syn.user_clusters(other), syn.user_clusters(BASE))


def test_chunk_size_does_not_change_the_data(base):
    for upc in (777, 10**6):
        cfg = SyntheticConfig(**{**BASE.__dict__, "users_per_chunk": upc})
        chunks = list(syn.interaction_chunks(cfg))
        assert len(chunks) == math.ceil(BASE.n_users / upc)
        seen: set[int] = set()
        for i, chunk in enumerate(chunks):
            users = np.unique(chunk.column("user_id").to_numpy())
            assert len(users) == min(upc, BASE.n_users - i * upc)
            assert seen.isdisjoint(users.tolist())  # each user lies in exactly one chunk
            seen.update(users.tolist())
        assert pa.concat_tables(chunks).combine_chunks().equals(base)

    # users are drawn in fixed blocks: a smaller population is a prefix of a larger one
    half = collect(SyntheticConfig(**{**BASE.__dict__, "n_users": 2500}))
    assert half.equals(base.slice(0, half.num_rows))
    assert base.column("user_id")[half.num_rows].as_py() == 2500


def test_users_contiguous_and_baskets_consistent(base):
    c = cols(base)
    user, ts, inv = c["user_id"], c["timestamp"], c["invoice"]
    assert np.all(np.diff(user) >= 0)
    assert np.array_equal(np.unique(user), np.arange(BASE.n_users))  # every user has an event

    same_user = user[1:] == user[:-1]
    assert np.all(np.diff(ts)[same_user] >= 0)
    # a new invoice starts exactly where (user, timestamp) changes: a basket is one
    # (user, timestamp) and no two baskets of a user share a timestamp
    same_basket = same_user & (ts[1:] == ts[:-1])
    assert np.array_equal(inv[1:] == inv[:-1], same_basket)
    # invoices are numbered 0.. in (user, time) order, hence globally unique
    assert inv[0] == 0 and np.all(np.diff(inv) >= 0)
    assert np.array_equal(np.unique(inv), np.arange(inv[-1] + 1))


def test_basket_counts_sizes_and_times(base):
    c = cols(base)
    user, ts, inv = c["user_id"], c["timestamp"], c["invoice"]
    n_baskets = np.bincount(user[np.r_[True, inv[1:] != inv[:-1]]])
    basket_sizes = np.bincount(inv)
    assert n_baskets.min() >= 1 and basket_sizes.min() >= 1
    assert abs(n_baskets.mean() - BASE.mean_baskets) < 0.15
    assert abs(basket_sizes.mean() - BASE.mean_basket_size) < 0.06
    assert n_baskets.max() > 3 * BASE.mean_baskets  # geometric: a long tail of heavy users

    first_ts = ts[np.r_[True, user[1:] != user[:-1]]]
    assert first_ts.min() >= BASE.start_time
    assert first_ts.max() < BASE.start_time + 366 * 86_400
    # starts spread over the whole window, not piled up at start_time
    assert np.ptp(first_ts) > 300 * 86_400


# ----------------------------------------------------------------------------- planted structure


@pytest.mark.parametrize("affinity", [0.8, 0.0, 1.0])
def test_home_cluster_share_matches_affinity(affinity):
    cfg = SyntheticConfig(n_users=5000, n_items=2000, n_clusters=20, affinity=affinity, seed=5)
    t = collect(cfg)
    c = cols(t)
    home = syn.user_clusters(cfg)[c["user_id"]]
    in_home = syn.item_clusters(cfg)[c["item"]] == home
    p_global, _ = zipf_law(cfg)
    share = np.bincount(syn.item_clusters(cfg), weights=p_global, minlength=cfg.n_clusters)
    expected = affinity + (1 - affinity) * share[home].mean()
    assert abs(in_home.mean() - expected) < 0.01, (in_home.mean(), expected)


def test_popularity_follows_the_zipf_law(base):
    c = cols(base)
    p_global, p_within = zipf_law(BASE)
    clusters = syn.item_clusters(BASE)
    home_share = np.bincount(syn.user_clusters(BASE), minlength=BASE.n_clusters) / BASE.n_users
    expected = BASE.affinity * home_share[clusters] * p_within + (1 - BASE.affinity) * p_global
    assert math.isclose(expected.sum(), 1.0)

    counts = np.bincount(c["item"], minlength=BASE.n_items)
    freq = counts / counts.sum()
    top = BASE.n_items // 100
    expected_top = np.sort(expected)[::-1][:top].sum()
    observed_top = np.sort(freq)[::-1][:top].sum()
    assert expected_top > 0.2  # the law itself is skewed: 20x the uniform 1%
    assert abs(observed_top - expected_top) < 0.02, (observed_top, expected_top)

    # the whole distribution, not just its head: total variation distance to the law is at
    # the sampling-noise level (~0.05 for ~70k events over 2000 items); a uniform draw
    # within clusters would be at ~0.4
    assert 0.5 * np.abs(freq - expected).sum() < 0.08
    # the most popular item of the catalogue is the rank-0 item
    assert syn.item_popularity_rank(BASE)[np.argmax(counts)] == 0


def test_description_words_predict_the_cluster():
    cfg = SyntheticConfig(n_items=4000, n_clusters=40, seed=3)
    clusters = syn.item_clusters(cfg)
    words = [d.split() for d in syn.item_table(cfg).column("description").to_pylist()]

    # learn word -> cluster votes on even items, predict odd ones
    votes: dict[str, Counter] = defaultdict(Counter)
    for i in range(0, cfg.n_items, 2):
        for w in words[i]:
            votes[w][clusters[i]] += 1
    correct = 0
    for i in range(1, cfg.n_items, 2):
        tally = Counter()
        for w in words[i]:
            total = sum(votes[w].values())
            for c, n in votes[w].items():
                tally[c] += n / total  # noise words spread their vote thin
        correct += bool(tally) and tally.most_common(1)[0][0] == clusters[i]
    assert correct / (cfg.n_items // 2) > 0.95

    # ...while noise words are shared across many clusters
    spread = {w: len(v) for w, v in votes.items()}
    assert sum(n >= 5 for n in spread.values()) >= 200  # most of the 240 noise words


def test_prices_are_cluster_dependent():
    cfg = SyntheticConfig(n_items=4000, n_clusters=20, seed=4)
    log_price = np.log(syn.item_table(cfg).column("median_unit_price").to_numpy())
    clusters = syn.item_clusters(cfg)
    means = np.bincount(clusters, weights=log_price) / np.bincount(clusters)
    within = np.var(log_price - means[clusters])
    assert np.var(means) > 2 * within


def test_ground_truth_shapes():
    cfg = SyntheticConfig(n_users=10_000, n_items=1003, n_clusters=10, seed=2)
    uc = syn.user_clusters(cfg)
    assert uc.shape == (10_000,) and uc.min() == 0 and uc.max() == 9
    assert np.bincount(uc).min() > 800  # uniform home clusters
    ic = syn.item_clusters(cfg)
    assert sorted(set(np.bincount(ic).tolist())) == [100, 101]  # equal sizes, +-1
    assert np.array_equal(np.sort(syn.item_popularity_rank(cfg)), np.arange(1003))
    # user ground truth is a prefix-stable function of the seed
    small = SyntheticConfig(**{**cfg.__dict__, "n_users": 5000})
    assert np.array_equal(syn.user_clusters(small), uc[:5000])


@pytest.mark.parametrize(
    "field,value",
    [
        ("n_users", 0),
        ("n_items", -1),
        ("n_clusters", 0),
        ("n_clusters", 3000),  # > n_items
        ("mean_baskets", 0.5),
        ("mean_basket_size", 0),
        ("affinity", 1.5),
        ("affinity", -0.1),
        ("affinity", float("nan")),
        ("zipf_a", 1.0),
        ("seed", -1),
        ("users_per_chunk", 0),
        ("n_users", 2.5),
        ("n_items", True),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SyntheticConfig(**{field: value})


# ----------------------------------------------------------------------------- writing and CLI

SMALL = SyntheticConfig(n_users=1500, n_items=300, n_clusters=20, seed=9, users_per_chunk=400)
SMALL_ARGS = ["--users", "1500", "--items", "300", "--seed", "9", "--users-per-chunk", "400"]


def test_write_dataset_parquet_one_row_group_per_chunk(tmp_path):
    inter, items = syn.write_dataset(SMALL, tmp_path)
    assert (inter.name, items.name) == ("interactions.parquet", "items.parquet")
    f = pq.ParquetFile(inter)
    assert f.metadata.num_row_groups == 4  # ceil(1500 / 400) chunks
    assert f.schema_arrow == syn.INTERACTION_SCHEMA
    assert pq.read_table(inter).equals(collect(SMALL))
    assert pq.read_table(items).equals(syn.item_table(SMALL))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["interactions.parquet", "items.parquet"]


@pytest.mark.parametrize("fmt", ["parquet", "csv.gz", "csv"])
def test_cli_writes_readable_files(tmp_path, capsys, fmt):
    out = tmp_path / "out"
    assert syn.main([*SMALL_ARGS, "--out", str(out), "--format", fmt]) == 0
    expected, expected_items = collect(SMALL), syn.item_table(SMALL)
    printed = capsys.readouterr().out
    assert f"interactions.{fmt}" in printed and f"{expected.num_rows} rows" in printed
    assert f"items.{fmt}" in printed and "300 rows" in printed

    inter_path, items_path = out / f"interactions.{fmt}", out / f"items.{fmt}"
    if fmt == "parquet":
        got, got_items = pq.read_table(inter_path), pq.read_table(items_path)
    else:
        assert (inter_path.read_bytes()[:2] == b"\x1f\x8b") == (fmt == "csv.gz")

        def read(path, schema):
            opts = pcsv.ConvertOptions(column_types={f.name: f.type for f in schema})
            return pcsv.read_csv(path, convert_options=opts)

        got, got_items = read(inter_path, syn.INTERACTION_SCHEMA), read(items_path, syn.ITEM_SCHEMA)
    assert got.combine_chunks().equals(expected)
    assert got_items.combine_chunks().equals(expected_items)


@pytest.mark.parametrize(
    "argv",
    [
        ["--users", "0", "--items", "10"],
        ["--users", "ten", "--items", "10"],
        ["--users", "10", "--items", "10", "--clusters", "11"],
        ["--users", "10", "--items", "10", "--affinity", "2"],
        ["--users", "10", "--items", "10", "--zipf-a", "0.9"],
        ["--users", "10", "--items", "10", "--format", "xlsx"],
        ["--users", "10"],
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(tmp_path, capsys, argv):
    with pytest.raises(SystemExit) as exc:
        syn.main([*argv, "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error" in err
    assert not (tmp_path / "o").exists()


def test_cli_as_module(tmp_path):
    run = [sys.executable, "-m", "recserve.trainer.synthetic"]
    ok = subprocess.run([*run, *SMALL_ARGS, "--out", str(tmp_path)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert re.search(r"interactions: .*interactions\.parquet \(\d+ rows, 1500 users\)", ok.stdout)
    bad_args = ["--users", "-5", "--items", "10", "--out", str(tmp_path)]
    bad = subprocess.run([*run, *bad_args], capture_output=True, text=True)
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "--users" in bad.stderr


# ----------------------------------------------------------------------------- memory


def _peak_while_streaming(cfg: SyntheticConfig) -> tuple[int, int, int]:
    """(rows, peak traced bytes, peak Arrow pool bytes at chunk boundaries) while consuming."""
    arrow_base = pa.total_allocated_bytes()
    arrow_peak = rows = 0
    tracemalloc.start()
    try:
        for chunk in syn.interaction_chunks(cfg):
            rows += chunk.num_rows
            arrow_peak = max(arrow_peak, pa.total_allocated_bytes() - arrow_base)
            del chunk
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return rows, peak, arrow_peak


def test_streaming_memory_is_bounded_by_the_chunk():
    cfg = SyntheticConfig(n_users=400_000, n_items=2000, n_clusters=20, users_per_chunk=25_000, seed=8)
    # first use allocates a few MB of lasting interpreter/library state; keep it out of the peaks
    _peak_while_streaming(SyntheticConfig(**{**cfg.__dict__, "n_users": 30_000}))
    rows, peak, arrow_peak = _peak_while_streaming(cfg)
    # Materialising all rows would take at least the three int64 columns (24 B/row) in
    # NumPy plus ~9 B/row of item id strings in Arrow.
    assert rows > 4_000_000
    assert peak < 24 * rows / 4, (peak, rows)
    assert arrow_peak < 9 * rows / 4, (arrow_peak, rows)
    # ...and the peak does not grow with the number of users
    _, peak_small, _ = _peak_while_streaming(SyntheticConfig(**{**cfg.__dict__, "n_users": 100_000}))
    assert peak < 1.5 * peak_small, (peak, peak_small)


def test_item_sampler_stays_inside_the_segment_at_the_edges():
    # u just below 1 makes s + u round up to s + 1 for s >= 1: the draw must not spill into
    # the next cluster's segment
    cfg = SyntheticConfig(n_items=500, n_clusters=20, seed=6)
    clusters, rank = syn.item_clusters(cfg), syn.item_popularity_rank(cfg)
    sampler = syn._ItemSampler(cfg, clusters, rank)
    segments = np.arange(cfg.n_clusters + 1)
    top = sampler.sample(segments, np.zeros(len(segments)))
    last = sampler.sample(segments, np.full(len(segments), np.nextafter(1.0, 0.0)))
    for c in range(cfg.n_clusters):
        members = np.flatnonzero(clusters == c)
        assert top[c] == members[np.argmin(rank[members])]
        assert last[c] == members[np.argmax(rank[members])]
    assert rank[top[-1]] == 0 and rank[last[-1]] == cfg.n_items - 1
