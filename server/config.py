"""Server configuration: parsed once (CLI flags over an optional JSON file) into frozen dataclasses.

    cfg = ServerConfig.from_sources(config_file="serve.json", overrides={"port": 9000})

serve.json example (every key optional except repository):
    {"repository": "models", "port": 8500, "metrics_port": 9464, "poll_interval_s": 2,
     "admin_token_file": "/etc/recserve/admin-token",
     "device": "cuda", "cuda_device": 0, "gpu_engine": "auto",
     "batching": {"max_batch_size": 64, "max_queue_delay_us": 0, "max_queue_size": 1024,
                  "inline_compute_us": 500}}
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

GPU_ENGINES = ("auto", "tensorrt", "onnx-cuda", "torch")  # server/gpu_engines.py


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = 64
    # How long the first request of a batch may wait for company. 0 (default): never wait;
    # requests that arrive while a batch computes form the next batch, so batches grow
    # with load and a lone request is not delayed.
    max_queue_delay_us: int = 0
    max_queue_size: int = 1024  # waiting requests per model version; beyond: RESOURCE_EXHAUSTED
    # A batch whose measured cost (median of recent batches of its size, warm-up runs at
    # load included) is at most this many µs is computed on the event loop thread: handing
    # it to the compute thread and back costs ~0.3 ms of latency at low load on the 2-core
    # dev VM (bench/serve.py). A lone request in a quiet server is computed there at any
    # cost (server/batcher.py). 0: always hand batches to the compute thread.
    inline_compute_us: int = 500

    def __post_init__(self):
        for name in ("max_batch_size", "max_queue_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"config: batching.{name} must be an integer >= 1")
        for name in ("max_queue_delay_us", "inline_compute_us"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"config: batching.{name} must be an integer >= 0")


@dataclass(frozen=True)
class ServerConfig:
    repository: str
    host: str = "[::]"
    port: int = 8500
    max_k: int = 1000
    item_dtype: str = "float32"  # item matrix precision: float32 or float16 (half the bytes)
    engine: str = "auto"  # auto: TensorRT when the version has a plan and it runs here, else onnx
    engine_threads: int = 0  # ONNX Runtime intra-op threads (0: its default)
    compute_threads: int = 1  # batches computed at once (each already uses the cores)
    drain_timeout_s: float = 30.0
    poll_interval_s: float = 2.0  # how often the repository is rescanned (0: only on LoadModel)
    admin_token: str | None = None  # bearer token for recserve.v1.ModelService; None: admin disabled
    admin_token_file: str | None = None  # or read it from this file (first line)
    metrics_port: int | None = 9464  # Prometheus endpoint (0: any free port; None: no metrics)
    # RecommendService (+ health, reflection) also on a gRPC C++ front end at this port
    # (server/native.py; 0: any free port; None: off): less CPU per call than grpc.aio.
    native_port: int | None = None
    feature_store: str | None = None  # LMDB feature store: user histories + live events (None: from requests)
    tls_cert: str | None = None  # PEM certificate chain: serve TLS on the gRPC port
    tls_key: str | None = None  # its PEM private key
    tls_client_ca: str | None = None  # PEM CA bundle: mutual TLS, clients must present a certificate it signed
    trace_exporter: str | None = None  # None: tracing off; "otlp" (OTLP/gRPC) or "console"
    trace_endpoint: str = "localhost:4317"  # OTLP collector
    trace_insecure: bool = True  # plaintext to the collector
    trace_sample_ratio: float = 0.01  # share of traces kept (a sampled incoming traceparent is always kept)
    log_format: str = "text"  # "text" or "json" (one JSON object per line)
    max_receive_message_bytes: int = 4 << 20  # largest request accepted (gRPC's default)
    max_send_message_bytes: int = 16 << 20  # largest reply sent
    # Where the Recommend pipeline runs: "cpu", or "cuda" (tables, item matrix and every stage
    # on GPU cuda_device, server/gpu.py); gpu_engine picks the dense engine on the GPU:
    # auto (TensorRT with a .plan, else ONNX Runtime's CUDA EP, else torch), or one of them.
    device: str = "cpu"
    cuda_device: int = 0
    gpu_engine: str = "auto"
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    _admin_bearer: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.repository, str) or not self.repository:
            raise ValueError("config: repository must be a directory path")
        if not isinstance(self.port, int) or not 0 <= self.port < 65536:
            raise ValueError(f"config: port must be 0..65535, got {self.port!r}")
        if not isinstance(self.max_k, int) or self.max_k < 1:
            raise ValueError("config: max_k must be an integer >= 1")
        if self.item_dtype not in ("float32", "float16"):
            raise ValueError(f"config: item_dtype must be float32 or float16, got {self.item_dtype!r}")
        if self.engine not in ("auto", "onnx", "tensorrt"):
            raise ValueError(f"config: engine must be auto, onnx or tensorrt, got {self.engine!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"config: device must be cpu or cuda, got {self.device!r}")
        if not isinstance(self.cuda_device, int) or isinstance(self.cuda_device, bool) or self.cuda_device < 0:
            raise ValueError(f"config: cuda_device must be an integer >= 0, got {self.cuda_device!r}")
        if self.gpu_engine not in GPU_ENGINES:
            raise ValueError(f"config: gpu_engine must be one of {', '.join(GPU_ENGINES)}, got {self.gpu_engine!r}")
        if not isinstance(self.compute_threads, int) or self.compute_threads < 1:
            raise ValueError("config: compute_threads must be an integer >= 1")
        if not isinstance(self.drain_timeout_s, (int, float)) or self.drain_timeout_s < 0:
            raise ValueError("config: drain_timeout_s must be >= 0")
        if self.feature_store is not None and (not isinstance(self.feature_store, str) or not self.feature_store):
            raise ValueError("config: feature_store must be a path")
        if self.trace_exporter not in (None, "otlp", "console"):
            raise ValueError(f"config: trace_exporter must be otlp, console or null, got {self.trace_exporter!r}")
        if not isinstance(self.trace_sample_ratio, (int, float)) or not 0 <= self.trace_sample_ratio <= 1:
            raise ValueError("config: trace_sample_ratio must be in [0, 1]")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"config: log_format must be text or json, got {self.log_format!r}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("config: TLS needs both tls_cert and tls_key")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("config: tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"config: {name} {path}: no such file")
        for name in ("max_receive_message_bytes", "max_send_message_bytes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1024:
                raise ValueError(f"config: {name} must be an integer >= 1024")
        if not isinstance(self.poll_interval_s, (int, float)) or self.poll_interval_s < 0:
            raise ValueError("config: poll_interval_s must be >= 0")
        if self.metrics_port is not None and (not isinstance(self.metrics_port, int)
                                              or not 0 <= self.metrics_port < 65536):
            raise ValueError(f"config: metrics_port must be 0..65535 or null, got {self.metrics_port!r}")
        if self.native_port is not None and (not isinstance(self.native_port, int)
                                             or isinstance(self.native_port, bool)
                                             or not 0 <= self.native_port < 65536):
            raise ValueError(f"config: native_port must be 0..65535 or null, got {self.native_port!r}")
        if self.native_port and self.native_port == self.port:
            raise ValueError(f"config: native_port and port must differ, both are {self.port}")
        if self.admin_token is not None and self.admin_token_file is not None:
            raise ValueError("config: give admin_token or admin_token_file, not both")
        token = self.admin_token
        if self.admin_token_file is not None:
            try:
                token = Path(self.admin_token_file).read_text().splitlines()[0].strip()
            except (OSError, IndexError):
                raise ValueError(f"config: admin_token_file {self.admin_token_file}: cannot read a token") from None
        if token is not None and (not isinstance(token, str) or len(token) < 16):
            raise ValueError("config: the admin token must be a string of at least 16 characters")
        object.__setattr__(self, "_admin_bearer", token)

    @property
    def admin_bearer_token(self) -> str | None:
        """The admin token (from admin_token or admin_token_file); None: admin API off."""
        return self._admin_bearer

    @classmethod
    def from_dict(cls, d: dict) -> ServerConfig:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config: unknown key {unknown[0]!r}")
        batching = d.pop("batching", {})
        try:
            return cls(batching=BatchingConfig(**batching), **d)
        except TypeError as e:
            raise ValueError(f"config: {e}") from None

    @classmethod
    def from_sources(cls, config_file: str | None = None, overrides: dict | None = None) -> ServerConfig:
        base: dict = {}
        if config_file:
            try:
                base = json.loads(Path(config_file).read_text())
            except FileNotFoundError:
                raise ValueError(f"{config_file}: no such config file") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{config_file}: not valid JSON ({e})") from None
        for key, value in (overrides or {}).items():
            if value is None:
                continue
            if key.startswith("batching."):
                base.setdefault("batching", {})[key.split(".", 1)[1]] = value
            else:
                base[key] = value
        return cls.from_dict(base)
