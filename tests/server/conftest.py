"""A real recserve server on port 0 (in a thread with its own event loop) and an exported model."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from recserve.server.app import RecserveServer
from recserve.server.config import BatchingConfig, ServerConfig
from tests.trainer.conftest import tiny_config, tiny_data  # noqa: F401 (tiny_data: a shared fixture)


class ServerThread:
    """Runs RecserveServer on a private event loop; tests talk to it through real clients."""

    def __init__(self, config: ServerConfig, **server_options):
        """``server_options``: extra RecserveServer arguments (e.g. span_exporter)."""
        self.config = config
        self._options = server_options
        self.loop = asyncio.new_event_loop()
        self.server: RecserveServer | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.server = RecserveServer(self.config, **self._options)
            self.loop.run_until_complete(self.server.start())
        except BaseException as e:  # surface start-up failures in the test thread
            self._error = e
            self._started.set()
            return
        self._started.set()
        self.loop.run_forever()

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def target(self) -> str:
        return f"localhost:{self.server.port}"

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self._started.wait(60)
        if self._error:
            raise self._error
        return self

    def __exit__(self, *exc) -> None:
        if self.server is not None and not self.server.servicer.draining:
            self.call(self.server.drain())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)


def metric(server: ServerThread, name: str, **labels) -> float:
    """Sum of a Prometheus sample from the server's /metrics over the series whose labels
    include ``labels``."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://localhost:{server.server.metrics.port}/metrics").read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


class WorkerServer:
    """`recserve serve --workers N` as a child process in its own session, for the tests of
    worker processes: ``lines()`` waits for each worker's "(pid ...) serving" line, and
    leaving the block stops the whole process group, so a failed test leaves no worker
    holding a port that a later test needs.

        with WorkerServer([... "--workers", "2"]) as server:
            lines = server.lines(2)
            server.stop()            # SIGTERM: drain; returns the exit status
    """

    def __init__(self, cmd: list[str]):
        # stderr to a file, not a pipe: nobody reads it while the workers run, and a full
        # pipe would block their logging.
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                                     start_new_session=True)

    def lines(self, n: int, timeout: float = 120) -> list[str]:
        got: list[str] = []

        def read():
            while len([x for x in got if "(pid " in x]) < n:
                line = self.proc.stdout.readline()
                if not line:
                    return
                got.append(line)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        serving = [x for x in got if "(pid " in x]
        if len(serving) < n:
            self._kill()
            self._stderr.seek(0)
            raise AssertionError(f"{n} workers should each print a serving line; stdout {got!r}, exit code "
                                 f"{self.proc.returncode}, stderr:\n{self._stderr.read()[-3000:]}")
        return serving

    def stop(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def _kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def __enter__(self) -> WorkerServer:
        return self

    def __exit__(self, *exc) -> None:
        self._kill()  # the workers too, whatever happened
        self._stderr.close()


def server_config(repo: Path, **batching) -> ServerConfig:
    return ServerConfig(repository=str(repo), host="localhost", port=0, drain_timeout_s=5, metrics_port=0,
                        batching=BatchingConfig(**batching))


def native_required() -> bool:
    """RECSERVE_FRONTEND=ON (CI) makes the build require the native front end, and its tests too."""
    return os.environ.get("RECSERVE_FRONTEND", "").upper() == "ON"


def skip_without_native() -> None:
    from recserve.server.native import native_frontend_available

    if not native_frontend_available() and not native_required():
        pytest.skip("recserve._frontend was not built (gRPC C++ not found at build time: install libgrpc++-dev "
                    "and reinstall)")


def with_native_port(config: ServerConfig) -> ServerConfig:
    """``config`` also serving on a native port (any free one) where this build has the front end."""
    from recserve.server.native import native_frontend_available

    return dataclasses.replace(config, native_port=0) if native_frontend_available() or native_required() else config


def target_of(server: ServerThread, port: str) -> str:
    """The address of the server's ``port``: "main" (grpc.aio) or "native" (gRPC C++ front end)."""
    if port == "main":
        return server.target
    skip_without_native()
    return f"localhost:{server.server.native.port}"


@pytest.fixture(scope="session")
def server_run(tiny_data, tmp_path_factory) -> Path:
    """A trained tiny two-tower run (export it for more versions)."""
    from recserve.trainer.train import train

    run = tmp_path_factory.mktemp("server-run")
    train(tiny_config(tiny_data, epochs=2), run, progress=False, evaluate_each_epoch=False)
    return run


@pytest.fixture(scope="session")
def repo(server_run, tmp_path_factory) -> Path:
    """A repository with one exported tiny model ("tiny", version 1)."""
    from recserve.trainer.export import export_run

    repo = tmp_path_factory.mktemp("server-repo")
    export_run(server_run, repo, "tiny", log=lambda *_: None)
    return repo


@pytest.fixture(scope="module")
def server(repo):
    """The shared test server: its main port and, where built, a native port."""
    with ServerThread(with_native_port(server_config(repo, max_batch_size=32, max_queue_delay_us=2000))) as s:
        yield s
