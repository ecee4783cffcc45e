"""Policy: load → weight with hysteresis, states, probing share, saturation, load units."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller import breaker, policy
from dataplane import enginemetrics

CFG = policy.PolicyConfig()  # kv 0.9, queue 8, running 64, 16 levels, h 0.5


def load(running: float = 0.0, waiting: float = 0.0, kv: float = 0.0) -> enginemetrics.EngineLoad:
    return enginemetrics.EngineLoad(
        running=running, waiting=waiting, kv_usage=kv, kv_family=enginemetrics.KV_USAGE, engines=1
    )


def inp(
    identity: str,
    lo: enginemetrics.EngineLoad | None,
    state: breaker.State = breaker.State.CLOSED,
    terminating: bool = False,
) -> policy.BackendInput:
    return policy.BackendInput(identity, lo, state, terminating)


# -- config ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epsilon", -0.1),
        ("epsilon", float("nan")),
        ("levels", 0),
        ("levels", 2.0),
        ("hysteresis", 1.5),
        ("kv_threshold", 0.0),
        ("kv_threshold", 1.2),
        ("queue_threshold", 0),
        ("running_capacity", -1),
        ("saturation_exit", 0.0),
        ("probe_share", 1.0),
        ("probe_share", 0.0),
        ("probe_share", "5%"),
    ],
)
def test_config_rejects_bad_field_and_names_it(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"PolicyConfig.{field}"):
        policy.PolicyConfig(**{field: value})  # type: ignore[arg-type]


# -- weights --------------------------------------------------------------------------


def test_idle_gets_full_weight_and_full_gets_one_band() -> None:
    out = policy.compute(CFG, [inp("idle", load()), inp("full", load(kv=0.95, waiting=20))])
    assert out.backend("idle").weight == policy.WEIGHT_MAX
    assert out.backend("full").weight == round(policy.WEIGHT_MAX / 16)
    assert [b.state for b in out.backends] == ["active", "active"]


def test_each_pressure_counts_and_the_worst_wins() -> None:
    # Each of these is exactly half-used on its worst axis: headroom 0.5 -> x = 8.0 -> band 8.
    for lo in (load(kv=0.45), load(waiting=4), load(running=32), load(kv=0.45, waiting=1)):
        out = policy.compute(CFG, [inp("a", lo)])
        assert out.backend("a").level == 8, lo
    worst = policy.compute(CFG, [inp("a", load(kv=0.09, waiting=6, running=8))])
    assert worst.backend("a").level == 4  # waiting 6/8 dominates: headroom 0.25 -> band 4


def test_weight_never_increases_with_load() -> None:
    weights = [
        policy.compute(CFG, [inp("a", load(kv=k / 100))]).backend("a").weight for k in range(101)
    ]
    assert weights == sorted(weights, reverse=True)
    assert len(set(weights)) == 16  # every band is reachable
    assert min(weights) > 0


def test_hysteresis_holds_level_near_a_band_edge() -> None:
    # kv 0.45 -> headroom 0.5 -> x = 8.0, right on the edge between bands 7 and 8.
    first = policy.compute(CFG, [inp("a", load(kv=0.45))])
    assert first.backend("a").level == 8
    # A hair more load: x = 7.9, band 7 without hysteresis, but 7.9 >= 8 - 0.5 keeps 8.
    wobble = policy.compute(CFG, [inp("a", load(kv=0.45 + 0.1 * 0.9 / 16))], first)
    assert wobble.backend("a").level == 8
    assert wobble.backend("a").weight == first.backend("a").weight
    # Without the previous result the same load lands in band 7: hysteresis did the work.
    assert policy.compute(CFG, [inp("a", load(kv=0.45 + 0.1 * 0.9 / 16))]).backend("a").level == 7
    # Past the widened band (x = 7.4 < 7.5) the level moves.
    moved = policy.compute(CFG, [inp("a", load(kv=0.45 + 0.6 * 0.9 / 16))], first)
    assert moved.backend("a").level == 7
    # And the way back needs x >= 8 + 0.5 again.
    back = policy.compute(CFG, [inp("a", load(kv=0.45))], moved)
    assert back.backend("a").level == 7
    up = policy.compute(CFG, [inp("a", load(kv=0.45 - 0.55 * 0.9 / 16))], moved)
    assert up.backend("a").level == 8


def test_zero_hysteresis_is_plain_quantisation() -> None:
    cfg = policy.PolicyConfig(hysteresis=0.0)
    first = policy.compute(cfg, [inp("a", load(kv=0.45))])
    nudged = policy.compute(cfg, [inp("a", load(kv=0.46))], first)
    assert nudged.backend("a").level == first.backend("a").level - 1


def test_level_for_edges() -> None:
    assert policy.level_for(1.0, 16, 0.5, None) == 15
    assert policy.level_for(0.0, 16, 0.5, None) == 0
    assert policy.level_for(-3.0, 16, 0.5, None) == 0
    assert policy.level_for(0.5, 16, 0.5, 99) == 8  # previous from another config: ignored
    assert policy.level_for(0.5, 1, 0.5, None) == 0


_headroom = st.floats(0.0, 1.0)


@settings(max_examples=500, deadline=None)
@given(a=_headroom, delta=st.floats(-1.0, 1.0), levels=st.integers(1, 64), h=st.floats(0, 1))
def test_a_small_move_never_changes_the_level(
    a: float, delta: float, levels: int, h: float
) -> None:
    first = policy.level_for(a, levels, h, None)
    b = min(1.0, max(0.0, a + delta * h / levels))  # moved by less than h bands
    second = policy.level_for(b, levels, h, first)
    if abs(b - a) * levels < h:
        assert second == first
    # Whatever happened, the level is a valid band and a change means a real move.
    assert 0 <= second < levels
    if second != first:
        assert abs(b - a) * levels >= h - 1e-9


@settings(max_examples=200, deadline=None)
@given(seq=st.lists(_headroom, min_size=1, max_size=40), levels=st.integers(2, 32))
def test_level_tracks_the_load_within_one_band_plus_hysteresis(
    seq: list[float], levels: int
) -> None:
    h = 0.5
    level: int | None = None
    for headroom in seq:
        level = policy.level_for(headroom, levels, h, level)
        x = headroom * levels
        # The level's band, widened by h, always contains the current headroom
        # (except at the very top, where x == levels belongs to the last band).
        assert level - h <= x < level + 1 + h or (x == levels and level == levels - 1)


# -- states ---------------------------------------------------------------------------


def test_state_precedence_and_zero_weights() -> None:
    S = breaker.State
    out = policy.compute(
        CFG,
        [
            inp("a-active", load()),
            inp("b-open", load(), S.OPEN),
            inp("c-open-terminating", load(), S.OPEN, terminating=True),
            inp("d-draining", load(), terminating=True),
            inp("e-halfopen-terminating", load(), S.HALF_OPEN, terminating=True),
            inp("f-probing", load(), S.HALF_OPEN),
        ],
    )
    got = {b.identity: (b.state, b.weight > 0) for b in out.backends}
    assert got == {
        "a-active": ("active", True),
        "b-open": ("open", False),
        "c-open-terminating": ("open", False),
        "d-draining": ("draining", False),
        "e-halfopen-terminating": ("draining", False),
        "f-probing": ("probing", True),
    }


def test_probing_weight_gives_the_configured_share() -> None:
    cfg = policy.PolicyConfig(probe_share=0.1)
    backends = [inp(f"a{i}", load(kv=0.1 * i)) for i in range(4)]
    backends.append(inp("p", load(), breaker.State.HALF_OPEN))
    out = policy.compute(cfg, backends)
    total = sum(b.weight for b in out.backends)
    assert out.backend("p").state == "probing"
    assert out.backend("p").weight / total == pytest.approx(0.1, abs=1e-4)


def test_probing_alone_gets_everything() -> None:
    out = policy.compute(
        CFG,
        [inp("p", load(), breaker.State.HALF_OPEN), inp("o", load(), breaker.State.OPEN)],
    )
    assert out.backend("p").weight == policy.WEIGHT_MAX


def test_level_survives_open_and_draining() -> None:
    busy = policy.compute(CFG, [inp("a", load(kv=0.8))])
    opened = policy.compute(CFG, [inp("a", None, breaker.State.OPEN)], busy)
    assert opened.backend("a").weight == 0
    assert opened.backend("a").level == busy.backend("a").level
    back = policy.compute(CFG, [inp("a", None)], opened)
    assert back.backend("a").weight == busy.backend("a").weight


# -- load units -----------------------------------------------------------------------


def test_load_units_scale_and_clamp() -> None:
    assert load(running=3, waiting=2, kv=0.4567).units == 5457
    assert load().units == 0
    assert load(running=3 * 10**6, waiting=3 * 10**6, kv=1.0).units == policy.LOAD_MAX


def test_unknown_load_keeps_previous_or_starts_idle() -> None:
    first = policy.compute(CFG, [inp("a", load(running=2, kv=0.5))])
    again = policy.compute(CFG, [inp("a", None), inp("new", None)], first)
    assert again.backend("a").load == first.backend("a").load == 2500
    assert again.backend("a").level == first.backend("a").level
    assert again.backend("new").load == 0
    assert again.backend("new").weight == policy.WEIGHT_MAX


def test_mean_load_and_bound_over_backends_taking_sessions() -> None:
    cfg = policy.PolicyConfig(epsilon=0.5)
    out = policy.compute(
        cfg,
        [
            inp("a", load(running=1)),  # 1000
            inp("b", load(running=3)),  # 3000
            inp("p", load(running=2), breaker.State.HALF_OPEN),  # 2000
            inp("o", load(running=50), breaker.State.OPEN),  # not counted
            inp("d", load(running=50), terminating=True),  # not counted
        ],
    )
    assert out.mean_load == 2000
    assert out.load_bound == 3000
    assert out.epsilon == 0.5
    empty = policy.compute(cfg, [inp("o", load(), breaker.State.OPEN)])
    assert empty.mean_load == 0 and empty.load_bound == 0


# -- saturation -----------------------------------------------------------------------


def test_saturated_only_when_every_active_engine_is_full() -> None:
    full = load(waiting=10, kv=0.95)
    one_free = policy.compute(CFG, [inp("a", full), inp("b", load(waiting=10, kv=0.5))])
    assert not one_free.saturated
    out = policy.compute(CFG, [inp("a", full), inp("b", full), inp("o", None, breaker.State.OPEN)])
    assert out.saturated  # the open backend does not count
    unknown = policy.compute(CFG, [inp("a", full), inp("b", None)])
    assert not unknown.saturated  # never fail fast on a guess
    assert not policy.compute(CFG, [inp("o", full, breaker.State.OPEN)]).saturated
    assert not policy.compute(CFG, []).saturated


def test_saturation_flag_has_hysteresis() -> None:
    full = load(waiting=10, kv=0.95)
    sat = policy.compute(CFG, [inp("a", full)])
    assert sat.saturated
    # Slightly under the entry thresholds but above 80 % of them: still saturated.
    dip = policy.compute(CFG, [inp("a", load(waiting=7, kv=0.85))], sat)
    assert dip.saturated
    # The same dip would not have entered saturation.
    assert not policy.compute(CFG, [inp("a", load(waiting=7, kv=0.85))]).saturated
    # Below the exit line on either axis: cleared.
    assert not policy.compute(CFG, [inp("a", load(waiting=6, kv=0.95))], sat).saturated
    assert not policy.compute(CFG, [inp("a", load(waiting=10, kv=0.7))], sat).saturated


# -- determinism and input checks -----------------------------------------------------


def test_order_of_inputs_does_not_matter_and_output_is_sorted() -> None:
    backends = [inp(n, load(kv=k)) for n, k in (("c", 0.3), ("a", 0.9), ("b", 0.0))]
    one = policy.compute(CFG, backends)
    two = policy.compute(CFG, list(reversed(backends)))
    assert one == two
    assert [b.identity for b in one.backends] == ["a", "b", "c"]


def test_duplicate_or_empty_identity_rejected() -> None:
    with pytest.raises(ValueError, match="twice"):
        policy.compute(CFG, [inp("a", None), inp("a", None)])
    with pytest.raises(ValueError, match="empty"):
        policy.compute(CFG, [inp("", None)])
    with pytest.raises(KeyError):
        policy.compute(CFG, [inp("a", None)]).backend("zz")


_loads = st.builds(
    load,
    running=st.floats(0, 200),
    waiting=st.floats(0, 50),
    kv=st.floats(0, 1),
)


@settings(max_examples=200, deadline=None)
@given(
    loads=st.lists(st.one_of(st.none(), _loads), min_size=1, max_size=6),
    states=st.lists(st.sampled_from(list(breaker.State)), min_size=6, max_size=6),
    terminating=st.lists(st.booleans(), min_size=6, max_size=6),
)
def test_outputs_always_in_range(
    loads: list[enginemetrics.EngineLoad | None],
    states: list[breaker.State],
    terminating: list[bool],
) -> None:
    backends = [inp(f"b{i}", lo, states[i], terminating[i]) for i, lo in enumerate(loads)]
    out = policy.compute(CFG, backends)
    for b in out.backends:
        assert 0 <= b.weight <= policy.WEIGHT_MAX
        assert 0 <= b.load <= policy.LOAD_MAX
        assert (b.weight > 0) == (b.state in ("active", "probing"))
    assert math.isfinite(out.load_bound)
    # Same inputs, same previous: same answer (a second controller replica agrees).
    assert policy.compute(CFG, backends, out) == policy.compute(CFG, backends, out)
