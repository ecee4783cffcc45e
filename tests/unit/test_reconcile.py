"""controller.reconcile: specs + reports + time → snapshots, with explicit clocks."""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller import breaker, policy, reconcile
from controller.discovery import discovered
from dataplane import enginemetrics, model, reports, scraper

# Small, fast breaker: 3 failures in a row (a scrape round is one outcome) open it, 1 s
# cool-down, 3 successes close it.
BRK = breaker.BreakerConfig(consecutive_failures=3, cooldown_base=1.0, half_open_successes=3)
OPEN, HALF, CLOSED = breaker.State.OPEN, breaker.State.HALF_OPEN, breaker.State.CLOSED


def ep(address: str, port: int = 8000, *, ready: bool = True, serving: bool = True,
       terminating: bool = False, node: str | None = None) -> discovered.Endpoint:
    return discovered.Endpoint(ipaddress.IPv4Address(address), port, ready, serving, terminating,
                          node=node)


def spec(name: str = "default/llm", vip: str = "10.96.0.10", port: int = 80, *,
         endpoints: tuple[discovered.Endpoint, ...] = (ep("10.0.0.1"), ep("10.0.0.2")),
         llm: bool = True, **kw: Any) -> discovered.ServiceSpec:
    fields: dict[str, Any] = {"affinity": "session", "affinity_timeout": 600, **kw}
    return discovered.ServiceSpec(name=name, vip=ipaddress.IPv4Address(vip), port=port,
                             protocol="tcp", endpoints=endpoints, llm=llm, **fields)


def load(running: float = 0.0, waiting: float = 0.0, kv: float = 0.0) -> enginemetrics.EngineLoad:
    return enginemetrics.EngineLoad(running=running, waiting=waiting, kv_usage=kv,
                                    kv_family=enginemetrics.KV_USAGE, engines=1)


_ROUND = itertools.count(1)


def scrape(identity: str, ok: bool = True,
           engine_load: enginemetrics.EngineLoad | None = None) -> scraper.ScrapeResult:
    """One scrape round's result; each call is a new round (its own latency), as real
    rounds are."""
    if ok and engine_load is None:
        engine_load = load()
    latency = 0.01 + next(_ROUND) * 1e-7
    return scraper.ScrapeResult(identity=identity, metrics_ok=ok, health_ok=ok, latency=latency,
                                load=engine_load if ok else None,
                                error=None if ok else "metrics: connect failed")


def report(*engines: scraper.ScrapeResult, counters: tuple[reports.BackendCounters, ...] = (),
           agent: str = "agent-a") -> reports.AgentReport:
    return reports.AgentReport(agent_id=agent, node="node-a", applied_version=0,
                                applied_hash="", engines=engines, counters=counters)


def counters(identity: str, **kw: int) -> reports.BackendCounters:
    return reports.BackendCounters(identity=identity, **kw)


E1, E2 = "10.0.0.1:8000/tcp", "10.0.0.2:8000/tcp"
NAME = "default.llm.80-tcp"


def backend(snap: model.Snapshot, address: str, name: str = NAME) -> model.Backend:
    svc = snap.service(name)
    assert svc is not None, f"no service {name} in {[s.name for s in snap.services]}"
    for b in svc.backends:
        if b.address == address:
            return b
    raise AssertionError(f"no backend {address} in {name}")


def make(*specs: discovered.ServiceSpec, now: float = 0.0, **kw: Any) -> reconcile.Reconciler:
    rec = reconcile.Reconciler(default_breaker=BRK, **kw)
    rec.set_specs(list(specs or (spec(),)), now)
    return rec


def tick(rec: reconcile.Reconciler, now: float) -> model.Snapshot:
    """The snapshot in force after a tick at ``now`` (new or unchanged)."""
    rec.tick(now)
    assert rec.last is not None
    return rec.last


# -- names --------------------------------------------------------------------------------


def test_snapshot_names_are_readable_when_possible() -> None:
    assert reconcile.snapshot_name("default/llm", 8000, "tcp") == "default.llm.8000-tcp"
    assert reconcile.snapshot_name("llm", 80, "udp") == "llm.80-udp"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("LLM", 80, "tcp"), ("llm", 80, "tcp")),  # lower-casing alone would collide
        (("a_b", 80, "tcp"), ("a-b", 80, "tcp")),  # so would replacing characters
        (("x" * 80, 80, "tcp"), ("x" * 81, 80, "tcp")),  # so would cutting
        (("ns/" + "y" * 70, 80, "tcp"), ("ns/" + "y" * 70, 81, "tcp")),
    ],
)
def test_snapshot_names_stay_distinct_when_changed_or_cut(a: tuple[str, int, str],
                                                          b: tuple[str, int, str]) -> None:
    na, nb = reconcile.snapshot_name(*a), reconcile.snapshot_name(*b)
    assert na != nb
    for n in (na, nb):
        model._name("name", n)  # valid (raises otherwise)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=120), st.integers(1, 65535), st.sampled_from(["tcp", "udp"]))
def test_any_discovered_name_maps_to_a_valid_stable_name(name: str, port: int,
                                                         proto: str) -> None:
    got = reconcile.snapshot_name(name, port, proto)
    assert model._name("name", got) == got
    assert len(got) <= model.NAME_MAX
    assert reconcile.snapshot_name(name, port, proto) == got


# -- snapshots ----------------------------------------------------------------------------


def test_first_tick_publishes_and_an_unchanged_tick_returns_none() -> None:
    rec = make(spec(endpoints=(ep("10.0.0.1", node="node-a"), ep("10.0.0.2"))),
               first_version=7)
    snap = rec.tick(0.0)
    assert snap is not None and snap.version == 7
    svc = snap.service(NAME)
    assert svc is not None
    assert (svc.vip, svc.port, svc.affinity, svc.affinity_timeout) == ("10.96.0.10", 80,
                                                                       "session", 600)
    assert svc.table_size == 251 and svc.epsilon == 0.25 and svc.probe_share == 0.05
    assert [(b.address, b.state, b.weight) for b in svc.backends] == [
        ("10.0.0.1", "active", policy.WEIGHT_MAX), ("10.0.0.2", "active", policy.WEIGHT_MAX)]
    assert snap.engines == (
        model.EngineRef(E1, "http://10.0.0.1:8000/metrics", "http://10.0.0.1:8000/health",
                           "node-a"),
        model.EngineRef(E2, "http://10.0.0.2:8000/metrics", "http://10.0.0.2:8000/health",
                           None),
    )
    assert rec.tick(0.05) is None
    rec.observe(report(scrape(E1), scrape(E2)), 0.1)  # idle engines: nothing moves
    assert rec.tick(0.1) is None
    assert rec.last is snap


def test_the_same_inputs_give_the_same_snapshots_whatever_the_spec_order() -> None:
    specs = [spec(), spec("team/chat", "10.96.0.11", endpoints=(ep("10.0.0.3"),)),
             spec("web", "10.96.0.12", llm=False, affinity="none", affinity_timeout=0)]
    a, b = make(*specs), make(*reversed(specs))
    for rec in (a, b):
        rec.observe(report(scrape(E1, engine_load=load(running=40)), scrape(E2, ok=False)), 1.0)
    sa, sb = a.tick(1.0), b.tick(1.0)
    assert sa is not None and sb is not None
    assert sa == sb and sa.hash == sb.hash


def test_metrics_port_and_path_make_the_engine_urls() -> None:
    rec = make(spec(metrics_port=9100, metrics_path="/stats"))
    ref = tick(rec, 0).engine(E1)
    assert ref is not None
    assert ref.metrics_url == "http://10.0.0.1:9100/stats"
    assert ref.health_url == "http://10.0.0.1:8000/health"


# -- breakers -----------------------------------------------------------------------------


def test_failing_scrapes_open_then_cooldown_probes_then_successes_close() -> None:
    rec = make()
    tick(rec, 0.0)
    # A failed round is one failure (health first, as it failed first): the 3rd opens it.
    for i in range(2):
        rec.observe(report(scrape(E1, ok=False), scrape(E2)), 0.1 * (i + 1))
    assert backend(tick(rec, 0.2), "10.0.0.1").state == "active"
    rec.observe(report(scrape(E1, ok=False), scrape(E2)), 0.3)
    snap = tick(rec, 0.3)
    b1 = backend(snap, "10.0.0.1")
    assert (b1.state, b1.weight) == ("open", 0)
    assert backend(snap, "10.0.0.2").state == "active"
    events = rec.events()
    assert [(e.engine, e.from_state, e.to_state, e.reason) for e in events] == [
        (E1, CLOSED, OPEN, "consecutive_failures:health")]
    assert rec.events() == []  # drained

    # Failures while open change nothing; the cool-down alone decides.
    rec.observe(report(scrape(E1, ok=False)), 0.9)
    assert backend(tick(rec, 1.29), "10.0.0.1").state == "open"
    # Half-open, but the engine's last probe failed: no client is sent to probe it.
    assert backend(tick(rec, 1.3), "10.0.0.1").state == "open"
    assert rec.breaker_state(E1, 1.3) is HALF
    assert [(e.to_state, e.reason, e.at) for e in rec.events()] == [
        (HALF, "cooldown_elapsed", 1.3)]
    rec.observe(report(scrape(E1)), 1.35)  # its own probe passes: clients may probe too
    b1 = backend(tick(rec, 1.35), "10.0.0.1")
    assert b1.state == "probing"
    # probe_share 0.05 next to one active backend of weight 65535.
    assert b1.weight == round(0.05 * policy.WEIGHT_MAX / 0.95)

    rec.observe(report(scrape(E1)), 1.4)  # 2 successes: not yet
    assert backend(tick(rec, 1.4), "10.0.0.1").state == "probing"
    rec.observe(report(scrape(E1)), 1.5)
    assert backend(tick(rec, 1.5), "10.0.0.1").state == "active"
    assert [e.reason for e in rec.events()] == ["probes_succeeded"]


def test_half_open_after_a_kernel_trip_probes_without_a_reported_scrape() -> None:
    """Nothing says the engine's probes fail (no scrape reported yet): probe at once."""
    rec = make()
    rec.observe(report(counters=(counters(E1),)), 0.0)
    rec.observe(report(counters=(counters(E1, failed=1, trips=1),)), 0.1)
    assert backend(tick(rec, 0.1), "10.0.0.1").state == "open"
    assert backend(tick(rec, 1.2), "10.0.0.1").state == "probing"


def test_a_half_open_engine_whose_probes_fail_stays_published_open() -> None:
    rec = make()
    for i in range(3):
        rec.observe(report(scrape(E1, ok=False)), 0.1 * i)
    assert backend(tick(rec, 0.3), "10.0.0.1").state == "open"
    # After the cool-down the breaker is half-open; the next failed probe re-trips it.
    assert backend(tick(rec, 1.5), "10.0.0.1").state == "open"
    rec.observe(report(scrape(E1, ok=False)), 1.6)
    assert rec.breaker_state(E1, 1.6) is OPEN
    assert backend(tick(rec, 1.6), "10.0.0.1").state == "open"


def test_unproven_rounds_neither_close_a_half_open_breaker_nor_hide_it() -> None:
    """An engine that failed on 5xx and got no request since: published probing (its
    probes pass, so clients may test it), but only a served request closes it."""
    rec = make()
    for i in range(3):
        rec.observe(report(scrape(E1, ok=False)), 0.1 * i)
    assert rec.breaker_state(E1, 1.3) is HALF
    for i in range(5):
        rec.observe(report(dataclasses.replace(scrape(E1), unproven=True)), 1.3 + 0.1 * i)
    assert rec.breaker_state(E1, 1.8) is HALF
    assert backend(tick(rec, 1.8), "10.0.0.1").state == "probing"
    for i in range(3):
        rec.observe(report(scrape(E1)), 2.0 + 0.1 * i)
    assert rec.breaker_state(E1, 2.3) is CLOSED


def test_a_round_reported_twice_counts_once() -> None:
    rec = make()
    failed = scrape(E1, ok=False)
    for i in range(5):  # 5 reports of one failed round: 1 failure, not 5
        rec.observe(report(failed), 0.1 * i)
    assert rec.breaker_state(E1, 0.5) is CLOSED
    assert rec.repeated_scrape_reports == 4
    # Another agent's identical-looking result is its own round.
    rec.observe(report(failed, agent="agent-b"), 0.6)
    assert rec.breaker_state(E1, 0.6) is CLOSED
    # A new round of the same agent differs (at least in latency) and counts.
    rec.observe(report(scrape(E1, ok=False)), 0.7)
    assert rec.breaker_state(E1, 0.7) is OPEN


def test_a_kernel_trip_opens_at_once() -> None:
    rec = make()
    tick(rec, 0)
    rec.observe(report(counters=(counters(E1, established=10, trips=0),)), 0.1)
    assert backend(tick(rec, 0.1), "10.0.0.1").state == "active"
    rec.observe(report(counters=(counters(E1, established=10, failed=1, trips=1),)), 0.2)
    assert backend(tick(rec, 0.2), "10.0.0.1").state == "open"
    assert [e.reason for e in rec.events()] == ["kernel_trip"]


def test_kernel_failed_connect_deltas_are_failures() -> None:
    rec = make()
    rec.observe(report(counters=(counters(E1, failed=100, established=50),)), 0.0)  # baseline
    rec.observe(report(counters=(counters(E1, failed=102, established=60),)), 0.1)
    assert rec.breaker_state(E1, 0.1) is CLOSED  # 2 failures < 3
    rec.observe(report(counters=(counters(E1, failed=103, established=60),)), 0.2)
    assert rec.breaker_state(E1, 0.2) is OPEN
    assert rec.events()[0].reason == "consecutive_failures:kernel"


def test_established_connects_are_no_successes() -> None:
    """A hung or always-503 engine completes every handshake: client traffic must not
    reset the failure run its probes build up (issue 8)."""
    rec = make()
    rec.observe(report(counters=(counters(E1, established=0),)), 0.0)  # baseline
    for i in range(1, 5):
        rec.observe(report(scrape(E1, ok=False),
                           counters=(counters(E1, established=1000 * i),)), 0.1 * i)
    # Failed rounds with thousands of handshakes in between: open.
    assert rec.breaker_state(E1, 0.4) is OPEN


def test_established_connects_do_not_close_a_half_open_breaker() -> None:
    rec = make()
    rec.observe(report(counters=(counters(E1),)), 0.0)  # baseline
    for i in range(3):
        rec.observe(report(scrape(E1, ok=False)), 0.1 + 0.01 * i)
    assert rec.breaker_state(E1, 0.2) is OPEN
    assert rec.breaker_state(E1, 1.5) is HALF
    rec.observe(report(counters=(counters(E1, established=500),)), 1.6)
    assert rec.breaker_state(E1, 1.6) is HALF


def test_the_first_counter_reading_is_only_a_baseline() -> None:
    rec = make()
    rec.observe(report(counters=(counters(E1, failed=10_000, trips=7),)), 0.0)
    assert rec.breaker_state(E1, 0.0) is CLOSED
    # Per agent: another agent's first reading is its own baseline too.
    rec.observe(report(counters=(counters(E1, failed=500, trips=2),), agent="agent-b"), 0.1)
    assert rec.breaker_state(E1, 0.1) is CLOSED


def test_counter_reset_counts_the_new_reading_as_the_increase() -> None:
    rec = make()
    rec.observe(report(counters=(counters(E1, failed=100),)), 0.0)
    # The agent restarted: 2 < 100, so 2 new failures (not -98, not 0).
    rec.observe(report(counters=(counters(E1, failed=2),)), 0.1)
    assert rec.breaker_state(E1, 0.1) is CLOSED
    rec.observe(report(counters=(counters(E1, failed=3),)), 0.2)  # +1: 3 in a row
    assert rec.breaker_state(E1, 0.2) is OPEN
    # A reset trips counter: 1 after 0 is a trip whatever came before.
    rec2 = make()
    rec2.observe(report(counters=(counters(E1, trips=4),)), 0.0)
    rec2.observe(report(counters=(counters(E1, trips=1),)), 0.1)
    assert rec2.breaker_state(E1, 0.1) is OPEN


def test_handshakes_in_a_counter_interval_do_not_hide_its_failures() -> None:
    rec = make()
    rec.observe(report(counters=(counters(E1),)), 0.0)
    rec.observe(report(counters=(counters(E1, established=1000, failed=5),)), 0.1)
    assert rec.breaker_state(E1, 0.1) is OPEN


def test_service_breaker_annotations_apply_to_its_engines() -> None:
    rec = make(spec(breaker={"consecutive_failures": 2}))
    rec.observe(report(scrape(E1, ok=False)), 0.1)
    assert rec.breaker_state(E1, 0.1) is CLOSED
    rec.observe(report(scrape(E1, ok=False)), 0.2)
    assert rec.breaker_state(E1, 0.2) is OPEN


# -- policy -------------------------------------------------------------------------------


def test_load_moves_weights_only_past_the_hysteresis() -> None:
    rec = make()
    first = backend(tick(rec, 0), "10.0.0.1")
    rec.observe(report(scrape(E1, engine_load=load(kv=0.06))), 0.1)
    small = backend(tick(rec, 0.1), "10.0.0.1")
    assert small.weight == first.weight  # 0.06/0.9 of headroom: inside the widened band
    assert small.load == 0  # loads travel apart from snapshots (Publisher.publish_loads)
    rec.observe(report(scrape(E1, engine_load=load(kv=0.1))), 0.2)
    moved = backend(tick(rec, 0.2), "10.0.0.1")
    assert moved.weight < first.weight
    assert moved.weight == policy.weight_for(14, 16)
    rec.observe(report(scrape(E1, engine_load=load(kv=0.08))), 0.3)
    assert backend(tick(rec, 0.3), "10.0.0.1").weight == moved.weight  # no flap back


def test_a_failed_scrape_keeps_the_last_load() -> None:
    rec = make()
    rec.observe(report(scrape(E1, engine_load=load(running=3))), 0.1)
    rec.observe(report(scrape(E1, ok=False)), 0.2)
    assert rec.engine_view()[E1].load == load(running=3)
    assert rec.engine_view()[E1].last_ok is False


def test_a_load_change_inside_the_band_publishes_no_snapshot() -> None:
    rec = make()
    assert rec.tick(0) is not None
    for i, kv in enumerate((0.01, 0.03, 0.05, 0.02)):
        rec.observe(report(scrape(E1, engine_load=load(kv=kv))), 0.1 * (i + 1))
        assert rec.tick(0.1 * (i + 1)) is None


def test_terminating_endpoints_drain_and_not_serving_ones_are_left_out() -> None:
    eps = (ep("10.0.0.1"), ep("10.0.0.2", ready=False, terminating=True),
           ep("10.0.0.3", ready=False, serving=False))
    snap = tick(make(spec(endpoints=eps),
                     spec("web", "10.96.0.12", llm=False, endpoints=eps, affinity="none",
                          affinity_timeout=0)), 0)
    llm = snap.service(NAME)
    web = snap.service("web.80-tcp")
    assert llm is not None and web is not None
    assert [(b.address, b.state, b.weight > 0) for b in llm.backends] == [
        ("10.0.0.1", "active", True), ("10.0.0.2", "draining", False)]
    assert [(b.address, b.state, b.weight) for b in web.backends] == [
        ("10.0.0.1", "active", 100), ("10.0.0.2", "draining", 0)]
    # Draining engines are still scraped (their pinned sessions still go there).
    assert [e.identity for e in snap.engines] == [E1, E2]


def test_an_address_listed_ready_and_terminating_is_one_ready_backend() -> None:
    eps = (ep("10.0.0.1", ready=False, terminating=True), ep("10.0.0.1"))
    svc = tick(make(spec(endpoints=eps)), 0).service(NAME)
    assert svc is not None
    assert [(b.address, b.state) for b in svc.backends] == [("10.0.0.1", "active")]


def test_plain_services_get_kube_proxy_behaviour_and_no_breakers() -> None:
    web = spec("web", "10.96.0.12", llm=False, affinity="none", affinity_timeout=0,
               endpoints=(ep("10.0.1.1", 80), ep("10.0.1.2", 80)))
    rec = make(web)
    snap = tick(rec, 0)
    svc = snap.service("web.80-tcp")
    assert svc is not None
    assert svc.epsilon is None and svc.saturated is False
    assert svc.affinity_timeout == 10800  # "none" has no timeout; the snapshot needs one
    assert svc.table_size == 251  # dataplane.config's automatic size for 2 backends
    assert snap.engines == ()
    rec.observe(report(scrape("10.0.1.1:80/tcp", ok=False)), 0.1)
    assert rec.unknown_engine_reports == 1
    assert rec.tick(0.1) is None


def test_saturation_sets_the_service_flag_and_clears_with_hysteresis() -> None:
    rec = make()
    full = load(running=10, waiting=9, kv=0.95)
    rec.observe(report(scrape(E1, engine_load=full), scrape(E2, engine_load=full)), 0.1)
    svc = tick(rec, 0.1).service(NAME)
    assert svc is not None and svc.saturated
    # One engine a little better, still above saturation_exit (0.8) x thresholds: stays.
    rec.observe(report(scrape(E1, engine_load=load(running=10, waiting=7, kv=0.8))), 0.2)
    svc = tick(rec, 0.2).service(NAME)
    assert svc is not None and svc.saturated
    rec.observe(report(scrape(E1, engine_load=load(running=2, waiting=0, kv=0.3))), 0.3)
    svc = tick(rec, 0.3).service(NAME)
    assert svc is not None and not svc.saturated


def test_epsilon_is_clamped_to_the_snapshot_limit() -> None:
    rec = make(policy_config=policy.PolicyConfig(epsilon=50.0))
    svc = tick(rec, 0).service(NAME)
    assert svc is not None and svc.epsilon == model.EPSILON_MAX
    svc = tick(make(spec(epsilon=0.5, probe_share=0.2)), 0).service(NAME)
    assert svc is not None and (svc.epsilon, svc.probe_share) == (0.5, 0.2)


# -- spec changes -------------------------------------------------------------------------


def test_removed_engines_are_forgotten_and_come_back_closed() -> None:
    rec = make()
    for i in range(3):
        rec.observe(report(scrape(E1, ok=False)), 0.1 * i)
    assert rec.breaker_state(E1, 0.3) is OPEN
    rec.set_specs([spec(endpoints=(ep("10.0.0.2"),))], 0.4)
    snap = tick(rec, 0.4)
    assert [e.identity for e in snap.engines] == [E2]
    assert rec.breaker_state(E1, 0.4) is None
    assert E1 not in rec.engine_view()
    rec.set_specs([spec()], 0.5)
    assert backend(tick(rec, 0.5), "10.0.0.1").state == "active"


def test_a_changed_breaker_annotation_waits_for_the_breaker_to_close() -> None:
    rec = make()
    for i in range(3):
        rec.observe(report(scrape(E1, ok=False)), 0.1 * i)
    rec.set_specs([spec(breaker={"consecutive_failures": 1, "cooldown_base": 5.0})], 0.5)
    tick(rec, 0.5)
    assert rec.breaker_state(E1, 1.2) is HALF  # the old 1 s cool-down still ran
    rec.observe(report(scrape(E1)), 1.3)
    rec.observe(report(scrape(E1)), 1.4)
    tick(rec, 1.4)
    rec.observe(report(scrape(E1, ok=False)), 1.5)  # the new threshold: 1 failure
    assert rec.breaker_state(E1, 1.5) is OPEN


def test_conflicting_specs_are_left_out_with_a_reason() -> None:
    rec = make(spec(), spec("other", vip="10.96.0.10"))
    snap = tick(rec, 0)
    assert [s.name for s in snap.services] == [NAME]
    (problem,) = rec.problems()
    assert "other" in problem and "already service" in problem


def test_addresses_the_snapshot_would_refuse_never_reach_a_tick() -> None:
    eps = (ep("10.0.0.1"), ep("0.0.0.0"), ep("224.0.0.5"), ep("255.255.255.255"),
           ep("127.0.0.1"), ep("127.3.2.1"), ep("10.96.0.10"))
    rec = make(spec(endpoints=eps), spec("bad-vip", vip="239.1.2.3"),
               spec("loop-vip", vip="127.0.0.53"))
    snap = tick(rec, 0)
    assert [s.name for s in snap.services] == [NAME]
    assert [b.address for b in snap.services[0].backends] == ["10.0.0.1"]
    assert [e.identity for e in snap.engines] == [E1]
    problems = "\n".join(rec.problems())
    for line in ("0.0.0.0:8000 is the unspecified address, left out",
                 "224.0.0.5:8000 is a multicast address, left out",
                 "255.255.255.255:8000 is the broadcast address, left out",
                 "127.0.0.1:8000 is a loopback address, left out",
                 "127.3.2.1:8000 is a loopback address, left out",
                 "10.96.0.10:8000 is the service's own VIP, left out",
                 "vip: 239.1.2.3 is a multicast address",
                 "vip: 127.0.0.53 is a loopback address"):
        assert line in problems
    assert "bad-vip" in problems and "loop-vip" in problems


def test_a_table_too_small_for_the_endpoints_grows() -> None:
    eps = tuple(ep(f"10.0.0.{i}") for i in range(1, 10))
    rec = make(spec(endpoints=eps, table_size=7))
    svc = tick(rec, 0).service(NAME)
    assert svc is not None and svc.table_size == 1021 and len(svc.backends) == 9
    assert "do not fit table-size 7" in rec.problems()[0]


def test_engine_view() -> None:
    rec = make(spec(endpoints=(ep("10.0.0.1", node="node-a"), ep("10.0.0.2"))),
               spec("team/chat", "10.96.0.11", endpoints=(ep("10.0.0.1", node="node-a"),)))
    rec.observe(report(scrape(E1, engine_load=load(running=5))), 0.1)
    tick(rec, 0.1)
    view = rec.engine_view()
    assert set(view) == {E1, E2}
    v = view[E1]
    assert v.services == (NAME, "team.chat.80-tcp")
    assert (v.node, v.state, v.breaker, v.load_units) == ("node-a", "active", CLOSED, 5000)
    assert v.load == load(running=5) and v.last_ok is True
    assert view[E2].last_ok is None and view[E2].load is None
    with pytest.raises(TypeError):
        view[E1] = v  # type: ignore[index]


def test_versions_only_move_when_content_changes() -> None:
    rec = make()
    v1 = tick(rec, 0).version
    assert rec.tick(0.1) is None
    rec.set_specs([spec(endpoints=(ep("10.0.0.1"),))], 0.2)
    s2 = rec.tick(0.2)
    assert s2 is not None and s2.version == v1 + 1
    d = model.delta(dataclasses.replace(s2, version=v1), s2)
    assert d.engines is None or len(d.engines) == 1


# -- cost ---------------------------------------------------------------------------------


def test_a_tick_for_100_services_of_10_engines_is_cheap() -> None:
    """Prints the numbers with ``pytest -s``; the bound only catches a gross regression
    (the machine is shared, so no tight timing is asserted)."""
    specs = [spec(f"ns/svc{i}", f"10.96.{i // 200}.{i % 200 + 1}",
                  endpoints=tuple(ep(f"10.1.{i}.{j + 1}") for j in range(10)))
             for i in range(100)]
    rec = make(*specs)
    first = rec.tick(0.0)
    assert first is not None and len(first.services) == 100 and len(first.engines) == 1000
    ids = [f"10.1.{i}.{j + 1}:8000/tcp" for i in range(100) for j in range(10)]

    def timed(moving: Any, rounds: int = 15) -> float:
        times = []
        for k in range(rounds):
            now = 1.0 + k
            rec.observe(report(*(scrape(ident, engine_load=load(running=moving(ident, k)))
                                 for ident in ids)), now)
            start = time.perf_counter()
            rec.tick(now)
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    unchanged = timed(lambda ident, k: 1.0)
    one = timed(lambda ident, k: 1.0 + (k % 3 if ident.startswith("10.1.7.") else 0))
    every = timed(lambda ident, k: 1.0 + k % 3)
    print(f"\ntick, 100 services x 10 engines (median): loads unchanged {unchanged * 1e3:.2f} ms,"
          f" one service's loads moved {one * 1e3:.2f} ms, every load moved {every * 1e3:.2f} ms")
    assert every < 0.25 and unchanged < every


def test_move_epsilon_reaches_the_snapshot() -> None:
    svc = tick(make(spec(epsilon=0.5, move_epsilon=1.5)), 0).service(NAME)
    assert svc is not None and (svc.epsilon, svc.move_epsilon) == (0.5, 1.5)
    svc = tick(make(spec()), 0).service(NAME)
    assert svc is not None and svc.move_epsilon is None


def test_a_move_epsilon_not_above_epsilon_leaves_the_service_out_in_the_models_words() -> None:
    rec = make(spec(epsilon=0.5, move_epsilon=0.5))
    assert tick(rec, 0).service(NAME) is None
    assert any("move_epsilon: must be greater than epsilon (0.5)" in p for p in rec.problems())


def test_dual_stack_and_ipv6_specs_become_services_with_both_families() -> None:
    """A dual-stack spec: one service with both VIPs, each backend with both addresses,
    engines named (and scraped) by their IPv4 address; an IPv6-only one: bracketed URLs."""
    pair = discovered.Endpoint(ipaddress.IPv4Address("10.0.0.1"), 53, True, True, False,
                               address6=ipaddress.IPv6Address("fd00::1"))
    dual = discovered.ServiceSpec(name="kube-system/dns", vip=ipaddress.IPv4Address("10.96.0.10"),
                                  vip6=ipaddress.IPv6Address("fd00:96::a"), port=53,
                                  protocol="udp", endpoints=(pair,))
    only6 = discovered.ServiceSpec(
        name="default/llm6", vip=ipaddress.IPv6Address("fd00:96::b"), port=80, protocol="tcp",
        endpoints=(discovered.Endpoint(ipaddress.IPv6Address("fd00::2"), 8000, True, True,
                                       False),), llm=True)
    rec = make(dual, only6)
    snap = rec.tick(0.0)
    assert snap is not None and rec.problems() == ()
    dns = snap.service("kube-system.dns.53-udp")
    assert dns is not None and (dns.vip, dns.vip6, dns.protocol) == ("10.96.0.10",
                                                                      "fd00:96::a", "udp")
    assert [(b.address, b.address6) for b in dns.backends] == [("10.0.0.1", "fd00::1")]
    ref = snap.engine("[fd00::2]:8000/tcp")
    assert ref is not None and ref.metrics_url == "http://[fd00::2]:8000/metrics"
