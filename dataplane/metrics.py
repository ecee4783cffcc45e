"""Agent metrics: a prometheus-client collector that reads the BPF counters at
scrape time (the process_collector pattern), plus the agent's own timings.
Registries are passed in; nothing registers at import."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import ClassVar

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dataplane import abi, inspect, nodeport
from dataplane.maps import MapSet

_STATES = [s.name.lower() for s in abi.BackendState]


class BadPagesCollector(Collector):
    """kvroute_agent_engine_bad_pages_total: scrapes that failed because the engine's own
    page was oversized or malformed (an engine pod controls its page)."""

    def __init__(self, counts: Callable[[], Mapping[tuple[str, str], int]]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("kvroute_agent_engine_bad_pages",
                                     "Engine scrapes refused for an oversized or malformed page",
                                     labels=["engine", "reason"])
        for (engine, reason), n in sorted(self.counts().items()):
            family.add_metric([engine, reason], n)
        yield family


class BindingCollector(Collector):
    """kvroute_agent_bindings_total{event}: what the agent's relay of fleet-wide session
    bindings did (dataplane.binder.Binder's counters), read at scrape time."""

    EVENTS: ClassVar[dict[str, str]] = {
        "kernel_events": "events read from the kernel's ring",
        "dropped": "rows dropped: the queue to the controller was full",
        "unknown": "events naming ids this agent does not hold",
        "resent": "rows sent again on a new stream to the controller",
        "written": "bindings from the fleet written into the kernel",
        "deleted": "expired bindings deleted from the kernel",
        "unwritable": "fleet bindings naming a service or backend this node lacks",
    }

    def __init__(self, counts: Callable[[], Mapping[str, int]]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "kvroute_agent_bindings", "Fleet-wide session bindings relayed by this agent: "
            + "; ".join(f"{k}: {v}" for k, v in self.EVENTS.items()), labels=["event"])
        counts = self.counts()
        for event in self.EVENTS:
            family.add_metric([event], counts.get(event, 0))
        yield family


class KernelCollector(Collector):
    """kvroute_* families from the pinned maps, read when Prometheus scrapes."""

    def __init__(self, maps: MapSet) -> None:
        self.maps = maps

    def collect(self) -> Iterator[Metric]:
        svc_counts = CounterMetricFamily(
            "kvroute_agent_service_connects", "connect() outcomes per service, from the kernel",
            labels=["service", "outcome"])
        be_counts = CounterMetricFamily(
            "kvroute_agent_backend_events",
            "Per-backend kernel events (selected, connects, failed, "
            "established, closed, trips)", labels=["backend", "event"])
        load = GaugeMetricFamily("kvroute_agent_backend_load", "Bounded-load units in the kernel",
                                 labels=["backend"])
        state = GaugeMetricFamily("kvroute_agent_backend_state",
                                  "1 for the backend's effective state (kernel trips read open)",
                                  labels=["backend", "state"])
        rtt = GaugeMetricFamily("kvroute_agent_backend_srtt_seconds",
                                "Smoothed RTT of established connections", labels=["backend"])
        for s in inspect.services(self.maps):
            name = s["name"] or str(s["id"])
            for outcome, value in s["counters"].items():
                svc_counts.add_metric([name, outcome], value)
        for b in inspect.backends(self.maps):
            addr = b["address"]
            for event, value in b["counters"].items():
                be_counts.add_metric([addr, event], value)
            load.add_metric([addr], b["load"])
            rtt.add_metric([addr], b["srtt_us"] / 1e6)
            for st in _STATES:
                state.add_metric([addr, st], 1.0 if b["state"] == st else 0.0)
        reasons = CounterMetricFamily("kvroute_agent_kernel_reasons",
                                      "Fail-open and bookkeeping events", labels=["reason"])
        for reason, value in self.maps.reasons().items():
            reasons.add_metric([reason], value)
        yield from (svc_counts, be_counts, load, state, rtt, reasons)


class PacketPathCollector(Collector):
    """The packet path's counters (kvr_np_cnt, kvr_np_reasons), read when Prometheus
    scrapes."""

    def __init__(self, maps: MapSet, np: nodeport.NodePortMaps) -> None:
        self.maps = maps
        self.np = np

    def collect(self) -> Iterator[Metric]:
        packets = CounterMetricFamily(
            "kvroute_agent_packet_path",
            "Packet path (NodePort, external IPs) per service: flows started, packets "
            "translated each way, SNATed or local flows, drops, mid-flow misses, closes",
            labels=["service", "event"])
        for s in inspect.services(self.maps):
            counters = self.np.counters(s["id"])
            if not any(counters):
                continue
            name = s["name"] or str(s["id"])
            for counter in abi.NpCounter:
                packets.add_metric([name, counter.name.lower()], counters[counter])
        reasons = CounterMetricFamily("kvroute_agent_packet_path_reasons",
                                      "Packets the packet path left alone or dropped, by why",
                                      labels=["reason"])
        for reason, value in self.np.reasons().items():
            reasons.add_metric([reason], value)
        # No conntrack size here: walking 262,144 entries key by key at every scrape
        # would cost seconds (`kvroute maps nodeport` counts them on demand).
        yield from (packets, reasons)


class AgentMetrics:
    """The agent's own instruments."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.apply_seconds = Histogram(
            "kvroute_agent_apply_seconds", "Time to plan and write a desired state",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=registry)
        self.snapshot_version = Gauge("kvroute_agent_snapshot_version",
                                      "Version of the last snapshot applied", registry=registry)
        self.scrape_seconds = Histogram(
            "kvroute_agent_scrape_seconds", "Duration of one round of engine scrapes",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1), registry=registry)
        self.load_writes = Gauge("kvroute_agent_load_entries_written",
                                 "Load map entries written by the last scrape round",
                                 registry=registry)
