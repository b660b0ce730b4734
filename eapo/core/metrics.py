"""Prometheus helpers: a metrics endpoint for the non-HTTP roles (learner, rollout), per-step gauges,
and labelled counters cheap enough for hot paths."""

from __future__ import annotations

import functools
import re

from prometheus_client import Counter, Gauge, start_http_server


@functools.cache
def labelled(metric: Counter, *values: str) -> Counter:
    """``metric.labels(*values)``, looked up once per label set: ``labels`` validates and takes a lock on
    every call (~3 µs), which the gateway and the episode loop pay per request or episode. Only for
    label values from small fixed sets (outcomes, status codes)."""
    return metric.labels(*values)


def serve_metrics(port: int | None, host: str) -> None:
    """Serve ``/metrics`` on ``host:port`` from a background thread; no-op when ``port`` is None."""
    if port is not None:
        start_http_server(port, addr=host)


class StepGauges:
    """One gauge per numeric field of a metrics record (the same record that goes to metrics.jsonl)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self._gauges: dict[str, Gauge] = {}

    def update(self, record: dict[str, object]) -> None:
        for key, value in record.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            name = f"{self.prefix}_{re.sub(r'[^a-zA-Z0-9_]', '_', key)}"
            if name not in self._gauges:
                self._gauges[name] = Gauge(name, f"{key} at the latest learner step")
            self._gauges[name].set(value)
