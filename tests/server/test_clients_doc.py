"""docs/clients.md's Python example runs as written against a live server."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from recserve.features.ingest import ingest_interactions
from recserve.features.store import FeatureStore
from tests.server.conftest import ServerThread, server_config

DOC = Path(__file__).resolve().parents[2] / "docs" / "clients.md"
TOKEN = "docs-example-token-0123456789"


def test_the_python_example_in_docs_clients_md_runs(repo, tiny_data, tmp_path, capsys):
    (block,) = re.findall(r"## Python\n.*?```python\n(.*?)```", DOC.read_text(), re.S)
    store = tmp_path / "features.lmdb"
    with FeatureStore.open(store, create=True, max_history=20) as fs:
        ingest_interactions(fs, tiny_data / "interactions.csv.gz", progress=False)
    config = replace(server_config(repo), feature_store=str(store), admin_token=TOKEN)
    with ServerThread(config) as s:
        exec(compile(block.replace("localhost:8500", s.target), str(DOC), "exec"), {"ADMIN_TOKEN": TOKEN})
        assert s.server.store.user_records(["17"])[0]["history"][0] == "I042"  # the push landed
    out = capsys.readouterr().out
    assert "tiny 1" in out and "32 answers" in out and "READY" in out
