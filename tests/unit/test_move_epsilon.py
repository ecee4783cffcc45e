"""Service.move_epsilon (sticky until saturated) from every door: the model's check,
the content hash, YAML, the wire, annotations, and what apply writes for it and for
fleet mode."""

from __future__ import annotations

import re
from typing import Any

import pytest

from controller.discovery import discovered
from dataplane import abi, apply, config, model
from dataplane.api import convert


def svc(**kw: Any) -> model.Service:
    fields: dict[str, Any] = {
        "affinity": "session", "epsilon": 0.25,
        "backends": (model.Backend("10.0.0.1", 8000), model.Backend("10.0.0.2", 8000)),
        **kw}
    return model.Service("llm", "10.96.0.10", 80, **fields)


def test_default_is_off() -> None:
    assert svc().move_epsilon is None


@pytest.mark.parametrize(("value", "message"), [
    (-0.5, "move_epsilon: must be a finite number in [0.001, 10], got -0.5"),
    (10.5, "move_epsilon: must be a finite number in [0.001, 10], got 10.5"),
    (float("inf"), "move_epsilon: must be a finite number"),
    ("1", "move_epsilon: must be a number, got '1'"),
    (True, "move_epsilon: must be a number, got True"),
    (0.25, "move_epsilon: must be greater than epsilon (0.25), got 0.25"),
    (0.1, "move_epsilon: must be greater than epsilon (0.25), got 0.1"),
])
def test_bad_values_are_refused(value: object, message: str) -> None:
    with pytest.raises(model.ModelError, match=re.escape(message)):
        svc(move_epsilon=value)


def test_any_value_in_range_without_a_bounded_load_check() -> None:
    assert svc(epsilon=None, move_epsilon=0.001).move_epsilon == 0.001
    with pytest.raises(model.ModelError, match=r"0\.001"):  # the kernel's 0 means "off"
        svc(epsilon=None, move_epsilon=0.0)
    assert svc(move_epsilon=10).move_epsilon == 10.0


def test_it_is_part_of_the_content_hash() -> None:
    a, b, c = svc(), svc(move_epsilon=1.0), svc(move_epsilon=1.5)
    assert len({a.digest, b.digest, c.digest}) == 3
    assert model.content_hash([a]) != model.content_hash([b])
    assert svc(move_epsilon=1.0).digest == b.digest


@pytest.mark.parametrize("value", [None, 1.0, 2.5])
def test_yaml_round_trip(value: float | None) -> None:
    state = model.DesiredState((svc(move_epsilon=value),))
    loaded = config.parse(config.dump(state))
    assert loaded == state and loaded.hash == state.hash
    assert loaded.services[0].move_epsilon == value


def test_yaml_names_the_field() -> None:
    text = ("services:\n  - {name: a, vip: 10.96.0.1, port: 80, affinity: session,\n"
            "     epsilon: 0.5, move_epsilon: 0.5}\n")
    with pytest.raises(model.ModelError,
                       match=re.escape("move_epsilon: must be greater than epsilon (0.5)")):
        config.parse(text)


@pytest.mark.parametrize("value", [None, 1.0, 2.5])
def test_wire_round_trip(value: float | None) -> None:
    s = svc(move_epsilon=value)
    msg = convert.service_to_pb(s)
    assert msg.HasField("move_epsilon") == (value is not None)
    wire = convert.pb.Service.FromString(msg.SerializeToString())
    assert convert.service_from_pb(wire, "services") == s


def test_annotation_is_parsed_and_checked_by_the_model() -> None:
    options, problems = discovered.parse_options(
        "ns/x", {discovered.AFFINITY: "session", discovered.MOVE_EPSILON: "1.5"})
    assert problems == () and options.move_epsilon == 1.5
    options, problems = discovered.parse_options(
        "ns/x", {discovered.AFFINITY: "session", discovered.MOVE_EPSILON: "11"})
    assert options.move_epsilon is None
    assert problems and problems[0].endswith(
        "kvroute.io/move-epsilon='11': must be a finite number in [0.001, 10], got 11.0")


def _svc_value(p: apply.Plan) -> dict[str, int]:
    (value,) = p.target.services.values()
    return dict(zip(apply._SVC_FIELDS, value, strict=True))


def test_apply_writes_the_move_bound_and_the_fleet_flag() -> None:
    state = model.DesiredState((svc(move_epsilon=1.25),))
    plain = _svc_value(apply.plan(state, apply.View(), 1))
    assert plain["move_eps_milli"] == 1250 and not plain["flags"] & abi.SVC_F_FLEET
    fleet = _svc_value(apply.plan(state, apply.View(), 1, fleet=True))
    assert fleet["flags"] & abi.SVC_F_FLEET
    # The value differs when only the mode does, so a restarted agent rewrites it.
    assert fleet != plain
    off = _svc_value(apply.plan(model.DesiredState((svc(),)), apply.View(), 1))
    assert off["move_eps_milli"] == 0  # off: what the padding held before ABI 2
    no_aff = _svc_value(apply.plan(model.DesiredState((svc(affinity="none"),)),
                                   apply.View(), 1, fleet=True))
    assert not no_aff["flags"] & abi.SVC_F_FLEET
