"""ghz load tests against a real `recserve serve`, and the CI ecosystem smoke.

    make loadtest                          # installs ghz, builds the model once, runs both configs
    make loadtest LOADTEST_ARGS="--concurrency 64 --total 50000"
    make ecosystem-smoke                   # CI: = loadtest.py --smoke (after make go-client)

    .venv/bin/python clients/ghz/loadtest.py [--concurrency N] [--total N] [--batch-total N]
    .venv/bin/python clients/ghz/loadtest.py --smoke

Model: bench/serve.py's `build_model` (synthetic data, 20,000 users x 10,000 items, one
epoch of the two-tower trainer, exported; ~20 s on 2 cores, kept in build/loadtest).
Request data: the model's held-out users with their recent items (their history after
their last training event, as the server would see it), k = 20, written where the configs
in clients/ghz/ expect it: recommend-data.json (one user per call),
batch-recommend-data.json (8 users per BatchRecommend) and model-infer-data.json (KServe v2
ModelInfer on the model's dense user tower: each user's pooled feature vectors, computed
by the model's own feature spec and tables, as typed FP32 contents). The server runs as its own
process on a free port; ghz finds the methods by server reflection (no proto files) and
its JSON report gives p50/p95/p99 and RPS. Any error status fails the run.

Where the build has the native front end the server also gets a free --native-port, and
ghz runs Recommend and BatchRecommend against that port too.

--smoke (CI) runs against that one server, with ghz bounded to 2,000 Recommend, 200
BatchRecommend and 500 ModelInfer calls: grpc-health-probe (SERVING), grpcurl list and describe, the Go
example command (items, and one error line with its status), the native port's health
probe and grpcurl list, then ghz. Every command is printed, and must appear in
docs/clients.md as it ran (port 8500 there, the native port 8510).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DOCS = ROOT / "docs" / "clients.md"
MODEL = "m"  # the name build_model exports under
K = 20
BATCH_USERS = 8
CONFIGS = {"Recommend": HERE / "recommend.json", "BatchRecommend": HERE / "batch_recommend.json",
           "ModelInfer": HERE / "model_infer.json"}
INFER_USERS = 500
DOC_PORT = 8500
DOC_NATIVE_PORT = 8510  # the server's --native-port in docs/clients.md
NATIVE_CALLS = ("Recommend", "BatchRecommend")  # what the native port serves (ModelInfer: the main port)


def _bench_serve():
    """bench/serve.py as a module (its build_model is the model this runs against)."""
    sys.path.insert(0, str(ROOT / "bench"))  # its sibling modules (closed_loop)
    spec = importlib.util.spec_from_file_location("recserve_bench_serve", ROOT / "bench" / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rel(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def write_data(requests_json: Path, out_dir: Path, repo: Path) -> dict[str, Path]:
    """ghz data files (JSON arrays of request messages; ghz cycles through them)."""
    users = json.loads(requests_json.read_text())
    single = [{"model": MODEL, "user_id": u["user_id"], "k": K, "recent_item_ids": u.get("history", [])}
              for u in users]
    batches = [{"requests": single[i:i + BATCH_USERS]} for i in range(0, len(single), BATCH_USERS)]
    paths = {"Recommend": out_dir / "recommend-data.json", "BatchRecommend": out_dir / "batch-recommend-data.json",
             "ModelInfer": out_dir / "model-infer-data.json"}
    paths["Recommend"].write_text(json.dumps(single))
    paths["BatchRecommend"].write_text(json.dumps(batches))
    paths["ModelInfer"].write_text(json.dumps(_infer_requests(repo, users[:INFER_USERS])))
    return paths


def _infer_requests(repo: Path, users: list[dict]) -> list[dict]:
    """ModelInfer requests for the model's dense tower: each user's pooled inputs."""
    from recserve.server.retrieval import RetrievalModel

    model = RetrievalModel.load(repo / MODEL / "1")
    pooled = model.spec.pool("user", model.spec.encode("user", users), model.tables)
    inputs = model.signature["inputs"]
    return [{"model_name": MODEL, "inputs": [
        {"name": i["name"], "datatype": "FP32", "shape": [1, len(pooled[i["name"]][row])],
         "contents": {"fp32_contents": [round(float(v), 6) for v in pooled[i["name"]][row]]}} for i in inputs]}
        for row in range(len(users))]


class Checks:
    """Runs commands from the repository root, printing each; collects failures."""

    def __init__(self, ports: dict[int, int], check_docs: bool):
        """``ports``: the server's ports -> the ones docs/clients.md shows."""
        self.ports = ports
        self.failures: list[str] = []
        self.documented = _documented_commands() if check_docs else None

    def run(self, argv: list[str], timeout: float = 60, show: bool = True) -> subprocess.CompletedProcess:
        """``show``: print what the command printed (indented, at most 20 lines)."""
        line = shlex.join(argv)
        print(f"$ {line}", flush=True)
        if self.documented is not None and _normalise(line, self.ports) not in self.documented:
            self.fail(f"docs/clients.md does not show this command as the smoke runs it (ports "
                      f"{DOC_PORT}, native {DOC_NATIVE_PORT}): {_normalise(line, self.ports)}")
        try:
            proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            self.fail(f"{argv[0]} did not finish in {timeout:.0f} s")
            return subprocess.CompletedProcess(argv, 124, e.stdout or "", e.stderr or "")
        if show:
            printed = (proc.stdout + proc.stderr).splitlines()
            print("\n".join(f"    {ln}" for ln in printed[:20]) + ("\n    ..." if len(printed) > 20 else ""),
                  flush=True)
        return proc

    def fail(self, why: str) -> None:
        print(f"FAIL: {why}", flush=True)
        self.failures.append(why)

    def expect(self, ok: bool, why: str, proc: subprocess.CompletedProcess) -> None:
        if not ok:
            self.fail(f"{why} (exit {proc.returncode}; stdout {proc.stdout.strip()[-500:]!r}; "
                      f"stderr {proc.stderr.strip()[-500:]!r})")


def _normalise(command: str, ports: dict[int, int]) -> str:
    """A command as docs/clients.md shows it: ports 8500 (and 8510 native); the user and recent
    items of the Go example are data (they depend on the synthetic model), so any value stands."""
    command = re.sub(r"localhost:(\d+)", lambda m: f"localhost:{ports.get(int(m[1]), m[1])}", command)
    return re.sub(r"(-user|-recent) \S+", r"\1 ...", command)


def _documented_commands() -> set[str]:
    if not DOCS.exists():
        return set()
    return {_normalise(line.strip(), {}) for line in DOCS.read_text().splitlines()
            if line.strip().startswith("build/go-bin/")}


def ghz(checks: Checks, binary: Path, call: str, target: str, data: Path, default_data: Path,
        total: int | None, concurrency: int | None) -> dict | None:
    argv = [rel(binary), "--config", rel(CONFIGS[call])]
    if data.resolve() != default_data.resolve():
        argv += ["--data-file", rel(data)]
    if total:
        argv += ["--total", str(total)]
    if concurrency:
        argv += ["--concurrency", str(concurrency)]
    proc = checks.run(argv + ["--format", "json", target], timeout=600, show=False)
    if proc.returncode != 0 or not proc.stdout.strip().startswith("{"):
        hint = (" — the server's reflection did not resolve the method name (Python grpcio-reflection does not, "
                "grpc/grpc#34743; the server must answer method symbols)" if "Symbol not found" in proc.stderr
                + proc.stdout else "")
        checks.fail(f"ghz {call} failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-500:]}{hint}")
        return None
    report = json.loads(proc.stdout)
    not_ok = {code: n for code, n in report["statusCodeDistribution"].items() if code != "OK"}
    if not_ok or report["errorDistribution"]:
        checks.fail(f"ghz {call}: errors {not_ok} {report['errorDistribution']}")
    expected = total or report["options"]["total"]
    if report["count"] != expected:
        checks.fail(f"ghz {call}: {report['count']} calls answered, {expected} sent")
    return report


def summary(reports: dict[str, dict], batch_users: dict[str, int]) -> str:
    """``reports``: ghz's JSON report per row label ("Recommend", "Recommend native", ...)."""
    rows = [f"{'call':<22} {'calls':>7} {'users/call':>10} {'errors':>6} {'concurrency':>11} {'calls/s':>8} "
            f"{'users/s':>8} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7}"]
    for call, r in reports.items():
        pct = {p["percentage"]: p["latency"] / 1e6 for p in r["latencyDistribution"] or []}
        errors = sum(n for code, n in r["statusCodeDistribution"].items() if code != "OK")
        per = batch_users[call.split()[0]]
        rows.append(f"{call:<22} {r['count']:>7} {per:>10} {errors:>6} {r['options']['concurrency']:>11} "
                    f"{r['rps']:>8.1f} {r['rps'] * per:>8.1f} {pct.get(50, float('nan')):>7.2f} "
                    f"{pct.get(95, float('nan')):>7.2f} {pct.get(99, float('nan')):>7.2f}")
    return "\n".join(rows)


def smoke_checks(checks: Checks, bin_dir: Path, target: str, data: dict[str, Path]) -> None:
    b = rel(bin_dir)
    for service in ([], ["-service", "recserve.v1.RecommendService"]):
        proc = checks.run([f"{b}/grpc-health-probe", "-addr", target] + service)
        checks.expect(proc.returncode == 0 and "status: SERVING" in proc.stdout + proc.stderr,
                      "grpc-health-probe: not SERVING", proc)
    proc = checks.run([f"{b}/grpcurl", "-plaintext", target, "list"])
    listed = set(proc.stdout.split())
    checks.expect(proc.returncode == 0 and {"recserve.v1.RecommendService", "grpc.health.v1.Health"} <= listed,
                  "grpcurl list: recserve.v1.RecommendService or grpc.health.v1.Health missing", proc)
    proc = checks.run([f"{b}/grpcurl", "-plaintext", target, "describe", "recserve.v1.RecommendService"])
    checks.expect(proc.returncode == 0 and "rpc Recommend (" in proc.stdout and "rpc BatchRecommend (" in proc.stdout,
                  "grpcurl describe: the methods are missing", proc)

    proc = checks.run([f"{b}/grpcurl", "-plaintext", "-d", json.dumps({"model": MODEL, "user_id": "42", "k": 3}),
                       target, "recserve.v1.RecommendService/Recommend"])
    try:
        reply = json.loads(proc.stdout)
    except ValueError:
        reply = {}
    checks.expect(proc.returncode == 0 and len(reply.get("item_ids", [])) == 3 and reply.get("model") == MODEL,
                  "grpcurl Recommend: expected 3 items from model m", proc)

    user = json.loads(data["Recommend"].read_text())[0]
    recent = ",".join(user["recent_item_ids"][:3])
    proc = checks.run([f"{b}/recommend", "-target", target, "-model", MODEL, "-user", user["user_id"], "-k", "5",
                       "-recent", recent])
    lines = proc.stdout.splitlines()
    checks.expect(proc.returncode == 0 and lines[:1] == [f"model {MODEL} version 1"] and len(lines) == 6,
                  "Go example: expected 'model m version 1' and 5 items", proc)
    proc = checks.run([f"{b}/recommend", "-target", target, "-model", "no-such-model", "-user", user["user_id"]])
    checks.expect(proc.returncode == 1 and not proc.stdout and len(proc.stderr.splitlines()) == 1
                  and proc.stderr.startswith("recommend: error: NOT_FOUND: "),
                  "Go example, unknown model: expected exit 1 and one line 'recommend: error: NOT_FOUND: ...'", proc)


def native_smoke_checks(checks: Checks, bin_dir: Path, target: str) -> None:
    """The native port: its own health and reflection, RecommendService only."""
    b = rel(bin_dir)
    proc = checks.run([f"{b}/grpc-health-probe", "-addr", target, "-service", "recserve.v1.RecommendService"])
    checks.expect(proc.returncode == 0 and "status: SERVING" in proc.stdout + proc.stderr,
                  "grpc-health-probe (native port): not SERVING", proc)
    proc = checks.run([f"{b}/grpcurl", "-plaintext", target, "list"])
    listed = set(proc.stdout.split())
    checks.expect(proc.returncode == 0 and "recserve.v1.RecommendService" in listed
                  and "recserve.v1.ModelService" not in listed,
                  "grpcurl list (native port): expected RecommendService and not ModelService", proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="build/loadtest", help="model and request data (built once, reused)")
    parser.add_argument("--items", type=int, default=10_000, help="catalogue size of the synthetic model")
    parser.add_argument("--bin", default="build/go-bin", help="where ghz (and, for --smoke, the other tools) are")
    parser.add_argument("--total", type=int, help="Recommend calls (default: recommend.json's; --smoke: 2000)")
    parser.add_argument("--batch-total", type=int,
                        help="BatchRecommend calls (default: batch_recommend.json's; --smoke: 200)")
    parser.add_argument("--infer-total", type=int,
                        help="ModelInfer calls (default: model_infer.json's; --smoke: 500)")
    parser.add_argument("--concurrency", type=int, help="ghz concurrency for every call (default: the configs')")
    parser.add_argument("--smoke", action="store_true", help="CI: bounded ghz run plus grpcurl, "
                                                             "grpc-health-probe and the Go example")
    args = parser.parse_args()
    if args.smoke:
        args.total = args.total or 2000
        args.batch_total = args.batch_total or 200
        args.infer_total = args.infer_total or 500
    bin_dir = (ROOT / args.bin).resolve()
    needed = ["ghz"] + (["grpcurl", "grpc-health-probe", "recommend"] if args.smoke else [])
    missing = [name for name in needed if not (bin_dir / name).is_file()]
    if missing:
        print(f"loadtest: error: {', '.join(missing)} not in {rel(bin_dir)} "
              f"(make {'ecosystem-smoke' if args.smoke else 'loadtest'} installs them)", file=sys.stderr)
        return 1

    from recserve.server.native import native_frontend_available
    from recserve.server.process import start_server_process

    bench = _bench_serve()
    print(f"==> model: {args.items:,} synthetic items, one epoch (bench/serve.py build_model) in {args.work}",
          flush=True)
    repo, requests_json = bench.build_model(ROOT / args.work, args.items)
    data = write_data(requests_json, requests_json.parent, repo)
    default_data = {call: ROOT / json.loads(path.read_text())["data-file"] for call, path in CONFIGS.items()}

    log = requests_json.parent / "server.log"
    # The native port (gRPC C++ front end) too, where this build has it; CI (RECSERVE_FRONTEND=ON) needs it.
    native_port = bench.free_ports(1)[0] if native_frontend_available() else None
    if native_port is None and os.environ.get("RECSERVE_FRONTEND", "").upper() == "ON":
        print("loadtest: error: RECSERVE_FRONTEND=ON but recserve._frontend is not built", file=sys.stderr)
        return 1
    native = ["--native-port", str(native_port)] if native_port else []
    cmd = [sys.executable, "-m", "recserve.cli", "serve", "--repository", str(repo), "--host", "localhost",
           "--port", "0", "--metrics-port", "0", *native]
    print(f"==> $ recserve serve --repository {rel(repo)} --host localhost --port 0 --metrics-port 0 "
          f"{shlex.join(native)} (log: {rel(log)})", flush=True)
    with open(log, "w") as log_file:
        server, port = start_server_process(cmd, stderr=log_file, cwd=ROOT)
    targets = {"": f"localhost:{port}"}
    ports = {port: DOC_PORT}
    if native_port:
        targets[" native"] = f"localhost:{native_port}"
        ports[native_port] = DOC_NATIVE_PORT
    checks = Checks(ports, check_docs=args.smoke)
    reports = {}
    try:
        if args.smoke:
            print("==> ecosystem smoke", flush=True)
            smoke_checks(checks, bin_dir, targets[""], data)
            if native_port:
                print("==> ecosystem smoke, native port", flush=True)
                native_smoke_checks(checks, bin_dir, targets[" native"])
        for label, target in targets.items():
            print(f"==> ghz (server reflection, no proto files) against {target}", flush=True)
            for call, total in (("Recommend", args.total), ("BatchRecommend", args.batch_total),
                                ("ModelInfer", args.infer_total)):
                if label and call not in NATIVE_CALLS:
                    continue
                report = ghz(checks, bin_dir / "ghz", call, target, data[call], default_data[call], total,
                             args.concurrency)
                if report is not None:
                    reports[call + label] = report
    finally:
        bench.stop(server)
        code = server.wait()
    if code != 0:
        checks.fail(f"the server exited with status {code} after SIGTERM (log: {rel(log)})")
    if reports:
        print(f"\nghz against recserve serve: model {MODEL} ({args.items:,} items), k = {K}")
        print(summary(reports, {"Recommend": 1, "BatchRecommend": BATCH_USERS, "ModelInfer": 1}))
    if checks.failures:
        print(f"\n{len(checks.failures)} check(s) failed; server log: {rel(log)}", file=sys.stderr)
        for why in checks.failures:
            print(f"  - {why}", file=sys.stderr)
        return 1
    if args.smoke:
        print("\nall checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
