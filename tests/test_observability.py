"""Traces reach a real OTLP/gRPC receiver from all three services as one trace; metrics count; compose validates."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from minedraft.app.client import collect, make_request, stream
from minedraft.app.launcher import Cluster, free_port
from tests.conftest import channel_to, cluster_args

ROOT = Path(__file__).resolve().parent.parent


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """The OTLP trace collector service: keeps every span with its service's name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next(a.value.string_value for a in resource_spans.resource.attributes
                               if a.key == "service.name")
                for scope in resource_spans.scope_spans:
                    self.spans.extend((service, span) for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def otlp_receiver(monkeypatch):
    receiver, port = Receiver(), free_port()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    yield receiver
    server.stop(0)


def test_one_request_is_one_trace_across_router_draft_and_target(otlp_receiver, tiny_pair) -> None:
    with Cluster(cluster_args("psd", *tiny_pair)) as cluster:
        cluster.wait_ready(timeout_s=120)
        with channel_to(cluster) as channel:
            result = collect(stream(channel, make_request(prompt="def add(a, b):", max_tokens=12)))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with otlp_receiver.lock:
                services = {service for service, _ in otlp_receiver.spans}
                names = {span.name for _, span in otlp_receiver.spans}
            if {"router", "draft", "target"} <= services and {"generate", "round"} <= names:
                break
            time.sleep(0.2)
    spans = [(service, span) for service, span in otlp_receiver.spans]
    assert {service for service, _ in spans} == {"router", "draft", "target"}
    by_trace = {}
    for s, sp in spans:
        by_trace.setdefault(sp.trace_id.hex()[:6], []).append((s, sp.name))
    assert len(by_trace) == 1, {k: v[:4] for k, v in by_trace.items()}
    assert not any("Health" in span.name for _, span in spans), "health checks are not traced"

    def find(service: str, name: str) -> list:
        return [span for s, span in spans if s == service and span.name == name]

    (server,) = find("router", "/minedraft.protos.Generation/Generate")
    (generate,) = find("router", "generate")
    rounds = find("router", "round")
    assert generate.parent_span_id == server.span_id
    assert len(rounds) == int(result.stats["rounds"])
    assert all(r.parent_span_id == generate.span_id for r in rounds)
    assert all(any(link.span_id == generate.span_id for link in r.links) for r in rounds)
    round_ids = {r.span_id for r in rounds}
    for service, method in (("draft", "Propose"), ("target", "Verify")):
        clients = find("router", f"/minedraft.protos.{service.title()}/{method}")
        servers = find(service, f"/minedraft.protos.{service.title()}/{method}")
        assert clients and len(servers) == len(clients)
        assert all(c.parent_span_id in round_ids for c in clients)
        assert {s.parent_span_id for s in servers} == {c.span_id for c in clients}
    (prefill,) = find("router", "prefill")
    assert prefill.parent_span_id == generate.span_id
    assert find("target", "/minedraft.protos.Target/Prefill")[0].trace_id == generate.trace_id
    attributes = {a.key: a.value for a in generate.attributes}
    assert attributes["minedraft.completion_tokens"].int_value == len(result.token_ids)


def test_an_http_request_continues_its_callers_trace(otlp_receiver, tiny_pair) -> None:
    """A traceparent sent to the HTTP front is the trace of the front's span and of every router span."""
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    with Cluster(cluster_args("psd", *tiny_pair, http_port=free_port())) as cluster:
        cluster.wait_ready(timeout_s=120)
        request = urllib.request.Request(
            f"http://{cluster.http_address}/v1/completions", method="POST",
            data=json.dumps({"model": "target", "prompt": "def add(a, b):", "max_tokens": 8}).encode(),
            headers={"content-type": "application/json", "traceparent": f"00-{trace_id}-{parent}-01"})
        with urllib.request.urlopen(request, timeout=60) as reply:
            assert reply.status == 200
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with otlp_receiver.lock:
                names = {(service, span.name) for service, span in otlp_receiver.spans}
            if {("http", "POST /v1/completions"), ("router", "generate")} <= names:
                break
            time.sleep(0.2)
    spans = list(otlp_receiver.spans)
    (front,) = [span for service, span in spans if service == "http" and span.name == "POST /v1/completions"]
    (generate,) = [span for service, span in spans if service == "router" and span.name == "generate"]
    assert front.trace_id.hex() == generate.trace_id.hex() == trace_id
    assert front.parent_span_id.hex() == parent


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_metrics_endpoints_count_what_happened(tiny_pair) -> None:
    base = free_port()
    while any(_port_taken(base + i) for i in range(3)):
        base = free_port()
    with Cluster(cluster_args("sd", *tiny_pair, metrics_port=base)) as cluster:
        cluster.wait_ready(timeout_s=120)
        with channel_to(cluster) as channel:
            results = [collect(stream(channel, make_request(prompt=p, max_tokens=10))) for p in ("Hello", "def f(")]
        router, draft, target = scrape(base), scrape(base + 1), scrape(base + 2)
    finished = sum(v for k, v in router.items() if k.startswith("minedraft_requests_total"))
    assert finished == 2
    assert router["minedraft_generated_tokens_total"] == sum(len(r.token_ids) for r in results)
    drafted = sum(v for k, v in router.items() if k.startswith("minedraft_drafted_tokens_total"))
    accepted = sum(v for k, v in router.items() if k.startswith("minedraft_accepted_tokens_total"))
    assert drafted == sum(int(r.stats["drafted_tokens"]) for r in results)
    assert accepted == sum(int(r.stats["accepted_tokens"]) for r in results)
    assert router['minedraft_backend_up{backend="draft"}'] == 1
    assert draft['minedraft_device_call_seconds_count{method="propose"}'] >= 1
    assert target['minedraft_device_call_seconds_count{method="verify"}'] == sum(int(r.stats["rounds"])
                                                                                 for r in results)
    assert target["minedraft_sequences_held"] == 0 and target["minedraft_device_busy_seconds_total"] > 0


def _port_taken(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("compose_file", ["compose.yaml", "compose.cpu.yaml"])
def test_compose_files_validate(compose_file: str) -> None:
    tool = shutil.which("docker-compose")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is missing: .ci/run installs it")
        pytest.skip("docker-compose not installed (apt-get install docker-compose)")
    result = subprocess.run([tool, "-f", str(ROOT / compose_file), "config"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert {"draft", "target", "router", "http", "jaeger"} <= set(services)
    for name, service in services.items():  # each holds the files of ./certs it names, and no others
        named = {word for word in service.get("command", []) + service.get("healthcheck", {}).get("test", [])
                 if word.startswith("/certs/")}
        given = {secret["target"] for secret in service.get("secrets", [])}
        assert given == named, name
        assert not any("certs" in str(volume) for volume in service.get("volumes", [])), name
    assert {secret["target"] for secret in services["http"]["secrets"]} == {"/certs/ca.pem"}
