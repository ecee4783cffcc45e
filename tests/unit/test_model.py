"""The desired-state model (ex controller.snapshot): validation, canonical hashing, deltas,
protobuf round trips, agent reports."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane import enginemetrics, model, reports, scraper
from dataplane.api import convert
from dataplane.api.pb import kvroute_pb2 as pb

SE = model.ModelError


def be(address: str = "10.0.0.1", port: int = 8000, **kw: Any) -> model.Backend:
    fields: dict[str, Any] = {"weight": 100, "state": "active", "load": 0, **kw}
    return model.Backend(address=address, port=port, **fields)


def svc(name: str = "llm", vip: str = "10.96.0.10", **kw: Any) -> model.Service:
    fields: dict[str, Any] = {
        "port": 80, "protocol": "tcp", "affinity": "session", "affinity_timeout": 600,
        "table_size": 251, "epsilon": 0.25, "probe_share": 0.05,
        "backends": (be("10.0.0.1"), be("10.0.0.2")), **kw,
    }
    return model.Service(name=name, vip=vip, **fields)


def service_dict(**kw: Any) -> dict[str, Any]:
    return {**svc().to_dict(), **kw}


def from_dict(version: int, data: Any) -> model.Snapshot:
    return model.Snapshot(version, model.desired_from_dict(data))


# -- strategies ---------------------------------------------------------------------------

names = st.from_regex(r"[a-j0-3]([-a-j0-3.]{0,8}[a-j0-3])?", fullmatch=True)
backends = st.builds(
    model.Backend,
    address=st.integers(1, 200).map(lambda i: f"10.1.{i // 100}.{i % 100 + 1}"),
    port=st.sampled_from([8000, 8001]),
    weight=st.integers(0, model.WEIGHT_MAX),
    state=st.sampled_from(list(model.BackendState)),
    load=st.integers(0, model.LOAD_MAX),
)


@st.composite
def services(draw: st.DrawFn, name: str) -> model.Service:
    bes = draw(st.lists(backends, max_size=5, unique_by=lambda b: b.key))
    return model.Service(
        name=name,
        vip=f"10.96.{draw(st.integers(0, 3))}.{draw(st.integers(1, 254))}",
        port=draw(st.integers(1, 65535)),
        protocol=draw(st.sampled_from(list(model.Protocol))),
        affinity=draw(st.sampled_from(list(model.Affinity))),
        affinity_timeout=draw(st.integers(1, 3600)),
        table_size=draw(st.sampled_from([7, 251, 16381, 65537, 131071])),
        epsilon=draw(st.none() | st.floats(0.0, 10.0)),
        probe_share=draw(st.floats(0.0, 1.0)),
        saturated=draw(st.booleans()),
        backends=tuple(bes),
    )


def _engine_ref(i: int, port: int, proto: str, node: str | None,
                https: bool) -> model.EngineRef:
    host = f"10.1.{i // 100}.{i % 100 + 1}"
    return model.EngineRef(
        identity=f"{host}:{port}/{proto}",
        metrics_url=f"{'https' if https else 'http'}://{host}:{port}/metrics",
        health_url=f"http://{host}:{port}/health", node=node)


engine_refs = st.builds(
    _engine_ref,
    st.integers(1, 200), st.sampled_from([8000, 8001]), st.sampled_from(list(model.Protocol)),
    st.none() | st.sampled_from(["node-a", "node-b"]), st.booleans(),
)


@st.composite
def snapshots(draw: st.DrawFn, version: int | None = None) -> model.Snapshot:
    engines = draw(st.lists(engine_refs, max_size=4, unique_by=lambda e: e.identity))
    chosen = draw(st.lists(names, max_size=5, unique=True))
    items = []
    used: set[tuple[str, int, str]] = set()
    for n in chosen:
        s = draw(services(n))
        if s.l4 not in used:
            used.add(s.l4)
            items.append(s)
    v = version if version is not None else draw(st.integers(1, model.VERSION_MAX))
    return model.Snapshot.of(v, tuple(items), tuple(engines))


# -- properties ---------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(snapshots(version=1), snapshots(version=2))
def test_apply_delta_of_a_and_b_gives_b(a: model.Snapshot, b: model.Snapshot) -> None:
    d = model.delta(a, b)
    assert model.apply_delta(a, d) == b
    assert model.apply_delta(a, d).hash == b.hash
    # The same through the wire format.
    wire = pb.Delta.FromString(convert.delta_to_pb(d).SerializeToString())
    assert model.apply_delta(a, convert.delta_from_pb(wire)) == b


@settings(max_examples=60, deadline=None)
@given(snapshots(), st.randoms(use_true_random=False))
def test_hash_and_equality_ignore_order(snap: model.Snapshot, rnd: Any) -> None:
    shuffled = []
    for s in snap.services:
        bes = list(s.backends)
        rnd.shuffle(bes)
        shuffled.append(dataclasses.replace(s, backends=tuple(bes)))
    rnd.shuffle(shuffled)
    engines = list(snap.engines)
    rnd.shuffle(engines)
    other = model.Snapshot.of(snap.version, tuple(shuffled), tuple(engines))
    assert other == snap
    assert other.hash == snap.hash
    # The version is not content.
    assert model.Snapshot.of(1, tuple(shuffled), tuple(engines)).hash == snap.hash


@settings(max_examples=100, deadline=None)
@given(snapshots())
def test_round_trips_through_protobuf_and_dict(snap: model.Snapshot) -> None:
    wire = pb.Snapshot.FromString(convert.snapshot_to_pb(snap).SerializeToString())
    assert convert.snapshot_from_pb(wire) == snap
    assert from_dict(snap.version, snap.desired.to_dict()) == snap
    assert model.desired_from_dict(snap.desired.to_dict()).hash == snap.hash
    # engines=False leaves the engines out.
    without = from_dict(snap.version, snap.desired.to_dict(engines=False))
    assert without.services == snap.services and without.engines == ()


@settings(max_examples=60, deadline=None)
@given(snapshots(version=3), st.data())
def test_any_single_field_change_changes_the_hash(snap: model.Snapshot,
                                                  data: st.DataObject) -> None:
    if not snap.services:
        return
    target = data.draw(st.sampled_from(snap.services))
    field = data.draw(st.sampled_from(["port", "affinity_timeout", "saturated", "probe_share"]))
    value: Any = {
        "port": target.port % 65535 + 1,
        "affinity_timeout": target.affinity_timeout + 1,
        "saturated": not target.saturated,
        "probe_share": 0.5 if target.probe_share != 0.5 else 0.25,
    }[field]
    changed = dataclasses.replace(target, **{field: value})
    others = tuple(s for s in snap.services if s.name != target.name)
    try:
        new = model.Snapshot.of(3, (*others, changed))
    except SE:  # the change collided with another service's address
        return
    assert new.hash != snap.hash


garbage = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
    st.text(max_size=20), st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(model._SERVICE_FIELDS), garbage)
def test_garbage_in_a_service_field_is_rejected_naming_it(field: str, value: Any) -> None:
    data = service_dict(**{field: value})
    try:
        snap = from_dict(1, {"services": [data]})
    except SE as exc:
        assert str(exc).startswith(f"services[0].{field}"), str(exc)
        return
    # Accepted: then the value was a valid one for that field and survives exactly.
    got = snap.services[0].to_dict().get(field)  # vip6 = None is left out
    if field == "table_size" and value is None:  # None: the automatic size
        assert got == model.auto_table_size(snap.services[0].affinity, 2)
    elif field != "backends":
        assert got == value


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(model._BACKEND_FIELDS), garbage)
def test_garbage_in_a_backend_field_is_rejected_naming_it(field: str, value: Any) -> None:
    data = service_dict()
    data["backends"] = [{**data["backends"][0], field: value}]
    try:
        snap = from_dict(1, {"services": [data]})
    except SE as exc:
        assert str(exc).startswith(f"services[0].backends[0].{field}"), str(exc)
        return
    assert snap.services[0].backends[0].to_dict().get(field) == value  # address6 None: left out


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_decode_into_an_unchecked_snapshot(blob: bytes) -> None:
    try:
        msg = pb.Snapshot.FromString(blob)
    except Exception:  # protobuf's DecodeError: not ours to judge
        return
    try:
        snap = convert.snapshot_from_pb(msg)
    except SE:
        return
    assert snap.hash == msg.hash  # only a self-consistent message gets through


# -- validation, examples -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": ""}, "name"),
        ({"name": "has space"}, "name"),
        ({"name": "Upper"}, "name"),
        ({"name": "ns/svc:80"}, "name"),
        ({"name": "-edge"}, "name"),
        ({"name": "x" * 64}, "name: must be at most 63"),
        ({"vip": "10.0.0.256"}, "vip"),
        ({"vip": "0.0.0.0"}, "vip"),
        ({"vip": "224.0.0.1"}, "vip"),
        ({"vip": "::ffff:10.0.0.1"}, "vip: ::ffff:10.0.0.1 is an IPv4-mapped address"),
        ({"vip": "FD00::1"}, "vip: not in canonical form"),
        ({"vip": "ff02::1"}, "vip: ff02::1 is a multicast address, not a unicast destination"),
        ({"vip": "fd00::1"}, r"backends\[10.0.0.1:8000\]: the service has an IPv6 VIP"),
        ({"vip6": "fd00::1"}, r"backends\[10.0.0.1:8000\]: the service has an IPv6 VIP"),
        ({"vip6": "10.0.0.9"}, "vip6: '10.0.0.9' is not an IPv6 address"),
        ({"vip": "10.0.0.1\x00"}, r"vip: '10\.0\.0\.1\\x00' is not an IPv4 address"),
        ({"port": 0}, "port"),
        ({"port": 65536}, "port"),
        ({"port": 80.0}, "port: must be an integer"),
        ({"port": True}, "port: must be an integer"),
        ({"protocol": "sctp"}, "protocol"),
        ({"affinity": "header"}, "affinity"),
        ({"affinity_timeout": 0}, "affinity_timeout"),
        ({"affinity_timeout": 86401}, "affinity_timeout"),
        ({"table_size": 16384}, "table_size: must be a prime"),
        ({"table_size": 131101}, r"table_size: must be in \[7, 131071\]"),
        ({"table_size": 5}, "table_size"),
        ({"epsilon": -0.1}, "epsilon"),
        ({"epsilon": 10.5}, "epsilon"),
        ({"epsilon": math.nan}, "epsilon"),
        ({"epsilon": math.inf}, "epsilon"),
        ({"probe_share": 1.5}, "probe_share"),
        ({"saturated": 1}, "saturated"),
        ({"table_size": 7, "backends": [be(f"10.0.0.{i}").to_dict() for i in range(1, 9)]},
         "backends: 8 backends do not fit"),
    ],
)
def test_bad_service_fields_are_named(change: dict[str, Any], message: str) -> None:
    with pytest.raises(SE, match=message):
        from_dict(1, {"services": [service_dict(**change)]})


def test_error_paths_name_service_and_backend() -> None:
    data = service_dict()
    data["backends"][1]["weight"] = 70000
    with pytest.raises(SE, match=r"^services\[0\]\.backends\[1\]\.weight: must be in "
                                 r"\[0, 65535\], got 70000$"):
        from_dict(1, {"services": [data]})
    msg = convert.snapshot_to_pb(model.Snapshot.of(1, (svc(),)))
    msg.services[0].backends[1].weight = 70000
    with pytest.raises(SE, match=r"services\[llm\]\.backends\[10\.0\.0\.2:8000\]\.weight"):
        convert.snapshot_from_pb(msg)
    msg = convert.snapshot_to_pb(model.Snapshot.of(1, (svc(),)))
    msg.services[0].affinity = pb.AFFINITY_UNSPECIFIED
    with pytest.raises(SE, match=r"services\[llm\]\.affinity: unknown or unspecified"):
        convert.snapshot_from_pb(msg)


def test_structure_errors() -> None:
    with pytest.raises(SE, match=r"^services\[0\]\.colour: unknown key$"):
        from_dict(1, {"services": [service_dict(colour="red")]})
    with pytest.raises(SE, match=r"^services\[0\]\.vip: required$"):
        data = service_dict()
        del data["vip"]
        from_dict(1, {"services": [data]})
    with pytest.raises(SE, match=r"services\[llm\]: name listed twice"):
        model.Snapshot.of(1, (svc(), svc(vip="10.96.0.11")))
    with pytest.raises(SE, match=r"services\[b\]\.vip: 10\.96\.0\.10:80/tcp is already"):
        model.Snapshot.of(1, (svc("a"), svc("b")))
    with pytest.raises(SE, match=r"backends\[10\.0\.0\.1:8000\]: listed twice"):
        svc(backends=(be(), be(weight=3)))
    with pytest.raises(SE, match="version"):
        model.Snapshot.of(0, ())
    with pytest.raises(SE, match="services: must be a list"):
        from_dict(1, {"services": "llm"})
    with pytest.raises(SE, match=r"^services\[0\]: must be a Service"):
        model.DesiredState((service_dict(),))  # type: ignore[arg-type]
    with pytest.raises(SE, match=r"^backends\[0\]: must be a Backend"):
        svc(backends=(be().to_dict(),))


def test_saturated_and_load_default_when_absent_from_a_dict() -> None:
    data = service_dict()
    del data["saturated"]
    del data["backends"][0]["load"]
    got = model.service_from_dict(data)
    assert got.saturated is False
    assert got.backends[0].load == 0


def test_to_dict_is_the_agent_config_shape() -> None:
    desired = model.Snapshot.of(5, (svc(epsilon=None, saturated=True),), (ref(),)).desired
    assert list(desired.to_dict()) == ["services", "engines"]
    assert desired.to_dict()["engines"] == [ref().to_dict()]
    d = desired.to_dict(engines=False)
    assert list(d) == ["services"]
    (s,) = d["services"]
    assert set(s) == {"name", "vip", "port", "protocol", "affinity", "affinity_timeout",
                      "table_size", "epsilon", "probe_share", "saturated", "move_epsilon",
                      "backends"}
    assert s["epsilon"] is None and s["saturated"] is True and s["move_epsilon"] is None
    assert set(s["backends"][0]) == {"address", "port", "weight", "state", "load"}


def test_the_yaml_loader_reads_the_snapshot_content() -> None:
    from dataplane import config

    snap = model.Snapshot.of(5, (svc(epsilon=None), svc("b", vip="10.96.0.11", saturated=True),
                                 svc("c", vip="10.96.0.12", affinity="none", table_size=7)),
                             (ref(), ref("10.0.0.2:8000/udp", node="node-b")))
    loaded = config.parse(config.dump(snap.desired))
    assert loaded == snap.desired and loaded.hash == snap.hash
    assert model.Snapshot(5, loaded) == snap


# -- deltas, examples ---------------------------------------------------------------------


def test_delta_carries_only_changed_services() -> None:
    a = model.Snapshot.of(1, (svc("a"), svc("b", vip="10.96.0.11"), svc("c", vip="10.96.0.12")))
    b = model.Snapshot.of(2, (svc("a"), svc("b", vip="10.96.0.11", saturated=True),
                              svc("d", vip="10.96.0.13")))
    d = model.delta(a, b)
    assert [s.name for s in d.upserted] == ["b", "d"]
    assert d.removed == ("c",)
    assert (d.from_version, d.to_version, d.hash) == (1, 2, b.hash)
    assert model.delta(b, b).empty


def test_apply_delta_refuses_the_wrong_base_and_a_wrong_hash() -> None:
    a = model.Snapshot.of(1, (svc("a"),))
    b = model.Snapshot.of(2, (svc("a", saturated=True),))
    d = model.delta(a, b)
    with pytest.raises(SE, match="from_version"):
        model.apply_delta(model.Snapshot.of(7, a.services), d)
    # Right version number, different content underneath: the hash catches it.
    other = model.Snapshot.of(1, (svc("a", port=81), svc("z", vip="10.96.0.99")))
    with pytest.raises(SE, match="hash"):
        model.apply_delta(other, d)
    corrupt = dataclasses.replace(d, hash="0" * 64)
    with pytest.raises(SE, match="hash"):
        model.apply_delta(a, corrupt)
    with pytest.raises(SE, match=r"removed\[q\]: no such service"):
        model.apply_delta(a, model.Delta(1, 2, a.hash, (), ("q",)))
    # An upsert that collides with another service's address is refused, not applied.
    clash = model.Delta(1, 2, "0" * 64, (svc("b"),), ())
    with pytest.raises(SE, match="already service"):
        model.apply_delta(a, clash)


def test_delta_validation() -> None:
    with pytest.raises(SE, match="hash"):
        model.Delta(1, 2, "xyz")
    with pytest.raises(SE, match=r"removed\[a\]: also upserted"):
        model.Delta(1, 2, "0" * 64, (svc("a"),), ("a",))
    with pytest.raises(SE, match="removed: a name is listed twice"):
        model.Delta(1, 2, "0" * 64, (), ("a", "a"))


def test_full_snapshot_with_a_wrong_hash_is_refused() -> None:
    msg = convert.snapshot_to_pb(model.Snapshot.of(1, (svc(),)))
    msg.services[0].saturated = True  # content changed after hashing
    with pytest.raises(SE, match="hash"):
        convert.snapshot_from_pb(msg)


# -- reports ------------------------------------------------------------------------------


def load(**kw: Any) -> enginemetrics.EngineLoad:
    fields: dict[str, Any] = {
        "running": 3.0, "waiting": 1.0, "kv_usage": 0.4, "kv_family": enginemetrics.KV_USAGE,
        "engines": 1, "ttft_count": 10.0, "ttft_sum": 2.5, "ttft_p50": 0.2, "ttft_p90": None,
        "ttft_buckets": ((0.1, 2.0), (1.0, 9.0), (math.inf, 10.0)), **kw,
    }
    return enginemetrics.EngineLoad(**fields)


def report(**kw: Any) -> reports.AgentReport:
    fields: dict[str, Any] = {
        "agent_id": "node-a", "node": "a", "applied_version": 4, "applied_hash": "a" * 64,
        "apply_seconds": 0.01,
        "engines": (scraper.ScrapeResult("10.0.0.1:8000", True, True, 0.002, load(), None),
                    scraper.ScrapeResult("10.0.0.2:8000", False, True, 0.3, None, "metrics: x"),
                    scraper.ScrapeResult("10.0.0.3:8000", True, True, 0.01, load(),
                                         "engine: stalled", failure="stalled"),
                    scraper.ScrapeResult("10.0.0.4:8000", True, True, 0.01, load(), None,
                                         unproven=True)),
        "counters": (reports.BackendCounters("10.0.0.1:8000/tcp", connects=5, failed=1),),
        "errors": ("apply: boom",), **kw,
    }
    return reports.AgentReport(**fields)


def test_report_round_trip() -> None:
    r = report()
    wire = pb.AgentReport.FromString(convert.report_to_pb(r).SerializeToString())
    assert convert.report_from_pb(wire) == r


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"agent_id": ""}, "agent_id"),
        ({"applied_hash": "nothex"}, "applied_hash"),
        ({"apply_seconds": math.nan}, "apply_seconds"),
        ({"engines": (scraper.ScrapeResult("e", True, True, 0.0, load(kv_usage=7.0), None),)},
         r"engines\['e'\]\.load\.kv_usage"),
        ({"engines": (scraper.ScrapeResult("e", True, True, 0.0, load(running=-1.0), None),)},
         r"engines\['e'\]\.load\.running"),
        ({"engines": (scraper.ScrapeResult("e", True, True, 0.0,
                                           load(ttft_buckets=((math.nan, 1.0),)), None),)},
         r"ttft_buckets\[0\]\.le"),
        ({"engines": (scraper.ScrapeResult("e", True, True, 0.0, load(), None,
                                           failure="slow"),)},
         r"engines\['e'\]\.failure"),
        ({"counters": (reports.BackendCounters("x"), reports.BackendCounters("x"))},
         r"counters\['x'\]: listed twice"),
    ],
)
def test_bad_reports_are_rejected(change: dict[str, Any], message: str) -> None:
    with pytest.raises(SE, match=message):
        report(**change)


def test_negative_counter_rejected() -> None:
    with pytest.raises(SE, match="failed"):
        reports.BackendCounters("x", failed=-1)


# -- engines ------------------------------------------------------------------------------


def ref(identity: str = "10.0.0.1:8000/tcp", **kw: Any) -> model.EngineRef:
    address = identity.split(":")[0]
    fields: dict[str, Any] = {"metrics_url": f"http://{address}:8000/metrics",
                              "health_url": f"http://{address}:8000/health", "node": None, **kw}
    return model.EngineRef(identity=identity, **fields)


def test_engines_are_content_hashed_and_sorted() -> None:
    a = model.Snapshot.of(1, (svc(),), (ref("10.0.0.2:8000/tcp"), ref("10.0.0.1:8000/tcp")))
    assert [e.identity for e in a.engines] == ["10.0.0.1:8000/tcp", "10.0.0.2:8000/tcp"]
    assert a.hash != model.Snapshot.of(1, (svc(),)).hash
    moved = model.Snapshot.of(1, (svc(),), (ref("10.0.0.2:8000/tcp"),
                                            ref("10.0.0.1:8000/tcp", node="node-b")))
    assert moved.hash != a.hash
    assert a.engine("10.0.0.2:8000/tcp") == ref("10.0.0.2:8000/tcp")
    assert a.engine("10.0.0.9:8000/tcp") is None


def test_delta_replaces_the_engine_list_only_when_it_changed() -> None:
    a = model.Snapshot.of(1, (svc(),), (ref(),))
    b = model.Snapshot.of(2, (svc(saturated=True),), (ref(),))
    d = model.delta(a, b)
    assert d.engines is None and not d.empty
    c = model.Snapshot.of(3, (svc(saturated=True),), (ref(), ref("10.0.0.2:8000/tcp")))
    d2 = model.delta(b, c)
    assert d2.upserted == () and d2.engines == c.engines and not d2.empty
    wire = pb.Delta.FromString(convert.delta_to_pb(d2).SerializeToString())
    assert wire.engines_replaced
    assert model.apply_delta(b, convert.delta_from_pb(wire)) == c
    # Back to no engines at all: an empty list, not "unchanged".
    e = model.Snapshot.of(4, (svc(saturated=True),))
    d3 = convert.delta_from_pb(pb.Delta.FromString(
        convert.delta_to_pb(model.delta(c, e)).SerializeToString()))
    assert d3.engines == ()
    assert model.apply_delta(c, d3) == e


def test_a_delta_listing_engines_without_the_flag_is_refused() -> None:
    msg = convert.delta_to_pb(model.Delta(1, 2, "a" * 64, engines=(ref(),)))
    msg.engines_replaced = False
    with pytest.raises(SE, match="engines_replaced"):
        convert.delta_from_pb(msg)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"identity": "10.0.0.1:8000"}, "identity"),
        ({"identity": "10.0.0.1:8000/sctp"}, "identity"),
        ({"identity": "10.0.0.1:0/tcp"}, "identity"),
        ({"identity": "10.0.0.256:80/tcp"}, "identity"),
        ({"identity": "10.0.0.1:080/tcp"}, "canonical"),
        ({"identity": ""}, "identity"),
        ({"metrics_url": "ftp://10.0.0.1/metrics"}, "metrics_url"),
        ({"metrics_url": "http:///metrics"}, "metrics_url"),
        ({"metrics_url": "http://10.0.0.1:99999/metrics"}, "metrics_url"),
        ({"health_url": "http://10.0.0.1/he alth"}, "health_url"),
        ({"health_url": ""}, "health_url"),
        ({"node": ""}, "node"),
        ({"node": "n" * 300}, "node"),
    ],
)
def test_bad_engine_refs_are_refused_naming_the_field(change: dict[str, Any],
                                                       message: str) -> None:
    with pytest.raises(SE, match=message):
        ref(**change) if "identity" not in change else model.EngineRef(
            **{**ref().to_dict(), **change})


def test_duplicate_engines_and_bad_engine_wire_data_are_refused() -> None:
    with pytest.raises(SE, match=r"engines\[10.0.0.1:8000/tcp\]: listed twice"):
        model.Snapshot.of(1, (), (ref(), ref(node="x")))
    snap = model.Snapshot.of(1, (svc(),), (ref(),))
    msg = convert.snapshot_to_pb(snap)
    msg.engines[0].metrics_url = "gopher://x"
    with pytest.raises(SE, match=r"engines\[10.0.0.1:8000/tcp\].metrics_url"):
        convert.snapshot_from_pb(msg)
    with pytest.raises(SE, match=r"engines\[0\].colour: unknown key"):
        from_dict(1, {"services": [], "engines": [{**ref().to_dict(), "colour": "red"}]})


def test_a_backend_on_the_services_own_vip_is_refused() -> None:
    with pytest.raises(model.ModelError, match=r"backends\[10.96.0.1:8000\]: is the service's "
                                               r"own VIP"):
        model.Service("loop", "10.96.0.1", 80, backends=(model.Backend("10.96.0.1", 8000),))
    # The same address on another port is still the VIP: the kernel rewrites it again.
    with pytest.raises(model.ModelError, match="own VIP"):
        model.Service("loop", "10.96.0.1", 80, backends=(model.Backend("10.96.0.1", 80),))


# Each address that cannot be a destination, with the reason the message gives.
_UNROUTABLE = [
    ("0.0.0.0", "the unspecified address"),
    ("127.0.0.1", "a loopback address"),
    ("127.255.255.254", "a loopback address"),
    ("255.255.255.255", "the broadcast address"),
    ("224.0.0.1", "a multicast address"),
    ("239.255.255.255", "a multicast address"),
]


@pytest.mark.parametrize(("address", "why"), _UNROUTABLE)
def test_an_address_no_connect_can_reach_is_refused_as_a_backend(address: str, why: str
                                                                 ) -> None:
    with pytest.raises(model.ModelError) as exc:
        model.service_from_dict({"name": "s", "vip": "10.96.0.1", "port": 80,
                                 "backends": [{"address": "10.0.0.1", "port": 8000},
                                              {"address": address, "port": 8000}]})
    assert exc.value.problems == [f"backends[1].address: {address} is {why}, "
                                  f"not a unicast destination"]


@pytest.mark.parametrize(("address", "why"), _UNROUTABLE)
def test_an_address_no_connect_can_reach_is_refused_as_a_vip(address: str, why: str) -> None:
    with pytest.raises(model.ModelError) as exc:
        model.desired_from_dict({"services": [{"name": "s", "vip": address, "port": 80}]})
    assert exc.value.problems == [f"services[0].vip: {address} is {why}, "
                                  f"not a unicast destination"]


@pytest.mark.parametrize(("address", "why"), _UNROUTABLE)
def test_an_address_no_connect_can_reach_is_refused_as_an_engine(address: str, why: str
                                                                 ) -> None:
    with pytest.raises(model.ModelError, match=f"identity: {address} is {why}"):
        model.EngineRef(f"{address}:8000/tcp", "http://10.0.0.1/metrics",
                        "http://10.0.0.1/health")


@pytest.mark.parametrize("address", ["10.0.0.1", "126.255.255.255", "128.0.0.1",
                                     "223.255.255.254", "240.0.0.1", "169.254.1.1"])
def test_addresses_next_to_the_refused_ranges_are_accepted(address: str) -> None:
    assert model.address_problem(model.address("a", address)) is None
    model.Service("s", "10.96.0.1", 80, backends=(model.Backend(address, 8000),))


def test_capacity_is_checked_before_anything_is_written() -> None:
    backends = tuple(model.Backend(f"10.1.{i // 250}.{i % 250 + 1}", 8000) for i in range(6))
    state = model.DesiredState(tuple(
        model.Service(f"s{i}", f"10.96.0.{i + 1}", 80, backends=backends) for i in range(3)))
    model.check_capacity(state, max_services=3, max_backends=18)
    with pytest.raises(model.ModelError, match="18 \\(service, backend\\) pairs, more than "
                                               "the 17"):
        model.check_capacity(state, max_services=3, max_backends=17)
    with pytest.raises(model.ModelError, match="3 services, more than the 2"):
        model.check_capacity(state, max_services=2, max_backends=100)
