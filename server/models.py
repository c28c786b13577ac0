"""The models the server serves: versions and their states, hot-swap, routing, A/B traffic.

    registry = ModelRegistry(config, executor, metrics)
    await registry.start()                  # load every model per its policy, watch the repository
    result, served, variant = await registry.recommend("retail", query, deadline)
    await registry.load("retail", 3)        # pin version 3 (rollback); load("retail") unpins, rescans
    await registry.unload("retail", 3)
    registry.set_traffic("retail", split)   # overrides serving.json's traffic until cleared
    registry.status()                       # every model and version with its state and reason
    await registry.close()

Each model directory has a policy (``serving.json``, server/serving_config.py): which
versions to serve (the newest N that load, default 1, or specific ones) and an optional
traffic split. A version is loaded in the background by one low-priority loader thread:
files checked against the manifest's checksums, tables and items memory-mapped, the
engine opened and its signature checked, the golden requests reproduced, then warmed up.
Only then is it READY, and routing switches to it at once (an event-loop step: no request
sees a half-switched state). The version it replaces is UNLOADING: it takes no new
requests, finishes the queued and in-flight ones, then is closed. A version that fails any
step is UNAVAILABLE with the reason and the versions already serving keep serving.

The manifest's kind picks what a version is: ``retrieval`` (server/retrieval.py: the
Recommend pipeline, with a batcher) or ``generic`` (server/generic.py: an ONNX model served
only through KServe ModelInfer, no batcher). Both go through the same states and policies.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from recserve.features.history import HISTORY_SOURCE
from recserve.features.serving import StoreFeatures
from recserve.features.store import FeatureStore
from recserve.server.batcher import DynamicBatcher
from recserve.server.config import ServerConfig
from recserve.server.engines import EngineUnavailable
from recserve.server.errors import InvalidRequest, ModelNotFound, NotReady, Retired, VersionNotLoaded
from recserve.server.generic import GenericModel
from recserve.server.metrics import Metrics
from recserve.server.recommend import FeatureSource, Query, RequestFeatures, Result, recommend_batch
from recserve.server.repository import RepositoryError, list_versions, read_manifest, validate_model_name
from recserve.server.retrieval import RetrievalModel
from recserve.server.serving_config import SERVING_FILE, ServingPolicy, TrafficSplit, Variant

log = logging.getLogger(__name__)
LOADER_NICE = 10  # the loader thread yields the cores to the serving path


class State(str, enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"
    UNLOADING = "UNLOADING"


@dataclass
class ServedVersion:
    name: str
    version: int
    model: RetrievalModel | GenericModel
    batcher: DynamicBatcher | None  # None: a generic model (no Recommend pipeline)

    async def submit(self, query: Query, deadline: float | None) -> Result:
        if self.batcher is None:
            raise InvalidRequest(f"model {self.name!r} version {self.version} is a generic model: it has no "
                                 "Recommend pipeline; call inference.GRPCInferenceService/ModelInfer")
        return await self.batcher.submit(query, deadline)


@dataclass
class VersionEntry:
    version: int
    state: State
    reason: str = ""
    served: ServedVersion | None = None
    held: bool = False  # failed validation or unloaded on request: not loaded again until a LoadModel


@dataclass
class ModelEntry:
    """What the registry knows of one model directory."""

    name: str
    policy: ServingPolicy = field(default_factory=ServingPolicy)
    policy_error: str = ""  # serving.json could not be used (the previous policy stays)
    policy_mtime: float | None = None
    traffic_override: TrafficSplit | None = None
    pinned: int | None = None
    unloaded: bool = False  # the whole model unloaded on request: nothing loads until a LoadModel
    versions: dict[int, VersionEntry] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def traffic(self) -> TrafficSplit:
        return self.traffic_override if self.traffic_override is not None else self.policy.traffic

    def ready(self) -> dict[int, ServedVersion]:
        return {v: e.served for v, e in sorted(self.versions.items()) if e.state == State.READY and e.served}

    @property
    def serving(self) -> ServedVersion | None:
        """The default route: the pinned version if READY, else the newest READY one."""
        ready = self.ready()
        if self.pinned in ready:
            return ready[self.pinned]
        return ready[max(ready)] if ready else None

    def failures(self) -> str:
        return "; ".join(f"v{v}: {e.reason}" for v, e in sorted(self.versions.items()) if e.held) or "no versions"


def _lower_priority() -> None:
    """The loader thread's initializer: a lower CPU priority, and one thread for the kernels
    it calls (golden check, warm-up): a new version's top-k over its items would otherwise
    take both cores' memory bandwidth from the serving top-k while it is verified."""
    from recserve import _C

    _C._set_calling_thread_limit(1)
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOADER_NICE)  # this thread only (Linux)
    except (AttributeError, OSError):
        pass


def warm_up_batches(model: RetrievalModel | GenericModel) -> list[list[Query]]:
    """The manifest's golden requests as queries: each alone, then all together (one round
    of DynamicBatcher.warm_up: touches the mmap'd pages and measures what batches of these
    sizes cost)."""
    queries = []
    if isinstance(model, GenericModel):  # its golden requests were its warm-up (check_golden)
        return []
    for g in model.manifest.get("golden", []):
        record = dict(g["request"])
        user_id, history = str(record.pop("user_id", "") or "warm-up"), record.pop(HISTORY_SOURCE, None) or ()
        queries.append(Query(user_id=user_id, k=int(g["k"]), context={k: str(v) for k, v in record.items()},
                             recent_items=tuple(history)))
    return [[q] for q in queries] + ([queries] if queries else [])


class ModelRegistry:
    def __init__(self, config: ServerConfig, executor: Executor, metrics: Metrics | None = None,
                 store: FeatureStore | None = None, in_flight: Callable[[], int] | None = None,
                 loop_has_room: Callable[[], bool] | None = None):
        """``store``: the feature store the pipeline reads user features from (each version
        is checked against it when it loads); without one, features come from the request.
        ``in_flight()``: requests the server is handling; ``loop_has_room()``: compute may
        run on the event loop thread (DynamicBatcher)."""
        self.config = config
        if config.device == "cuda":  # this machine cannot serve on the GPU: one line, at startup
            from recserve.server.gpu import require_cuda

            require_cuda(config)
        self.store = store
        self.in_flight, self.loop_has_room = in_flight, loop_has_room
        self.repository = Path(config.repository)
        self.executor = executor
        self.metrics = metrics or Metrics.disabled()
        self.features: FeatureSource = StoreFeatures(store) if store is not None else RequestFeatures()
        self.models: dict[str, ModelEntry] = {}
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="recserve-loader", initializer=_lower_priority)
        self._watcher: asyncio.Task | None = None
        self._retiring: set[asyncio.Task] = set()
        self._shadows: set[asyncio.Task] = set()

    # -- discovery and policies -------------------------------------------------------
    def discover(self) -> list[str]:
        """Model directories of the repository (valid names only); models whose directory
        disappeared are forgotten once they have nothing loaded."""
        if not self.repository.is_dir():
            raise RepositoryError(f"{self.repository}: model repository is not a directory")
        names = []
        for path in sorted(self.repository.iterdir()):
            if not path.is_dir() or path.name.startswith("."):
                continue
            try:
                names.append(validate_model_name(path.name))
            except RepositoryError:
                log.warning("ignoring %s: not a valid model name", path)
        for name in names:
            self.models.setdefault(name, ModelEntry(name))
        return names

    def _read_policy(self, entry: ModelEntry) -> None:
        path = self.repository / entry.name / SERVING_FILE
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            mtime = None
        if mtime == entry.policy_mtime and entry.policy_mtime is not None:
            return
        entry.policy_mtime = mtime
        try:
            entry.policy = ServingPolicy.read(path.parent)
            entry.policy_error = ""
        except RepositoryError as e:  # keep serving with the previous policy
            entry.policy_error = str(e)
            log.error("model %s: %s (keeping the previous policy)", entry.name, e)

    def _wanted(self, entry: ModelEntry, published: list[int]) -> set[int]:
        """Versions of this model to have loaded: the policy's (skipping held ones), the
        pinned one, and those any traffic split (this model's or another's) names."""
        if entry.unloaded:
            return set()
        held = {v for v, e in entry.versions.items() if e.held}
        wanted = set(entry.policy.versions.wanted(published, sorted(held)))
        for owner in self.models.values():
            split = owner.traffic
            for v in split.variants + ((split.shadow,) if split.shadow else ()):
                if v.version is not None and (v.model or owner.name) == entry.name:
                    wanted.add(v.version)
        if entry.pinned is not None:
            wanted.add(entry.pinned)
        return {v for v in wanted if v in published and v not in held}

    # -- lifecycle --------------------------------------------------------------------
    async def start(self, watch: bool = True) -> None:
        await self.refresh()
        if watch and self.config.poll_interval_s > 0:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="repository watcher")

    async def refresh(self, name: str | None = None) -> None:
        """Rescan the repository (or one model) and apply the policies."""
        names = self.discover() if name is None else [name]
        await asyncio.gather(*(self.sync(n) for n in names))

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval_s)
            try:
                await self.refresh()
            except Exception:  # a bad scan must not stop the watching
                log.exception("repository scan failed")

    async def sync(self, name: str) -> None:
        """Bring one model to its policy: load the wanted versions (newest first; a failure
        makes the policy fall through to an older version), then retire the rest."""
        entry = self.models.setdefault(name, ModelEntry(name))
        async with entry.lock:
            self._read_policy(entry)
            for _ in range(64):  # each pass loads or fails at least one version
                published = list_versions(self.repository / name)
                todo = sorted((v for v in self._wanted(entry, published)
                               if v not in entry.versions or entry.versions[v].state == State.UNAVAILABLE),
                              reverse=True)
                if not todo:
                    break
                await self._load_version(entry, todo[0])
            published = list_versions(self.repository / name)
            wanted, ready = self._wanted(entry, published), entry.ready()
            # keep what is wanted; if nothing wanted loads, keep what serves now
            keep = (wanted & set(ready)) or ({entry.serving.version} if entry.serving else set())
            for v in ready:
                if v not in keep:
                    self._retire(entry, entry.versions[v], f"not in the version policy (serving version "
                                                           f"{entry.serving.version})" if v in published
                                 else "deleted from the repository")
            for v, e in list(entry.versions.items()):
                if v not in published and e.state in (State.UNAVAILABLE, State.LOADING) and e.served is None:
                    del entry.versions[v]
            if entry.serving is None and not published:
                log.warning("model %s has no versions", name)

    async def _load_version(self, entry: ModelEntry, version: int) -> None:
        name = entry.name
        ve = entry.versions[version] = VersionEntry(version, State.LOADING)
        self.metrics.swap_event(name, version, "loading")
        loop = asyncio.get_running_loop()
        try:
            model = await loop.run_in_executor(self._loader, self._build_version, name, version)
            served = self._serve(name, version, model)
            if served.batcher is not None:
                await loop.run_in_executor(self._loader, served.batcher.warm_up, warm_up_batches(model))
        except Exception as e:  # any failure: report it; what serves keeps serving
            ve.state, ve.held, ve.reason = State.UNAVAILABLE, True, f"{type(e).__name__}: {e}"
            log.error("model %s version %d rejected: %s", name, version, ve.reason)
            self.metrics.swap_event(name, version, "rejected")
            return
        previous = entry.serving
        ve.served, ve.state, ve.reason = served, State.READY, ""
        log.info("model %s version %d is READY (%s)%s", name, version,
                 "generic" if isinstance(model, GenericModel) else f"{len(model.item_ids)} items",
                 f"; serving version {entry.serving.version}" if entry.serving else "")
        self.metrics.swap_event(name, version, "ready")
        if previous is not None and entry.serving is not previous:
            log.info("model %s: routing switched from version %d to %d", name, previous.version,
                     entry.serving.version)

    def _build_version(self, name: str, version: int) -> RetrievalModel | GenericModel:
        """In the loader thread: open, verify and check one version (raises on any fault)."""
        version_dir = self.repository / name / str(version)
        options = {"threads": self.config.engine_threads}
        kind = read_manifest(version_dir)["kind"]
        if kind not in ("retrieval", "generic"):
            raise RepositoryError(f"{version_dir}: kind {kind!r} is not served yet (serves: retrieval, generic)")
        backends = self._backends(version_dir)
        for backend in backends:
            try:
                if kind == "generic":
                    model = GenericModel.load(version_dir, backend=backend, engine_options=options)
                else:
                    model = RetrievalModel.load(version_dir, backend=backend, item_dtype=self.config.item_dtype,
                                                engine_options=options)
                    max_batch = model.manifest["engines"][backend].get("max_batch")
                    if max_batch is not None and self.config.batching.max_batch_size > max_batch:
                        raise EngineUnavailable(f"its plan takes batches up to {max_batch}, "
                                                f"max_batch_size is {self.config.batching.max_batch_size}")
                model.check_golden()
                if kind == "retrieval" and self.store is not None:
                    self.store.check_compatible(model.spec)  # SchemaMismatch names each difference
            except (EngineUnavailable, RepositoryError) as e:
                if backend == backends[-1] or (self.config.engine != "auto"):
                    raise
                log.warning("model %s version %d: %s engine not used (%s); trying %s", name, version, backend, e,
                            backends[backends.index(backend) + 1])
                continue
            log.info("model %s version %d: %s engine (%s)", name, version, backend, ", ".join(model.engine.providers))
            if kind == "retrieval" and self.config.device == "cuda":  # server/gpu.py: resident, golden-checked
                from recserve.server.gpu import to_device

                model = to_device(model, self.config, log=lambda where: log.info(
                    "model %s version %d: on %s", name, version, where))
            return model
        raise EngineUnavailable(f"{version_dir}: no engine that runs here")

    def _backends(self, version_dir: Path) -> list[str]:
        """Engines to try, best first: the configured one, or (auto) TensorRT then ONNX."""
        if self.config.engine != "auto":
            return [self.config.engine]
        available = read_manifest(version_dir).get("engines", {})
        return [b for b in ("tensorrt", "onnx") if b in available]

    def _serve(self, name: str, version: int, model: RetrievalModel | GenericModel) -> ServedVersion:
        if isinstance(model, GenericModel):  # ModelInfer runs its engine (server/kserve.py)
            return ServedVersion(name, version, model, None)

        def run(queries):
            return recommend_batch(model, self.features, queries)

        def observe(size: int, queued: list[float], compute: float, results) -> None:
            self.metrics.batch(name, version, size, queued, compute)
            if results:
                self.metrics.stages(name, version, results[0].stages)

        batcher = DynamicBatcher(run, self.config.batching, self.executor, name=f"{name}/{version}", observe=observe,
                                 in_flight=self.in_flight, loop_has_room=self.loop_has_room)
        batcher.start()
        return ServedVersion(name, version, model, batcher)

    def _retire(self, entry: ModelEntry, ve: VersionEntry, why: str) -> None:
        """UNLOADING now (routing no longer picks it), closed once its requests are answered."""
        ve.state, ve.reason = State.UNLOADING, why
        served = ve.served
        log.info("model %s version %d is UNLOADING: %s", entry.name, ve.version, why)
        self.metrics.swap_event(entry.name, ve.version, "unloading")

        async def finish() -> None:
            if served.batcher is not None:  # a generic version has nothing queued
                await served.batcher.drain()
            if entry.versions.get(ve.version) is ve:
                ve.served, ve.state, ve.reason = None, State.UNAVAILABLE, f"unloaded ({why})"
            log.info("model %s version %d unloaded", entry.name, ve.version)
            self.metrics.swap_event(entry.name, ve.version, "unloaded")

        task = asyncio.get_running_loop().create_task(finish(), name=f"retire {entry.name}/{ve.version}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    # -- admin ------------------------------------------------------------------------
    def entry(self, name: str) -> ModelEntry:
        entry = self.models.get(name)
        if entry is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise ModelNotFound(f"unknown model {name!r} (models: {known})")
        return entry

    async def load(self, name: str, version: int | None = None) -> None:
        """With a version: load it if needed and pin it as the default route (rollback).
        Without: unpin, forget past failures and apply the policy again."""
        if name not in self.models:
            self.discover()
        entry = self.entry(name)
        published = list_versions(self.repository / name)
        if version is not None and version not in published:
            raise ModelNotFound(f"model {name!r} has no version {version} (versions: {published})")
        async with entry.lock:
            for ve in entry.versions.values():
                if ve.held and (version is None or ve.version == version):
                    ve.held = False
            entry.pinned = version
            entry.unloaded = False
        await self.sync(name)
        if version is not None and entry.versions[version].state != State.READY:
            entry.pinned = None
            raise VersionNotLoaded(f"model {name!r} version {version} did not load: "
                                   f"{entry.versions[version].reason}")

    async def unload(self, name: str, version: int) -> None:
        entry = self.entry(name)
        async with entry.lock:
            ve = entry.versions.get(version)
            if ve is None or ve.state != State.READY:
                raise VersionNotLoaded(f"model {name!r} version {version} is not loaded "
                                       f"({ve.state.value if ve else 'never loaded'})")
            if len(entry.ready()) == 1:
                raise VersionNotLoaded(f"model {name!r} version {version} is its only READY version; "
                                       "load another one first")
            if entry.pinned == version:
                entry.pinned = None
            ve.held = True  # the policy must not load it straight back
            self._retire(entry, ve, "unloaded by request")

    async def unload_model(self, name: str) -> None:
        """Stop serving every version of a model (KServe RepositoryModelUnload): each finishes
        what it has queued; none is loaded again until a load(name)."""
        entry = self.entry(name)
        async with entry.lock:  # no version is LOADING while the lock is held (sync holds it)
            entry.pinned, entry.unloaded = None, True
            for ve in entry.versions.values():
                if ve.state == State.READY:
                    self._retire(entry, ve, "unloaded by request")

    async def set_traffic(self, name: str, split: TrafficSplit | None) -> None:
        """Replace the model's traffic split (None: back to serving.json's) and load the
        versions its variants name. Until they are READY their traffic goes to the
        variants that are (or to the serving version)."""
        entry = self.entry(name)
        variants = (split.variants + ((split.shadow,) if split.shadow else ())) if split else ()
        for v in variants:
            target = self.entry(v.model) if v.model else entry
            if v.version is not None and v.version not in list_versions(self.repository / target.name):
                raise InvalidRequest(f"variant {v.name!r}: model {target.name!r} has no version {v.version}")
        entry.traffic_override = split
        await asyncio.gather(*(self.sync(n) for n in {name, *(v.model for v in variants if v.model)}))

    def status(self) -> list[ModelEntry]:
        return [self.models[n] for n in sorted(self.models)]

    # -- routing ----------------------------------------------------------------------
    def _variant_target(self, entry: ModelEntry, v: Variant) -> ServedVersion | None:
        target = self.models.get(v.model) if v.model else entry
        if target is None:
            return None
        if v.version is None:
            return target.serving
        return target.ready().get(v.version)

    def get(self, name: str, version: int | None = None) -> ServedVersion:
        """The version a request with this model/version goes to (no traffic split)."""
        entry = self.entry(name)
        if version is not None:
            ve = entry.versions.get(version)
            if ve is not None and ve.state == State.READY and ve.served:
                return ve.served
            published = list_versions(self.repository / name)
            if version not in published:
                raise ModelNotFound(f"model {name!r} has no version {version} (versions: {published})")
            serving = entry.serving
            why = f" ({ve.state.value}: {ve.reason})" if ve is not None and ve.reason else ""
            raise VersionNotLoaded(f"model {name!r} version {version} is not loaded"
                                   f"{f' (serving version {serving.version})' if serving else ''}{why}")
        served = entry.serving
        if served is None:
            if entry.unloaded:
                raise NotReady(f"model {name!r} was unloaded on request; load it to serve it again")
            if any(e.state == State.LOADING for e in entry.versions.values()):
                raise NotReady(f"model {name!r} is loading; retry shortly")
            raise NotReady(f"model {name!r} has no loadable version ({entry.failures()})")
        return served

    def route(self, name: str, user_id: str, version: int | None = None,
              variant: str | None = None) -> tuple[ServedVersion, str]:
        """(version to compute on, variant name) for one request."""
        if version is not None:
            return self.get(name, version), ""
        entry = self.entry(name)
        split = entry.traffic
        if variant:
            v = split.variant(variant)
            if v is None:
                names = ", ".join(x.name for x in split.variants) or "none"
                raise InvalidRequest(f"model {name!r} has no variant {variant!r} (variants: {names})")
            served = self._variant_target(entry, v)
            if served is None:
                raise NotReady(f"model {name!r} variant {variant!r} is not ready; retry shortly")
            return served, v.name
        if split.active:
            ready = {v.name: self._variant_target(entry, v) is not None for v in split.variants}
            v = split.pick(user_id, ready)
            if v is not None:
                return self._variant_target(entry, v), v.name
        return self.get(name), ""

    async def recommend(self, name: str, query: Query, deadline: float | None, version: int | None = None,
                        variant: str | None = None) -> tuple[Result, ServedVersion, str]:
        for attempt in range(3):
            served, variant_name = self.route(name, query.user_id, version, variant)
            shadow = None
            if version is None and not variant:
                shadow = self._shadow_target(name)
            shadow_task = None
            if shadow is not None and shadow is not served:
                shadow_task = asyncio.get_running_loop().create_task(shadow.submit(query, None))
            try:
                result = await served.submit(query, deadline)
            except Retired:  # swapped out between routing and queueing: route again
                if shadow_task:
                    shadow_task.cancel()
                if attempt == 2:
                    raise
                continue
            if shadow_task is not None:
                self._watch_shadow(name, self.models[name].traffic.shadow.name, shadow_task, result)
            return result, served, variant_name
        raise AssertionError("unreachable")

    def _shadow_target(self, name: str) -> ServedVersion | None:
        entry = self.models[name]
        shadow = entry.traffic.shadow
        return self._variant_target(entry, shadow) if shadow is not None else None

    def _watch_shadow(self, name: str, variant: str, task: asyncio.Task, primary: Result) -> None:
        """Record the shadow's outcome and its agreement with the answer returned."""

        def done(t: asyncio.Task) -> None:
            self._shadows.discard(t)
            if t.cancelled():
                return
            if t.exception() is not None:
                self.metrics.shadow(name, variant, "error", None)
                return
            ids = t.result().item_ids
            overlap = len(set(ids) & set(primary.item_ids)) / max(len(primary.item_ids), 1)
            self.metrics.shadow(name, variant, "ok", overlap)

        self._shadows.add(task)
        task.add_done_callback(done)

    @property
    def ready(self) -> bool:
        return bool(self.models) and all(e.serving is not None for e in self.models.values())

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        for task in list(self._shadows):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        for entry in self.models.values():
            for ve in entry.versions.values():
                if ve.served is not None and ve.served.batcher is not None:
                    await ve.served.batcher.close()
        self._loader.shutdown(wait=False, cancel_futures=True)
