"""Acceptance (issue 7): NVIDIA's tritonclient.grpc, sync and aio, unmodified, gets metadata
and correct inference results from recserve, including a BYTES input and an FP16 output.

tritonclient pins protobuf < 7 and recserve's stubs need protobuf >= 7, so the client runs
from its own venv (.venv-tritonclient, built by `make test` from
tests/compat/tritonclient-requirements.txt) as a separate process: a real external client
of a real server. The expected outputs come from ONNX Runtime run here, directly. The
script also runs docs/clients.md's tritonclient example and compares its output with the
page's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from inference import grpc_service_pb2
from recserve.server.generic import publish_onnx
from tests.compat.onnx_models import build, reference_session
from tests.server.conftest import ServerThread, server_config

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "compat" / "tritonclient_check.py"
DOC = ROOT / "docs" / "clients.md"  # its tritonclient example runs first, as written
TOKEN = "tritonclient-admin-token-0123"


def tritonclient_python() -> Path | None:
    path = Path(os.environ.get("RECSERVE_TRITONCLIENT_PYTHON", ROOT / ".venv-tritonclient" / "bin" / "python"))
    return path if path.exists() else None


def test_tritonclient_sync_and_aio(tmp_path):
    python = tritonclient_python()
    if python is None:
        message = "no .venv-tritonclient: run `make test` (or make .venv-tritonclient/.installed)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI must run the acceptance test, never skip it
        pytest.skip(message)
    repo = tmp_path / "models"
    for name in ("text", "dense"):
        publish_onnx(build(tmp_path, name), repo, name, log=lambda *_: None)
    rng = np.random.default_rng(3)
    text = np.array(["hello", "héllo wörld", "", "abc"])
    text_x = rng.standard_normal((2, 4)).astype(np.float32)
    dense_x = rng.standard_normal((3, 4)).astype(np.float32)
    tagged, match, y = reference_session(tmp_path / "text.onnx").run(None, {"text": text.astype(object),
                                                                            "x": text_x})
    dense_y, dense_label = reference_session(tmp_path / "dense.onnx").run(None, {"x": dense_x})
    assert y.dtype == np.float16
    expected = tmp_path / "expected.npz"
    np.savez(expected, text=text, text_x=text_x, tagged=tagged.astype(str), match=match, y=y, dense_x=dense_x,
             dense_y=dense_y, dense_label=dense_label)
    descriptor = tmp_path / "grpc_service.pb"
    descriptor.write_bytes(grpc_service_pb2.DESCRIPTOR.serialized_pb)

    config = replace(server_config(repo), admin_token=TOKEN, poll_interval_s=0)
    with ServerThread(config) as server:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        run = subprocess.run([str(python), str(SCRIPT), "--target", server.target, "--expected", str(expected),
                              "--descriptor", str(descriptor), "--token", TOKEN, "--doc", str(DOC)],
                             capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    sys.stdout.write(run.stdout)
    assert run.returncode == 0, f"tritonclient check failed:\n{run.stdout}\n{run.stderr}"
    assert "checks passed" in run.stdout
