"""Agent metrics: the custom collector reads the kernel's counters at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dataplane import metrics
from tests.kernel.conftest import Node, connect_names
from tests.kernel.test_sock_lb import VIP, svc


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_collector_reports_kernel_counters_at_scrape_time(kv: Node) -> None:
    kv.apply([svc("m", VIP, [kv.backend("gpu0"), kv.backend("gpu1", state="draining")])])
    registry = CollectorRegistry()
    registry.register(metrics.KernelCollector(kv.maps))
    before = _samples(registry)
    assert before[("kvroute_agent_service_connects_total",
                   (("outcome", "selected"), ("service", "m")))] == 0
    names = kv.run(connect_names, VIP, 80, 7)
    assert names == ["gpu0"] * 7
    after = _samples(registry)  # no update call: the collector reads the maps now
    gpu0 = f"{kv.pod('gpu0').address}:8000/tcp"
    gpu1 = f"{kv.pod('gpu1').address}:8000/tcp"
    assert after[("kvroute_agent_service_connects_total",
                  (("outcome", "selected"), ("service", "m")))] == 7
    assert after[("kvroute_agent_backend_events_total",
                  (("backend", gpu0), ("event", "established")))] == 7
    assert after[("kvroute_agent_backend_state", (("backend", gpu1), ("state", "draining")))] == 1
    assert after[("kvroute_agent_backend_state", (("backend", gpu1), ("state", "active")))] == 0
