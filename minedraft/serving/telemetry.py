"""Tracing in one place: OpenTelemetry over OTLP/gRPC, configured by the standard OTEL_* variables.

Off unless OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT) is set. gRPC spans come from
opentelemetry-instrumentation-grpc's aio interceptors (context travels in gRPC metadata); health
checks are not traced.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import AbstractContextManager

from opentelemetry import trace
from opentelemetry.trace import Link, Span

TRACER_NAME = "minedraft"
_enabled = False


def tracing_configured() -> bool:
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def setup_tracing(service_name: str) -> bool:
    """Installs the global tracer provider for this process; returns whether tracing is on."""
    global _enabled
    if not tracing_configured() or _enabled:
        return _enabled
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _enabled = True
    return True


def shutdown_tracing() -> None:
    """Flushes spans still in the batch processor (called on graceful shutdown)."""
    provider = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()


def _traced():
    """Every call but the periodic ones (health checks, lease renewals), which belong to no request."""
    from opentelemetry.instrumentation.grpc import filters

    return filters.negate(filters.any_of(filters.health_check(), filters.method_name("Renew")))


def server_interceptors() -> list:
    if not _enabled:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(filter_=_traced())]


def client_interceptors() -> list:
    if not _enabled:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return aio_client_interceptors(filter_=_traced())


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def batch_span(name: str, served: Sequence[Span], **attributes) -> AbstractContextManager[Span]:
    """A span for a call that serves many requests: a child of the first one's span, linked to all.

    It becomes the current span, so the gRPC calls made under it carry its context downstream.
    """
    parent = trace.set_span_in_context(served[0]) if served else None
    links = [Link(span.get_span_context()) for span in served if span.get_span_context().is_valid]
    return tracer().start_as_current_span(name, context=parent, links=links, attributes=attributes)
