"""Start a server as a child process and learn its port from its first stdout line.

    proc, port = start_server_process([sys.executable, "-m", "recserve.cli", "serve",
                                       "--repository", "models", "--port", "0"])

Used by `recserve demo`, the benchmarks and the tests: servers print one line ending in
their port (``... on port 43121``) once they answer.
"""

from __future__ import annotations

import subprocess
import threading


def start_server_process(cmd: list[str], marker: str = "on port", timeout: float = 300,
                         **popen) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, **popen)
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    first = line[0] if line else ""
    if marker not in first:
        exited = proc.poll() is not None
        proc.kill()
        proc.wait()
        why = (f"printed {first.strip()!r}" if first else "exited without printing" if exited
               else f"printed nothing in {timeout:.0f} s")
        raise RuntimeError(f"{' '.join(cmd[:4])} ... did not start (it {why}; exit code {proc.returncode})")
    return proc, int(first.rsplit(" ", 1)[1])
