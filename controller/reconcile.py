"""Discovery, agent reports and time → snapshots: the controller's brain, pure.

:class:`Reconciler` holds what the controller knows and turns it into the agents' desired
state. It reads no clock and does no I/O: every input comes with a ``now`` (seconds on one
monotonic scale), so the same calls in the same order give the same snapshots, on any
replica and in tests.

- :meth:`Reconciler.set_specs`: the services discovery currently sees.
- :meth:`Reconciler.observe`: one agent report. Engine scrapes feed that engine's breaker
  (``ScrapeResult.outcomes()``: one outcome per round, a success only when ``/metrics``,
  ``/health`` and the agent's verdict on the engine's counters, 5xx and stalled
  generation (:mod:`dataplane.health`), all passed) and replace its load when the page
  parsed; a result equal
  to the one the same agent reported last for that engine is the same round again and
  counts once. The kernel's
  per-backend counters are cumulative per agent, so the previous reading per
  (agent, backend) is kept and only the increase counts: more failed connects are failures
  (source ``kernel``), more kernel trips open the breaker at once. More established
  connections count for nothing: a hung or 5xx engine completes handshakes too, so only
  the probes (``scrape``, ``health``) bring successes. A counter that went down means
  the agent's counters started over
  (a restart without pinned maps): the new reading is then the increase. The first
  reading of an (agent, backend) pair is only a baseline, so a restarted controller does
  not replay an agent's whole history into its breakers.
- :meth:`Reconciler.tick`: let breaker timers run, compute every LLM service's policy
  (a HALF_OPEN breaker whose engine's last reported scrape failed is published as OPEN:
  no client is sent to probe an engine whose own probes still fail)
  (:func:`controller.policy.compute`, with the previous result as hysteresis memory) and
  build the next snapshot; it is returned only when its content hash differs from the
  last one, so the version moves only when agents have something to do.

Services without ``kvroute.io/engine`` get kube-proxy behaviour: every ready endpoint is
``active`` with weight 100, a serving terminating one ``draining``, no breakers, no
bounded load. Endpoints neither ready nor serving are left out, as kube-proxy does.

An engine is one backend identity (``"address:port/protocol"``, as the agents hash it),
with one breaker however many services list it: the pod behind it is up or down for all
of them. The snapshot lists every LLM backend the agents should scrape
(:class:`controller.model.EngineRef`), with the node it runs on.

Snapshot names: discovery names a service ``namespace/name`` and gives one spec per port,
neither of which is a valid snapshot name (lower-case letters, digits, ``-`` and ``.``,
at most 63 characters, unique). :func:`snapshot_name` maps (name, port, protocol) to one
deterministically, adding a short hash of the original when the readable part had to be
changed or cut, so two different services never share a name.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import re
import types
from collections.abc import Iterable, Mapping

from controller import breaker, policy
from controller.discovery import discovered
from dataplane import enginemetrics, model, reports, scraper

PLAIN_WEIGHT = model.DEFAULT_WEIGHT  # kube-proxy mode: every ready endpoint the same
HEALTH_PATH = "/health"
_EVENTS_MAX = 4096  # undrained breaker events kept (oldest dropped first)
_HASH_CHARS = 8
_UNSAFE = re.compile(r"[^a-z0-9.-]+")
_EDGES = re.compile(r"^[^a-z0-9]+|[^a-z0-9]+$")


def snapshot_name(name: str, port: int, protocol: str) -> str:
    """A valid, unique snapshot service name for one port of a discovered service.

    ``"ns/name", 8000, "tcp"`` → ``"ns.name.8000-tcp"``. Anything the name rule does not
    allow becomes ``-``; when that changed the text, or it is longer than 63 characters,
    the readable part is cut and ``-<8 hex digits of sha256(name, port, protocol)>``
    appended, so distinct inputs keep distinct names.
    """
    raw = f"{name.replace('/', '.')}.{port}-{protocol}"
    clean = _EDGES.sub("", _UNSAFE.sub("-", raw.lower()))
    if clean == raw and len(clean) <= model.NAME_MAX:
        return clean
    digest = hashlib.sha256(f"{name}\0{port}\0{protocol}".encode()).hexdigest()[:_HASH_CHARS]
    head = _EDGES.sub("", clean[: model.NAME_MAX - _HASH_CHARS - 1])
    return f"{head}-{digest}" if head else digest


backend_identity = model.backend_identity


@dataclasses.dataclass(frozen=True)
class BreakerEvent:
    """One breaker transition of one engine (for metrics and logs)."""

    engine: str  # backend identity
    from_state: breaker.State
    to_state: breaker.State
    reason: str  # bounded set, see controller.breaker.Transition
    at: float


@dataclasses.dataclass(frozen=True)
class EngineView:
    """What the controller thinks of one engine as of the last tick."""

    identity: str
    node: str | None
    services: tuple[str, ...]  # snapshot names of the services listing it
    state: str  # policy state in the first of those services
    weight: int  # Maglev weight there
    load_units: int  # bounded-load units there
    load: enginemetrics.EngineLoad | None  # last good scrape
    breaker: breaker.State
    trips: int  # trips in a row (the back-off exponent)
    last_ok: bool | None  # the last scrape reported for it (None: never reported)
    last_error: str | None


@dataclasses.dataclass(frozen=True)
class _Backend:
    address: str
    port: int
    identity: str
    terminating: bool  # serving but terminating: draining
    address6: str | None = None  # a dual-stack pod's IPv6 address


@dataclasses.dataclass(frozen=True)
class _Service:
    """A spec prepared for ticks: everything but the policy-driven parts."""

    name: str
    llm: bool
    vip: str
    port: int
    protocol: model.Protocol
    affinity: model.Affinity
    affinity_timeout: int
    table_size: int
    epsilon: float | None
    move_epsilon: float | None
    probe_share: float
    policy: policy.PolicyConfig | None  # LLM services only
    backends: tuple[_Backend, ...]
    vip6: str | None = None  # dual stack


class _Engine:
    def __init__(self, ref: model.EngineRef, cfg: breaker.BreakerConfig, now: float) -> None:
        self.ref = ref
        self.config = cfg  # wanted; the breaker switches to it once it is CLOSED
        self.breaker = breaker.Breaker(cfg, now)
        self.load: enginemetrics.EngineLoad | None = None
        self.revision = 0  # bumped whenever load changes, so ticks skip unchanged services
        self.last_ok: bool | None = None
        self.last_error: str | None = None


_ViewInputs = tuple[Mapping[str, policy.ServicePolicy], Mapping[str, breaker.State]]


class Reconciler:
    """Not thread-safe: one owner calls the mutating methods. :attr:`last`,
    :meth:`engine_view` and :meth:`problems` return immutable values that another thread
    may read."""

    def __init__(
        self,
        policy_config: policy.PolicyConfig | None = None,
        default_breaker: breaker.BreakerConfig | None = None,
        *,
        first_version: int = 1,
    ) -> None:
        self.policy_config = policy_config if policy_config is not None else policy.PolicyConfig()
        self.default_breaker = (
            default_breaker if default_breaker is not None else breaker.BreakerConfig()
        )
        if not 1 <= first_version <= model.VERSION_MAX:
            raise ValueError(f"first_version must be in [1, {model.VERSION_MAX}]")
        self._version = first_version - 1
        self._services: tuple[_Service, ...] = ()
        self._refs: tuple[model.EngineRef, ...] = ()
        self._engines: dict[str, _Engine] = {}
        self._counters: dict[tuple[str, str], reports.BackendCounters] = {}
        self._scrapes: dict[tuple[str, str], scraper.ScrapeResult] = {}  # last per agent
        self._policies: dict[str, policy.ServicePolicy] = {}
        # Per service: the policy inputs of the last tick and the ServiceState built then,
        # reused while the inputs stay the same (compute is a fixed point on equal inputs).
        self._inputs: dict[str, tuple[tuple[int, breaker.State], ...]] = {}
        self._states: dict[str, model.Service] = {}
        self._last: model.Snapshot | None = None
        self._events: collections.deque[BreakerEvent] = collections.deque(maxlen=_EVENTS_MAX)
        # The engine view is built on demand from the last tick's inputs, and cached
        # together with the inputs it came from, so a reader on another thread racing a
        # tick can never cache a view of older inputs as current.
        self._view_inputs: _ViewInputs = ({}, {})
        self._view: tuple[_ViewInputs, Mapping[str, EngineView]] | None = None
        self._problems: tuple[str, ...] = ()
        self.unknown_engine_reports = 0  # scrapes of identities no LLM service lists
        self.repeated_scrape_reports = 0  # a round an agent had already reported

    # -- inputs ------------------------------------------------------------------------

    def set_specs(self, specs: Iterable[discovered.ServiceSpec], now: float) -> None:
        """Replace the discovered services. Engines no longer listed are forgotten
        (breaker, load, counters); new ones start CLOSED. A spec that cannot be turned
        into a service is left out and named in :meth:`problems`."""
        problems: list[str] = []
        services: dict[str, _Service] = {}
        owners: dict[tuple[str, int, str], str] = {}
        refs: dict[str, model.EngineRef] = {}
        breakers: dict[str, breaker.BreakerConfig] = {}
        prepared = []
        for spec in specs:
            name = snapshot_name(spec.name, spec.port, spec.protocol)
            prepared.append((name, spec))
        for name, spec in sorted(prepared, key=lambda p: p[0]):
            where = f"service {spec.name} port {spec.port}/{spec.protocol} ({name})"
            if name in services:
                problems.append(f"{where}: snapshot name already used, left out")
                continue
            taken = [(str(v), p, proto) for v, p, proto in spec.keys
                     if (str(v), p, proto) in owners]
            if taken:
                l4 = taken[0]
                problems.append(f"{where}: {l4[0]}:{l4[1]}/{l4[2]} is already service "
                                f"{owners[l4]}, left out")
                continue
            try:
                svc = self._prepare(name, spec, problems)
                if spec.llm:
                    cfg = spec.breaker_config(self.default_breaker)
            except (ValueError, TypeError) as exc:  # TypeError: an unknown breaker field
                problems.append(f"{where}: {exc}; left out")
                continue
            for v, p, proto in spec.keys:
                owners[(str(v), p, proto)] = name
            services[name] = svc
            if not spec.llm:
                continue
            nodes = {(str(e.address), e.port): e.node for e in spec.endpoints}
            for be in svc.backends:
                if be.identity in refs:
                    continue  # listed by an earlier service: its URLs and breaker win
                mport = spec.metrics_port or be.port
                host = f"[{be.address}]" if ":" in be.address else be.address
                refs[be.identity] = model.EngineRef(
                    identity=be.identity,
                    metrics_url=f"http://{host}:{mport}{spec.metrics_path}",
                    health_url=f"http://{host}:{be.port}{HEALTH_PATH}",
                    node=nodes.get((be.address, be.port)) or None,
                )
                breakers[be.identity] = cfg

        for identity in [i for i in self._engines if i not in refs]:
            self._drain(identity, self._engines.pop(identity))
        self._counters = {k: v for k, v in self._counters.items() if k[1] in refs}
        self._scrapes = {k: v for k, v in self._scrapes.items() if k[1] in refs}
        for identity, ref in refs.items():
            engine = self._engines.get(identity)
            if engine is None:
                self._engines[identity] = _Engine(ref, breakers[identity], now)
            else:
                engine.ref = ref
                engine.config = breakers[identity]
        self._services = tuple(services.values())
        self._refs = tuple(refs[i] for i in sorted(refs))
        self._policies = {k: v for k, v in self._policies.items() if k in services}
        self._inputs = {}
        self._states = {}
        self._problems = tuple(problems)

    def _prepare(self, name: str, spec: discovered.ServiceSpec, problems: list[str]) -> _Service:
        # Kubernetes may list one address in two slices (e.g. during a rollout): keep one
        # backend per address and port, ready winning over terminating.
        chosen: dict[tuple[str, int], _Backend] = {}
        for ep in sorted(spec.endpoints):
            state = ep.state
            if state is discovered.State.EXCLUDED:
                continue
            address = str(ep.address)
            vips = {model.number_of(v) for v in (spec.vip, spec.vip6) if v is not None}
            why = model.backend_problem(model.number_of(ep.address), vips)
            if why is None and ep.address6 is not None:
                why = model.backend_problem(model.number_of(ep.address6), vips)
            if why is not None:
                problems.append(f"service {spec.name} port {spec.port}/{spec.protocol}: "
                                f"endpoint {address}:{ep.port} is {why}, left out")
                continue
            be = _Backend(address, ep.port, backend_identity(address, ep.port, spec.protocol),
                          terminating=state is discovered.State.DRAINING,
                          address6=str(ep.address6) if ep.address6 is not None else None)
            old = chosen.get((address, ep.port))
            if old is None or (old.terminating and not be.terminating):
                chosen[(address, ep.port)] = be
        backends = tuple(chosen[k] for k in sorted(chosen))

        table_size = spec.table_size or model.auto_table_size(spec.affinity, len(backends))
        if len(backends) > table_size:
            fits = model.auto_table_size(spec.affinity, len(backends))
            problems.append(f"service {spec.name} port {spec.port}/{spec.protocol}: "
                            f"{len(backends)} backends do not fit table-size {table_size}, "
                            f"using {fits}")
            table_size = fits
        probe_share = (spec.probe_share if spec.probe_share is not None
                       else self.policy_config.probe_share)
        pcfg: policy.PolicyConfig | None = None
        epsilon: float | None = None
        if spec.llm:
            pcfg = dataclasses.replace(
                self.policy_config,
                epsilon=spec.epsilon if spec.epsilon is not None else self.policy_config.epsilon,
                probe_share=probe_share,
            )
            epsilon = min(max(pcfg.epsilon, 0.0), model.EPSILON_MAX)
        svc = _Service(
            name=name, llm=spec.llm, vip=str(spec.vip), port=spec.port,
            vip6=str(spec.vip6) if spec.vip6 is not None else None,
            protocol=model.Protocol(spec.protocol), affinity=model.Affinity(spec.affinity),
            affinity_timeout=spec.affinity_timeout or model.DEFAULT_AFFINITY_TIMEOUT,
            table_size=table_size, epsilon=epsilon, move_epsilon=spec.move_epsilon,
            probe_share=probe_share, policy=pcfg, backends=backends,
        )
        # Whatever the snapshot would refuse (a VIP that is not unicast, ...) is found
        # here, where the service can be left out, and never in a tick.
        self._plain(svc)
        return svc

    def observe(self, report: reports.AgentReport, now: float) -> None:
        """Feed one agent report (see the module docstring for what counts)."""
        for result in report.engines:
            engine = self._engines.get(result.identity)
            if engine is None:
                self.unknown_engine_reports += 1
                continue
            key = (report.agent_id, result.identity)
            if self._scrapes.get(key) == result:
                # The same round reported again (an agent reports its latest round on
                # every report, and may report faster than it scrapes): counting it twice
                # would open and close breakers on half the evidence. Two real rounds
                # always differ, if only in their measured latency.
                self.repeated_scrape_reports += 1
                continue
            self._scrapes[key] = result
            engine.breaker.record_many(result.outcomes(), now)
            if result.load is not None and result.load != engine.load:
                engine.load = result.load
                engine.revision += 1
            engine.last_ok, engine.last_error = result.ok, result.error
        for counters in report.counters:
            engine = self._engines.get(counters.identity)
            if engine is None:
                continue
            key = (report.agent_id, counters.identity)
            previous = self._counters.get(key)
            self._counters[key] = counters
            if previous is None:
                continue  # a baseline, not news
            cfg = engine.breaker.config
            # A completed handshake says the engine's kernel accepted a connection, not
            # that its server answers: a hung or always-503 engine completes every one.
            # Counting them as successes let client traffic outvote /health (and reset the
            # consecutive-failure run) forever, so only failed connects are evidence here;
            # successes come from the scrape and /health probes alone. Bounded: more
            # failures than this change nothing the breaker has not already seen.
            cap = max(cfg.window, cfg.consecutive_failures)
            failed = min(cap, model.counter_increase(previous.failed, counters.failed))
            if failed:
                engine.breaker.record_many([(False, "kernel")] * failed, now)
            if model.counter_increase(previous.trips, counters.trips) > 0:
                engine.breaker.kernel_tripped(now)
        self._collect()

    # -- output ------------------------------------------------------------------------

    def tick(self, now: float) -> model.Snapshot | None:
        """Advance breakers, recompute policy, and return the next snapshot if its
        content changed since the last one returned (else None)."""
        states: dict[str, breaker.State] = {}
        published: dict[str, breaker.State] = {}
        for identity, engine in self._engines.items():
            state = engine.breaker.state(now)  # lets its timers run up to now
            if state is breaker.State.CLOSED and engine.breaker.config != engine.config:
                # A changed annotation takes effect once the engine is healthy: swapping
                # an OPEN breaker would skip its cool-down.
                engine.breaker = breaker.Breaker(engine.config, now)
            states[identity] = state
            # Half-open sends clients a probe share; while the engine's own last probe
            # failed that share would only find a hung or failing server, so the agents
            # keep it open until a probe passes (that success counts towards closing).
            published[identity] = (breaker.State.OPEN if state is breaker.State.HALF_OPEN
                                   and engine.last_ok is False else state)
        self._collect()

        services: list[model.Service] = []
        changed = self._last is None or self._last.engines != self._refs
        for svc in self._services:
            cached = self._states.get(svc.name)
            if svc.policy is None:
                if cached is None:
                    cached = self._states[svc.name] = self._plain(svc)
                    changed = True
                services.append(cached)
                continue
            key = tuple((self._engines[be.identity].revision, published[be.identity])
                        for be in svc.backends)
            previous = self._policies.get(svc.name)
            if cached is None or previous is None or key != self._inputs.get(svc.name):
                inputs = [
                    policy.BackendInput(be.identity, self._engines[be.identity].load,
                                        published[be.identity], be.terminating)
                    for be in svc.backends
                ]
                result = policy.compute(svc.policy, inputs, previous)
                self._policies[svc.name] = result
                self._inputs[svc.name] = key
                if cached is None or result != previous:
                    cached = self._states[svc.name] = self._llm(svc, result)
                    changed = True
            assert cached is not None
            services.append(cached)
        # Built on demand from these (engine_view), most ticks nobody looks.
        self._view_inputs = (dict(self._policies), states)

        if not changed:
            return None
        candidate = model.Snapshot.of(self._version + 1, tuple(services), self._refs)
        if self._last is not None and candidate.hash == self._last.hash:
            return None
        self._version += 1
        self._last = candidate
        return candidate

    @property
    def last(self) -> model.Snapshot | None:
        """The last snapshot :meth:`tick` returned."""
        return self._last

    @property
    def has_events(self) -> bool:
        """Transitions are waiting for :meth:`events`."""
        return bool(self._events)

    def events(self) -> list[BreakerEvent]:
        """Breaker transitions since the last call, oldest first."""
        out = list(self._events)
        self._events.clear()
        return out

    def engine_view(self) -> Mapping[str, EngineView]:
        """Identity → what the last tick made of that engine (read-only)."""
        inputs, cached = self._view_inputs, self._view
        if cached is not None and cached[0] is inputs:
            return cached[1]
        view = types.MappingProxyType(self._build_view(*inputs))
        self._view = (inputs, view)
        return view

    def problems(self) -> tuple[str, ...]:
        """Why specs of the last :meth:`set_specs` were left out or changed."""
        return self._problems

    def forget_agents(self, agent_ids: Iterable[str]) -> None:
        """Drop what is kept per agent (last scrape and counters) for agents that left."""
        gone = set(agent_ids)
        self._counters = {k: v for k, v in self._counters.items() if k[0] not in gone}
        self._scrapes = {k: v for k, v in self._scrapes.items() if k[0] not in gone}

    def engine_ref(self, identity: str) -> model.EngineRef | None:
        """The engine discovery knows by ``identity`` (with its node), if any."""
        engine = self._engines.get(identity)
        return engine.ref if engine is not None else None

    def breaker_state(self, identity: str, now: float) -> breaker.State | None:
        engine = self._engines.get(identity)
        return engine.breaker.state(now) if engine is not None else None

    # -- internals ---------------------------------------------------------------------

    def _plain(self, svc: _Service) -> model.Service:
        backends = tuple(
            model.Backend(be.address, be.port, 0 if be.terminating else PLAIN_WEIGHT,
                          model.BackendState.DRAINING if be.terminating
                          else model.BackendState.ACTIVE, address6=be.address6)
            for be in svc.backends
        )
        return self._state(svc, backends, saturated=False)

    def _llm(self, svc: _Service, result: policy.ServicePolicy) -> model.Service:
        by_id = {bp.identity: bp for bp in result.backends}
        backends = tuple(
            # Loads travel apart (Publisher.publish_loads): a snapshot changes only when
            # a weight, state or member does, not several times a second.
            model.Backend(be.address, be.port, by_id[be.identity].weight,
                          by_id[be.identity].state, address6=be.address6)
            for be in svc.backends
        )
        return self._state(svc, backends, saturated=result.saturated)

    def _state(self, svc: _Service, backends: tuple[model.Backend, ...],
               saturated: bool) -> model.Service:
        return model.Service(
            name=svc.name, vip=svc.vip, port=svc.port, protocol=svc.protocol,
            affinity=svc.affinity, affinity_timeout=svc.affinity_timeout,
            table_size=svc.table_size, epsilon=svc.epsilon, probe_share=svc.probe_share,
            saturated=saturated, move_epsilon=svc.move_epsilon, backends=backends,
            vip6=svc.vip6,
        )

    def _build_view(self, policies: Mapping[str, policy.ServicePolicy],
                    states: Mapping[str, breaker.State]) -> dict[str, EngineView]:
        listed: dict[str, list[tuple[str, policy.BackendPolicy]]] = {}
        for name, result in policies.items():
            for bp in result.backends:
                listed.setdefault(bp.identity, []).append((name, bp))
        view: dict[str, EngineView] = {}
        for ref in self._refs:
            engine = self._engines.get(ref.identity)
            if engine is None:
                continue
            entries = listed.get(ref.identity, [])
            first = entries[0][1] if entries else None
            view[ref.identity] = EngineView(
                identity=ref.identity, node=ref.node,
                services=tuple(name for name, _ in entries),
                state=first.state if first else "active",
                weight=first.weight if first else 0,
                load_units=first.load if first else 0,
                load=engine.load, breaker=states.get(ref.identity, breaker.State.CLOSED),
                trips=engine.breaker.trips, last_ok=engine.last_ok,
                last_error=engine.last_error,
            )
        return view

    def _collect(self) -> None:
        for identity, engine in self._engines.items():
            self._drain(identity, engine)

    def _drain(self, identity: str, engine: _Engine) -> None:
        for t in engine.breaker.drain_events():
            self._events.append(BreakerEvent(identity, t.from_state, t.to_state, t.reason, t.at))
