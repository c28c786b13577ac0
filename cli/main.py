"""The ``recserve`` command line.

    recserve train runs/retail --interactions data/interactions.csv.gz --items data/items.csv.gz
    recserve train runs/retail --resume
    recserve evaluate runs/retail [--baselines popularity,mf] [--test heldout.csv]
    recserve export runs/retail --repository models --model retail [--backend onnx,tensorrt]
    recserve serve --repository models [--port 8500] [--config serve.json]
    recserve recommend 17850 --model retail [--target localhost:8500] [--k 10] [--recent 85123A,71053]
    recserve demo [--data ../shared/data/online-retail] [--work build/demo]
    torchrun --nproc_per_node=2 -m recserve.cli.main train ...

Each verb imports its implementation lazily (only train/evaluate/export load torch). Errors
print one line, ``recserve <verb>: error: ...``, and exit with status 1 (2 for bad usage).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _cmd_train(args) -> None:
    from recserve.trainer.config import TrainConfig
    from recserve.trainer.train import CONFIG, train

    run = Path(args.run)
    overrides = {k: v for k, v in {
        "interactions": args.interactions, "items": args.items, "epochs": args.epochs,
        "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "split": args.split,
        "model": args.model, "threads": args.threads,
    }.items() if v is not None}
    if args.resume:
        if not (run / CONFIG).exists():
            raise CliError(f"{run}: nothing to resume (no {CONFIG})")
        if args.config or set(overrides) - {"epochs"}:
            raise CliError("--resume continues with the run's own config; only --epochs may change")
        cfg = TrainConfig.from_json(run / CONFIG).replace(**overrides)
    else:
        base = TrainConfig.from_json(args.config).to_dict() if args.config else {}
        base.update(overrides)
        if "interactions" not in base:
            raise CliError("--interactions is required (or an interactions entry in --config)")
        cfg = TrainConfig.from_dict(base)
    summary = train(cfg, run, resume=args.resume, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return
    final = summary["final"] or {}
    shown = ", ".join(f"{k} {v:.4f}" for k, v in final.get("eval", {}).items())
    print(f"trained {run} ({final.get('epoch', 0)} epochs){': ' + shown if shown else ''}")


def _cmd_evaluate(args) -> None:
    import json

    from recserve.trainer.evaluate import evaluate_run, format_table

    results = evaluate_run(Path(args.run), baselines=_csv(args.baselines),
                           test_path=Path(args.test) if args.test else None, progress=not args.quiet)
    (Path(args.run) / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    print(format_table(results))


def _cmd_export(args) -> None:
    from recserve.trainer.export import export_run

    version = export_run(Path(args.run), Path(args.repository), args.model, backends=_csv(args.backend),
                         log=(lambda *_: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr)))
    print(version)


def _cmd_serve(args) -> None:
    # Kernel threads sleep between batches instead of spinning: a spinning OpenMP team takes
    # the cores the gRPC event loop needs (c=64 throughput +18 % on 2 cores, bench/serve.py).
    # libgomp reads this when the kernels load, so it is set before they are imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import logging

    from recserve.server.app import serve_processes
    from recserve.server.config import ServerConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig.from_sources(args.config, {
        "repository": args.repository, "host": args.host, "port": args.port, "max_k": args.max_k,
        "item_dtype": args.item_dtype, "batching.max_batch_size": args.max_batch_size,
        "batching.max_queue_delay_us": args.max_queue_delay_us, "batching.max_queue_size": args.max_queue_size,
        "batching.inline_compute_us": args.inline_compute_us,
        "engine": args.engine})
    serve_processes(config, args.workers)


def _cmd_recommend(args) -> None:
    import grpc

    from recserve.clients import RecommendClient

    with RecommendClient(args.target) as client:
        try:
            rec = client.recommend(args.model, args.user, k=args.k, recent_items=_csv(args.recent or ""),
                                   exclude=_csv(args.exclude or ""), timeout=args.timeout)
        except grpc.RpcError as e:
            raise CliError(f"{e.code().name}: {e.details()}") from None
    print(f"model {rec.model} version {rec.version}" + (f" variant {rec.variant}" if rec.variant else ""))
    for rank, (item_id, score) in enumerate(rec, 1):
        print(f"{rank:3d}  {item_id:<16} {score: .4f}")


def _cmd_demo(args) -> None:
    from recserve.cli.demo import default_data, run_demo

    run_demo(Path(args.data) if args.data else default_data(), Path(args.work), args.epochs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recserve", description="recserve: train, export and serve recommenders")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("train", help="train a two-tower model (or the MF baseline) into a run directory")
    p.add_argument("run", help="run directory (created)")
    p.add_argument("--interactions", help="interaction log: CSV/Parquet/JSONL with user_id,item_id,timestamp")
    p.add_argument("--items", help="optional item table: item_id[,description][,price|median_unit_price]")
    p.add_argument("--config", help="JSON file of TrainConfig fields; flags override it")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--split", choices=("leave_last_out", "last_basket"))
    p.add_argument("--model", choices=("two_tower", "mf"))
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = verbs.add_parser("evaluate", help="recall/NDCG/MRR of a run and of baselines on held-out data")
    p.add_argument("run")
    p.add_argument("--baselines", default="popularity,mf", help="comma-separated: popularity, mf (or '')")
    p.add_argument("--test", help="held-out user_id,item_id rows (default: the run's own split)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_evaluate)

    p = verbs.add_parser("export", help="publish a run as a new model version in a repository")
    p.add_argument("run")
    p.add_argument("--repository", required=True)
    p.add_argument("--model", required=True, help="model name (letters, digits, '_', '-', '.')")
    p.add_argument("--backend", default="onnx", help="comma-separated: onnx (always), tensorrt")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_export)

    p = verbs.add_parser("serve", help="serve a model repository over gRPC")
    p.add_argument("--repository", help="model repository directory")
    p.add_argument("--config", help="JSON server config; flags override it")
    p.add_argument("--host", help="bind address (default [::])")
    p.add_argument("--port", type=int, help="gRPC port (default 8500; 0: any free port)")
    p.add_argument("--max-k", type=int)
    p.add_argument("--item-dtype", choices=("float32", "float16"))
    p.add_argument("--max-batch-size", type=int)
    p.add_argument("--max-queue-delay-us", type=int)
    p.add_argument("--max-queue-size", type=int)
    p.add_argument("--inline-compute-us", type=int,
                   help="batches measured to cost at most this compute on the event loop (default 500; 0: never)")
    p.add_argument("--engine", choices=("auto", "onnx", "tensorrt"))
    p.add_argument("--workers", type=int, default=1, help="server processes sharing the port (SO_REUSEPORT)")
    p.set_defaults(func=_cmd_serve)

    p = verbs.add_parser("recommend", help="ask a running server for one user's top-k items")
    p.add_argument("user")
    p.add_argument("--model", required=True)
    p.add_argument("--target", default="localhost:8500")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--recent", help="comma-separated recent item ids, newest first")
    p.add_argument("--exclude", help="comma-separated item ids never to return")
    p.add_argument("--timeout", type=float, default=5.0)
    p.set_defaults(func=_cmd_recommend)

    p = verbs.add_parser("demo", help="train on Online Retail, export, serve, query, stop")
    p.add_argument("--data", help="directory with interactions.csv.gz and items.csv.gz "
                                  "(default: ../shared/data/online-retail)")
    p.add_argument("--work", default="build/demo", help="where the run and the model repository go")
    p.add_argument("--epochs", type=int, default=3)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from recserve.features.logs import DataError
    from recserve.server.repository import RepositoryError

    try:
        args.func(args)
    except (CliError, DataError, RepositoryError, ValueError, FileNotFoundError, RuntimeError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"recserve {args.verb}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"recserve {args.verb}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
