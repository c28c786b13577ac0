"""OpenTelemetry tracing: a span per Recommend query, with a child span per pipeline stage.

    tracing = Tracing.from_config(config)            # off unless trace_exporter is set
    span = tracing.start("recserve.Recommend", metadata, {"recserve.model": "retail"})
    ...; tracing.finish(span, stages, status_code)    # stages: [(name, start_ns, end_ns), ...]

Off (the default) costs one ``if`` per request: no tracer, no span objects. On, requests are
sampled by trace id (``trace_sample_ratio``; a caller's sampled ``traceparent`` is
honoured, so a trace that started upstream continues here) and exported in batches by a
background thread, over OTLP/gRPC to ``trace_endpoint`` or to the console.

The pipeline runs once per batch, so its stage timings (features, hash, lookup, engine,
top-k) are measured once per batch and every sampled query of the batch gets child spans
with those start and end times; an unsampled query costs nothing more.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)
STAGES = ("features", "hash", "lookup", "engine", "topk")


class Tracing:
    def __init__(self, tracer=None, provider=None):
        self.tracer, self._provider = tracer, provider

    @property
    def enabled(self) -> bool:
        return self.tracer is not None

    @classmethod
    def off(cls) -> Tracing:
        return cls()

    @classmethod
    def from_config(cls, config, exporter=None) -> Tracing:
        """``exporter`` (a SpanExporter) overrides the configured one (tests, embedding)."""
        if exporter is None and config.trace_exporter is None:
            return cls.off()
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(config.trace_sample_ratio)),
                                  resource=Resource.create({"service.name": "recserve"}))
        if exporter is not None:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        elif config.trace_exporter == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        else:
            try:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            except ImportError as e:
                raise RuntimeError("trace_exporter otlp needs opentelemetry-exporter-otlp-proto-grpc: "
                                   "pip install opentelemetry-exporter-otlp-proto-grpc") from e
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.trace_endpoint,
                                                                            insecure=config.trace_insecure)))
        log.info("tracing on: %s, sample ratio %g", "in-process exporter" if exporter else config.trace_exporter,
                 config.trace_sample_ratio)
        return cls(provider.get_tracer("recserve"), provider)

    def start(self, name: str, metadata, attributes: dict):
        """A server span for one query (None when tracing is off)."""
        if self.tracer is None:
            return None
        from opentelemetry import propagate
        from opentelemetry.trace import SpanKind

        parent = propagate.extract({k: v for k, v in metadata or () if isinstance(v, str)})
        return self.tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)

    def finish(self, span, stages, code: str, attributes: dict | None = None) -> None:
        if span is None:
            return
        from opentelemetry import trace
        from opentelemetry.trace import Status, StatusCode

        if span.is_recording():
            if attributes:
                span.set_attributes(attributes)
            context = trace.set_span_in_context(span)
            for stage, start_ns, end_ns in stages or ():
                self.tracer.start_span(f"recserve.{stage}", context=context, start_time=start_ns).end(end_ns)
            span.set_attribute("rpc.grpc.status_code", code)
            if code != "OK":
                span.set_status(Status(StatusCode.ERROR, code))
        span.end()

    def close(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()
