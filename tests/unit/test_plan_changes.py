"""An incremental plan (plan_changes) leaves the maps exactly as a full plan would, up to
the numbering of ids: same services, backends, states, members, loads and tables."""

from __future__ import annotations

import random
from typing import Any

import pytest

from dataplane import abi, apply, model

SEED = 7
STATES = list(model.BackendState)


def _place(p: apply.Plan, view: apply.View) -> None:
    """What execute does to the view for tables, without a kernel: give each new table a
    place (the placement is not what is compared)."""
    for key in p.tables:
        value = p.diffs["services"].put.get(key) or p.target.services[key]
        placed = (*value[:2], 1, 1, *value[4:])
        p.target.services[key] = placed
        if key in p.diffs["services"].put:
            p.diffs["services"].put[key] = placed


def _full(desired: model.DesiredState, view: apply.View) -> tuple[apply.View, apply.Refs]:
    p = apply.plan(desired, view, SEED)
    _place(p, view)
    return p.target, p.refs


def _incremental(before: model.DesiredState, after: model.DesiredState, view: apply.View,
                 refs: apply.Refs) -> tuple[apply.View, apply.Refs, apply.Plan]:
    names = {n for n, s in after.by_name.items() if before.by_name.get(n) != s}
    names |= set(before.by_name) - set(after.by_name)
    p = apply.plan_changes(before, after, names, view, refs, SEED)
    _place(p, view)
    # Applier._patch, on copies.
    new = apply.View(**{f: dict(getattr(view, f)) for f in apply.View.__dataclass_fields__})
    applier: Any = type("A", (), {})()
    applier.view, applier.refs = new, {k: dict(v) for k, v in refs.items()}
    apply.Applier._patch(applier, p)
    return applier.view, applier.refs, p


def _meaning(view: apply.View) -> dict[str, Any]:
    """The view with ids replaced by what they stand for."""
    ep_of = {i: row[:3] for i, row in view.backends.items()}
    name_of = dict(view.names)
    return {
        "services": {k: (name_of[v[0]], v[1], *v[4:10]) for k, v in view.services.items()},
        "backends": {row[:3]: row[3:] for row in view.backends.values()},  # state, IPv6
        "aliases": dict(view.aliases),
        "members": {(name_of[s], ep_of[b]): w for (s, b), w in view.members.items()},
        "be_load": {ep_of[b]: v for b, v in view.be_load.items()},
        "svc_load": {name_of[s]: v for s, v in view.svc_load.items()},
        "names": set(name_of.values()),
    }


def _random_state(rng: random.Random, names: list[str]) -> model.DesiredState:
    pool = [f"10.9.0.{i}" for i in range(1, 12)]
    services = []
    for i, name in enumerate(names):
        # Some services are dual stack: a second VIP, and each pod's IPv6 address (one per
        # pod, whichever service lists it).
        dual = rng.random() < 0.3
        backends = [model.Backend(addr, 8000, rng.choice([0, 50, 100]), rng.choice(STATES),
                                  rng.choice([0, 0, 500, 2000]),
                                  f"fd00:9::{addr.rsplit('.', 1)[1]}" if dual else None)
                    for addr in rng.sample(pool, rng.randint(0, 4))]
        last = i + 1 if rng.random() < .9 else 99
        services.append(model.Service(name, f"10.96.0.{last}",
                                       80 + i, affinity=rng.choice(list(model.Affinity)),
                                       saturated=rng.random() < 0.2, backends=tuple(backends),
                                       vip6=f"fd00:96::{last}" if dual else None))
    # VIPs must stay unique: keep the first service of each.
    seen: set[tuple[str, int]] = set()
    unique = [s for s in services if (s.vip, s.port) not in seen and not seen.add((s.vip,
                                                                                   s.port))]
    return model.DesiredState(tuple(unique))


def _mutate(rng: random.Random, state: model.DesiredState) -> model.DesiredState:
    """Change, add or drop one or two services; keep the rest as the same objects."""
    services = dict(state.by_name)
    for _ in range(rng.randint(1, 2)):
        fresh = _random_state(rng, [f"svc-{rng.randint(0, 9)}"]).services
        name = fresh[0].name if fresh else None
        if name is None:
            continue
        if rng.random() < 0.25:
            services.pop(name, None)
        else:
            clash = any((s.vip, s.port) == (fresh[0].vip, fresh[0].port) and n != name
                        for n, s in services.items())
            if not clash:
                services[name] = fresh[0]
    return model.DesiredState(tuple(services.values()))


@pytest.mark.unit
@pytest.mark.parametrize("case", range(300))
def test_incremental_plan_equals_the_full_plan(case: int) -> None:
    rng = random.Random(case)
    before = _random_state(rng, [f"svc-{i}" for i in range(rng.randint(1, 8))])
    view, refs = _full(before, apply.View())
    for _ in range(4):
        after = _mutate(rng, before)
        inc_view, inc_refs, p = _incremental(before, after, view, refs)
        full_view, full_refs = _full(after, view)
        assert _meaning(inc_view) == _meaning(full_view)
        assert inc_refs == full_refs
        # A table is rebuilt exactly where the full plan rebuilds one.
        full_plan = apply.plan(after, view, SEED)
        assert set(p.tables) == set(full_plan.tables)
        for key in p.tables:
            assert _slots(p.tables[key], inc_view) == _slots(full_plan.tables[key], full_view)
        before, view, refs = after, inc_view, inc_refs


def _slots(table: Any, view: apply.View) -> list[Any]:
    ep_of = {i: row[:3] for i, row in view.backends.items()}
    return [ep_of.get(int(b), int(b)) if int(b) != abi.NO_BACKEND else None for b in table]


@pytest.mark.unit
def test_a_one_service_change_touches_one_service() -> None:
    services = [model.Service(f"s{i}", f"10.96.{i // 250}.{i % 250 + 1}", 80,
                              backends=(model.Backend(f"10.200.{i // 250}.{i % 250 + 1}",
                                                      8000),))
                for i in range(2000)]
    before = model.DesiredState(tuple(services))
    view, refs = _full(before, apply.View())
    changed = model.Service("s5", services[5].vip, 80, backends=(
        model.Backend("10.200.0.6", 8000, weight=7), model.Backend("10.201.0.1", 8000)))
    after = model.DesiredState((*services[:5], changed, *services[6:]))
    _, _, p = _incremental(before, after, view, refs)
    assert list(p.tables) == [apply._service_key(changed)]
    assert len(p.diffs["backends"].put) == 1 and len(p.diffs["members"].put) == 2
