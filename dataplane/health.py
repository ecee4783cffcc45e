"""Whether an engine serves its clients, judged between two scrapes: pure, no I/O.

A completed TCP handshake, or a ``/health`` that answers, does not show that clients get
answers. The engine's own counters do (:class:`dataplane.enginemetrics.Progress`):

- ``5xx``: between two readings the 5xx answers on the inference handlers grew and either
  no 2xx did or the 5xx share of the two reached ``error_share``;
- ``stalled``: the engine held running requests (``running > 0``) while its generated-token
  counter did not advance, for longer than ``stall_window`` seconds.

:func:`judge` takes the previous :class:`Reading` of the engine (None for the first scrape,
which only sets a baseline) and the current counters, and returns the verdict (None: fine,
else one of :data:`FAILURES`) and the reading to keep for the next call. After a ``5xx``
verdict the reading stays :func:`unproven` until an interval brings 2xx answers: an engine
the breaker took clients from answers nothing, which is no evidence that it recovered.
The caller (the agent's :class:`dataplane.engines.EngineWatcher`) keeps one reading per
engine; time comes in as ``now`` (seconds, any monotonic scale). A counter that went
down means the engine restarted: the new value is then the increase
(:func:`dataplane.model.counter_increase`).
"""

from __future__ import annotations

import dataclasses
import math

from dataplane import enginemetrics, model

FIVE_XX = "5xx"
STALLED = "stalled"
FAILURES = (FIVE_XX, STALLED)  # breaker outcome sources beside scrape, health, kernel

DEFAULT_STALL_WINDOW = 2.0


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    # Running requests and no new token for longer than this: stalled. A real engine emits
    # a token per running request every step (tens of ms); a long chunked prefill may hold
    # the counter still for a while, hence seconds, not one scrape interval.
    stall_window: float = DEFAULT_STALL_WINDOW
    # 5xx share of the inference answers between two readings that counts as failing, when
    # some 2xx came too (with no 2xx at all, any 5xx does).
    error_share: float = 0.5

    def __post_init__(self) -> None:
        if not (math.isfinite(self.stall_window) and self.stall_window > 0):
            raise ValueError(f"stall_window must be > 0 seconds, got {self.stall_window!r}")
        if not 0.0 < self.error_share <= 1.0:
            raise ValueError(f"error_share must be in (0, 1], got {self.error_share!r}")


@dataclasses.dataclass(frozen=True)
class Reading:
    """What the judge remembers of one engine between scrapes."""

    progress: enginemetrics.Progress
    at: float  # when it was read
    moving_since: float  # last reading at which tokens advanced or nothing was running
    # The last interval with inference answers failed on 5xx, and none has succeeded
    # since: a quiet interval then proves nothing (the breaker stopped sending clients),
    # so it is "unproven" rather than a success.
    suspect: bool = False


def judge(previous: Reading | None, current: enginemetrics.Progress, now: float,
          config: JudgeConfig = JudgeConfig()) -> tuple[str | None, Reading]:
    """Verdict on the interval since ``previous`` and the reading to keep."""
    if previous is None:
        return None, Reading(current, now, now)
    old = previous.progress
    moving_since = previous.moving_since
    tokens, before = current.generation_tokens, old.generation_tokens
    if current.running <= 0 or tokens is None or before is None or tokens != before:
        moving_since = now  # idle, unknown, advanced or restarted: not stalled
    errors, served = _answers(old, current, config.error_share)
    suspect = errors or (previous.suspect and not served)
    reading = Reading(current, now, moving_since, suspect)
    if errors:
        return FIVE_XX, reading
    if now - moving_since > config.stall_window:
        return STALLED, reading
    return None, reading


def unproven(reading: Reading) -> bool:
    """The engine last failed on 5xx and has answered no inference request well since."""
    return reading.suspect


def _answers(old: enginemetrics.Progress, new: enginemetrics.Progress,
             share: float) -> tuple[bool, bool]:
    """(too many 5xx, some 2xx) on the inference handlers over the interval."""
    if new.http_5xx is None or new.http_2xx is None:
        return False, False
    # Exporters create a labelled series on its first request, so a family absent from
    # the previous page counted nothing then: everything on this page is new.
    bad = model.counter_increase(old.http_5xx or 0.0, new.http_5xx)
    good = model.counter_increase(old.http_2xx or 0.0, new.http_2xx)
    return bad > 0 and (good <= 0 or bad >= share * (bad + good)), good > 0
