"""Prometheus metrics of the gateway (prometheus-client), and of the instances, collected over the bus.

The gateway counts what passes through it: HTTP requests by route and status, their latency, errors by type,
tokens in and out by model. At each scrape it asks the scheduler for the launched models and renders their state,
queue depth, requests in flight and the counters each instance keeps (requests, failures, cancellations, tokens
in and out, since it was loaded).
"""

from __future__ import annotations

import typing

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from zinfer.shared import instances
from zinfer.shared.errors import ZinferError
from zinfer.shared.payloads import Usage

STATES = typing.get_args(instances.InstanceState)  # every state an instance can be in, from its one definition


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("zinfer_http_requests", "HTTP requests handled", ["route", "method", "status"],
                                registry=self.registry)
        self.latency = Histogram("zinfer_http_request_seconds", "Time to the response (headers, for streams)",
                                 ["route"], registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.errors = Counter("zinfer_http_errors", "Requests answered with an error, by type", ["type"],
                              registry=self.registry)
        self.token_count = Counter("zinfer_gateway_tokens", "Tokens through the gateway", ["model", "direction"],
                                   registry=self.registry)

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def error(self, exc: ZinferError) -> None:
        self.errors.labels(exc.code).inc()

    def tokens(self, model: str, usage: Usage | None) -> None:
        if usage is not None:
            self.token_count.labels(model, "in").inc(usage.prompt_tokens)
            self.token_count.labels(model, "out").inc(usage.completion_tokens)

    def render(self, models: list[instances.InstanceView]) -> bytes:
        return generate_latest(self.registry) + generate_latest(_Instances(models))


class _Instances:
    """A one-scrape registry of the instances' metrics (prometheus-client calls collect())."""

    def __init__(self, models: list[instances.InstanceView]):
        self.models = models

    def collect(self):
        labels = ["model_uid", "model_name", "model_type"]
        state = GaugeMetricFamily("zinfer_instance_state", "1 for the state an instance is in", labels=labels +
                                  ["state"])
        queue = GaugeMetricFamily("zinfer_instance_queue_depth", "Requests waiting", labels=labels)
        inflight = GaugeMetricFamily("zinfer_instance_inflight", "Requests running", labels=labels)
        replicas = GaugeMetricFamily("zinfer_instance_replicas", "Replicas", labels=labels)
        counters = {name: CounterMetricFamily(f"zinfer_instance_{name}", f"Instance {name.replace('_', ' ')} since "
                                              "it was loaded", labels=labels)
                    for name in instances.InstanceStats.__struct_fields__}
        for m in self.models:
            values = [m.model_uid, m.info.model_name, m.info.model_type]
            for s in STATES:
                state.add_metric([*values, s], 1.0 if m.state == s else 0.0)
            queue.add_metric(values, m.queue_depth)
            inflight.add_metric(values, m.inflight)
            replicas.add_metric(values, m.replica)
            for name, family in counters.items():
                family.add_metric(values, getattr(m.stats, name))
        yield from (state, queue, inflight, replicas, *counters.values())
