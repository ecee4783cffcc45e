"""Per-engine circuit breaker: a pure state machine driven by explicit timestamps.

Nothing in here reads a clock: every method takes ``now`` (seconds on any monotonic
scale, e.g. ``time.monotonic()``), so tests replay exact timelines and the controller
decides where time comes from.

States and transitions::

    CLOSED    --(N consecutive failures | failure ratio >= r over the last W outcomes
                 with at least min_samples of them | kernel trip)-->           OPEN
    OPEN      --(cool-down elapsed)-->                                          HALF_OPEN
    HALF_OPEN --(M consecutive successes)-->                                    CLOSED
    HALF_OPEN --(any failure | kernel trip)-->                                  OPEN

The cool-down backs off: the k-th trip in a row waits ``min(base * factor**k, max)``
(k from 0). The trip count returns to zero once the breaker has stayed CLOSED for
``stable_reset`` seconds, so an engine that flapped yesterday is not punished today.

Outcomes come from the agents' probes of each engine and from the kernel
(:data:`SOURCES`). Every scrape round of an engine is one outcome: a success only when
``/metrics`` parsed, ``/health`` answered in time and the engine's own counters show it
serves clients (no burst of 5xx on the inference handlers, generation not stalled while
requests run: :mod:`dataplane.health`); otherwise one failure whose source is what failed
first (``health``, ``scrape``, ``5xx``, ``stalled``). The kernel's connect counters add a
failure per failed connect (source ``kernel``) and no successes: a completed handshake
says nothing about whether the server answers, and a hung or always-503 engine completes
every one. All sources count the same; the source only ends up in the transition reason,
for metrics and logs.

The kernel trips a backend to ``open`` by itself after K failed connects, faster than
any scrape. :meth:`Breaker.kernel_tripped` brings this breaker to the same state; the
kernel never closes a backend again, the controller does, through HALF_OPEN.

Outcomes that arrive while OPEN are ignored: the cool-down alone decides when to probe,
otherwise a flapping health check could shorten the back-off.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import math
from collections.abc import Iterable

from dataplane import health

SOURCES = frozenset({"scrape", "health", "kernel", *health.FAILURES})

# Bounded so a breaker whose events nobody drains cannot grow without limit.
_EVENT_LOG_MAX = 256


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclasses.dataclass(frozen=True)
class BreakerConfig:
    """Thresholds of one breaker. Defaults suit a 250 ms scrape interval, where each
    round of an engine is one outcome: 3 failed rounds in a row (about 0.75 s) open it,
    one slow or lost round does not."""

    consecutive_failures: int = 3  # N
    failure_ratio: float = 0.5  # r, in (0, 1]
    window: int = 20  # W, outcomes remembered for the ratio
    min_samples: int = 10  # the ratio is not judged on fewer outcomes than this
    cooldown_base: float = 1.0  # seconds OPEN after the first trip
    cooldown_factor: float = 2.0  # multiplier per further trip in a row
    cooldown_max: float = 60.0  # cap on the cool-down
    stable_reset: float = 60.0  # seconds CLOSED after which the trip count resets
    half_open_successes: int = 3  # M, consecutive successes that close it again

    def __post_init__(self) -> None:
        _require_int(self, "consecutive_failures", 1)
        _require_int(self, "window", 1)
        _require_int(self, "min_samples", 1)
        _require_int(self, "half_open_successes", 1)
        if self.min_samples > self.window:
            raise ValueError(
                f"BreakerConfig.min_samples ({self.min_samples}) must be <= window "
                f"({self.window}): the ratio could never be judged"
            )
        ratio = _require_finite(self, "failure_ratio")
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"BreakerConfig.failure_ratio must be in (0, 1], got {ratio}")
        base = _require_finite(self, "cooldown_base")
        if base <= 0.0:
            raise ValueError(f"BreakerConfig.cooldown_base must be > 0, got {base}")
        factor = _require_finite(self, "cooldown_factor")
        if factor < 1.0:
            raise ValueError(f"BreakerConfig.cooldown_factor must be >= 1, got {factor}")
        cap = _require_finite(self, "cooldown_max")
        if cap < base:
            raise ValueError(
                f"BreakerConfig.cooldown_max ({cap}) must be >= cooldown_base ({base})"
            )
        reset = _require_finite(self, "stable_reset")
        if reset < 0.0:
            raise ValueError(f"BreakerConfig.stable_reset must be >= 0, got {reset}")

    def cooldown(self, trips: int) -> float:
        """Cool-down after the ``trips``-th trip in a row (0 for the first)."""
        if trips < 0:
            raise ValueError(f"trips must be >= 0, got {trips}")
        # Compare in log space so a long run of trips cannot overflow factor**trips.
        if self.cooldown_factor > 1.0 and trips * math.log(self.cooldown_factor) >= math.log(
            self.cooldown_max / self.cooldown_base
        ):
            return self.cooldown_max
        return float(min(self.cooldown_base * self.cooldown_factor**trips, self.cooldown_max))


def _require_int(cfg: BreakerConfig, name: str, minimum: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"BreakerConfig.{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"BreakerConfig.{name} must be >= {minimum}, got {value}")


def _require_finite(cfg: BreakerConfig, name: str) -> float:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"BreakerConfig.{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"BreakerConfig.{name} must be finite, got {value}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class Transition:
    """One state change, for metrics (``kvroute_controller_breaker_transitions_total``) and logs.

    ``reason`` has bounded cardinality: ``consecutive_failures:<source>``,
    ``failure_ratio:<source>``, ``kernel_trip``, ``cooldown_elapsed``,
    ``probe_failed:<source>``, ``probes_succeeded``.
    """

    from_state: State
    to_state: State
    reason: str
    at: float


class Breaker:
    """Circuit breaker of one engine. Not thread-safe; one owner drives it."""

    def __init__(self, config: BreakerConfig | None = None, now: float = 0.0) -> None:
        self.config = config if config is not None else BreakerConfig()
        self._state = State.CLOSED
        self._now = _check_time(now)
        self._window: collections.deque[bool] = collections.deque(maxlen=self.config.window)
        self._consecutive_failures = 0
        self._probe_successes = 0
        self._trips = 0  # trips in a row, drives the back-off
        self._closed_since = self._now
        self._open_until = 0.0
        self._events: collections.deque[Transition] = collections.deque(maxlen=_EVENT_LOG_MAX)

    # -- queries -------------------------------------------------------------------------

    def state(self, now: float) -> State:
        """Current state after letting timers run up to ``now``."""
        self.advance(now)
        return self._state

    @property
    def trips(self) -> int:
        """Trips in a row so far (the exponent of the next cool-down)."""
        return self._trips

    @property
    def open_until(self) -> float | None:
        """When the current OPEN period ends, or None when not OPEN."""
        return self._open_until if self._state is State.OPEN else None

    def drain_events(self) -> list[Transition]:
        """Transitions since the last drain, oldest first (at most the last 256)."""
        events = list(self._events)
        self._events.clear()
        return events

    # -- inputs --------------------------------------------------------------------------

    def advance(self, now: float) -> list[Transition]:
        """Let timers run up to ``now``: OPEN becomes HALF_OPEN once the cool-down is
        over, and a long enough CLOSED period forgets past trips."""
        now = self._tick(now)
        out: list[Transition] = []
        if self._state is State.OPEN and now >= self._open_until:
            # The transition happened when the cool-down ended, not when we noticed.
            out.append(self._go(State.HALF_OPEN, "cooldown_elapsed", self._open_until))
            self._probe_successes = 0
        elif (
            self._state is State.CLOSED
            and self._trips
            and now - self._closed_since >= self.config.stable_reset
        ):
            self._trips = 0
        return out

    def record(self, ok: bool, now: float, source: str) -> list[Transition]:
        """Feed one outcome; returns the transitions it caused (also kept for
        :meth:`drain_events`)."""
        if source not in SOURCES:
            raise ValueError(
                f"unknown outcome source {source!r}, expected one of {sorted(SOURCES)}"
            )
        out = self.advance(now)
        now = self._now
        if self._state is State.CLOSED:
            self._window.append(ok)
            if ok:
                self._consecutive_failures = 0
                return out
            self._consecutive_failures += 1
            if self._consecutive_failures >= self.config.consecutive_failures:
                out.append(self._trip(f"consecutive_failures:{source}", now))
            elif len(self._window) >= self.config.min_samples:
                failures = sum(1 for o in self._window if not o)
                if failures >= self.config.failure_ratio * len(self._window):
                    out.append(self._trip(f"failure_ratio:{source}", now))
        elif self._state is State.HALF_OPEN:
            if not ok:
                out.append(self._trip(f"probe_failed:{source}", now))
            else:
                self._probe_successes += 1
                if self._probe_successes >= self.config.half_open_successes:
                    out.append(self._close(now))
        return out

    def record_many(self, outcomes: Iterable[tuple[bool, str]], now: float) -> list[Transition]:
        """Feed several outcomes observed at the same instant, in order."""
        out: list[Transition] = []
        for ok, source in outcomes:
            out.extend(self.record(ok, now, source))
        return out

    def kernel_tripped(self, now: float) -> list[Transition]:
        """The kernel marked this backend open after K failed connects. Already OPEN:
        nothing changes (a late report must not extend the cool-down)."""
        out = self.advance(now)
        if self._state is not State.OPEN:
            out.append(self._trip("kernel_trip", self._now))
        return out

    # -- internals -----------------------------------------------------------------------

    def _tick(self, now: float) -> float:
        now = _check_time(now)
        # A timestamp from the past (two callers racing to hand in their clock reading)
        # is treated as "now": time never runs backwards inside the machine.
        if now > self._now:
            self._now = now
        return self._now

    def _go(self, to: State, reason: str, at: float) -> Transition:
        event = Transition(self._state, to, reason, at)
        self._state = to
        self._events.append(event)
        return event

    def _trip(self, reason: str, now: float) -> Transition:
        self._open_until = now + self.config.cooldown(self._trips)
        self._trips += 1
        self._probe_successes = 0
        return self._go(State.OPEN, reason, now)

    def _close(self, now: float) -> Transition:
        self._window.clear()
        self._consecutive_failures = 0
        self._closed_since = now
        return self._go(State.CLOSED, "probes_succeeded", now)


def _check_time(now: float) -> float:
    if isinstance(now, bool) or not isinstance(now, int | float) or not math.isfinite(now):
        raise ValueError(f"now must be a finite number of seconds, got {now!r}")
    return float(now)
