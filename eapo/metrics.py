"""Prometheus for the non-HTTP roles (learner, rollout): a metrics endpoint and per-step gauges."""

from __future__ import annotations

import re

from prometheus_client import Gauge, start_http_server


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
