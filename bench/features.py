"""Feature-store benchmark: batch reads vs Redis, ingest throughput, live events with readers.

Usage::

    .venv/bin/python bench/features.py            # 100k users, 1M-row ingest (make bench-features)
    .venv/bin/python bench/features.py --small    # a few seconds: 20k users, 100k rows
    .venv/bin/python bench/features.py --users 500000 --reads 20000 --out /tmp/features.md

1. Batch read: 64 random users' features (history of 50 items) per call, p50/p99 over
   ``--reads`` rounds. Each round runs every path once, in a shuffled order, each on its own
   fresh random batch (a path never reads keys another path has just pulled into the CPU
   caches). LMDB ``user_batch`` (columnar: what ``HistoryBuckets`` feeds a model) and
   ``user_records`` (raw records with item-id strings: what ``StoreFeatures`` returns),
   against a real ``redis-server`` on loopback (TCP) holding the same encoded values:
   ``MGET`` of the 64 keys followed by the same decode (``FeatureStore.decode_users``).
   The Redis client is redis-py with the hiredis parser (what a deployment runs), and a
   raw-socket client (one ``sendall`` of a hiredis-packed MGET, hiredis parsing the reply)
   as the floor of any Python Redis client. The component rows (lookups alone, MGET alone,
   the decode alone, ``records()`` alone) say where the time goes, and a pair of rows reads
   users with histories of 1..50 items (values of mixed sizes: the general decode). Then
   four rows again back to back (each alone in alternating blocks of 25 calls), to show what
   the interleaving costs each side.
   Target (issue 5): LMDB at least 5x faster than Redis at p50.
2. Ingest: ``ingest_interactions`` of a generated ``--rows`` interaction log (Parquet; 20
   events per user), read + derive (``history_at_end``) + chunked synced writes, rows/s.
3. Live events: ``push_events`` calls of 1 and of 256 events (one synced transaction per
   call) for ``--push-seconds`` each while ``--readers`` threads read batches
   (``user_records``); events/s and the readers' p50/p99 meanwhile.

Needs ``redis-server`` on PATH (``make bench-features`` installs Debian's package) and the
``redis`` and ``hiredis`` clients (the ``bench`` extra). Prints Markdown and writes ``--out``.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recserve.features.encoding import EVENT_COUNT, HISTORY, LAST_SEEN, USERS
from recserve.features.ingest import ingest_interactions
from recserve.features.store import FeatureStore

RATIO_TARGET = 5.0
T0 = 1_700_000_000


def percentiles(seconds: list[float]) -> tuple[float, float]:
    us = np.asarray(seconds) * 1e6
    return float(np.percentile(us, 50)), float(np.percentile(us, 99))


def build_store(path: Path, users: int, items: int, history: int, seed: int, mixed: int = 0) -> FeatureStore:
    """A users view of ``users`` users with ``history`` distinct items each (``user...``),
    and ``mixed`` users with 1..``history`` items (``mix...``)."""
    store = FeatureStore.open(path, create=True, max_history=history)
    codes = store.assign_item_codes([f"I{i:07d}" for i in range(items)])
    view, now, rng = store.view(USERS), store.now(), np.random.default_rng(seed)
    for prefix, count, lengths in (("user", users, None), ("mix", mixed, (1, history + 1))):
        for lo in range(0, count, 20_000):
            pairs = []
            for u in range(lo, min(lo + 20_000, count)):
                n = history if lengths is None else int(rng.integers(*lengths))
                hist = codes[rng.choice(items, n, replace=False)]
                pairs.append((f"{prefix}{u:08d}".encode(), view.encode({HISTORY: hist, EVENT_COUNT: 2 * n,
                                                                          LAST_SEEN: T0}, now)))
            store.bulk_put(USERS, pairs)
    return store


class RawMget:
    """The thinnest MGET a Python process can make: one ``sendall`` of a hiredis-packed
    command, ``recv`` until hiredis has parsed the whole reply (no pool, no callbacks)."""

    def __init__(self, port: int):
        import hiredis

        self._pack = hiredis.pack_command
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = hiredis.Reader()

    def mget(self, keys) -> list:
        self.sock.sendall(self._pack(("MGET", *keys)))
        reader, recv = self.reader, self.sock.recv
        while (reply := reader.gets()) is False:
            reader.feed(recv(1 << 16))
        return reply


class RedisServer:
    """redis-server on a free loopback port, no persistence; stopped by pid on exit."""

    def __init__(self, binary: str):
        if shutil.which(binary) is None:
            raise SystemExit(f"{binary} not found: `make bench-features` installs it (apt-get install redis-server)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        self.client = redis.Redis(host="127.0.0.1", port=self.port)
        for _ in range(200):
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.02)
        else:
            raise SystemExit("redis-server did not start")
        self.version = self.client.info()["redis_version"]
        self.raw = RawMget(self.port)

    def load(self, store: FeatureStore) -> int:
        """The store's encoded users values, byte for byte, under the same keys."""
        env, db = store._env, store._dbs[USERS]  # the benchmark copies the raw values
        pipe, n = self.client.pipeline(transaction=False), 0
        with env.begin(db=db) as txn:
            for key, value in txn.cursor():
                pipe.set(key, value)
                n += 1
                if n % 10_000 == 0:
                    pipe.execute()
        pipe.execute()
        return n

    def stop(self) -> None:
        self.raw.sock.close()
        self.proc.terminate()
        self.proc.wait(10)


RECORDS, COLUMNAR = "LMDB user_records", "LMDB user_batch (columnar)"
REDIS_RECORDS, REDIS_COLUMNAR = "Redis MGET + same decode (records)", "Redis MGET + same decode (columnar)"
RAW_COLUMNAR = "Redis MGET, raw socket + same decode (columnar)"
MIXED, REDIS_MIXED = "LMDB user_batch, histories of 1..50", "Redis MGET + same decode, histories of 1..50"
LOOKUPS, MGET, RAW_MGET = "LMDB lookups only (get_values)", "Redis MGET only", "Redis MGET only, raw socket"
DECODE, TO_RECORDS = "decode only (decode_users, values in hand)", "records() only (a decoded batch in hand)"
BACK_TO_BACK = "back to back: "
BLOCK, BLOCK_WARMUP = 25, 5


def bench_reads(store: FeatureStore, redis: RedisServer, users: int, mixed: int, batch: int, reads: int,
                seed: int) -> dict:
    rng = random.Random(seed)
    ids = [f"user{u:08d}" for u in range(users)]
    mixed_ids = [f"mix{u:08d}" for u in range(mixed)]
    client, raw, decode = redis.client, redis.raw, store.decode_users

    def same(b):
        return b

    def values(b):  # untimed setup of the decode-only row
        return b, raw.mget(b)

    # name: (user pool, untimed setup(batch) -> arg, timed fn(arg))
    paths = {
        COLUMNAR: (ids, same, store.user_batch),
        REDIS_COLUMNAR: (ids, same, lambda b: decode(b, client.mget(b))),
        RAW_COLUMNAR: (ids, same, lambda b: decode(b, raw.mget(b))),
        RECORDS: (ids, same, store.user_records),
        REDIS_RECORDS: (ids, same, lambda b: decode(b, client.mget(b)).records()),
        LOOKUPS: (ids, lambda b: [u.encode() for u in b], lambda k: store.get_values(USERS, k)),
        MGET: (ids, same, client.mget),
        RAW_MGET: (ids, same, raw.mget),
        DECODE: (ids, values, lambda a: decode(*a)),
        TO_RECORDS: (ids, store.user_batch, lambda batch_: batch_.records()),
    }
    if mixed:
        paths[MIXED] = (mixed_ids, same, store.user_batch)
        paths[REDIS_MIXED] = (mixed_ids, same, lambda b: decode(b, client.mget(b)))
    # Same result from both sources (a benchmark of different answers would mean nothing).
    for pool in (ids, mixed_ids) if mixed else (ids,):
        b = rng.sample(pool, batch)
        assert store.user_records(b) == decode(b, client.mget(b)).records() == decode(b, raw.mget(b)).records()
    times = {name: [] for name in paths}
    names = list(paths)
    for i in range(reads + 200):  # the first 200 rounds warm up
        rng.shuffle(names)
        for name in names:
            pool, setup, fn = paths[name]
            arg = setup(rng.sample(pool, batch))
            t0 = time.perf_counter()
            fn(arg)
            if i >= 200:
                times[name].append(time.perf_counter() - t0)
    out = {name: percentiles(t) for name, t in times.items()}
    # Back to back: one path alone for a run of calls (nothing else between two calls, as in
    # a process that only does this), to show what the interleaving costs each side. Blocks
    # of BLOCK calls, the paths' blocks alternating in a shuffled order (so load changes on
    # the machine hit every path alike); the first calls of each block warm it up.
    b2b = [COLUMNAR, REDIS_COLUMNAR, LOOKUPS, MGET]
    runs = {name: [] for name in b2b}
    for _ in range(max(1, min(reads, 2000) // (BLOCK - BLOCK_WARMUP))):
        rng.shuffle(b2b)
        for name in b2b:
            pool, setup, fn = paths[name]
            for j in range(BLOCK):
                arg = setup(rng.sample(pool, batch))
                t0 = time.perf_counter()
                fn(arg)
                if j >= BLOCK_WARMUP:
                    runs[name].append(time.perf_counter() - t0)
    for name, t in runs.items():
        out[BACK_TO_BACK + name] = percentiles(t)
    return out


def write_log(path: Path, rows: int, items: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    users = max(1, rows // 20)
    user = np.sort(rng.integers(0, users, rows))
    item = np.minimum(rng.zipf(1.3, rows) - 1, items - 1)
    ts = T0 - 86_400 * 365 + rng.integers(0, 86_400 * 365, rows)
    pq.write_table(pa.table({"user_id": pa.array([f"c{u:07d}" for u in user]),
                             "item_id": pa.array([f"I{i:07d}" for i in item]), "timestamp": ts}), path)
    return path


def bench_ingest(work: Path, rows: int, items: int, history: int, seed: int) -> dict:
    log = write_log(work / "log.parquet", rows, items, seed)
    with FeatureStore.open(work / "ingest", create=True, max_history=history) as store:
        t0 = time.perf_counter()
        report = ingest_interactions(store, log, progress=False)
        seconds = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in (work / "ingest").iterdir())
    return {"rows": report.rows, "users": report.total, "seconds": seconds, "rows_per_s": report.rows / seconds,
            "store_mb": size / 2**20}


def bench_push(store: FeatureStore, users: int, items: int, batch: int, readers: int, seconds: float,
               seed: int) -> list[dict]:
    ids = [f"user{u:08d}" for u in range(users)]
    out = []
    for per_call in (1, 256):
        stop, lat = threading.Event(), [[] for _ in range(readers)]

        def read(slot: int) -> None:
            rng = random.Random(seed + slot)
            while not stop.is_set():
                b = rng.sample(ids, batch)
                t0 = time.perf_counter()
                store.user_records(b)
                lat[slot].append(time.perf_counter() - t0)

        threads = [threading.Thread(target=read, args=(i,)) for i in range(readers)]
        for t in threads:
            t.start()
        rng, pushed, calls = np.random.default_rng(seed), 0, 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            us, its = rng.integers(0, users, per_call), rng.integers(0, items, per_call)
            pushed += store.push_events([(ids[u], f"I{i:07d}", T0, "click") for u, i in zip(us, its)])
            calls += 1
        elapsed = time.perf_counter() - t0
        stop.set()
        for t in threads:
            t.join()
        p50, p99 = percentiles([x for slot in lat for x in slot]) if any(lat) else (float("nan"),) * 2
        out.append({"per_call": per_call, "events_per_s": pushed / elapsed, "calls_per_s": calls / elapsed,
                    "reads": sum(map(len, lat)), "read_p50": p50, "read_p99": p99})
    return out


def report(args, reads: dict, ingest: dict, push: list[dict], redis_version: str) -> str:
    import hiredis
    import lmdb
    import redis

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    parser = "hiredis" if getattr(redis.utils, "HIREDIS_AVAILABLE", False) else "pure-Python"
    p50 = {name: v[0] for name, v in reads.items()}
    col, rec = p50[REDIS_COLUMNAR] / p50[COLUMNAR], p50[REDIS_RECORDS] / p50[RECORDS]
    floor = p50[RAW_COLUMNAR] / p50[COLUMNAR]

    def verdict(ratio: float) -> str:
        return "met" if ratio >= RATIO_TARGET else "NOT met"

    order = [COLUMNAR, REDIS_COLUMNAR, RAW_COLUMNAR, RECORDS, REDIS_RECORDS, MIXED, REDIS_MIXED, LOOKUPS, MGET,
             RAW_MGET, DECODE, TO_RECORDS]
    lines = [
        "## Feature store: LMDB vs Redis, ingest, live events",
        "",
        f"Machine: {cpu}, {os.cpu_count()} cores. py-lmdb {lmdb.__version__} (LMDB {'.'.join(map(str, lmdb.version()))}),"
        f" redis-server {redis_version} on 127.0.0.1 (TCP), redis-py {redis.__version__} ({parser} parser),"
        f" hiredis {hiredis.__version__}.",
        f"Command: `.venv/bin/python bench/features.py{''.join(' ' + a for a in args.argv)}`",
        "",
        f"### Batch read: {args.batch} random users of {args.users:,}, history {args.history}, {args.reads:,} rounds",
        "",
        "Every round runs each row once, in a shuffled order, each on its own random batch. Redis holds the "
        "same encoded values; its rows run the same decode (`FeatureStore.decode_users`).",
        "",
        "| path | p50 (us) | p99 (us) |",
        "|---|---:|---:|",
        *[f"| {name} | {reads[name][0]:.0f} | {reads[name][1]:.0f} |" for name in order if name in reads],
        "",
        f"Back to back (each path alone in blocks of {BLOCK} calls, the first {BLOCK_WARMUP} of a block not "
        f"counted, the paths' blocks alternating; nothing else runs between two calls of a block):",
        "",
        "| path | p50 (us) | p99 (us) |",
        "|---|---:|---:|",
        *[f"| {name[len(BACK_TO_BACK):]} | {v[0]:.0f} | {v[1]:.0f} |" for name, v in reads.items()
          if name.startswith(BACK_TO_BACK)],
        "",
        f"Back to back, columnar: {p50[BACK_TO_BACK + REDIS_COLUMNAR] / p50[BACK_TO_BACK + COLUMNAR]:.1f}x.",
        "",
        f"p50 speed-up of LMDB over Redis (redis-py + hiredis): **columnar {col:.1f}x** (target {RATIO_TARGET:.0f}x: "
        f"{verdict(col)}), records {rec:.1f}x ({verdict(rec)}); over the raw-socket client, the floor of any "
        f"Python Redis client: columnar {floor:.1f}x."
        + (f" Mixed history lengths (1..{args.history}): {p50[REDIS_MIXED] / p50[MIXED]:.1f}x." if MIXED in p50 else ""),
        "",
        f"Where the columnar time goes (p50): LMDB lookups {p50[LOOKUPS]:.0f} us (64 random B-tree lookups in one "
        f"read txn) + decode {p50[DECODE]:.0f} us, against MGET {p50[MGET]:.0f} us (raw socket {p50[RAW_MGET]:.0f} us) "
        f"+ the same decode. The records path adds `records()` ({p50[TO_RECORDS]:.0f} us: "
        f"{args.batch * args.history:,} item-id strings and {args.batch} dicts) to both sides, which bounds its ratio.",
        "",
        f"### Ingest: {ingest['rows']:,} interaction rows ({ingest['users']:,} users) from Parquet",
        "",
        f"{ingest['seconds']:.2f} s end to end (read, derive with history_at_end, chunked synced writes): "
        f"**{ingest['rows_per_s']:,.0f} rows/s**; store {ingest['store_mb']:.0f} MiB.",
        "",
        f"### push_events with {args.readers} reader threads ({args.push_seconds:g} s per row)",
        "",
        "| events per call | events/s | calls/s | reader p50 (us) | reader p99 (us) | reads |",
        "|---:|---:|---:|---:|---:|---:|",
        *[f"| {p['per_call']} | {p['events_per_s']:,.0f} | {p['calls_per_s']:,.0f} | {p['read_p50']:.0f} | "
          f"{p['read_p99']:.0f} | {p['reads']:,} |" for p in push],
        "",
        "Each call is one write transaction synced to disk (acknowledged = durable).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="a quick run: 20k (+5k mixed) users, 100k rows, "
                                                                "1000 reads")
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--history", type=int, default=50)
    parser.add_argument("--mixed", type=int, default=20_000, help="extra users with 1..history items")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reads", type=int, default=5000)
    parser.add_argument("--rows", type=int, default=1_000_000, help="interaction rows for the ingest benchmark")
    parser.add_argument("--readers", type=int, default=2)
    parser.add_argument("--push-seconds", type=float, default=5.0)
    parser.add_argument("--redis-server", default="redis-server")
    parser.add_argument("--work", help="scratch directory (default: a temp dir, removed)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "features.md"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    if args.small:
        args.users, args.items, args.rows, args.reads, args.push_seconds = 20_000, 20_000, 100_000, 1000, 2.0
        args.mixed = 5_000
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-features-"))
    work.mkdir(parents=True, exist_ok=True)
    redis = RedisServer(args.redis_server)
    try:
        store = build_store(work / "serve", args.users, args.items, args.history, args.seed, args.mixed)
        redis.load(store)
        reads = bench_reads(store, redis, args.users, args.mixed, args.batch, args.reads, args.seed)
        push = bench_push(store, args.users, args.items, args.batch, args.readers, args.push_seconds, args.seed)
        store.close()
        ingest = bench_ingest(work, args.rows, args.items, args.history, args.seed)
    finally:
        redis.stop()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    text = report(args, reads, ingest, push, redis.version)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
