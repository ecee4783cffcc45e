"""The controller's Prometheus metrics, on a registry the caller owns.

Nothing is registered at import. :class:`ControllerMetrics` puts two kinds of metrics on
the registry it is given:

- event metrics it counts as they happen (breaker transitions, snapshots published, tick
  duration, leadership), fed by the controller loop;
- a custom collector that reads the current state at scrape time (the
  ``prometheus_client`` ``ProcessCollector`` pattern): per backend weight, state and load
  from the last snapshot, per engine breaker state and scraped load from
  :meth:`controller.reconcile.Reconciler.engine_view`, per agent applied version and
  convergence lag from :meth:`controller.grpc_server.ControlServer.agents`.

State gauges are one-hot: ``kvroute_controller_backend_state{service,backend,state}`` is 1 for the
backend's state and 0 for the others, so ``sum by (state)`` counts backends per state.
Backends are labelled by their identity (``address:port/protocol``), engines too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping

import prometheus_client
from prometheus_client import registry as prom_registry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from controller import breaker, grpc_server, reconcile
from dataplane import model

TICK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
BREAKER_STATES = tuple(s.value for s in breaker.State)


class ControllerMetrics:
    """Registers the controller's metrics on ``registry`` (never the global one)."""

    def __init__(
        self,
        registry: prometheus_client.CollectorRegistry,
        reconciler: reconcile.Reconciler,
        server: grpc_server.ControlServer | None = None,
    ) -> None:
        self.registry = registry
        self.transitions = prometheus_client.Counter(
            "kvroute_controller_breaker_transitions",
            "Engine circuit-breaker state changes.",
            ["engine", "from", "to", "reason"],
            registry=registry,
        )
        self.snapshots = prometheus_client.Counter(
            "kvroute_controller_snapshots_published",
            "Snapshots with new content published to agents.",
            registry=registry,
        )
        self.tick_seconds = prometheus_client.Histogram(
            "kvroute_controller_tick_seconds",
            "Duration of one reconcile tick (breakers, policy, snapshot build).",
            buckets=TICK_BUCKETS,
            registry=registry,
        )
        self.leader = prometheus_client.Gauge(
            "kvroute_controller_leader",
            "1 while this controller publishes snapshots (the leader, or no election).",
            registry=registry,
        )
        self.reports = prometheus_client.Counter(
            "kvroute_controller_reports",
            "Agent reports fed to the reconciler.",
            registry=registry,
        )
        self.discovery_updates = prometheus_client.Counter(
            "kvroute_controller_discovery_updates",
            "Service lists received from discovery.",
            registry=registry,
        )
        self.discovery_refused = prometheus_client.Counter(
            "kvroute_controller_discovery_refused",
            "Discovery results refused for removing too many services at once.",
            registry=registry,
        )
        self.collector = StateCollector(reconciler, server)
        registry.register(self.collector)

    def record_transitions(self, events: Iterable[reconcile.BreakerEvent]) -> None:
        for e in events:
            self.transitions.labels(
                engine=e.engine, to=e.to_state.value, reason=e.reason,
                **{"from": e.from_state.value},
            ).inc()


class StateCollector(prom_registry.Collector):
    """Reads the reconciler and the gRPC server at scrape time."""

    def __init__(self, reconciler: reconcile.Reconciler,
                 server: grpc_server.ControlServer | None = None) -> None:
        self.reconciler = reconciler
        self.server = server

    def describe(self) -> list[Metric]:
        # Collected at scrape time only: registering must not read half-built state.
        return []

    def collect(self) -> Iterator[Metric]:
        engines = self.reconciler.engine_view()
        # Loads are not in snapshots (they travel apart): the reconciler's latest ones.
        loads = {i: v.load.units for i, v in engines.items() if v.load is not None}
        yield from self._snapshot(self.reconciler.last, loads)
        yield from self._engines(engines)
        if self.server is not None:
            yield from self._agents(self.server.agents())
            yield from self._bindings(self.server)
            yield from self._authz(self.server)

    @staticmethod
    def _authz(server: grpc_server.ControlServer) -> Iterator[Metric]:
        refused = CounterMetricFamily(
            "kvroute_controller_rpcs_refused",
            "Agent RPCs refused: 'identity' (the client certificate's node is not the one "
            "the message speaks for), 'agents_full' (too many agents known).",
            labels=["rpc", "reason"])
        for (rpc, reason), value in sorted(server.refused.items()):
            refused.add_metric([rpc, reason], value)
        dropped = CounterMetricFamily(
            "kvroute_controller_report_entries_dropped",
            "Scrapes and kernel counters dropped from accepted reports because they were "
            "about engines of another node.")
        dropped.add_metric([], server.report_entries_dropped)
        expired = CounterMetricFamily(
            "kvroute_controller_agents_expired",
            "Agents forgotten after --agent-ttl seconds without a stream or a report.")
        expired.add_metric([], server.agents_expired)
        yield from (refused, dropped, expired)

    @staticmethod
    def _bindings(server: grpc_server.ControlServer) -> Iterator[Metric]:
        table = server.bindings
        live = GaugeMetricFamily("kvroute_controller_bindings",
                                 "Live session bindings the controller holds, fleet-wide.")
        live.add_metric([], len(table))
        decisions = CounterMetricFamily(
            "kvroute_controller_binding_decisions",
            "Session bindings reported by agents, by what the controller made of them.",
            labels=["outcome"])
        for outcome, value in dataclasses.asdict(table.stats).items():
            decisions.add_metric([outcome], value)
        sessions = GaugeMetricFamily("kvroute_controller_engine_sessions",
                                     "Live session bindings per backend.", labels=["backend"])
        for ident, count in sorted(table.sessions().items()):
            sessions.add_metric([ident], count)
        reports = CounterMetricFamily("kvroute_controller_binding_reports",
                                      "Binding reports received from agents.",
                                      labels=["result"])
        reports.add_metric(["accepted"], server.binding_reports)
        reports.add_metric(["rejected"], server.binding_reports_rejected)
        yield from (live, decisions, sessions, reports)

    @staticmethod
    def _snapshot(snap: model.Snapshot | None, loads: Mapping[str, int]) -> Iterator[Metric]:
        version = GaugeMetricFamily("kvroute_controller_snapshot_version",
                                    "Version of the last snapshot built (0: none yet).")
        version.add_metric([], snap.version if snap is not None else 0)
        count = GaugeMetricFamily("kvroute_controller_snapshot_services",
                                  "Services in the last snapshot.")
        count.add_metric([], len(snap.services) if snap is not None else 0)
        weight = GaugeMetricFamily("kvroute_controller_backend_weight",
                                   "Maglev weight of a backend.",
                                   labels=["service", "backend"])
        load = GaugeMetricFamily("kvroute_controller_backend_load",
                                 "Bounded-load units of a backend (1000 per request).",
                                 labels=["service", "backend"])
        state = GaugeMetricFamily("kvroute_controller_backend_state",
                                  "1 for the backend's state, 0 for the others.",
                                  labels=["service", "backend", "state"])
        saturated = GaugeMetricFamily("kvroute_controller_service_saturated",
                                      "1 when every engine of the service is full.",
                                      labels=["service"])
        for svc in snap.services if snap is not None else ():
            saturated.add_metric([svc.name], 1 if svc.saturated else 0)
            for b in svc.backends:
                ident = reconcile.backend_identity(b.address, b.port, svc.protocol)
                weight.add_metric([svc.name, ident], b.weight)
                load.add_metric([svc.name, ident], loads.get(ident, b.load))
                for s in model.BackendState:
                    state.add_metric([svc.name, ident, s], 1 if b.state == s else 0)
        yield from (version, count, weight, load, state, saturated)

    @staticmethod
    def _engines(view: Mapping[str, reconcile.EngineView]) -> Iterator[Metric]:
        brk = GaugeMetricFamily("kvroute_controller_engine_breaker_state",
                                "1 for the engine breaker's state, 0 for the others.",
                                labels=["engine", "state"])
        trips = GaugeMetricFamily("kvroute_controller_engine_breaker_trips",
                                  "Breaker trips in a row (the cool-down back-off exponent).",
                                  labels=["engine"])
        running = GaugeMetricFamily("kvroute_controller_engine_requests_running",
                                    "Requests running on the engine (last good scrape).",
                                    labels=["engine"])
        waiting = GaugeMetricFamily("kvroute_controller_engine_requests_waiting",
                                    "Requests queued on the engine (last good scrape).",
                                    labels=["engine"])
        kv = GaugeMetricFamily("kvroute_controller_engine_kv_usage_ratio",
                               "KV-cache usage of the engine, 0..1 (last good scrape).",
                               labels=["engine"])
        ok = GaugeMetricFamily("kvroute_controller_engine_scrape_ok",
                               "1 if the last reported scrape of the engine succeeded.",
                               labels=["engine"])
        for ident, v in view.items():
            for s in BREAKER_STATES:
                brk.add_metric([ident, s], 1 if v.breaker.value == s else 0)
            trips.add_metric([ident], v.trips)
            if v.load is not None:
                running.add_metric([ident], v.load.running)
                waiting.add_metric([ident], v.load.waiting)
                kv.add_metric([ident], v.load.kv_usage)
            if v.last_ok is not None:
                ok.add_metric([ident], 1 if v.last_ok else 0)
        yield from (brk, trips, running, waiting, kv, ok)

    @staticmethod
    def _agents(agents: dict[str, grpc_server.AgentStatus]) -> Iterator[Metric]:
        applied = GaugeMetricFamily("kvroute_controller_agent_applied_version",
                                    "Snapshot version the agent last reported applied.",
                                    labels=["agent"])
        converged = GaugeMetricFamily("kvroute_controller_agent_converged",
                                      "1 when the agent holds the current content.",
                                      labels=["agent"])
        lag = GaugeMetricFamily("kvroute_controller_agent_convergence_lag_seconds",
                                "How long the agent has been behind the current snapshot "
                                "(0 when converged).", labels=["agent"])
        watching = GaugeMetricFamily("kvroute_controller_agent_watching",
                                     "1 while the agent has a snapshot stream open.",
                                     labels=["agent"])
        apply_s = GaugeMetricFamily("kvroute_controller_agent_apply_seconds",
                                    "Duration of the agent's last apply.", labels=["agent"])
        reports = CounterMetricFamily("kvroute_controller_agent_reports",
                                      "Reports accepted from the agent.",
                                      labels=["agent"])
        rejected = CounterMetricFamily("kvroute_controller_agent_reports_rejected",
                                       "Reports from the agent dropped as invalid.",
                                       labels=["agent"])
        for agent_id, a in sorted(agents.items()):
            applied.add_metric([agent_id], a.applied_version)
            converged.add_metric([agent_id], 1 if a.converged else 0)
            lag.add_metric([agent_id], a.lag_seconds)
            watching.add_metric([agent_id], 1 if a.watching else 0)
            apply_s.add_metric([agent_id], a.apply_seconds)
            reports.add_metric([agent_id], a.reports)
            rejected.add_metric([agent_id], a.rejected_reports)
        yield from (applied, converged, lag, watching, apply_s, reports, rejected)
