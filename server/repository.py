"""The model repository on disk (architecture.md section 5): names, versions, manifests.

    <repository>/<model>/<version>/manifest.json, engine/, tables/, items/

Writers (``recserve export``) call ``publish_version``: the version is built in a hidden
temp directory inside the model directory, every file and directory is fsynced, and the
directory is renamed to the next free version number — so a reader lists either the
complete version or nothing. Readers call ``list_versions`` and ``read_manifest``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

MANIFEST = "manifest.json"
MANIFEST_SCHEMA_VERSION = 1
KINDS = ("retrieval", "ranking", "scoring", "generic")
_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_TMP_PREFIX = ".tmp-"
STALE_TEMP_AGE_S = 24 * 3600


class RepositoryError(ValueError):
    """A repository, model or version that cannot be used; the message says why."""


def validate_model_name(name: str) -> str:
    if not isinstance(name, str) or not _MODEL_NAME_RE.match(name) or ".." in name:
        raise RepositoryError(
            f"invalid model name {name!r}: use 1-128 letters, digits, '_', '-', '.' "
            "starting with a letter or digit (no path separators, no '..')"
        )
    return name


def list_versions(model_dir: Path) -> list[int]:
    """Published versions (positive integer directory names), ascending."""
    if not Path(model_dir).is_dir():
        return []
    out = []
    for entry in os.scandir(model_dir):
        if entry.is_dir() and entry.name.isdigit() and not entry.name.startswith("0"):
            out.append(int(entry.name))
    return sorted(out)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name() -> str:
    return f"{_TMP_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove_stale_temp_dirs(model_dir: Path) -> None:
    """Temp dirs of killed exports: a dead writer pid on this host, or older than a day
    (a writer on another host sharing the directory cannot be probed)."""
    host = socket.gethostname()
    for entry in model_dir.glob(_TMP_PREFIX + "*"):
        writer_host, _, pid = entry.name[len(_TMP_PREFIX):].rpartition("-")[0].rpartition("-")
        try:
            if writer_host == host and pid.isdigit():
                stale = not _pid_alive(int(pid))
            else:
                stale = time.time() - entry.stat().st_mtime > STALE_TEMP_AGE_S
        except FileNotFoundError:  # another exporter removed it meanwhile
            continue
        if stale:
            shutil.rmtree(entry, ignore_errors=True)


def publish_version(repository: Path, model: str, build: Callable[[Path, int], None]) -> int:
    """Build a version with ``build(tmp_dir, version)`` and publish it atomically.

    Returns the version number. ``build`` may write anything below ``tmp_dir``; if it
    raises, nothing is published and the temp directory is removed.
    """
    model_dir = Path(repository) / validate_model_name(model)
    model_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(model_dir)
    tmp = model_dir / _temp_name()
    tmp.mkdir()
    try:
        version = (list_versions(model_dir) or [0])[-1] + 1
        build(tmp, version)
        _fsync_tree(tmp)
        while True:
            try:
                # rename(2) of a directory onto an existing non-empty directory fails,
                # so two concurrent exporters never overwrite each other's version.
                os.rename(tmp, model_dir / str(version))
                break
            except OSError:
                if not (model_dir / str(version)).exists():
                    raise
                version = list_versions(model_dir)[-1] + 1
                manifest_path = tmp / MANIFEST
                if manifest_path.exists():  # the number is recorded inside; keep it true
                    m = json.loads(manifest_path.read_text())
                    m["version"] = version
                    write_json(manifest_path, m)
        _fsync_dir(model_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return version


def write_json(path: Path, obj) -> None:
    """Write JSON durably and atomically: readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_entries(version_dir: Path) -> dict[str, dict]:
    """{relative path: {sha256, bytes}} for every file except the manifest."""
    out = {}
    for path in sorted(Path(version_dir).rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            rel = path.relative_to(version_dir).as_posix()
            out[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return out


def read_manifest(version_dir: Path) -> dict:
    path = Path(version_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise RepositoryError(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise RepositoryError(f"{path}: not valid JSON ({e})") from None
    schema = manifest.get("schema_version")
    if schema != MANIFEST_SCHEMA_VERSION:
        raise RepositoryError(f"{path}: schema_version {schema!r} is not supported (expected {MANIFEST_SCHEMA_VERSION})")
    if manifest.get("kind") not in KINDS:
        raise RepositoryError(f"{path}: kind {manifest.get('kind')!r} is not one of {KINDS}")
    return manifest


def verify_files(version_dir: Path, manifest: dict) -> None:
    """Every file listed in the manifest exists with its recorded size and sha256."""
    for rel, entry in manifest.get("files", {}).items():
        path = Path(version_dir) / rel
        if not path.is_file():
            raise RepositoryError(f"{path}: missing (listed in the manifest)")
        if path.stat().st_size != entry["bytes"]:
            raise RepositoryError(f"{path}: {path.stat().st_size} bytes, manifest says {entry['bytes']}")
        if sha256_file(path) != entry["sha256"]:
            raise RepositoryError(f"{path}: sha256 does not match the manifest")
