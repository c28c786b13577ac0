"""Synthetic implicit-feedback data with planted structure, for scale tests and benchmarks.

Usage::

    # 100k users x 20k items into /tmp/synth/{interactions,items}.parquet
    python -m recserve.trainer.synthetic --users 100000 --items 20000 --out /tmp/synth

    # the full-scale benchmark shape; CSV (gzip) instead of Parquet
    python -m recserve.trainer.synthetic --users 10000000 --items 1000000 --clusters 50 \\
        --seed 7 --out /data/synth
    python -m recserve.trainer.synthetic --users 5000 --items 500 --out /tmp/s --format csv.gz

    from recserve.trainer.synthetic import SyntheticConfig, interaction_chunks, item_table, write_dataset

    cfg = SyntheticConfig(n_users=50_000, n_items=5_000, seed=3)
    interactions_path, items_path = write_dataset(cfg, "/tmp/synth")
    for chunk in interaction_chunks(cfg):  # one pyarrow.Table per `users_per_chunk` users
        ...

Output (the trainer's loader reads exactly this):

* interactions: ``user_id`` int64, ``item_id`` string, ``timestamp`` int64 (unix seconds),
  ``invoice`` int64. One invoice is one basket: its rows share user and timestamp.
  Invoice ids are globally unique, numbered 0, 1, 2, ... in (user, time) order. Rows of a
  user are contiguous and sorted by timestamp; different baskets of a user never share a
  timestamp. A basket may list the same item twice (as real invoices sometimes do).
  Parquet files have one row group per chunk.
* items: ``item_id`` string (``"I"`` + zero-padded index, width ``len(str(n_items))``),
  ``description`` string, ``median_unit_price`` float64 > 0. Every item of the catalogue
  is listed, including those that never appear in an interaction.

Planted structure (the ground truth is exposed by `user_clusters`, `item_clusters` and
`item_popularity_rank`, computable without generating any event):

* items are split into ``n_clusters`` equal-sized (+-1) random clusters; each user has a
  uniformly drawn home cluster. Each event picks from the home cluster with probability
  ``affinity``, else from the whole catalogue.
* popularity: one random permutation ranks all items; the global draw picks the item of
  rank r with probability proportional to (r + 1) ** -zipf_a, and a cluster draw does the
  same over the cluster's items taken in that global order.
* baskets per user ~ Geometric (mean ``mean_baskets``, at least 1); basket size ~
  1 + Poisson(``mean_basket_size`` - 1); a user's first basket falls uniformly in a one-year
  window after ``start_time``, later ones after exponential gaps (mean two weeks, >= 1 s).
* descriptions: two words specific to the item's cluster plus one or two words from a
  shared noise vocabulary; prices are log-normal around a per-cluster log-mean.

Determinism: the output is a pure function of the config with ``users_per_chunk``
excluded: users are generated in fixed blocks of `BLOCK_USERS`, each from its own
``SeedSequence(seed, spawn_key=(stream, block))``, and chunks are cut from those blocks. So
a smaller ``n_users`` gives a prefix of a larger one, and the item side depends only on
``seed``, ``n_items``, ``n_clusters`` and ``zipf_a``. (The same holds within one NumPy
version: NumPy does not promise identical `Generator` streams across versions.)

Memory is O(users_per_chunk * events per user + n_items): no per-user Python objects, one
``searchsorted`` over precomputed per-cluster CDFs for item draws, and item id strings built
once and gathered with ``take``. NumPy and PyArrow only (the trainer's torch stays out).
"""

from __future__ import annotations

import argparse
import math
import numbers
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

__all__ = [
    "BLOCK_USERS",
    "FORMATS",
    "INTERACTION_SCHEMA",
    "ITEM_SCHEMA",
    "SyntheticConfig",
    "interaction_chunks",
    "item_clusters",
    "item_popularity_rank",
    "item_table",
    "main",
    "user_clusters",
    "write_dataset",
]

INTERACTION_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.string()),
        ("timestamp", pa.int64()),
        ("invoice", pa.int64()),
    ]
)
ITEM_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("description", pa.string()),
        ("median_unit_price", pa.float64()),
    ]
)
FORMATS = ("parquet", "csv", "csv.gz")

# Users are drawn in blocks of this size, each from its own seed stream, so the data do not
# depend on users_per_chunk. Small enough that a block's temporaries are a few MB, large
# enough that per-block Python overhead stays ~1 s over 10M users. Changing it changes
# the data for a given seed.
BLOCK_USERS = 4096

_TIME_WINDOW_S = 365 * 86_400
_MEAN_GAP_S = 14 * 86_400
_WORDS_PER_CLUSTER = 6
_NOISE_WORDS = 240
_SYLLABLES = np.array([c + v for c in "bdfgklmnprstvz" for v in "aeiou"])

# Independent seed streams per component, so that e.g. the price model can change without
# reshuffling clusters, and user home clusters are known without drawing any event.
_STREAM_ITEM_CLUSTER = 1
_STREAM_ITEM_RANK = 2
_STREAM_ITEM_TEXT = 3
_STREAM_ITEM_PRICE = 4
_STREAM_USER_HOME = 10
_STREAM_EVENTS = 11


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the generator; validated on construction (ValueError names the field)."""

    n_users: int = 10_000
    n_items: int = 2_000
    n_clusters: int = 20
    mean_baskets: float = 4.0
    mean_basket_size: float = 3.0
    affinity: float = 0.8
    zipf_a: float = 1.1
    seed: int = 0
    start_time: int = 1_600_000_000
    users_per_chunk: int = 200_000

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            want_int = f.type in (int, "int")
            ok = isinstance(value, numbers.Integral if want_int else numbers.Real)
            if not ok or isinstance(value, bool):
                kind = "an integer" if want_int else "a number"
                raise ValueError(f"{f.name} must be {kind}, got {value!r}")
            if not want_int and not math.isfinite(value):
                raise ValueError(f"{f.name} must be finite, got {value!r}")
        for name in ("n_users", "n_items", "n_clusters", "users_per_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        # item indices are int32
        if self.n_items > 2**31 - 1:
            raise ValueError(f"n_items must be < 2**31, got {self.n_items}")
        if self.n_clusters > self.n_items:
            raise ValueError(
                f"n_clusters must be <= n_items (every cluster needs an item), "
                f"got n_clusters={self.n_clusters}, n_items={self.n_items}"
            )
        for name in ("mean_baskets", "mean_basket_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (every user/basket has one), got {getattr(self, name)}")
        if not 0.0 <= self.affinity <= 1.0:
            raise ValueError(f"affinity must be in [0, 1], got {self.affinity}")
        if self.zipf_a <= 1.0:
            raise ValueError(f"zipf_a must be > 1, got {self.zipf_a}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.start_time < 0:
            raise ValueError(f"start_time must be >= 0, got {self.start_time}")


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=tuple(int(k) for k in key)))


def _n_blocks(cfg: SyntheticConfig) -> int:
    return -(-cfg.n_users // BLOCK_USERS)


# ----------------------------------------------------------------------------- ground truth


def item_clusters(cfg: SyntheticConfig) -> np.ndarray:
    """Cluster of each item (int32, length n_items); cluster sizes differ by at most one."""
    perm = _rng(cfg.seed, _STREAM_ITEM_CLUSTER).permutation(cfg.n_items)
    return (perm % cfg.n_clusters).astype(np.int32)


def item_popularity_rank(cfg: SyntheticConfig) -> np.ndarray:
    """Global popularity rank of each item (int32 permutation of 0..n_items-1; 0 = most popular)."""
    return _rng(cfg.seed, _STREAM_ITEM_RANK).permutation(cfg.n_items).astype(np.int32)


def _user_home_block(cfg: SyntheticConfig, block: int) -> np.ndarray:
    # Always a full block, so a user's home cluster does not depend on n_users.
    return _rng(cfg.seed, _STREAM_USER_HOME, block).integers(0, cfg.n_clusters, size=BLOCK_USERS, dtype=np.int32)


def user_clusters(cfg: SyntheticConfig) -> np.ndarray:
    """Home cluster of each user (int32, length n_users), without generating any event."""
    out = np.empty(cfg.n_users, dtype=np.int32)
    for b in range(_n_blocks(cfg)):
        lo = b * BLOCK_USERS
        hi = min(lo + BLOCK_USERS, cfg.n_users)
        out[lo:hi] = _user_home_block(cfg, b)[: hi - lo]
    return out


# ----------------------------------------------------------------------------- items


def _item_ids(n_items: int) -> pa.Array:
    digits = pa.array(np.arange(n_items, dtype=np.int64)).cast(pa.string())
    return pc.binary_join_element_wise("I", pc.utf8_lpad(digits, width=len(str(n_items)), padding="0"), "")


def _pseudo_words(count: int, rng: np.random.Generator) -> pa.Array:
    """`count` distinct pronounceable words ("kamobe"): distinct integers spelled in syllables."""
    n_syl = len(_SYLLABLES)
    length = 2
    # A sparse draw keeps Generator.choice(replace=False) on its fast path and words varied.
    while n_syl**length < 8 * count:
        length += 1
    codes = rng.choice(n_syl**length, size=count, replace=False)
    words = _SYLLABLES[codes % n_syl]
    for _ in range(length - 1):
        codes //= n_syl
        words = np.char.add(words, _SYLLABLES[codes % n_syl])
    return pa.array(words, type=pa.string())


def _descriptions(cfg: SyntheticConfig, clusters: np.ndarray) -> pa.Array:
    rng = _rng(cfg.seed, _STREAM_ITEM_TEXT)
    n, k = cfg.n_items, _WORDS_PER_CLUSTER
    vocab = _pseudo_words(cfg.n_clusters * k + _NOISE_WORDS, rng)
    noise0 = cfg.n_clusters * k
    first = rng.integers(0, k, size=n)
    # a different second word of the same cluster: "red red mug" carries no extra signal
    second = (first + rng.integers(1, k, size=n)) % k if k > 1 else first
    base = clusters.astype(np.int64) * k
    lead_noise = noise0 + rng.integers(0, _NOISE_WORDS, size=n)
    tail_noise = noise0 + rng.integers(0, _NOISE_WORDS, size=n)
    no_tail = rng.random(n) < 0.5
    return pc.binary_join_element_wise(
        vocab.take(pa.array(lead_noise)),
        vocab.take(pa.array(base + first)),
        vocab.take(pa.array(base + second)),
        vocab.take(pa.array(tail_noise, mask=no_tail)),
        " ",
        null_handling="skip",
    )


def _prices(cfg: SyntheticConfig, clusters: np.ndarray) -> np.ndarray:
    rng = _rng(cfg.seed, _STREAM_ITEM_PRICE)
    cluster_log_mean = rng.normal(math.log(8.0), 0.8, size=cfg.n_clusters)
    log_price = cluster_log_mean[clusters] + rng.normal(0.0, 0.35, size=cfg.n_items)
    return np.maximum(np.round(np.exp(log_price), 2), 0.01)


def _item_table(cfg: SyntheticConfig, ids: pa.Array, clusters: np.ndarray) -> pa.Table:
    return pa.Table.from_arrays(
        [ids, _descriptions(cfg, clusters), pa.array(_prices(cfg, clusters))], schema=ITEM_SCHEMA
    )


def item_table(cfg: SyntheticConfig) -> pa.Table:
    """The item catalogue: all n_items items in id order (ITEM_SCHEMA)."""
    return _item_table(cfg, _item_ids(cfg.n_items), item_clusters(cfg))


# ----------------------------------------------------------------------------- events


class _ItemSampler:
    """Draws items from per-cluster Zipf laws or the global one with a single searchsorted.

    Segments 0..C-1 hold each cluster's items in popularity order, segment C all items.
    Segment s's CDF is shifted to (s, s + 1], so one sorted array serves every law and a
    draw from segment s is ``searchsorted(cdf, s + u)``. Memory: 2 * n_items of float64 +
    int32.
    """

    def __init__(self, cfg: SyntheticConfig, clusters: np.ndarray, rank: np.ndarray):
        n, c = cfg.n_items, cfg.n_clusters
        by_cluster = np.lexsort((rank, clusters))
        by_rank = np.argsort(rank)
        self.items = np.concatenate([by_cluster, by_rank]).astype(np.int32)
        seg_sizes = np.append(np.bincount(clusters, minlength=c), n)
        seg_start = np.cumsum(seg_sizes) - seg_sizes
        seg_of = np.repeat(np.arange(c + 1), seg_sizes)
        weight = (np.arange(2 * n, dtype=np.float64) - seg_start[seg_of] + 1.0) ** -cfg.zipf_a
        seg_total = np.add.reduceat(weight, seg_start)
        cum = np.cumsum(weight)
        cum -= (cum[seg_start] - weight[seg_start])[seg_of]
        self.cdf = seg_of + cum / seg_total[seg_of]
        self.seg_last = seg_start + seg_sizes - 1
        # exact segment ends keep rounding from leaking a draw into the next segment's range
        self.cdf[self.seg_last] = np.arange(1, c + 2, dtype=np.float64)
        self.global_segment = c

    def sample(self, segment: np.ndarray, u: np.ndarray) -> np.ndarray:
        x = segment + u
        # With sorted keys searchsorted narrows each search from the previous hit, so it no
        # longer walks a cache-missing path down a multi-MB CDF per draw: 3-4x faster at
        # 1M items, argsort included. The result is identical.
        order = np.argsort(x)
        pos = np.empty(len(x), dtype=np.intp)
        pos[order] = np.searchsorted(self.cdf, x[order], side="right")
        # s + u can round up to s + 1 for u just below 1
        np.minimum(pos, self.seg_last[segment], out=pos)
        return self.items[pos]


class _Block(NamedTuple):
    user: np.ndarray  # int64, global user id per event
    item: np.ndarray  # int32 item index per event
    timestamp: np.ndarray  # int64
    invoice: np.ndarray  # int64
    n_baskets: int


def _events_block(cfg: SyntheticConfig, sampler: _ItemSampler, block: int, invoice0: int) -> _Block:
    """Events of users [block * BLOCK_USERS, ...), truncated to n_users.

    Draws are always made for a full block so that a user's events do not depend on n_users
    (the last block wastes at most BLOCK_USERS users' worth of work).
    """
    rng = _rng(cfg.seed, _STREAM_EVENTS, block)
    home = _user_home_block(cfg, block)
    b = BLOCK_USERS
    n_baskets = rng.geometric(1.0 / cfg.mean_baskets, size=b)
    total_baskets = int(n_baskets.sum())
    sizes = rng.poisson(cfg.mean_basket_size - 1.0, size=total_baskets) + 1
    start = rng.integers(0, _TIME_WINDOW_S, size=b)
    gaps = rng.exponential(_MEAN_GAP_S, size=total_baskets).astype(np.int64) + 1
    n_events = int(sizes.sum())
    affine = rng.random(n_events) < cfg.affinity
    u = rng.random(n_events)

    # Per-user running sums via one cumsum over the block: each user's first "gap" is its
    # start offset, and subtracting the cumsum before the user's first basket restarts it.
    user_of_basket = np.repeat(np.arange(b, dtype=np.int32), n_baskets)
    first_basket = np.cumsum(n_baskets) - n_baskets
    gaps[first_basket] = start
    ts = np.cumsum(gaps)
    ts -= (ts[first_basket] - start)[user_of_basket]
    ts += cfg.start_time

    basket_of_event = np.repeat(np.arange(total_baskets, dtype=np.int64), sizes)
    user_of_event = user_of_basket[basket_of_event]
    segment = np.where(affine, home[user_of_event], sampler.global_segment)
    item = sampler.sample(segment, u)

    n_real = min(b, cfg.n_users - block * b)
    if n_real < b:
        keep_baskets = int(first_basket[n_real])
        keep_events = int(sizes[:keep_baskets].sum())
    else:
        keep_baskets, keep_events = total_baskets, n_events
    user = user_of_event[:keep_events].astype(np.int64)
    user += block * b
    basket_of_event = basket_of_event[:keep_events]
    return _Block(
        user=user,
        item=item[:keep_events],
        timestamp=ts[basket_of_event],
        invoice=basket_of_event + invoice0,
        n_baskets=keep_baskets,
    )


def _chunk_table(pieces: list[tuple[np.ndarray, ...]], ids: pa.Array) -> pa.Table:
    # Chunked columns over zero-copy NumPy buffers: no concatenation copy per chunk.
    return pa.Table.from_arrays(
        [
            pa.chunked_array([pa.array(p[0]) for p in pieces], pa.int64()),
            pa.chunked_array([ids.take(pa.array(p[1])) for p in pieces], pa.string()),
            pa.chunked_array([pa.array(p[2]) for p in pieces], pa.int64()),
            pa.chunked_array([pa.array(p[3]) for p in pieces], pa.int64()),
        ],
        schema=INTERACTION_SCHEMA,
    )


def _interaction_chunks(cfg: SyntheticConfig, ids: pa.Array, clusters: np.ndarray) -> Iterator[pa.Table]:
    sampler = _ItemSampler(cfg, clusters, item_popularity_rank(cfg))
    invoice0 = 0
    pending: list[tuple[np.ndarray, ...]] = []
    chunk_end = min(cfg.users_per_chunk, cfg.n_users)
    for block in range(_n_blocks(cfg)):
        blk = _events_block(cfg, sampler, block, invoice0)
        invoice0 += blk.n_baskets
        arrays = blk[:4]
        lo = block * BLOCK_USERS
        hi = min(lo + BLOCK_USERS, cfg.n_users)
        while True:
            if hi < chunk_end:
                pending.append(arrays)
                break
            cut = int(np.searchsorted(arrays[0], chunk_end))
            pending.append(tuple(a[:cut] for a in arrays))
            yield _chunk_table(pending, ids)
            pending = []
            arrays = tuple(a[cut:] for a in arrays)
            lo = chunk_end
            chunk_end = min(chunk_end + cfg.users_per_chunk, cfg.n_users)
            if lo >= hi:
                break


def interaction_chunks(cfg: SyntheticConfig) -> Iterator[pa.Table]:
    """Interactions as consecutive tables of `users_per_chunk` users each (the last may be smaller).

    Rows follow INTERACTION_SCHEMA; each user lies in exactly one chunk. Memory is bounded
    by one chunk plus O(n_items), independent of n_users.
    """
    return _interaction_chunks(cfg, _item_ids(cfg.n_items), item_clusters(cfg))


# ----------------------------------------------------------------------------- writing


class _Written(NamedTuple):
    interactions_path: Path
    items_path: Path
    n_interactions: int
    n_items: int


def _write(
    cfg: SyntheticConfig,
    out_dir: str | os.PathLike,
    fmt: str,
    on_chunk: Callable[[int, int], None] | None,
) -> _Written:
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    inter_path = out / f"interactions.{fmt}"
    items_path = out / f"items.{fmt}"
    ids = _item_ids(cfg.n_items)
    clusters = item_clusters(cfg)
    chunks = _interaction_chunks(cfg, ids, clusters)
    items = _item_table(cfg, ids, clusters)

    # Written under a temporary name first: a crash must not leave a truncated file under
    # the final name that a loader would accept.
    tmp_inter = out / f".{inter_path.name}.{os.getpid()}.tmp"
    tmp_items = out / f".{items_path.name}.{os.getpid()}.tmp"
    rows = users = 0
    try:
        if fmt == "parquet":
            with pq.ParquetWriter(tmp_inter, INTERACTION_SCHEMA) as writer:
                for table in chunks:
                    writer.write_table(table, row_group_size=table.num_rows)
                    rows += table.num_rows
                    users = min(users + cfg.users_per_chunk, cfg.n_users)
                    if on_chunk is not None:
                        on_chunk(users, rows)
            pq.write_table(items, tmp_items)
        else:
            codec = "gzip" if fmt == "csv.gz" else None

            def sink(path: Path) -> pa.NativeFile:
                return pa.CompressedOutputStream(str(path), codec) if codec else pa.OSFile(str(path), "wb")

            with sink(tmp_inter) as f, pcsv.CSVWriter(f, INTERACTION_SCHEMA) as writer:
                for table in chunks:
                    writer.write_table(table)
                    rows += table.num_rows
                    users = min(users + cfg.users_per_chunk, cfg.n_users)
                    if on_chunk is not None:
                        on_chunk(users, rows)
            with sink(tmp_items) as f:
                pcsv.write_csv(items, f)
        os.replace(tmp_inter, inter_path)
        os.replace(tmp_items, items_path)
    finally:
        for tmp in (tmp_inter, tmp_items):
            tmp.unlink(missing_ok=True)
    return _Written(inter_path, items_path, rows, items.num_rows)


def write_dataset(
    cfg: SyntheticConfig,
    out_dir: str | os.PathLike,
    fmt: str = "parquet",
    on_chunk: Callable[[int, int], None] | None = None,
) -> tuple[Path, Path]:
    """Write ``<out_dir>/interactions.<fmt>`` and ``<out_dir>/items.<fmt>``; return their paths.

    fmt: "parquet" (one row group per chunk), "csv" or "csv.gz" (gzip). on_chunk(users_done,
    rows_done) is called after each chunk, e.g. for progress reports.
    """
    written = _write(cfg, out_dir, fmt, on_chunk)
    return written.interactions_path, written.items_path


# ----------------------------------------------------------------------------- CLI


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the whole usage block first
        message = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    return value


def _parser() -> argparse.ArgumentParser:
    d = SyntheticConfig()
    p = _OneLineParser(
        prog="python -m recserve.trainer.synthetic",
        description="Generate synthetic implicit-feedback data with planted cluster and popularity structure.",
    )
    p.add_argument("--users", type=_int_at_least(1), required=True, help="number of users")
    p.add_argument("--items", type=_int_at_least(1), required=True, help="number of items")
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--clusters", type=_int_at_least(1), help=f"clusters (default: min({d.n_clusters}, items))")
    p.add_argument("--seed", type=_int_at_least(0), default=d.seed)
    p.add_argument("--format", choices=FORMATS, default="parquet")
    p.add_argument("--affinity", type=_float, default=d.affinity, help="P(event from the home cluster)")
    p.add_argument("--zipf-a", type=_float, default=d.zipf_a, help="popularity exponent (> 1)")
    p.add_argument("--mean-baskets", type=_float, default=d.mean_baskets)
    p.add_argument("--mean-basket-size", type=_float, default=d.mean_basket_size)
    p.add_argument("--start-time", type=_int_at_least(0), default=d.start_time, help="unix seconds")
    p.add_argument("--users-per-chunk", type=_int_at_least(1), default=d.users_per_chunk)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        cfg = SyntheticConfig(
            n_users=args.users,
            n_items=args.items,
            n_clusters=args.clusters if args.clusters is not None else min(SyntheticConfig.n_clusters, args.items),
            mean_baskets=args.mean_baskets,
            mean_basket_size=args.mean_basket_size,
            affinity=args.affinity,
            zipf_a=args.zipf_a,
            seed=args.seed,
            start_time=args.start_time,
            users_per_chunk=args.users_per_chunk,
        )
    except ValueError as e:
        parser.error(str(e))
    try:
        written = _write(cfg, args.out, args.format, None)
    except OSError as e:
        print(f"{parser.prog}: error: cannot write to {args.out}: {e}", file=sys.stderr)
        return 1
    print(f"interactions: {written.interactions_path} ({written.n_interactions} rows, {cfg.n_users} users)")
    print(f"items: {written.items_path} ({written.n_items} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
