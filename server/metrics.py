"""Server metrics through the OpenTelemetry SDK, exported for Prometheus.

    metrics = Metrics.serve_prometheus(host="[::]", port=9464)   # GET http://host:9464/metrics
    metrics.request("retail", 3, "control", "OK", 0.0012)
    metrics.close()
    Metrics.disabled()                                          # the same calls, recording nothing

Each server has its own MeterProvider and Prometheus registry (several servers in one
process, as in the tests, do not mix their numbers). Names (Prometheus form; OTel
instrument names are the same without the unit suffix) and labels:

  recserve_requests_total                   model, version, variant, code   RPCs answered
  recserve_request_duration_seconds         model, version, variant, code   handler latency
  recserve_batch_size                       model, version                  requests per batch
  recserve_queue_duration_seconds           model, version                  arrival -> compute start
  recserve_compute_duration_seconds         model, version                  one batch's pipeline
  recserve_stage_duration_seconds           model, version, stage           features, hash, lookup,
                                                                            engine, topk (per batch)
  recserve_model_events_total               model, version, event           loading/ready/rejected/
                                                                            unloading/unloaded
  recserve_shadow_requests_total            model, variant, outcome         shadow copies (ok/error)
  recserve_shadow_overlap                   model, variant                  |shadow ∩ answer| / k
  recserve_feature_reads_total              view, outcome                   store reads: hit, missing,
                                                                            expired (cold start)
  recserve_feature_events_total                                             live events written
  recserve_feature_store_resizes_total                                      LMDB map growths
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_STAGE_BUCKETS = (0.00001, 0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1,
                  0.2, 0.5)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_RATIO_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99, 1.0)


class Metrics:
    def __init__(self, meter, provider=None, http=None, port: int | None = None):
        self._provider, self._http, self.port = provider, http, port
        self._requests = meter.create_counter("recserve_requests", description="RPCs answered, by status code")
        self._latency = meter.create_histogram("recserve_request_duration", unit="s",
                                               description="time in the handler, by status code")
        self._batch = meter.create_histogram("recserve_batch_size", description="requests per computed batch")
        self._queue = meter.create_histogram("recserve_queue_duration", unit="s",
                                             description="from a request's arrival to its batch's compute start")
        self._compute = meter.create_histogram("recserve_compute_duration", unit="s",
                                               description="one batch through the pipeline")
        self._stage = meter.create_histogram("recserve_stage_duration", unit="s",
                                             description="one pipeline stage of a batch")
        self._events = meter.create_counter("recserve_model_events", description="model version lifecycle events")
        self._shadow = meter.create_counter("recserve_shadow_requests", description="shadow copies, by outcome")
        self._overlap = meter.create_histogram("recserve_shadow_overlap",
                                               description="share of the returned items the shadow also returned")
        self._meter = meter

    @classmethod
    def disabled(cls) -> Metrics:
        from opentelemetry.metrics import NoOpMeter

        return cls(NoOpMeter("recserve"))

    @classmethod
    def serve_prometheus(cls, host: str, port: int) -> Metrics:
        """A MeterProvider read by a Prometheus endpoint on host:port (0: any free port)."""
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
        from opentelemetry.sdk.resources import Resource
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry()
        reader = PrometheusMetricReader(registry=registry, disable_target_info=True)
        views = [View(instrument_name=n, aggregation=ExplicitBucketHistogramAggregation(b)) for n, b in (
            ("recserve_request_duration", _LATENCY_BUCKETS), ("recserve_queue_duration", _LATENCY_BUCKETS),
            ("recserve_compute_duration", _LATENCY_BUCKETS), ("recserve_stage_duration", _STAGE_BUCKETS),
            ("recserve_batch_size", _SIZE_BUCKETS),
            ("recserve_shadow_overlap", _RATIO_BUCKETS))]
        provider = MeterProvider(metric_readers=[reader], views=views,
                                 resource=Resource.create({"service.name": "recserve"}))
        http, _ = start_http_server(port, addr=host.strip("[]") if host != "[::]" else "::", registry=registry)
        bound = http.server_port
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return cls(provider.get_meter("recserve"), provider, http, bound)

    # -- recording (cheap; called on the serving path) --------------------------------
    def request(self, model: str, version: int, variant: str, code: str, seconds: float) -> None:
        attrs = {"model": model, "version": str(version), "variant": variant, "code": code}
        self._requests.add(1, attrs)
        self._latency.record(seconds, attrs)

    def batch(self, model: str, version: int, size: int, queue_seconds: list[float], compute_seconds: float) -> None:
        attrs = {"model": model, "version": str(version)}
        self._batch.record(size, attrs)
        for q in queue_seconds:
            self._queue.record(q, attrs)
        self._compute.record(compute_seconds, attrs)

    def stages(self, model: str, version: int, stages) -> None:
        """(stage, start ns, end ns) of one batch."""
        for stage, start, end in stages:
            self._stage.record((end - start) / 1e9, {"model": model, "version": str(version), "stage": stage})

    def swap_event(self, model: str, version: int, event: str) -> None:
        self._events.add(1, {"model": model, "version": str(version), "event": event})

    def shadow(self, model: str, variant: str, outcome: str, overlap: float | None) -> None:
        self._shadow.add(1, {"model": model, "variant": variant, "outcome": outcome})
        if overlap is not None:
            self._overlap.record(overlap, {"model": model, "variant": variant})

    def watch_feature_store(self, counters) -> None:
        """Export the store's monotonic counters (``FeatureStore.counters``), read at scrape time."""
        from opentelemetry.metrics import Observation

        def reads(options):
            c = counters()
            out = []
            for key, n in c.items():
                view, _, what = key.rpartition("_")
                if view and what in ("hits", "missing", "expired"):
                    out.append(Observation(n, {"view": view, "outcome": "hit" if what == "hits" else what}))
            return out

        def single(name):
            return lambda options: [Observation(counters().get(name, 0))]

        self._meter.create_observable_counter("recserve_feature_reads", [reads],
                                              description="feature store reads by outcome (missing/expired: cold start)")
        self._meter.create_observable_counter("recserve_feature_events", [single("events_pushed")],
                                              description="live events written to the feature store")
        self._meter.create_observable_counter("recserve_feature_store_resizes", [single("map_resizes")],
                                              description="feature store map growths")

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._provider is not None:
            self._provider.shutdown()
