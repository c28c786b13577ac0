"""`recserve demo`: train on Online Retail, export, ingest features, serve, query, stop.

    make demo
    recserve demo --data ../shared/data/online-retail --work build/demo [--epochs 3]

Each step prints what it does: train a two-tower model, publish it to a model repository,
load every customer's recent purchases into an LMDB feature store, start a real
`recserve serve` process on a free port, ask it for a few customers' recommendations by
customer id alone (the server reads their history from the store), send a live purchase
event and show the recommendations move, then stop the server with SIGTERM (a graceful
drain).
"""

from __future__ import annotations

import csv
import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

DEMO_USERS = 3
DEMO_K = 5


def _step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def _descriptions(items_path: Path) -> dict[str, str]:
    opener = gzip.open if items_path.name.endswith(".gz") else open
    with opener(items_path, "rt", newline="") as f:
        return {row["item_id"]: row.get("description") or "" for row in csv.DictReader(f)}


def _start_server(repo: Path, store: Path):
    from recserve.server.process import start_server_process

    return start_server_process([sys.executable, "-m", "recserve.cli", "serve", "--repository", str(repo),
                                 "--host", "localhost", "--port", "0", "--metrics-port", "0",
                                 "--feature-store", str(store)])


def _show(rec, names: dict[str, str], ms: float) -> None:
    for rank, (item_id, score) in enumerate(rec, 1):
        print(f"  {rank}. {item_id:<8} {names.get(item_id, ''):<40} score {score:.3f}")
    print(f"  (model {rec.model} v{rec.version}, {ms:.1f} ms)")


def run_demo(data: Path, work: Path, epochs: int) -> None:
    from recserve.clients import FeatureClient, RecommendClient
    from recserve.features.ingest import ingest_interactions
    from recserve.features.logs import data_attribution
    from recserve.features.store import FeatureStore
    from recserve.trainer.config import TrainConfig
    from recserve.trainer.export import export_run
    from recserve.trainer.train import load_trained, train

    interactions, items = data / "interactions.csv.gz", data / "items.csv.gz"
    for path in (interactions, items):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: demo data not found (pass --data DIR)")
    print("Data: UCI Online Retail (CC BY 4.0).")
    print(data_attribution(interactions) or "")

    run, repo = work / "run", work / "models"
    _step(f"training a two-tower model for {epochs} epochs on {interactions.name} -> {run}")
    cfg = TrainConfig(interactions=str(interactions), items=str(items), epochs=epochs)
    summary = train(cfg, run, progress=sys.stderr.isatty())
    final = summary["final"]["eval"]
    print(f"held-out recall@20 {final['recall@20']:.3f}, ndcg@20 {final['ndcg@20']:.3f}")

    _step(f"exporting to the model repository {repo}")
    version = export_run(run, repo, "retail", log=lambda msg: print(f"    {msg}"))
    print(f"published retail version {version}")

    store = work / "features.lmdb"
    _step(f"loading every customer's recent purchases into the feature store {store}")
    with FeatureStore.open(store, create=True, max_history=cfg.history_len) as fs:
        report = ingest_interactions(fs, interactions, progress=False)
    print(f"    {report.summary()}")

    _step("starting `recserve serve` (graceful stop with SIGTERM at the end)")
    server, port = _start_server(repo, store)
    print(f"serving on localhost:{port} (pid {server.pid})")
    try:
        _, _, dataset, _ = load_trained(run)
        users = [str(dataset.user_ids[u]) for u in dataset.split.test_users[:DEMO_USERS]]
        names = _descriptions(items)
        with FeatureStore.open(store) as fs:  # read-only look, for the printout
            histories = {r["user_id"]: r["history"] for r in fs.user_records(users)}
        with RecommendClient(f"localhost:{port}") as client, FeatureClient(f"localhost:{port}") as features:
            first = None
            for user in users:
                recent = histories[user]
                _step(f"Recommend(user {user}, k={DEMO_K}) — the store says they recently bought: "
                      + "; ".join(names.get(i, i) for i in recent[:3]) + (" ..." if len(recent) > 3 else ""))
                started = time.perf_counter()
                rec = client.recommend("retail", user, k=DEMO_K, timeout=10)
                _show(rec, names, (time.perf_counter() - started) * 1e3)
                first = first or rec
            user, bought = users[0], first.item_ids[0]
            _step(f"PushEvents: user {user} buys {bought} ({names.get(bought, '')}); Recommend again")
            features.push([(user, bought, time.time(), "purchase")], timeout=10)
            started = time.perf_counter()
            rec = client.recommend("retail", user, k=DEMO_K, exclude=[bought], timeout=10)
            _show(rec, names, (time.perf_counter() - started) * 1e3)
    finally:
        _step("stopping the server (SIGTERM: drain, then exit)")
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            code = server.wait()
        print(f"server exited with status {code}")
    if code != 0:
        raise RuntimeError(f"the server exited with status {code}")


def default_data() -> Path:
    return Path(os.environ.get("RECSERVE_DEMO_DATA", Path.cwd().parent / "shared" / "data" / "online-retail"))
