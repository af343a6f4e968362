"""Prometheus metrics of every service (one process each, so the default registry is per service).

Device busy fraction is `rate(minedraft_device_busy_seconds_total[1m])`.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

# Draft and target services.
DEVICE_CALL_SECONDS = Histogram("minedraft_device_call_seconds", "Device time of one batched call", ["method"],
                                buckets=LATENCY_BUCKETS)
DEVICE_QUEUE_SECONDS = Histogram("minedraft_device_queue_seconds", "Wait for the device thread", ["method"],
                                 buckets=LATENCY_BUCKETS)
DEVICE_BATCH = Histogram("minedraft_device_batch_size", "Sequences in one call", ["method"], buckets=BATCH_BUCKETS)
DEVICE_BUSY = Counter("minedraft_device_busy_seconds", "Time the device thread spent running calls")
GRAPH_STEPS = Counter("minedraft_graph_steps", "Static-KV steps on CUDA, replayed as a graph or run eagerly",
                      ["how"])
SEQUENCES_HELD = Gauge("minedraft_sequences_held", "Sequences whose state this service holds")

# Router.
REQUESTS = Counter("minedraft_requests", "Finished requests", ["finish_reason"])
REFUSED = Counter("minedraft_refused_requests", "Requests refused at admission", ["reason"])
GENERATED_TOKENS = Counter("minedraft_generated_tokens", "Tokens streamed to clients")
DRAFTED = Counter("minedraft_drafted_tokens", "Draft tokens proposed, by position in the round", ["position"])
ACCEPTED = Counter("minedraft_accepted_tokens", "Draft tokens accepted, by position in the round", ["position"])
ROUND_SECONDS = Histogram("minedraft_round_seconds", "Wall time of one lane round", ["lane"], buckets=LATENCY_BUCKETS)
STAGE_SECONDS = Histogram("minedraft_stage_seconds", "Device time of the calls a round makes", ["stage"],
                          buckets=LATENCY_BUCKETS)
LANE_SEQUENCES = Gauge("minedraft_lane_sequences", "Sequences in a lane", ["lane"])
WAITING = Gauge("minedraft_waiting_requests", "Requests waiting for a lane")
BACKEND_UP = Gauge("minedraft_backend_up", "Whether the router can use a backend", ["backend"])
BACKEND_DOWN = Counter("minedraft_backend_down", "Times a backend was found down", ["backend"])


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Starts the /metrics endpoint (a daemon thread); port 0 leaves it off."""
    if port:
        start_http_server(port, addr=host)
