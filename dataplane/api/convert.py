"""dataplane.model objects <-> kvroute.v1 protobuf messages (hand-written, not generated).

Pure. Everything read from the wire goes through the snapshot constructors, so a message
with a bad field raises :class:`controller.model.ModelError` naming it, and a full
snapshot whose content does not match its announced hash is refused like a bad delta.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

from dataplane import bindings, enginemetrics, model, reports, scraper
from dataplane.api.pb import kvroute_pb2 as pb

_PROTOCOL = {model.Protocol.TCP: pb.PROTOCOL_TCP, model.Protocol.UDP: pb.PROTOCOL_UDP}
_AFFINITY = {
    model.Affinity.NONE: pb.AFFINITY_NONE,
    model.Affinity.CLIENT: pb.AFFINITY_CLIENT,
    model.Affinity.SESSION: pb.AFFINITY_SESSION,
}
_STATE = {
    model.BackendState.ACTIVE: pb.BACKEND_STATE_ACTIVE,
    model.BackendState.DRAINING: pb.BACKEND_STATE_DRAINING,
    model.BackendState.OPEN: pb.BACKEND_STATE_OPEN,
    model.BackendState.PROBING: pb.BACKEND_STATE_PROBING,
}
_FROM_PROTOCOL = {v: k for k, v in _PROTOCOL.items()}
_FROM_AFFINITY = {v: k for k, v in _AFFINITY.items()}
_FROM_STATE = {v: k for k, v in _STATE.items()}

K = TypeVar("K")
V = TypeVar("V")


def _reverse(path: str, table: Mapping[K, V], value: K) -> V:
    try:
        return table[value]
    except KeyError:
        raise model.ModelError(f"{path}: unknown or unspecified value {value!r}") from None


# -- snapshots ----------------------------------------------------------------------------


def service_to_pb(svc: model.Service) -> pb.Service:
    msg = pb.Service(
        name=svc.name,
        vip=svc.vip,
        port=svc.port,
        protocol=_PROTOCOL[svc.protocol],
        affinity=_AFFINITY[svc.affinity],
        affinity_timeout=svc.affinity_timeout,
        table_size=svc.table_size,
        probe_share=svc.probe_share,
        saturated=svc.saturated,
        backends=[
            pb.Backend(address=b.address, port=b.port, weight=b.weight, state=_STATE[b.state],
                       load=b.load, address6=b.address6)
            for b in svc.backends
        ],
    )
    if svc.epsilon is not None:
        msg.epsilon = svc.epsilon
    if svc.move_epsilon is not None:
        msg.move_epsilon = svc.move_epsilon
    if svc.vip6 is not None:
        msg.vip6 = svc.vip6
    return msg


def service_from_pb(msg: pb.Service, path: str) -> model.Service:
    label = f"{path}[{msg.name}]" if msg.name else path
    try:
        backends = []
        states = _FROM_STATE
        for i, b in enumerate(msg.backends):
            try:
                state = states.get(b.state) or _reverse("state", states, b.state)
                backends.append(model.Backend(
                    b.address, b.port, b.weight, state, b.load,
                    b.address6 if b.HasField("address6") else None))
            except model.ModelError as exc:
                where = f"backends[{b.address}:{b.port}]" if b.address else f"backends[{i}]"
                raise exc.prefixed(where) from None
        return model.Service(
            name=msg.name,
            vip=msg.vip,
            port=msg.port,
            protocol=_reverse("protocol", _FROM_PROTOCOL, msg.protocol),
            affinity=_reverse("affinity", _FROM_AFFINITY, msg.affinity),
            affinity_timeout=msg.affinity_timeout,
            table_size=msg.table_size,
            epsilon=msg.epsilon if msg.HasField("epsilon") else None,
            probe_share=msg.probe_share,
            saturated=msg.saturated,
            move_epsilon=msg.move_epsilon if msg.HasField("move_epsilon") else None,
            backends=tuple(backends),
            vip6=msg.vip6 if msg.HasField("vip6") else None,
        )
    except model.ModelError as exc:
        raise exc.prefixed(label) from None


def engine_to_pb(ref: model.EngineRef) -> pb.EngineRef:
    msg = pb.EngineRef(identity=ref.identity, metrics_url=ref.metrics_url,
                       health_url=ref.health_url)
    if ref.node is not None:
        msg.node = ref.node
    return msg


def engine_from_pb(msg: pb.EngineRef, path: str, i: int) -> model.EngineRef:
    try:
        return model.EngineRef(identity=msg.identity, metrics_url=msg.metrics_url,
                                  health_url=msg.health_url,
                                  node=msg.node if msg.HasField("node") else None)
    except model.ModelError as exc:
        label = f"{path}[{msg.identity}]" if msg.identity else f"{path}[{i}]"
        raise exc.prefixed(label) from None


def snapshot_to_pb(snap: model.Snapshot) -> pb.Snapshot:
    return pb.Snapshot(version=snap.version, hash=snap.hash,
                       services=[service_to_pb(s) for s in snap.services],
                       engines=[engine_to_pb(e) for e in snap.engines])


def snapshot_from_pb(msg: pb.Snapshot) -> model.Snapshot:
    services = tuple(service_from_pb(s, "services") for s in msg.services)
    engines = tuple(engine_from_pb(e, "engines", i) for i, e in enumerate(msg.engines))
    snap = model.Snapshot.of(msg.version, services, engines)
    if snap.hash != msg.hash:
        raise model.ModelError(f"hash: full snapshot {msg.version} hashes to "
                                     f"{snap.hash[:12]}, announced {msg.hash[:12]!r}")
    return snap


def delta_to_pb(change: model.Delta) -> pb.Delta:
    return pb.Delta(from_version=change.from_version, to_version=change.to_version,
                    hash=change.hash, upserted=[service_to_pb(s) for s in change.upserted],
                    removed=list(change.removed),
                    engines_replaced=change.engines is not None,
                    engines=[engine_to_pb(e) for e in change.engines or ()])


def delta_from_pb(msg: pb.Delta) -> model.Delta:
    if msg.engines and not msg.engines_replaced:
        raise model.ModelError("engines: listed without engines_replaced")
    engines = (tuple(engine_from_pb(e, "engines", i) for i, e in enumerate(msg.engines))
               if msg.engines_replaced else None)
    return model.Delta(
        from_version=msg.from_version,
        to_version=msg.to_version,
        hash=msg.hash,
        upserted=tuple(service_from_pb(s, "upserted") for s in msg.upserted),
        removed=tuple(msg.removed),
        engines=engines,
    )


def loads_update(loads: Mapping[str, int]) -> pb.SnapshotUpdate:
    return pb.SnapshotUpdate(loads=pb.EngineLoads(loads=[
        pb.EngineLoadUnits(identity=ident, load=load) for ident, load in loads.items()]))


def loads_from_pb(msg: pb.EngineLoads) -> dict[str, int]:
    seen: dict[str, int] = {}
    for entry in msg.loads:
        if entry.identity in seen:
            raise model.ModelError(f"loads[{entry.identity!r}]: listed twice")
        seen[entry.identity] = entry.load
    return model.check_loads("loads", seen)


def full_update(snap: model.Snapshot) -> pb.SnapshotUpdate:
    return pb.SnapshotUpdate(full=snapshot_to_pb(snap))


def delta_update(change: model.Delta) -> pb.SnapshotUpdate:
    return pb.SnapshotUpdate(delta=delta_to_pb(change))


# -- reports ------------------------------------------------------------------------------


def _load_to_pb(load: enginemetrics.EngineLoad) -> pb.EngineLoad:
    msg = pb.EngineLoad(
        running=load.running, waiting=load.waiting, kv_usage=load.kv_usage,
        kv_family=load.kv_family, engines=load.engines,
        ttft_buckets=[pb.HistogramBucket(le=le, count=c) for le, c in load.ttft_buckets],
    )
    for name in ("ttft_count", "ttft_sum", "ttft_p50", "ttft_p90"):
        value = getattr(load, name)
        if value is not None:
            setattr(msg, name, value)
    return msg


def _load_from_pb(msg: pb.EngineLoad) -> enginemetrics.EngineLoad:
    def opt(name: str) -> float | None:
        return getattr(msg, name) if msg.HasField(name) else None

    return enginemetrics.EngineLoad(
        running=msg.running, waiting=msg.waiting, kv_usage=msg.kv_usage,
        kv_family=msg.kv_family, engines=msg.engines,
        ttft_count=opt("ttft_count"), ttft_sum=opt("ttft_sum"),
        ttft_p50=opt("ttft_p50"), ttft_p90=opt("ttft_p90"),
        ttft_buckets=tuple((b.le, b.count) for b in msg.ttft_buckets),
    )


def report_to_pb(report: reports.AgentReport) -> pb.AgentReport:
    engines = []
    for r in report.engines:
        e = pb.EngineScrape(identity=r.identity, metrics_ok=r.metrics_ok,
                            health_ok=r.health_ok, latency_seconds=r.latency,
                            error=r.error or "", failure=r.failure or "",
                            unproven=r.unproven)
        if r.load is not None:
            e.load.CopyFrom(_load_to_pb(r.load))
        engines.append(e)
    return pb.AgentReport(
        agent_id=report.agent_id, node=report.node, applied_version=report.applied_version,
        applied_hash=report.applied_hash, apply_seconds=report.apply_seconds, engines=engines,
        counters=[
            pb.BackendCounters(identity=c.identity, selected=c.selected, connects=c.connects,
                               failed=c.failed, established=c.established, closed=c.closed,
                               trips=c.trips)
            for c in report.counters
        ],
        errors=list(report.errors),
    )


def report_from_pb(msg: pb.AgentReport) -> reports.AgentReport:
    engines = tuple(
        scraper.ScrapeResult(
            identity=e.identity, metrics_ok=e.metrics_ok, health_ok=e.health_ok,
            latency=e.latency_seconds,
            load=_load_from_pb(e.load) if e.HasField("load") else None,
            error=e.error or None, failure=e.failure or None, unproven=e.unproven,
        )
        for e in msg.engines
    )
    counters = []
    for i, c in enumerate(msg.counters):
        try:
            counters.append(reports.BackendCounters(
                identity=c.identity, selected=c.selected, connects=c.connects, failed=c.failed,
                established=c.established, closed=c.closed, trips=c.trips))
        except model.ModelError as exc:
            raise model.ModelError(f"counters[{i}].{exc}") from None
    return reports.AgentReport(
        agent_id=msg.agent_id, node=msg.node, applied_version=msg.applied_version,
        applied_hash=msg.applied_hash, apply_seconds=msg.apply_seconds, engines=engines,
        counters=tuple(counters), errors=tuple(msg.errors),
    )


# -- session bindings ---------------------------------------------------------------------


def _groups_to_pb(groups: tuple[bindings.Group, ...]) -> list[pb.BindingGroup]:
    return [pb.BindingGroup(service=g.service, backend=g.backend, prev_backend=g.prev,
                            keys=g.keys) for g in groups]


def _groups_from_pb(msgs: Iterable[pb.BindingGroup]) -> tuple[bindings.Group, ...]:
    return tuple(bindings.Group(m.service, m.backend, tuple(m.keys), m.prev_backend)
                 for m in msgs)


def binding_report_to_pb(report: bindings.Report) -> pb.BindingReport:
    return pb.BindingReport(agent_id=report.agent_id, node=report.node,
                            bound=_groups_to_pb(report.bound),
                            touched=_groups_to_pb(report.touched))


def binding_report_from_pb(msg: pb.BindingReport) -> bindings.Report:
    return bindings.Report(msg.agent_id, msg.node, _groups_from_pb(msg.bound),
                           _groups_from_pb(msg.touched))


def fanout_update(out: bindings.Fanout) -> pb.SnapshotUpdate:
    return pb.SnapshotUpdate(bindings=pb.SessionBindings(
        bound=_groups_to_pb(out.bound), expired=_groups_to_pb(out.expired),
        sessions=[pb.EngineSessions(identity=i, sessions=n) for i, n in out.sessions.items()]))


def fanout_from_pb(msg: pb.SessionBindings) -> bindings.Fanout:
    sessions: dict[str, int] = {}
    for entry in msg.sessions:
        if entry.identity in sessions:
            raise model.ModelError(f"sessions[{entry.identity!r}]: listed twice")
        sessions[entry.identity] = entry.sessions
    return bindings.Fanout(_groups_from_pb(msg.bound), _groups_from_pb(msg.expired), sessions)
