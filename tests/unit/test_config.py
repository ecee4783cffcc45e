"""Desired-state YAML: validation of every field, whole-file error reports, round trips."""

from __future__ import annotations

import copy
import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane import config

GOOD = """
table_size: 65521
services:
  - name: llm-chat
    vip: 10.96.0.10
    port: 8000
    protocol: tcp
    affinity: session
    affinity_timeout: 600
    epsilon: 0.5
    probe_share: 0.1
    backends:
      - address: 10.244.1.5
        port: 8000
        weight: 100
        state: active
        load: 3
      - address: 10.244.2.5
        port: 8000
        weight: 0
        state: draining
  - name: embed.v2
    vip: 10.96.0.11
    port: 9000
    protocol: udp
    epsilon: null
    backends:
      - {address: 10.244.3.5, port: 9000, state: probing}
      - {address: 10.244.3.6, port: 9000, state: open}
  - name: empty
    vip: 10.96.0.10
    port: 8001
"""


def _base() -> dict[str, Any]:
    data = yaml.safe_load(GOOD)
    assert isinstance(data, dict)
    return data


def _problems(data: Any) -> list[str]:
    with pytest.raises(config.ConfigError) as info:
        config.from_dict(data)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def test_good_file_parses_with_values_and_defaults() -> None:
    state = config.parse(GOOD)
    chat, embed, empty = state.services
    assert chat.key == (ipaddress.IPv4Address("10.96.0.10"), 8000, "tcp")
    assert chat.affinity is config.Affinity.SESSION
    assert chat.affinity_timeout == 600
    assert chat.table_size == 65521  # top-level table_size, because of affinity
    assert chat.epsilon == 0.5 and chat.probe_share == 0.1
    assert chat.backends[0] == config.Backend(
        ipaddress.IPv4Address("10.244.1.5"), 8000, 100, config.BackendState.ACTIVE, 3
    )
    assert chat.backends[1].weight == 0 and chat.backends[1].state is config.BackendState.DRAINING
    assert chat.backends[1].load == 0
    assert embed.protocol == "udp" and embed.epsilon is None
    assert embed.affinity is config.Affinity.NONE and embed.affinity_timeout == 10800
    assert embed.table_size == 251 and embed.probe_share == 0.05
    assert [b.weight for b in embed.backends] == [100, 100]
    assert [b.state for b in embed.backends] == [
        config.BackendState.PROBING,
        config.BackendState.OPEN,
    ]
    assert empty.backends == () and empty.key[1] == 8001
    assert config.backend_identity(embed, embed.backends[0]) == "10.244.3.5:9000/udp"


def test_round_trip_through_dict_and_yaml(tmp_path: Path) -> None:
    state = config.parse(GOOD)
    assert config.from_dict(config.to_dict(state)) == state
    path = tmp_path / "state.yaml"
    path.write_text(yaml.safe_dump(config.to_dict(state)))
    assert config.load_file(path) == state


def test_models_are_frozen() -> None:
    svc = config.parse(GOOD).services[0]
    with pytest.raises(AttributeError):
        svc.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("services", 0, "name"), "Chat_1", "services[0].name: must be lower-case"),
        (("services", 0, "name"), "-chat", "services[0].name: must be lower-case"),
        (("services", 0, "name"), "a" * 64, "services[0].name: must be at most 63 characters"),
        (("services", 0, "name"), 7, "services[0].name: must be a string"),
        (("services", 0, "vip"), "10.96.0.300", "services[0].vip: must be an IPv4 address"),
        (("services", 0, "vip"), "fd00::1", "services[0].vip: must be an IPv4 address"),
        (("services", 0, "port"), 0, "services[0].port: must be between 1 and 65535"),
        (("services", 0, "port"), "8000", "services[0].port: must be an integer"),
        (("services", 0, "port"), True, "services[0].port: must be an integer"),
        (("services", 0, "protocol"), "sctp", "services[0].protocol: must be one of tcp"),
        (("services", 0, "affinity"), "sticky", "services[0].affinity: must be one of none"),
        (("services", 0, "affinity_timeout"), 0, "services[0].affinity_timeout: must be between"),
        (("services", 0, "affinity_timeout"), 86401, "services[0].affinity_timeout: must be"),
        (("services", 0, "table_size"), 16383, "services[0].table_size: must be a prime"),
        (("services", 0, "table_size"), 5, "services[0].table_size: must be between 7 and"),
        (("services", 0, "table_size"), 262139, "services[0].table_size: must be between"),
        (("services", 0, "epsilon"), -0.1, "services[0].epsilon: must be between 0 and 10"),
        (("services", 0, "epsilon"), 10.5, "services[0].epsilon: must be between 0 and 10"),
        (("services", 0, "epsilon"), "big", "services[0].epsilon: must be a number"),
        (("services", 0, "probe_share"), 1.5, "services[0].probe_share: must be between 0 and 1"),
        (("services", 0, "backends"), {"a": 1}, "services[0].backends: must be a list"),
        (("services", 0, "backends", 0, "address"), "x", "services[0].backends[0].address: must"),
        (("services", 0, "backends", 0, "port"), 65536, "services[0].backends[0].port: must be "),
        (("services", 0, "backends", 1, "weight"), 65536, "services[0].backends[1].weight: must"),
        (("services", 0, "backends", 1, "weight"), -1, "services[0].backends[1].weight: must be"),
        (("services", 0, "backends", 1, "state"), "dead", "services[0].backends[1].state: must"),
        (("services", 0, "backends", 1, "load"), -1, "services[0].backends[1].load: must be at"),
        (("services", 0, "backends", 1, "load"), 1.5, "services[0].backends[1].load: must be an"),
        (("services", 1), 5, "services[1]: must be a mapping"),
        (("table_size",), 100, "table_size: must be a prime number"),
        (("services",), "none", "services: must be a list"),
    ],
)
def test_invalid_field_is_named(path: tuple[Any, ...], value: Any, expected: str) -> None:
    data = _base()
    target: Any = data
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    problems = _problems(data)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems


def test_port_message_is_exact() -> None:
    data = _base()
    data["services"][1]["backends"][0]["port"] = 70000
    assert _problems(data) == ["services[1].backends[0].port: must be between 1 and 65535"]


@pytest.mark.parametrize(
    ("path", "key", "expected"),
    [
        ((), "table_sise", "table_sise: unknown key"),
        (("services", 0), "afinity", "services[0].afinity: unknown key"),
        (("services", 0, "backends", 1), "wieght", "services[0].backends[1].wieght: unknown key"),
    ],
)
def test_unknown_keys_rejected(path: tuple[Any, ...], key: str, expected: str) -> None:
    data = _base()
    target: Any = data
    for part in path:
        target = target[part]
    target[key] = 1
    assert _problems(data) == [expected]


def test_required_fields() -> None:
    data = _base()
    del data["services"][0]["vip"]
    del data["services"][0]["backends"][0]["port"]
    assert _problems(data) == [
        "services[0].vip: required",
        "services[0].backends[0].port: required",
    ]


def test_all_problems_reported_together() -> None:
    data = _base()
    data["table_size"] = 4
    data["services"][0]["port"] = -1
    data["services"][0]["backends"][0]["address"] = "nope"
    data["services"][1]["protocol"] = "icmp"
    data["services"][2]["colour"] = "blue"
    problems = _problems(data)
    assert len(problems) == 5, problems
    for where in (
        "table_size:",
        "services[0].port:",
        "services[0].backends[0].address:",
        "services[1].protocol:",
        "services[2].colour:",
    ):
        assert any(p.startswith(where) for p in problems), (where, problems)


def test_duplicate_service_key_names_both_services() -> None:
    data = _base()
    dup = copy.deepcopy(data["services"][1])
    dup["name"] = "embed-copy"
    data["services"].append(dup)
    (problem,) = _problems(data)
    assert problem.startswith("services[3]:")
    assert "'embed-copy'" in problem and "'embed.v2'" in problem and "services[1]" in problem
    assert "10.96.0.11:9000/udp" in problem


def test_same_vip_port_other_protocol_is_fine() -> None:
    data = _base()
    dup = copy.deepcopy(data["services"][1])
    dup["name"] = "embed-tcp"
    dup["protocol"] = "tcp"
    data["services"].append(dup)
    assert len(config.from_dict(data).services) == 4


def test_duplicate_service_reported_even_if_other_fields_are_bad() -> None:
    data = _base()
    dup = copy.deepcopy(data["services"][0])
    dup["name"] = "again"
    dup["affinity"] = "bogus"
    data["services"].append(dup)
    problems = _problems(data)
    assert any(p.startswith("services[3].affinity:") for p in problems)
    assert any(p.startswith("services[3]:") and "'llm-chat'" in p for p in problems)


def test_duplicate_backend_and_name() -> None:
    data = _base()
    data["services"][0]["backends"].append({"address": "10.244.1.5", "port": 8000})
    data["services"][2]["name"] = "llm-chat"
    problems = _problems(data)
    assert len(problems) == 2, problems
    assert any(
        p.startswith("services[0].backends[2]:") and "10.244.1.5:8000" in p and "backends[0]" in p
        for p in problems
    )
    assert any(p.startswith("services[2].name:") and "services[0]" in p for p in problems)


def test_same_backend_in_two_services_is_fine() -> None:
    data = _base()
    data["services"][2]["backends"] = [{"address": "10.244.1.5", "port": 8000}]
    assert config.from_dict(data).services[2].backends[0].port == 8000


@pytest.mark.parametrize("text", ["", "   \n", "# only a comment\n"])
def test_empty_file_rejected(text: str) -> None:
    with pytest.raises(config.ConfigError, match="empty"):
        config.parse(text)


def test_yaml_syntax_error_has_line_number() -> None:
    text = "services:\n  - name: a\n    vip: [1.2.3.4\n    port: 80\n"
    with pytest.raises(config.ConfigError, match=r"line \d+") as info:
        config.parse(text)
    assert "YAML" in str(info.value)


def test_not_a_mapping_rejected() -> None:
    with pytest.raises(config.ConfigError, match="mapping"):
        config.parse("- 1\n- 2\n")


def test_load_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("services:\n  - {name: a, vip: 1.2.3.4, port: 0}\n")
    with pytest.raises(config.ConfigError) as info:
        config.load_file(path)
    assert str(info.value) == f"{path}: services[0].port: must be between 1 and 65535"
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load_file(tmp_path / "missing.yaml")


def test_no_services_is_valid() -> None:
    assert config.parse("services: []\n") == config.DesiredState(services=())
    assert config.parse("table_size: 251\n") == config.DesiredState(services=())


@pytest.mark.parametrize(
    ("backends", "expected"),
    [
        (0, 251),
        (3, 251),
        (4, 509),  # 64 * 4 = 256 > 251
        (5, 509),
        (15, 1021),
        (16, 2039),
        (100, 8191),
        (255, 16381),
        (256, 32749),
        (1000, 65521),
        (2048, 131071),
        (3000, 131071),
    ],
)
def test_auto_table_size_without_affinity(backends: int, expected: int) -> None:
    svc = {
        "name": "s",
        "vip": "10.96.0.1",
        "port": 80,
        "backends": [
            {"address": str(ipaddress.IPv4Address(0x0AF40000 + i)), "port": 80}
            for i in range(backends)
        ],
    }
    state = config.from_dict({"services": [svc]})
    assert state.services[0].table_size == expected
    assert config.auto_table_size(config.Affinity.NONE, backends) == expected


def test_auto_table_size_with_affinity_uses_top_level() -> None:
    svc = {"name": "s", "vip": "10.96.0.1", "port": 80, "affinity": "client"}
    assert config.from_dict({"services": [svc]}).services[0].table_size == 16381
    top = {"table_size": 131071, "services": [svc]}
    assert config.from_dict(top).services[0].table_size == 131071
    explicit = {"services": [dict(svc, table_size=1021)]}
    assert config.from_dict(explicit).services[0].table_size == 1021


# --- property: any valid state survives to_dict -> YAML -> parse ------------

_ipv4 = st.integers(min_value=1, max_value=2**32 - 2).map(ipaddress.IPv4Address)
_port = st.integers(min_value=1, max_value=65535)


@st.composite
def _states(draw: st.DrawFn) -> config.DesiredState:
    services = []
    keys: set[tuple[Any, ...]] = set()
    for i in range(draw(st.integers(min_value=0, max_value=4))):
        vip, port = draw(_ipv4), draw(_port)
        protocol = draw(st.sampled_from(list(config.Protocol)))
        if (vip, port, protocol) in keys:
            continue
        keys.add((vip, port, protocol))
        addrs = draw(st.lists(st.tuples(_ipv4, _port), max_size=6, unique=True))
        backends = tuple(
            config.Backend(
                address=a,
                port=p,
                weight=draw(st.integers(min_value=0, max_value=65535)),
                state=draw(st.sampled_from(list(config.BackendState))),
                load=draw(st.integers(min_value=0, max_value=2**40)),
            )
            for a, p in addrs
        )
        services.append(
            config.Service(
                name=f"svc-{i}" + draw(st.from_regex(r"[a-z0-9.-]{0,20}[a-z0-9]", fullmatch=True)),
                vip=vip,
                port=port,
                protocol=protocol,
                affinity=draw(st.sampled_from(list(config.Affinity))),
                affinity_timeout=draw(st.integers(min_value=1, max_value=86400)),
                table_size=draw(st.sampled_from((*config.AUTO_TABLE_SIZES, 7, 65537))),
                epsilon=draw(st.none() | st.floats(min_value=0, max_value=10)),
                probe_share=draw(st.floats(min_value=0, max_value=1)),
                backends=backends,
            )
        )
    return config.DesiredState(services=tuple(services))


@settings(max_examples=60, deadline=None)
@given(state=_states())
def test_property_round_trip(state: config.DesiredState) -> None:
    assert config.from_dict(config.to_dict(state)) == state
    assert config.parse(yaml.safe_dump(config.to_dict(state))) == state
