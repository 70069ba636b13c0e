"""Prometheus metrics for /metrics: latency histograms, request counts, backend gauges.

Each server gets its own registry (no module-global state), so several servers, as in
tests, do not share counts. Gauges come from Backend.stats() at scrape time: every key
becomes `tandem_backend_<key>`, so a backend that reports more (the disaggregated one adds
transfer bytes, time and failures) is exported without a change here.
"""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds; as vLLM's buckets, so dashboards built for it read these the same way.
TTFT_BUCKETS_S = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
TPOT_BUCKETS_S = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
E2E_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)

# Help text for the stats keys every backend reports and those the disaggregated backend
# (router/orchestrator.py) adds; other keys get a generic line.
STATS_HELP = {
    "num_waiting": "Requests waiting to be scheduled",
    "num_running": "Requests in the running batch",
    "num_free_blocks": "Free KV cache blocks",
    "num_blocks": "KV cache blocks in all",
    "kv_usage": "Fraction of KV cache blocks in use",
    "num_preemptions": "Requests preempted since start",
    "kv_transfers_total": "KV transfers from prefill to decode since start",
    "kv_transfer_failures_total": "KV transfers that failed since start",
    "kv_transfer_bytes_total": "KV bytes moved from prefill to decode since start",
    "kv_transfer_seconds_total": "Seconds spent in KV transfers since start",
    "local_prefills_total": "Requests prefilled on their decode worker since start",
    "migrations_total": "Requests live-migrated between decode workers with their KV since start",
    "migration_failures_total": "Migrations that failed (the request went on where it was) since start",
    "migration_pause_seconds_total": "Seconds migrated streams paused, detach to next token, summed",
    "pressure_migrations_total": "Migrations started because a decode worker ran short of KV blocks",
    "moves_total": "Requests moved off a draining worker by resuming them elsewhere since start",
    "role_changes_total": "Workers that changed role between prefill and decode since start",
    "role_change_failures_total": "Role changes that failed (the worker kept its role) since start",
    "rebalance_rate_rps": "Arrival rate the P:D rebalancer saw at its last evaluation",
    "rebalance_best_prefill_workers": "Prefill workers of the split the rebalancer forecast best",
    "rebalance_forecast_capacity_rps": "Requests/s the current split serves within the SLO, as forecast",
    "num_reserved": "Requests holding KV blocks while their KV arrives (decode)",
    "num_held": "Finished requests whose blocks a KV transfer still holds",
    "num_transfers": "KV transfers this worker is part of now",
}


def _metric_name(prefix: str, key: str) -> str:
    return prefix + re.sub(r"[^a-zA-Z0-9_]", "_", key)


class _BackendStats:
    """Reads Backend.stats() and Backend.workers() on every scrape."""

    def __init__(self, backend):
        self.backend = backend

    def collect(self):
        for key, value in self.backend.stats().items():
            yield GaugeMetricFamily(
                _metric_name("tandem_backend_", key),
                STATS_HELP.get(key, f"Backend.stats()[{key!r}]"),
                value=float(value),
            )
        workers = self.backend.workers()
        up = GaugeMetricFamily(
            "tandem_worker_up", "1 while the worker answers and its engine runs, else 0", labels=["role", "worker"]
        )
        families: dict[str, GaugeMetricFamily] = {}
        for w in workers:
            labels = [w.role.value, str(w.index)]
            up.add_metric(labels, 1.0 if w.up else 0.0)
            for key, value in (w.stats.gauges() if w.stats is not None else {}).items():  # none when down
                if key not in families:
                    families[key] = GaugeMetricFamily(
                        _metric_name("tandem_worker_", key),
                        STATS_HELP.get(key, f"a worker's stats()[{key!r}]"),
                        labels=["role", "worker"],
                    )
                families[key].add_metric(labels, float(value))
        yield up
        yield from families.values()


class ServerMetrics:
    def __init__(self, backend):
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft_s = Histogram(
            "tandem_time_to_first_token_seconds",
            "Time from arrival to the first token",
            ["frontend"],
            buckets=TTFT_BUCKETS_S,
            registry=r,
        )
        self.tpot_s = Histogram(
            "tandem_time_per_output_token_seconds",
            "Mean time between output tokens after the first, per request",
            ["frontend"],
            buckets=TPOT_BUCKETS_S,
            registry=r,
        )
        self.e2e_s = Histogram(
            "tandem_e2e_request_latency_seconds",
            "Time from arrival to the last token",
            ["frontend"],
            buckets=E2E_BUCKETS_S,
            registry=r,
        )
        self.requests = Counter(
            "tandem_requests",
            "Requests by how they ended: stop, length, error, abort, "
            "unavailable, cancelled (client gone), invalid, not_found, overloaded",
            ["frontend", "finish_reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "tandem_prompt_tokens", "Prompt tokens of admitted requests", ["frontend"], registry=r
        )
        self.generation_tokens = Counter(
            "tandem_generation_tokens", "Tokens generated and streamed", ["frontend"], registry=r
        )
        self.in_flight = Gauge(
            "tandem_requests_in_flight", "Requests the router is serving now", ["frontend"], registry=r
        )
        r.register(_BackendStats(backend))

    def count(self, frontend: str, finish_reason: str) -> None:
        self.requests.labels(frontend, finish_reason).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
