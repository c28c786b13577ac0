"""`recserve demo` end to end on the tiny dataset (make demo runs it on Online Retail)."""

from __future__ import annotations

import subprocess
import sys


def test_demo_trains_exports_serves_queries_and_stops(tiny_data, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "recserve.cli", "demo", "--data", str(tiny_data), "--work",
                           str(tmp_path), "--epochs", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for step in ("==> training", "==> exporting", "published retail version 1", "==> loading every customer's",
                 "==> starting `recserve serve`", "==> Recommend(user", "==> PushEvents: user",
                 "==> stopping the server", "server exited with status 0"):
        assert step in out, step
    assert out.count("(model retail v1,") == 4  # three users, then one again after a live event
    bought = out.split("==> PushEvents: user ")[1].split(" buys ")[1].split(" ")[0]
    after = out.split("==> PushEvents: user ")[1].split("==> stopping")[0]
    assert f" {bought} " not in after.split("\n", 1)[1]  # excluded once bought
    assert (tmp_path / "models/retail/1/manifest.json").is_file()


def test_demo_without_data_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "recserve.cli", "demo", "--data", str(tmp_path / "none"),
                           "--work", str(tmp_path / "w")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith("demo data not found (pass --data DIR)")
