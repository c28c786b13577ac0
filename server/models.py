"""Models the server serves: one loaded version per model, each with its own batcher.

    registry = ModelRegistry(config, executor)
    await registry.load_all()                  # newest valid version of every model
    served = registry.get("retail", version=None)
    results = await served.submit(query, deadline)

Loading (mmap, engine session, golden check) runs in a thread, not on the event loop. A
version that fails to load or to reproduce its golden requests is skipped with the reason
logged, and the next older version is tried. Version policies, watching the repository
and hot-swap arrive with the model-lifecycle issue.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

from recserve.features.history import HISTORY_SOURCE
from recserve.server.batcher import DynamicBatcher
from recserve.server.config import ServerConfig
from recserve.server.errors import ModelNotFound, NotReady, VersionNotLoaded
from recserve.server.recommend import FeatureSource, Query, RequestFeatures, Result, recommend_batch
from recserve.server.engines import EngineUnavailable
from recserve.server.repository import RepositoryError, list_versions, read_manifest, validate_model_name
from recserve.server.retrieval import RetrievalModel

log = logging.getLogger(__name__)


@dataclass
class ServedVersion:
    name: str
    version: int
    model: RetrievalModel
    batcher: DynamicBatcher
    variant: str = ""  # the A/B variant name (the lifecycle issue sets it); "" without a split

    async def submit(self, query: Query, deadline: float | None) -> Result:
        return await self.batcher.submit(query, deadline)


@dataclass
class ModelState:
    """What the registry knows of one model directory."""

    name: str
    serving: ServedVersion | None = None
    loading: bool = False
    failures: dict = field(default_factory=dict)  # version -> reason


def warm_up_batches(model: RetrievalModel, rounds: int = 3) -> list[list[Query]]:
    """The manifest's golden requests as queries: each alone, then all together, a few
    times (touches the mmap'd pages and measures what batches of these sizes cost)."""
    queries = []
    for g in model.manifest.get("golden", []):
        record = dict(g["request"])
        user_id, history = str(record.pop("user_id", "") or "warm-up"), record.pop(HISTORY_SOURCE, None) or ()
        queries.append(Query(user_id=user_id, k=int(g["k"]), context={k: str(v) for k, v in record.items()},
                             recent_items=tuple(history)))
    return [batch for _ in range(rounds) for batch in ([[q] for q in queries] + ([queries] if queries else []))]


class ModelRegistry:
    def __init__(self, config: ServerConfig, executor: Executor, features: FeatureSource | None = None):
        self.config = config
        self.repository = Path(config.repository)
        self.executor = executor
        self.features = features or RequestFeatures()
        self.models: dict[str, ModelState] = {}

    def discover(self) -> list[str]:
        """Model directories of the repository (valid names only)."""
        if not self.repository.is_dir():
            raise RepositoryError(f"{self.repository}: model repository is not a directory")
        names = []
        for path in sorted(self.repository.iterdir()):
            try:
                if path.is_dir():
                    names.append(validate_model_name(path.name))
            except RepositoryError:
                log.warning("ignoring %s: not a valid model name", path)
        for name in names:
            self.models.setdefault(name, ModelState(name))
        return names

    async def load_all(self) -> None:
        await asyncio.gather(*(self.load(name) for name in self.discover()))

    async def load(self, name: str) -> ServedVersion | None:
        state = self.models.setdefault(name, ModelState(name))
        state.loading = True
        loop = asyncio.get_running_loop()
        try:
            for version in reversed(list_versions(self.repository / name)):
                try:
                    model = await loop.run_in_executor(None, self._load_version, name, version)
                except Exception as e:  # any failure: report it, try the next older version
                    state.failures[version] = f"{type(e).__name__}: {e}"
                    log.error("model %s version %d not loaded: %s", name, version, state.failures[version])
                    continue
                served = self._serve(name, version, model)
                await loop.run_in_executor(None, served.batcher.warm_up, warm_up_batches(model))
                old, state.serving = state.serving, served
                if old is not None:
                    await old.batcher.close()
                log.info("model %s version %d is serving (%d items)", name, version, len(model.item_ids))
                return served
            log.error("model %s: no loadable version", name)
            return None
        finally:
            state.loading = False

    def _load_version(self, name: str, version: int) -> RetrievalModel:
        version_dir = self.repository / name / str(version)
        options = {"threads": self.config.engine_threads}
        backends = self._backends(version_dir)
        for backend in backends:
            try:
                model = RetrievalModel.load(version_dir, backend=backend, item_dtype=self.config.item_dtype,
                                            engine_options=options)
                max_batch = model.manifest["engines"][backend].get("max_batch")
                if max_batch is not None and self.config.batching.max_batch_size > max_batch:
                    raise EngineUnavailable(f"its plan takes batches up to {max_batch}, "
                                            f"max_batch_size is {self.config.batching.max_batch_size}")
                model.check_golden()
            except (EngineUnavailable, RepositoryError) as e:
                if backend == backends[-1] or (self.config.engine != "auto"):
                    raise
                log.warning("model %s version %d: %s engine not used (%s); trying %s", name, version, backend, e,
                            backends[backends.index(backend) + 1])
                continue
            log.info("model %s version %d: %s engine (%s)", name, version, backend, ", ".join(model.engine.providers))
            return model
        raise EngineUnavailable(f"{version_dir}: no engine that runs here")

    def _backends(self, version_dir: Path) -> list[str]:
        """Engines to try, best first: the configured one, or (auto) TensorRT then ONNX."""
        if self.config.engine != "auto":
            return [self.config.engine]
        available = read_manifest(version_dir).get("engines", {})
        return [b for b in ("tensorrt", "onnx") if b in available]

    def _serve(self, name: str, version: int, model: RetrievalModel) -> ServedVersion:
        def run(queries):
            return recommend_batch(model, self.features, queries)

        batcher = DynamicBatcher(run, self.config.batching, self.executor, name=f"{name}/{version}")
        batcher.start()
        return ServedVersion(name, version, model, batcher)

    def get(self, name: str, version: int | None = None) -> ServedVersion:
        state = self.models.get(name)
        if state is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise ModelNotFound(f"unknown model {name!r} (models: {known})")
        served = state.serving
        if served is None:
            if state.loading:
                raise NotReady(f"model {name!r} is loading; retry shortly")
            reasons = "; ".join(f"v{v}: {r}" for v, r in sorted(state.failures.items())) or "no versions"
            raise NotReady(f"model {name!r} has no loadable version ({reasons})")
        if version is not None and version != served.version:
            versions = list_versions(self.repository / name)
            if version not in versions:
                raise ModelNotFound(f"model {name!r} has no version {version} (versions: {versions})")
            why = f": {state.failures[version]}" if version in state.failures else ""
            raise VersionNotLoaded(f"model {name!r} version {version} is not loaded (serving version "
                                   f"{served.version}){why}")
        return served

    @property
    def ready(self) -> bool:
        return bool(self.models) and all(s.serving is not None for s in self.models.values())

    async def close(self) -> None:
        for state in self.models.values():
            if state.serving is not None:
                await state.serving.batcher.close()
