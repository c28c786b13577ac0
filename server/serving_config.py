"""Per-model serving policy: ``<repository>/<model>/serving.json``, parsed into frozen dataclasses.

    policy = ServingPolicy.read(model_dir)          # defaults when the file is absent
    policy.versions.wanted([1, 2, 3, 4])            # which published versions to serve
    variant = policy.traffic.pick("user-17")        # sticky A/B assignment

serving.json (every key optional)::

    {"version_policy": {"latest": 2}},              # or {"specific": [3, 5]}
     "traffic": {"salt": "exp-42",
                 "variants": [{"name": "control", "version": 3, "weight": 90},
                              {"name": "treatment", "version": 5, "weight": 10},
                              {"name": "other-model", "model": "retail-v2", "weight": 0}],
                 "shadow": {"name": "candidate", "version": 6}}}

A variant names a version of this model, or (``model``) another model of the repository
(its serving version unless ``version`` is given). Users are assigned by a stable hash of
(salt, user_id), so a user keeps their variant across calls and servers; changing the salt
reshuffles them. The shadow variant receives a copy of the traffic; its answers are
measured and never returned.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from recserve import kernels
from recserve.server.repository import RepositoryError, validate_model_name

SERVING_FILE = "serving.json"


def _fail(where: str, message: str):
    raise RepositoryError(f"{where}: {message}")


@dataclass(frozen=True)
class VersionPolicy:
    """``latest``: the newest N versions that load (a version that fails is skipped, so an
    older one keeps serving); ``specific``: exactly these versions."""

    latest: int = 1
    specific: tuple[int, ...] = ()

    def wanted(self, published: Sequence[int], failed: Sequence[int] = ()) -> list[int]:
        if self.specific:
            return [v for v in self.specific if v in published]
        usable = [v for v in sorted(published) if v not in set(failed)]
        return usable[-self.latest:]

    @classmethod
    def from_dict(cls, d, where: str) -> VersionPolicy:
        if not isinstance(d, Mapping) or len(d) != 1 or next(iter(d)) not in ("latest", "specific"):
            _fail(where, 'version_policy must be {"latest": N} or {"specific": [versions]}')
        if "latest" in d:
            n = d["latest"]
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                _fail(where, f"version_policy.latest must be an integer >= 1, got {n!r}")
            return cls(latest=n)
        versions = d["specific"]
        if (not isinstance(versions, list) or not versions
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in versions)):
            _fail(where, f"version_policy.specific must be a non-empty list of versions >= 1, got {versions!r}")
        return cls(specific=tuple(sorted(set(versions))))


@dataclass(frozen=True)
class Variant:
    name: str
    model: str = ""  # "" = this model
    version: int | None = None  # None = the model's serving version
    weight: float = 0.0

    def to_dict(self) -> dict:
        d: dict = {"name": self.name, "weight": self.weight}
        if self.model:
            d["model"] = self.model
        if self.version is not None:
            d["version"] = self.version
        return d

    @classmethod
    def from_dict(cls, d, where: str, *, weighted: bool = True) -> Variant:
        if not isinstance(d, Mapping):
            _fail(where, "a variant must be an object with name, version and/or model, weight")
        unknown = sorted(set(d) - {"name", "model", "version", "weight"})
        if unknown:
            _fail(where, f"unknown variant key {unknown[0]!r}")
        name = d.get("name")
        if not isinstance(name, str) or not name:
            _fail(where, "a variant needs a non-empty name")
        model = d.get("model", "")
        if model:
            validate_model_name(model)
        version = d.get("version")
        if version is not None and (not isinstance(version, int) or isinstance(version, bool) or version < 1):
            _fail(where, f"variant {name!r}: version must be an integer >= 1, got {version!r}")
        if not model and version is None:
            _fail(where, f"variant {name!r} needs a version, a model, or both")
        weight = d.get("weight", 0.0)
        if weighted and (not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0):
            _fail(where, f"variant {name!r}: weight must be a number >= 0, got {weight!r}")
        return cls(name=name, model=model, version=version, weight=float(weight) if weighted else 0.0)


@dataclass(frozen=True)
class TrafficSplit:
    salt: str = ""
    variants: tuple[Variant, ...] = ()
    shadow: Variant | None = None
    _cumulative: tuple[float, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self):
        names = [v.name for v in self.variants] + ([self.shadow.name] if self.shadow else [])
        if len(set(names)) != len(names):
            raise RepositoryError(f"traffic: variant names must be unique, got {names}")
        total = sum(v.weight for v in self.variants)
        if self.variants and total <= 0:
            raise RepositoryError("traffic: the variants' weights must not all be 0")
        acc, cumulative = 0.0, []
        for v in self.variants:
            acc += v.weight / total
            cumulative.append(acc)
        object.__setattr__(self, "_cumulative", tuple(cumulative))

    @property
    def active(self) -> bool:
        return bool(self.variants)

    def variant(self, name: str) -> Variant | None:
        for v in self.variants + ((self.shadow,) if self.shadow else ()):
            if v.name == name:
                return v
        return None

    def bucket(self, user_id: str) -> float:
        """The user's stable position in [0, 1)."""
        return kernels.murmur3_32(f"{self.salt}\x00{user_id}".encode(), 0) / 2.0**32

    def pick(self, user_id: str, ready: Mapping[str, bool] | None = None) -> Variant | None:
        """The user's variant. With ``ready`` (variant name -> servable), variants that
        cannot serve now are left out and the others' weights share their traffic."""
        if not self.variants:
            return None
        candidates = [v for v in self.variants if ready is None or ready.get(v.name, False)]
        if not candidates:
            return None
        if len(candidates) == len(self.variants):
            b = self.bucket(user_id)
            for v, edge in zip(self.variants, self._cumulative):
                if b < edge:
                    return v
            return self.variants[-1]
        return TrafficSplit(self.salt, tuple(candidates)).pick(user_id)

    def to_dict(self) -> dict:
        d: dict = {"salt": self.salt, "variants": [v.to_dict() for v in self.variants]}
        if self.shadow:
            d["shadow"] = {k: v for k, v in self.shadow.to_dict().items() if k != "weight"}
        return d

    @classmethod
    def from_dict(cls, d, where: str) -> TrafficSplit:
        if not isinstance(d, Mapping):
            _fail(where, "traffic must be an object")
        unknown = sorted(set(d) - {"salt", "variants", "shadow"})
        if unknown:
            _fail(where, f"unknown traffic key {unknown[0]!r}")
        salt = d.get("salt", "")
        if not isinstance(salt, str):
            _fail(where, "traffic.salt must be a string")
        variants = d.get("variants", [])
        if not isinstance(variants, list):
            _fail(where, "traffic.variants must be a list")
        shadow = d.get("shadow")
        try:
            return cls(salt=salt, variants=tuple(Variant.from_dict(v, where) for v in variants),
                       shadow=Variant.from_dict(shadow, where, weighted=False) if shadow is not None else None)
        except RepositoryError as e:
            if str(e).startswith("traffic:"):
                _fail(where, str(e))
            raise


@dataclass(frozen=True)
class ServingPolicy:
    versions: VersionPolicy = VersionPolicy()
    traffic: TrafficSplit = TrafficSplit()

    @classmethod
    def from_dict(cls, d, where: str) -> ServingPolicy:
        if not isinstance(d, Mapping):
            _fail(where, "must be a JSON object")
        unknown = sorted(set(d) - {"version_policy", "traffic"})
        if unknown:
            _fail(where, f"unknown key {unknown[0]!r} (known: version_policy, traffic)")
        versions = VersionPolicy.from_dict(d["version_policy"], where) if "version_policy" in d else VersionPolicy()
        traffic = TrafficSplit.from_dict(d["traffic"], where) if "traffic" in d else TrafficSplit()
        return cls(versions, traffic)

    @classmethod
    def read(cls, model_dir: Path) -> ServingPolicy:
        path = Path(model_dir) / SERVING_FILE
        try:
            text = path.read_text()
        except FileNotFoundError:
            return cls()
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise RepositoryError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, str(path))
