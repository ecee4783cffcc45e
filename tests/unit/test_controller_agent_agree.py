"""Whatever the controller can build, every agent accepts, and both judge a value with
the one model: a snapshot the reconciler publishes survives the wire unchanged (same
content, same hash) and plans on the agent; a value the model refuses is refused by the
controller before it is published, with the model's own message."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.discovery import discovered
from dataplane import apply, model
from dataplane.api import convert
from tests.unit import test_reconcile as tr

addresses = st.integers(1, 250).map(lambda i: f"10.0.{i // 100}.{i % 100 + 1}")
endpoint = st.builds(
    lambda a, port, ready, serving, term: tr.ep(a, port, ready=ready, serving=serving,
                                                terminating=term),
    addresses, st.sampled_from([8000, 8001]), st.booleans(), st.booleans(), st.booleans())


@st.composite
def specs(draw: st.DrawFn) -> list[discovered.ServiceSpec]:
    out = []
    for i in range(draw(st.integers(1, 5))):
        affinity = draw(st.sampled_from(list(discovered.AFFINITIES)))
        out.append(discovered.ServiceSpec(
            name=f"ns/svc-{i}", vip=ipaddress.IPv4Address(f"10.96.0.{i + 1}"),
            port=draw(st.integers(1, 65535)), protocol=draw(st.sampled_from(["tcp", "udp"])),
            endpoints=tuple(draw(st.lists(endpoint, max_size=8))),
            llm=draw(st.booleans()), affinity=affinity,
            affinity_timeout=0 if affinity == "none" else draw(st.integers(1, 86400)),
            table_size=draw(st.sampled_from([None, 7, 251, 16381])),
            epsilon=draw(st.sampled_from([None, 0.0, 0.25, 10.0])),
            probe_share=draw(st.sampled_from([None, 0.01, 0.5]))))
    return out


@pytest.mark.unit
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs(), st.lists(st.tuples(st.integers(0, 250), st.booleans(),
                                   st.floats(0, 64), st.floats(0, 1)), max_size=10))
def test_every_snapshot_the_controller_builds_is_accepted_by_the_agent(
        found: list[discovered.ServiceSpec],
        scrapes: list[tuple[int, bool, float, float]]) -> None:
    rec = tr.make(*found)
    rec.tick(0.0)
    refs = rec.last.engines if rec.last is not None else ()
    for n, (i, ok, running, kv) in enumerate(scrapes):
        if refs:
            ref = refs[i % len(refs)]
            rec.observe(tr.report(tr.scrape(ref.identity, ok,
                                             tr.load(running=running, kv=kv))), 0.1 * (n + 1))
        rec.tick(0.1 * (n + 1))
    snap = rec.last
    assert snap is not None
    wire = convert.full_update(snap).SerializeToString()
    got = convert.snapshot_from_pb(convert.pb.SnapshotUpdate.FromString(wire).full)
    assert got == snap and got.hash == snap.hash
    apply.plan(got.desired, apply.View(), 1)  # the agent plans it without an error


@pytest.mark.unit
@pytest.mark.parametrize("field, value", [
    ("table_size", 16383), ("epsilon", 11.0), ("affinity_timeout", 86401),
])
def test_a_value_the_model_refuses_never_reaches_a_snapshot(field: str, value: object) -> None:
    with pytest.raises(model.ModelError) as refused:
        model.Service("x", "10.96.0.1", 80, affinity="client", **{field: value})
    annotation = {"table_size": discovered.TABLE_SIZE, "epsilon": discovered.EPSILON,
                  "affinity_timeout": discovered.AFFINITY_TIMEOUT}[field]
    options, problems = discovered.parse_options(
        "ns/x", {discovered.AFFINITY: "client", annotation: str(value)})
    assert problems and annotation in problems[0]  # the controller refuses it first...
    assert getattr(options, field) != value
    message = str(refused.value).removeprefix(f"{field}: ")
    assert problems[0].endswith(message)  # ...in the model's words
