"""The server's Prometheus metrics, in a registry of its own (one per app, so that tests and replicas in one
process do not share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["ServeMetrics"]

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    """Queue depth, running batch size (a gauge, and per decode step a histogram), generated tokens (tokens/s is
    its rate()), time to first token and request latency, rejected requests by reason."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.queue_depth = Gauge("moerun_queue_depth", "Requests waiting for a slot", registry=r)
        self.running = Gauge("moerun_running_batch_size", "Requests holding a slot (the running batch)", registry=r)
        self.batch_size = Histogram("moerun_batch_size", "Requests in each decode step", buckets=_BATCH, registry=r)
        self.prefill_size = Histogram("moerun_prefill_batch_size", "Requests prefilled together (joining at one "
                                      "step)", buckets=_BATCH, registry=r)
        self.tokens = Counter("moerun_generated_tokens", "Tokens generated (rate(): tokens/s)", registry=r)
        self.ttft = Histogram("moerun_time_to_first_token_seconds", "Arrival to first token", buckets=_SECONDS,
                              registry=r)
        self.latency = Histogram("moerun_request_latency_seconds", "Arrival to the last token", buckets=_SECONDS,
                                 registry=r)
        self.rejected = Counter("moerun_rejected_requests", "Requests refused, by reason", ["reason"], registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
