"""Breaker state machine: exact timelines, back-off, kernel trips, and properties over
random outcome sequences."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller import breaker

S = breaker.State


def make(**overrides: float) -> breaker.Breaker:
    cfg = dataclasses.replace(breaker.BreakerConfig(), **overrides)  # type: ignore[arg-type]
    return breaker.Breaker(cfg, now=0.0)


# -- config validation ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("consecutive_failures", 0),
        ("consecutive_failures", 2.5),
        ("consecutive_failures", True),
        ("window", 0),
        ("min_samples", 0),
        ("half_open_successes", 0),
        ("failure_ratio", 0.0),
        ("failure_ratio", 1.5),
        ("failure_ratio", float("nan")),
        ("cooldown_base", 0.0),
        ("cooldown_base", float("inf")),
        ("cooldown_factor", 0.5),
        ("cooldown_max", 0.1),
        ("stable_reset", -1.0),
        ("stable_reset", "10"),
    ],
)
def test_config_rejects_bad_field_and_names_it(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        breaker.BreakerConfig(**{field: value})  # type: ignore[arg-type]


def test_config_min_samples_above_window_rejected() -> None:
    with pytest.raises(ValueError, match="min_samples"):
        breaker.BreakerConfig(window=5, min_samples=6)


def test_cooldown_backs_off_and_caps() -> None:
    cfg = breaker.BreakerConfig(cooldown_base=0.5, cooldown_factor=3.0, cooldown_max=10.0)
    assert [cfg.cooldown(k) for k in range(5)] == [0.5, 1.5, 4.5, 10.0, 10.0]
    assert cfg.cooldown(10_000) == 10.0  # no overflow on a very long run of trips
    flat = breaker.BreakerConfig(cooldown_base=2.0, cooldown_factor=1.0, cooldown_max=5.0)
    assert flat.cooldown(50) == 2.0


def test_unknown_source_and_bad_time_rejected() -> None:
    b = make()
    with pytest.raises(ValueError, match="source"):
        b.record(False, 1.0, "dns")
    with pytest.raises(ValueError, match="now"):
        b.record(False, float("nan"), "scrape")


# -- tripping -------------------------------------------------------------------------


def test_consecutive_failures_trip_at_exactly_n() -> None:
    b = make(consecutive_failures=3, min_samples=20, window=20)
    assert b.record(False, 1.0, "scrape") == []
    assert b.record(False, 1.1, "health") == []
    assert b.state(1.1) is S.CLOSED
    events = b.record(False, 1.2, "health")
    assert events == [breaker.Transition(S.CLOSED, S.OPEN, "consecutive_failures:health", 1.2)]
    assert b.state(1.2) is S.OPEN


def test_success_resets_consecutive_count() -> None:
    b = make(consecutive_failures=3, failure_ratio=1.0, min_samples=20, window=20)
    for i in range(10):
        b.record(False, i, "scrape")
        b.record(False, i + 0.1, "scrape")
        b.record(True, i + 0.2, "scrape")
    assert b.state(11.0) is S.CLOSED


def test_failure_ratio_trips_only_with_min_samples() -> None:
    # Alternate fail/ok: never 2 consecutive failures, ratio exactly 0.5.
    b = make(consecutive_failures=2, failure_ratio=0.5, window=10, min_samples=6)
    t = 0.0
    for _ in range(2):
        b.record(False, t, "kernel")
        b.record(True, t + 0.1, "kernel")
        t += 1.0
    assert b.state(t) is S.CLOSED  # 4 samples < min_samples even though ratio is 0.5
    b.record(False, t, "kernel")
    assert b.state(t) is S.CLOSED  # 5 samples
    b.record(True, t + 0.1, "kernel")  # 6 samples, 3 failures, but an ok cannot trip
    assert b.state(t + 0.1) is S.CLOSED
    events = b.record(False, t + 0.2, "kernel")  # 7 samples, 4 failures >= 0.5*7
    assert [e.reason for e in events] == ["failure_ratio:kernel"]


def test_ratio_below_threshold_does_not_trip() -> None:
    b = make(consecutive_failures=100, failure_ratio=0.5, window=10, min_samples=10)
    # 4 failures in every 10: 0.4 < 0.5 forever.
    for i in range(200):
        b.record(i % 10 not in (0, 3, 6, 8), float(i), "scrape")
    assert b.state(201.0) is S.CLOSED


def test_window_slides_old_failures_out() -> None:
    b = make(consecutive_failures=100, failure_ratio=0.5, window=4, min_samples=4)
    b.record(False, 0, "scrape")
    b.record(True, 1, "scrape")
    b.record(True, 2, "scrape")
    b.record(True, 3, "scrape")
    b.record(True, 4, "scrape")  # the failure left the window
    b.record(False, 5, "scrape")
    assert b.state(5) is S.CLOSED  # 1 of 4
    b.record(False, 6, "scrape")  # 2 of 4 = 0.5
    assert b.state(6) is S.OPEN


# -- open / half-open / closed cycle --------------------------------------------------


def test_full_cycle_with_backoff_and_events() -> None:
    b = make(
        consecutive_failures=1,
        cooldown_base=1.0,
        cooldown_factor=2.0,
        cooldown_max=5.0,
        half_open_successes=2,
        stable_reset=100.0,
    )
    b.record(False, 10.0, "scrape")
    assert b.open_until == 11.0
    b.record(True, 10.5, "health")  # ignored while OPEN
    assert b.state(10.99) is S.OPEN
    assert b.state(11.0) is S.HALF_OPEN
    b.record(False, 11.2, "kernel")  # any probe failure reopens, with the next back-off
    assert b.state(11.2) is S.OPEN and b.open_until == pytest.approx(13.2)
    assert b.state(13.1) is S.OPEN
    b.record(True, 13.3, "scrape")  # advances to HALF_OPEN first, then counts
    assert b.state(13.3) is S.HALF_OPEN
    b.record(True, 13.4, "health")
    assert b.state(13.4) is S.CLOSED
    assert b.trips == 2  # remembered until a stable closed period

    events = b.drain_events()
    assert [(e.from_state, e.to_state, e.reason, e.at) for e in events] == [
        (S.CLOSED, S.OPEN, "consecutive_failures:scrape", 10.0),
        (S.OPEN, S.HALF_OPEN, "cooldown_elapsed", 11.0),
        (S.HALF_OPEN, S.OPEN, "probe_failed:kernel", 11.2),
        (S.OPEN, S.HALF_OPEN, "cooldown_elapsed", 13.2),
        (S.HALF_OPEN, S.CLOSED, "probes_succeeded", 13.4),
    ]
    assert b.drain_events() == []

    # Trips soon after closing keep backing off: 4 s then capped at 5 s.
    b.record(False, 20.0, "scrape")
    assert b.open_until == 24.0
    b.state(24.0)
    b.record(False, 24.0, "scrape")
    assert b.open_until == 29.0


def test_stable_closed_period_resets_backoff() -> None:
    b = make(
        consecutive_failures=1,
        cooldown_base=1.0,
        cooldown_factor=2.0,
        cooldown_max=60.0,
        half_open_successes=1,
        stable_reset=60.0,
    )
    for t in (0.0, 20.0):  # two trips, each closed again 10 s later
        b.record(False, t, "scrape")
        b.record(True, t + 10.0, "scrape")
    assert b.state(30.0) is S.CLOSED
    assert b.trips == 2
    # Closed at 30, so the back-off is still remembered at 89.9 ...
    b.state(89.9)
    assert b.trips == 2
    # ... and forgotten at 90.
    b.state(90.0)
    assert b.trips == 0
    b.record(False, 91.0, "scrape")
    assert b.open_until == 92.0


def test_half_open_needs_consecutive_successes_from_any_source() -> None:
    b = make(consecutive_failures=1, half_open_successes=3, cooldown_base=1.0)
    b.record(False, 0.0, "kernel")
    b.state(1.0)
    b.record_many([(True, "scrape"), (True, "health")], 1.0)
    assert b.state(1.0) is S.HALF_OPEN
    b.record(True, 1.1, "kernel")
    assert b.state(1.1) is S.CLOSED


def test_kernel_trip_opens_from_closed_and_half_open_not_when_open() -> None:
    b = make(cooldown_base=2.0, cooldown_factor=2.0, cooldown_max=100.0)
    ev = b.kernel_tripped(5.0)
    assert [(e.from_state, e.to_state, e.reason) for e in ev] == [(S.CLOSED, S.OPEN, "kernel_trip")]
    assert b.open_until == 7.0
    assert b.kernel_tripped(6.0) == []  # late report: cool-down not extended
    assert b.open_until == 7.0
    ev = b.kernel_tripped(7.5)  # after the cool-down: half-open, then the kernel trips it
    assert [(e.to_state, e.reason) for e in ev] == [
        (S.HALF_OPEN, "cooldown_elapsed"),
        (S.OPEN, "kernel_trip"),
    ]
    assert b.open_until == 11.5


def test_time_going_backwards_is_clamped() -> None:
    b = make(consecutive_failures=1, cooldown_base=1.0)
    b.record(False, 10.0, "scrape")
    assert b.state(3.0) is S.OPEN  # not a reset, not an error
    assert b.state(11.0) is S.HALF_OPEN


def test_event_log_is_bounded() -> None:
    b = make(consecutive_failures=1, cooldown_base=1.0, cooldown_factor=1.0, cooldown_max=1.0)
    t = 0.0
    for _ in range(500):
        b.record(False, t, "scrape")
        t += 1.0
    assert len(b.drain_events()) == 256


# -- properties -----------------------------------------------------------------------

_ALLOWED = {
    (S.CLOSED, S.OPEN),
    (S.OPEN, S.HALF_OPEN),
    (S.HALF_OPEN, S.OPEN),
    (S.HALF_OPEN, S.CLOSED),
}

_steps = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=3.0),  # time step
        st.sampled_from(["ok", "fail", "kernel_trip", "tick"]),
        st.sampled_from(sorted(breaker.SOURCES)),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(steps=_steps, n=st.integers(1, 6), m=st.integers(1, 4), window=st.integers(1, 12))
def test_random_sequences_keep_invariants(
    steps: list[tuple[float, str, str]], n: int, m: int, window: int
) -> None:
    cfg = breaker.BreakerConfig(
        consecutive_failures=n,
        half_open_successes=m,
        window=window,
        min_samples=max(1, window // 2),
        cooldown_base=0.5,
        cooldown_factor=2.0,
        cooldown_max=4.0,
        stable_reset=10.0,
    )
    b = breaker.Breaker(cfg, now=0.0)
    t = 0.0
    state = S.CLOSED
    open_until = 0.0
    oks_in_half_open = 0
    fails_in_closed = 0

    def check(events: list[breaker.Transition], action: str) -> None:
        nonlocal state, open_until, oks_in_half_open
        for e in events:
            assert e.from_state is state, "transitions must chain"
            assert (e.from_state, e.to_state) in _ALLOWED
            assert e.at <= t
            if e.to_state is S.OPEN:
                assert action in ("fail", "kernel_trip"), "only failures open the breaker"
                assert b.open_until is not None
                open_until = b.open_until
                assert 0.5 - 1e-9 <= open_until - e.at <= 4.0 + 1e-9
            if e.from_state is S.OPEN:
                assert e.at == open_until, "half-open exactly when the cool-down ends"
            if e.to_state is S.CLOSED:
                assert action == "ok" and oks_in_half_open + 1 >= m
            if e.to_state is S.HALF_OPEN:
                oks_in_half_open = 0
            state = e.to_state

    for dt, action, source in steps:
        t += dt
        check(b.advance(t), "tick")
        before = state
        if action == "ok":
            check(b.record(True, t, source), action)
            if before is S.HALF_OPEN and state is S.HALF_OPEN:
                oks_in_half_open += 1
        elif action == "fail":
            if before is S.CLOSED:
                fails_in_closed += 1
            check(b.record(False, t, source), action)
            if before is S.HALF_OPEN:
                assert state is S.OPEN, "any failure in half-open reopens"
            if before is S.CLOSED and state is S.OPEN:
                assert fails_in_closed >= min(n, cfg.min_samples // 2 or 1)
                fails_in_closed = 0
        elif action == "kernel_trip":
            check(b.kernel_tripped(t), action)
            assert state is S.OPEN
        if before is not S.CLOSED and state is S.CLOSED:
            fails_in_closed = 0
        assert b.state(t) is state
        if state is S.OPEN:
            assert b.open_until is not None and b.open_until > t
