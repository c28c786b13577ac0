"""The ``recserve`` command line.

    recserve train runs/retail --interactions data/interactions.csv.gz --items data/items.csv.gz
    recserve train runs/retail --resume
    recserve evaluate runs/retail [--baselines popularity,mf] [--test heldout.csv]
    recserve export runs/retail --repository models --model retail [--backend onnx,tensorrt]
    recserve publish model.onnx --repository models --model resnet [--sample inputs.npz | --no-golden]
    recserve serve --repository models [--port 8500] [--config serve.json] [--device cuda]
    recserve recommend 17850 --model retail [--target localhost:8500] [--k 10] [--recent 85123A,71053]
    recserve push 17850 85123A 71053 --type click [--target localhost:8500]
    recserve models list|load|unload|split [MODEL] [--version N] [--split split.json] --token-file admin-token
    recserve demo [--data ../shared/data/online-retail] [--work build/demo]
    recserve features ingest --store features.lmdb --view users --input interactions.csv.gz
    recserve features ingest --store features.lmdb --view items --input items.csv.gz
    recserve features snapshot --store features.lmdb --out replica.lmdb
    recserve features info --store features.lmdb
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


def _add_client_args(p: argparse.ArgumentParser) -> None:
    """--target and the TLS flags of the verbs that call a running server."""
    p.add_argument("--target", default="localhost:8500")
    p.add_argument("--tls-ca", help="PEM CA bundle to verify the server (turns TLS on)")
    p.add_argument("--tls-cert", help="client certificate (PEM) for mutual TLS")
    p.add_argument("--tls-key", help="its private key (PEM)")


def _channel_options(args):
    from recserve.clients import ChannelOptions

    return ChannelOptions(tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key)


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


def _cmd_publish(args) -> None:
    from recserve.server.generic import publish_onnx

    if args.sample and args.no_golden:
        raise CliError("--sample and --no-golden exclude each other")
    version = publish_onnx(Path(args.onnx), Path(args.repository), args.model,
                           sample=Path(args.sample) if args.sample else None, golden=not args.no_golden,
                           log=(lambda *_: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr)))
    print(version)


def _cmd_serve(args) -> None:
    # Kernel threads sleep between batches instead of spinning: a spinning OpenMP team takes
    # the cores the gRPC event loop needs (c=64 throughput +18 % on 2 cores, bench/serve.py).
    # libgomp reads this when the kernels load, so it is set before they are imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from recserve.server.app import serve_processes
    from recserve.server.config import ServerConfig

    config = ServerConfig.from_sources(args.config, {
        "repository": args.repository, "host": args.host, "port": args.port, "max_k": args.max_k,
        "item_dtype": args.item_dtype, "batching.max_batch_size": args.max_batch_size,
        "batching.max_queue_delay_us": args.max_queue_delay_us, "batching.max_queue_size": args.max_queue_size,
        "batching.inline_compute_us": args.inline_compute_us, "poll_interval_s": args.poll_interval_s,
        "admin_token_file": args.admin_token_file, "feature_store": args.feature_store,
        "tls_cert": args.tls_cert, "tls_key": args.tls_key, "tls_client_ca": args.tls_client_ca,
        "trace_exporter": args.trace_exporter, "trace_endpoint": args.trace_endpoint,
        "trace_sample_ratio": args.trace_sample_ratio, "log_format": args.log_format,
        "metrics_port": int(args.metrics_port) if args.metrics_port not in (None, "off") else None,
        "native_port": args.native_port,
        "engine": args.engine, "device": args.device, "cuda_device": args.cuda_device,
        "gpu_engine": args.gpu_engine})
    if args.metrics_port == "off":
        import dataclasses

        config = dataclasses.replace(config, metrics_port=None)
    if config.device == "cuda":  # before anything starts: one line when this machine cannot
        from recserve.server.gpu import require_cuda

        require_cuda(config)
    serve_processes(config, args.workers)


def _cmd_recommend(args) -> None:
    import grpc

    from recserve.clients import RecommendClient

    with RecommendClient(args.target, _channel_options(args)) as client:
        try:
            rec = client.recommend(args.model, args.user, k=args.k, recent_items=_csv(args.recent or ""),
                                   exclude=_csv(args.exclude or ""), timeout=args.timeout)
        except grpc.RpcError as e:
            raise CliError(f"{e.code().name}: {e.details()}") from None
    print(f"model {rec.model} version {rec.version}" + (f" variant {rec.variant}" if rec.variant else ""))
    for rank, (item_id, score) in enumerate(rec, 1):
        print(f"{rank:3d}  {item_id:<16} {score: .4f}")


def _cmd_push(args) -> None:
    import time

    import grpc

    from recserve.clients import FeatureClient

    now = time.time()
    with FeatureClient(args.target, _channel_options(args)) as features:
        try:
            n = features.push([(args.user, item, now, args.type) for item in args.items], timeout=args.timeout)
        except grpc.RpcError as e:
            raise CliError(f"{e.code().name}: {e.details()}") from None
    print(f"{n} event(s) written for user {args.user}")


def _cmd_models(args) -> None:
    import grpc

    from recserve.clients import ModelClient

    token = None
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().splitlines()[0].strip()
        except (OSError, IndexError):
            raise CliError(f"{args.token_file}: cannot read an admin token") from None
    with ModelClient(args.target, token, _channel_options(args)) as admin:
        try:
            if args.action == "list":
                states = admin.list_models(args.model or "")
            elif args.action == "load":
                states = [admin.load(_need(args.model, "load"), args.version)]
            elif args.action == "unload":
                if args.version is None:
                    raise CliError("unload needs --version")
                states = [admin.unload(_need(args.model, "unload"), args.version)]
            else:
                import json

                split = json.loads(Path(args.split).read_text()) if args.split else {}
                states = [admin.set_traffic(_need(args.model, "split"), split.get("variants", []),
                                            salt=split.get("salt", ""), shadow=split.get("shadow"))]
        except grpc.RpcError as e:
            raise CliError(f"{e.code().name}: {e.details()}") from None
    for m in states:
        pinned = f", pinned {m.pinned_version}" if m.pinned_version else ""
        print(f"{m.name}: serving version {m.serving_version or '-'}{pinned}")
        for v in m.versions:
            print(f"  {v.version:>4}  {v.state:<11} {v.reason}")
        if m.traffic["variants"]:
            shares = ", ".join(f"{v['name']}={v.get('model', '') or 'v' + str(v.get('version', ''))}:{v['weight']:g}"
                               for v in m.traffic["variants"])
            print(f"  traffic (salt {m.traffic['salt']!r}): {shares}"
                  + (f"; shadow {m.traffic['shadow']['name']}" if "shadow" in m.traffic else ""))
        if m.policy_error:
            print(f"  serving.json: {m.policy_error}")


def _need(model: str | None, action: str) -> str:
    if not model:
        raise CliError(f"{action} needs a model name")
    return model


def _cmd_demo(args) -> None:
    from recserve.cli.demo import default_data, run_demo

    run_demo(Path(args.data) if args.data else default_data(), Path(args.work), args.epochs)


def _cmd_features_ingest(args) -> None:
    from recserve.features.ingest import ingest_interactions, ingest_items
    from recserve.features.store import FeatureStore

    with FeatureStore.open(args.store, create=True, max_history=args.max_history) as store:
        common = {"chunk_rows": args.chunk_rows, "ttl_s": args.ttl_s, "restart": args.restart,
                  "progress": not args.quiet}
        if args.view == "users":
            if args.string_columns:
                raise CliError("--string-columns applies to --view items only")
            report = ingest_interactions(store, args.input, **common)
        else:
            if args.max_history is not None:
                raise CliError("--max-history applies to --view users only")
            report = ingest_items(store, args.input, string_columns=_csv(args.string_columns or ""), **common)
    print(report.summary())


def _cmd_features_snapshot(args) -> None:
    from recserve.features.store import FeatureStore

    with FeatureStore.open(args.store) as store:
        out = store.snapshot(args.out)
    with FeatureStore.open(out) as copy:  # the copy opens and holds what the store held
        counts = ", ".join(f"{name} {copy.count(name)}" for name in sorted(copy.schema.views))
    print(f"snapshot {out}: {counts}")


def _cmd_features_info(args) -> None:
    import json

    from recserve.features.store import FeatureStore

    with FeatureStore.open(args.store) as store:
        info = {"store": str(store.path), "fingerprint": store.fingerprint, "map_size": store.map_size(),
                "views": {name: {**view.to_dict(), "entities": store.count(name),
                                 "ingest": store.ingest_progress(name)}
                          for name, view in sorted(store.schema.views.items())}}
    print(json.dumps(info, indent=2))


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

    p = verbs.add_parser("publish", help="publish an ONNX model (any kind: CV, NLP...) as a new generic model "
                                         "version, served over KServe v2 / Triton's protocol")
    p.add_argument("onnx", help="the .onnx file (external data not supported: save it as one file)")
    p.add_argument("--repository", required=True)
    p.add_argument("--model", required=True, help="model name (letters, digits, '_', '-', '.')")
    p.add_argument("--sample", help=".npz with one array per input: the golden request (default: a generated "
                                    "input, dynamic dimensions 1)")
    p.add_argument("--no-golden", action="store_true", help="publish without a golden request")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_publish)

    p = verbs.add_parser("serve", help="serve a model repository over gRPC")
    p.add_argument("--repository", help="model repository directory")
    p.add_argument("--config", help="JSON server config; flags override it")
    p.add_argument("--host", help="bind address (default [::])")
    p.add_argument("--port", type=int, help="gRPC port (default 8500; 0: any free port)")
    p.add_argument("--native-port", type=int,
                   help="also serve RecommendService on a gRPC C++ front end at this port (0: any free port)")
    p.add_argument("--max-k", type=int)
    p.add_argument("--item-dtype", choices=("float32", "float16"))
    p.add_argument("--max-batch-size", type=int)
    p.add_argument("--max-queue-delay-us", type=int)
    p.add_argument("--max-queue-size", type=int)
    p.add_argument("--inline-compute-us", type=int,
                   help="batches measured to cost at most this compute on the event loop (default 500; 0: never)")
    p.add_argument("--engine", choices=("auto", "onnx", "tensorrt"))
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help="where the Recommend pipeline runs (default cpu; cuda: tables, items and every stage on a GPU)")
    p.add_argument("--cuda-device", type=int, help="GPU index for --device cuda (default 0)")
    p.add_argument("--gpu-engine", choices=("auto", "tensorrt", "onnx-cuda", "torch"),
                   help="dense engine on the GPU (default auto: TensorRT with a plan, else ONNX Runtime CUDA, else torch)")
    p.add_argument("--workers", type=int, default=1, help="server processes sharing the port (SO_REUSEPORT)")
    p.add_argument("--metrics-port", help="Prometheus endpoint port (default 9464; 0: any free port; off: none)")
    p.add_argument("--poll-interval-s", type=float, help="rescan the repository this often (default 2; 0: never)")
    p.add_argument("--admin-token-file", help="file holding the bearer token that enables recserve.v1.ModelService")
    p.add_argument("--trace-exporter", choices=("otlp", "console"), help="turn OpenTelemetry tracing on")
    p.add_argument("--trace-endpoint", help="OTLP/gRPC collector (default localhost:4317)")
    p.add_argument("--trace-sample-ratio", type=float, help="share of requests traced (default 0.01)")
    p.add_argument("--log-format", choices=("text", "json"))
    p.add_argument("--tls-cert", help="PEM certificate chain: serve TLS (with --tls-key)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", help="PEM CA bundle: require client certificates signed by it (mutual TLS)")
    p.add_argument("--feature-store", help="LMDB feature store (recserve features ingest): user histories are read "
                                           "from it and FeatureService.PushEvents writes to it")
    p.set_defaults(func=_cmd_serve)

    p = verbs.add_parser("recommend", help="ask a running server for one user's top-k items")
    p.add_argument("user")
    p.add_argument("--model", required=True)
    _add_client_args(p)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--recent", help="comma-separated recent item ids, newest first")
    p.add_argument("--exclude", help="comma-separated item ids never to return")
    p.add_argument("--timeout", type=float, default=5.0)
    p.set_defaults(func=_cmd_recommend)

    p = verbs.add_parser("push", help="send live events (a user's interactions) to a server's feature store")
    p.add_argument("user")
    p.add_argument("items", nargs="+", help="item ids, oldest first")
    p.add_argument("--type", default="interaction", help="interaction, view, click, add_to_cart or purchase")
    _add_client_args(p)
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=_cmd_push)

    p = verbs.add_parser("models", help="list, load, unload model versions; set a traffic split (admin API)")
    p.add_argument("action", choices=("list", "load", "unload", "split"))
    p.add_argument("model", nargs="?")
    p.add_argument("--version", type=int, help="load: pin this version (rollback); unload: the version")
    p.add_argument("--split", help="split: a JSON file {salt, variants: [...], shadow} (absent: serving.json's)")
    _add_client_args(p)
    p.add_argument("--token-file", help="file holding the server's admin token")
    p.set_defaults(func=_cmd_models)

    p = verbs.add_parser("demo", help="train on Online Retail, export, serve, query, stop")
    p.add_argument("--data", help="directory with interactions.csv.gz and items.csv.gz "
                                  "(default: ../shared/data/online-retail)")
    p.add_argument("--work", default="build/demo", help="where the run and the model repository go")
    p.add_argument("--epochs", type=int, default=3)
    p.set_defaults(func=_cmd_demo)

    p = verbs.add_parser("features", help="the LMDB feature store: ingest, snapshot, info")
    sub = p.add_subparsers(dest="features_verb", required=True, metavar="SUBVERB")
    q = sub.add_parser("ingest", help="bulk-load a view (resumes an interrupted run of the same input)",
                       description="users: derived from an interaction log (user_id,item_id,timestamp): each "
                                   "user's last N distinct items, event count, last-seen time. items: one record "
                                   "per row of an item table (item_id + columns). CSV, CSV.gz, Parquet or JSONL. "
                                   "Writes in chunks, each one transaction with its progress: a killed ingest "
                                   "leaves the store consistent and the same command resumes it.")
    q.add_argument("--store", required=True, help="store directory (created if missing)")
    q.add_argument("--view", required=True, choices=("users", "items"))
    q.add_argument("--input", required=True, help="users: interaction log; items: item table")
    q.add_argument("--max-history", type=int,
                   help="users: recent items kept per user, fixed when the store is created (default 50)")
    q.add_argument("--ttl-s", type=int, help="set the view's max age in seconds: older values read as missing "
                                             "(0: never expire; default: keep the view's setting, 0 when new)")
    q.add_argument("--chunk-rows", type=int, default=10_000,
                   help="entities per write transaction (default 10000)")
    q.add_argument("--string-columns", help="items: comma-separated columns to read as text (e.g. codes like 007)")
    q.add_argument("--restart", action="store_true", help="ignore the progress of an earlier run; write everything")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=_cmd_features_ingest)

    q = sub.add_parser("snapshot", help="write a compacted, consistent copy of a store (to ship to replicas)")
    q.add_argument("--store", required=True)
    q.add_argument("--out", required=True, help="the copy: a new store directory (must not exist)")
    q.set_defaults(func=_cmd_features_snapshot)

    q = sub.add_parser("info", help="print a store's schema, entity counts and ingest progress (JSON)")
    q.add_argument("--store", required=True)
    q.set_defaults(func=_cmd_features_info)
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
