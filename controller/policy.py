"""Engine loads and breaker states → per-backend weight, state and load of one service.

Pure and deterministic: the same inputs (and the same previous result) always give the
same :class:`ServicePolicy`, on any controller replica.

Weight (how many Maglev slots a backend gets, i.e. its share of *new* sessions)
------------------------------------------------------------------------------
1. Utilisation ``u`` in [0, 1] is the worst of three ratios, each capped at 1::

       kv_usage / kv_threshold,  waiting / queue_threshold,  running / running_capacity

   and the headroom is ``1 - u``.
2. The headroom is quantised into ``levels`` equal bands (default 16, so 6.25 % each);
   level ``k`` maps to ``weight = round(65535 * (k + 1) / levels)``, so the busiest
   engine still gets 1/16 of an idle one's share and no active backend ever has weight 0
   (bounded load and affinity, not the weight, keep a full engine from drowning).
3. Hysteresis: a backend keeps its previous level ``k`` while ``headroom * levels`` stays
   inside ``[k - h, k + 1 + h)`` (``h`` = ``hysteresis``, a fraction of a band, default
   0.5). Only when the load leaves that widened band does the level move, straight to the
   band the headroom is in now. A load wobbling around a band edge therefore changes no
   weight, no Maglev slot and no session.

States (first match wins)
-------------------------
- breaker OPEN → ``open``, weight 0: never chosen, not even for pinned sessions (a dead
  engine is worse than a lost KV cache);
- terminating endpoint → ``draining``, weight 0: no new sessions, pinned ones stay;
- breaker HALF_OPEN → ``probing``, with the weight that gives it ``probe_share`` of new
  sessions next to the active backends (all of them when none is active);
- otherwise ``active``.

Load (the kernel's bounded-load input)
--------------------------------------
``load = 1000 * (running + waiting) + round(1000 * kv_usage)``, an unsigned 32-bit
integer: one unit per thousandth of a request in flight, with KV usage in permille as the
tie-breaker between engines with the same number of requests. The kernel compares a
backend's load with ``(1 + epsilon) * mean``; :attr:`ServicePolicy.mean_load` and
:attr:`ServicePolicy.load_bound` give both over the backends that can take new sessions.
The scale is :func:`dataplane.model.load_units` (``EngineLoad.units``), one definition for
every writer.

Saturation
----------
A service is ``saturated`` when every active backend with a known load has
``waiting >= queue_threshold`` and ``kv_usage >= kv_threshold``; the kernel then fails
new connections fast instead of queueing them forever. It stays saturated until some
active backend drops below ``saturation_exit`` times either threshold (hysteresis again,
so the flag does not flap), or none is left to judge. A backend whose load is unknown
counts as not saturated: never fail fast on a guess.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence

from controller import breaker
from dataplane import enginemetrics, model

WEIGHT_MAX = model.WEIGHT_MAX
LOAD_MAX = model.LOAD_MAX
BackendState = model.BackendState


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """Per-service knobs (from annotations, or defaults)."""

    epsilon: float = 0.25  # bounded load: a backend may carry (1 + epsilon) x the mean
    levels: int = 16  # weight bands
    hysteresis: float = 0.5  # how far past a band edge (in bands) the load must move
    kv_threshold: float = 0.9  # KV usage at which an engine counts as full
    queue_threshold: float = 8.0  # waiting requests at which an engine counts as full
    running_capacity: float = 64.0  # running requests at which an engine counts as full
    saturation_exit: float = 0.8  # leave "saturated" below this fraction of a threshold
    probe_share: float = 0.05  # share of new sessions for each probing backend

    def __post_init__(self) -> None:
        if isinstance(self.levels, bool) or not isinstance(self.levels, int):
            raise ValueError(f"PolicyConfig.levels must be an int, got {self.levels!r}")
        if not 1 <= self.levels <= WEIGHT_MAX:
            raise ValueError(f"PolicyConfig.levels must be in [1, {WEIGHT_MAX}], got {self.levels}")
        _check(self, "epsilon", 0.0, 100.0)
        _check(self, "hysteresis", 0.0, 1.0)
        _check(self, "kv_threshold", 0.0, 1.0, low_open=True)
        _check(self, "queue_threshold", 0.0, enginemetrics.MAX_REQUESTS, low_open=True)
        _check(self, "running_capacity", 0.0, enginemetrics.MAX_REQUESTS, low_open=True)
        _check(self, "saturation_exit", 0.0, 1.0, low_open=True)
        _check(self, "probe_share", 0.0, 1.0, low_open=True, high_open=True)


def _check(
    cfg: PolicyConfig,
    name: str,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ValueError(f"PolicyConfig.{name} must be a number, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"PolicyConfig.{name} must be in {interval}, got {value}")


@dataclasses.dataclass(frozen=True)
class BackendInput:
    identity: str  # stable name of the backend (e.g. "10.0.1.7:8000")
    load: enginemetrics.EngineLoad | None  # latest good scrape; None if never scraped
    breaker: breaker.State = breaker.State.CLOSED
    terminating: bool = False  # EndpointSlice says terminating (or the file says so)


@dataclasses.dataclass(frozen=True)
class BackendPolicy:
    identity: str
    weight: int  # 0..65535, Maglev weight; 0 = no slots
    state: BackendState
    load: int  # 0..LOAD_MAX, bounded-load units (EngineLoad.units)
    level: int  # weight band, kept even at weight 0 so hysteresis survives open/draining


@dataclasses.dataclass(frozen=True)
class ServicePolicy:
    epsilon: float
    saturated: bool
    backends: tuple[BackendPolicy, ...]  # sorted by identity
    mean_load: int  # mean load of active and probing backends (0 if none)

    @property
    def load_bound(self) -> int:
        """Load above which the kernel looks for another candidate."""
        return min(LOAD_MAX, math.floor((1.0 + self.epsilon) * self.mean_load))

    def backend(self, identity: str) -> BackendPolicy:
        for b in self.backends:
            if b.identity == identity:
                return b
        raise KeyError(identity)


def utilisation(config: PolicyConfig, load: enginemetrics.EngineLoad) -> float:
    """The worst of KV, queue and running pressure, in [0, 1]."""
    return min(
        1.0,
        max(
            load.kv_usage / config.kv_threshold,
            load.waiting / config.queue_threshold,
            load.running / config.running_capacity,
        ),
    )


def level_for(headroom: float, levels: int, hysteresis: float, previous: int | None) -> int:
    """Quantised weight band of ``headroom`` (in [0, 1]) with hysteresis around
    ``previous`` (see the module docstring)."""
    x = min(1.0, max(0.0, headroom)) * levels
    band = min(levels - 1, math.floor(x))
    if previous is None or not 0 <= previous < levels:
        return band
    if previous - hysteresis <= x < previous + 1 + hysteresis:
        return previous
    return band


def weight_for(level: int, levels: int) -> int:
    return round(WEIGHT_MAX * (level + 1) / levels)


def compute(
    config: PolicyConfig,
    backends: Iterable[BackendInput],
    previous: ServicePolicy | None = None,
) -> ServicePolicy:
    """Policy of one service. ``previous`` is the last result for the same service; it
    carries the hysteresis memory (levels, saturation) and the last known loads."""
    inputs = sorted(backends, key=lambda b: b.identity)
    _check_identities(inputs)
    before: Mapping[str, BackendPolicy] = (
        {b.identity: b for b in previous.backends} if previous is not None else {}
    )

    levels: dict[str, int] = {}
    loads: dict[str, int] = {}
    states: dict[str, BackendState] = {}
    for b in inputs:
        old = before.get(b.identity)
        if b.load is not None:
            headroom = 1.0 - utilisation(config, b.load)
            prev_level = old.level if old is not None else None
            levels[b.identity] = level_for(headroom, config.levels, config.hysteresis, prev_level)
            loads[b.identity] = b.load.units
        elif old is not None:
            # A failed scrape tells us nothing about load: keep what we had.
            levels[b.identity], loads[b.identity] = old.level, old.load
        else:
            # Never scraped: a new engine is most likely idle.
            levels[b.identity], loads[b.identity] = config.levels - 1, 0
        states[b.identity] = _state(b)

    active_sum = sum(
        weight_for(levels[i], config.levels) for i, s in states.items() if s == "active"
    )
    probe_weight = _probe_weight(config.probe_share, active_sum)
    out: list[BackendPolicy] = []
    for b in inputs:
        state = states[b.identity]
        if state == "active":
            weight = weight_for(levels[b.identity], config.levels)
        elif state == "probing":
            weight = probe_weight
        else:
            weight = 0
        out.append(BackendPolicy(b.identity, weight, state, loads[b.identity], levels[b.identity]))

    eligible = [loads[b.identity] for b in inputs if states[b.identity] in ("active", "probing")]
    mean_load = round(sum(eligible) / len(eligible)) if eligible else 0
    saturated = _saturated(
        config,
        [b.load for b in inputs if states[b.identity] == "active"],
        previous.saturated if previous is not None else False,
    )
    return ServicePolicy(config.epsilon, saturated, tuple(out), mean_load)


def _check_identities(inputs: Sequence[BackendInput]) -> None:
    seen: set[str] = set()
    for b in inputs:
        if not b.identity:
            raise ValueError("backend identity must not be empty")
        if b.identity in seen:
            raise ValueError(f"backend {b.identity!r} listed twice")
        seen.add(b.identity)


def _state(b: BackendInput) -> BackendState:
    if b.breaker is breaker.State.OPEN:
        return BackendState.OPEN
    if b.terminating:
        return BackendState.DRAINING
    if b.breaker is breaker.State.HALF_OPEN:
        return BackendState.PROBING
    return BackendState.ACTIVE


def _probe_weight(share: float, active_sum: int) -> int:
    if active_sum == 0:
        return WEIGHT_MAX
    # w / (active_sum + w) = share  =>  w = share * active_sum / (1 - share)
    return max(1, min(WEIGHT_MAX, round(share * active_sum / (1.0 - share))))


def _saturated(
    config: PolicyConfig,
    loads: Sequence[enginemetrics.EngineLoad | None],
    was_saturated: bool,
) -> bool:
    if not loads:
        return False
    if was_saturated:
        exit_q = config.queue_threshold * config.saturation_exit
        exit_kv = config.kv_threshold * config.saturation_exit
        return all(
            load is not None and load.waiting >= exit_q and load.kv_usage >= exit_kv
            for load in loads
        )
    return all(
        load is not None
        and load.waiting >= config.queue_threshold
        and load.kv_usage >= config.kv_threshold
        for load in loads
    )
