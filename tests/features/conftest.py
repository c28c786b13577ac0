"""Feature-store fixtures: a fake clock and small interaction logs (real LMDB in tmp dirs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

T0 = 1_700_000_000


class Clock:
    """A settable clock: TTL and updated_at without sleeping."""

    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def write_log(path: Path, users: int, events_per_user: int, items: int, seed: int = 0) -> Path:
    """A CSV log in shuffled file order with repeated items and tied timestamps."""
    rng = np.random.default_rng(seed)
    n = users * events_per_user
    user = np.repeat(np.arange(users), events_per_user)
    item = rng.integers(0, items, n)  # few items: many repeats
    ts = T0 - 10_000 + rng.integers(0, 50, n) * 60  # many ties within a user
    order = rng.permutation(n)
    lines = ["user_id,item_id,timestamp"] + [f"u{user[i]:05d},I{item[i]:03d},{ts[i]}" for i in order]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """The real `recserve` entry point in a child process."""
    proc = subprocess.run([sys.executable, "-m", "recserve.cli.main", *args], capture_output=True, text=True,
                          timeout=120, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"recserve {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc
