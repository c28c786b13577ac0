"""`recserve demo`: train on Online Retail, export, serve, query, stop — the README's first command.

    make demo
    recserve demo --data ../shared/data/online-retail --work build/demo [--epochs 3]

Each step prints what it does. The server runs as a real `recserve serve` process on a free
port and is stopped with SIGTERM (a graceful drain) at the end.
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


def _start_server(repo: Path):
    from recserve.server.process import start_server_process

    return start_server_process([sys.executable, "-m", "recserve.cli", "serve", "--repository", str(repo),
                                 "--host", "localhost", "--port", "0"])


def run_demo(data: Path, work: Path, epochs: int) -> None:
    from recserve.clients import RecommendClient
    from recserve.features.logs import data_attribution
    from recserve.trainer.config import TrainConfig
    from recserve.trainer.data import user_records
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

    _step("starting `recserve serve` (graceful stop with SIGTERM at the end)")
    server, port = _start_server(repo)
    print(f"serving on localhost:{port} (pid {server.pid})")
    try:
        _, _, dataset, _ = load_trained(run)
        users = dataset.split.test_users[:DEMO_USERS]
        records = user_records(dataset, users, cfg.history_len)
        names = _descriptions(items)
        with RecommendClient(f"localhost:{port}") as client:
            for record in records:
                recent = record["history"]
                _step(f"Recommend(user {record['user_id']}, k={DEMO_K}) — recently bought: "
                      + "; ".join(names.get(i, i) for i in recent[:3]) + (" ..." if len(recent) > 3 else ""))
                started = time.perf_counter()
                rec = client.recommend("retail", record["user_id"], k=DEMO_K, recent_items=recent, timeout=10)
                ms = (time.perf_counter() - started) * 1e3
                for rank, (item_id, score) in enumerate(rec, 1):
                    print(f"  {rank}. {item_id:<8} {names.get(item_id, ''):<40} score {score:.3f}")
                print(f"  (model {rec.model} v{rec.version}, {ms:.1f} ms)")
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
