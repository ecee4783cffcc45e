"""Desired-state YAML: the loader's file rules, validation of every field through the
model (one validator, field paths), whole-file error reports, round trips."""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane import config, model

GOOD = """
services:
  - name: llm-chat
    vip: 10.96.0.10
    port: 8000
    protocol: tcp
    affinity: session
    affinity_timeout: 600
    table_size: 65521
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
    with pytest.raises(model.ModelError) as info:
        model.desired_from_dict(data)
    assert str(info.value) == "\n".join(info.value.problems)
    # The file loader reports exactly what the model does.
    with pytest.raises(model.ModelError) as via_yaml:
        config.parse(yaml.safe_dump(data))
    assert via_yaml.value.problems == info.value.problems
    return info.value.problems


def _parse_error(text: str) -> str:
    with pytest.raises(model.ModelError) as info:
        config.parse(text)
    return str(info.value)


def _load_error(path: Path) -> str:
    with pytest.raises(model.ModelError) as info:
        config.load_file(path)
    return str(info.value)


def test_good_file_parses_with_values_and_defaults() -> None:
    state = config.parse(GOOD)
    # Services come sorted by name.
    assert [s.name for s in state.services] == ["embed.v2", "empty", "llm-chat"]
    embed, empty, chat = state.services
    assert chat.l4 == ("10.96.0.10", 8000, model.Protocol.TCP)
    assert chat.affinity is model.Affinity.SESSION
    assert chat.affinity_timeout == 600
    assert chat.table_size == 65521
    assert chat.epsilon == 0.5 and chat.probe_share == 0.1 and chat.saturated is False
    assert chat.backends[0] == model.Backend("10.244.1.5", 8000, 100, model.BackendState.ACTIVE, 3)
    assert chat.backends[1].weight == 0 and chat.backends[1].state is model.BackendState.DRAINING
    assert chat.backends[1].load == 0
    assert embed.protocol is model.Protocol.UDP and embed.epsilon is None
    assert embed.affinity is model.Affinity.NONE and embed.affinity_timeout == 10800
    assert embed.table_size == 251 and embed.probe_share == 0.05
    assert [b.weight for b in embed.backends] == [100, 100]
    assert [b.state for b in embed.backends] == [
        model.BackendState.PROBING,
        model.BackendState.OPEN,
    ]
    assert empty.backends == () and empty.port == 8001
    assert embed.identity(embed.backends[0]) == "10.244.3.5:9000/udp"
    assert state.engines == ()


def test_round_trip_through_dict_and_yaml(tmp_path: Path) -> None:
    state = config.parse(GOOD)
    assert model.desired_from_dict(state.to_dict()) == state
    path = tmp_path / "state.yaml"
    path.write_text(config.dump(state))
    loaded = config.load_file(path)
    assert loaded == state and loaded.hash == state.hash
    path.write_text(yaml.safe_dump(state.to_dict()))
    assert config.load_file(path) == state


def test_models_are_frozen() -> None:
    state = config.parse(GOOD)
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.services[0].port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.services[0].backends[0].weight = 1  # type: ignore[misc]


_NAME = "must be lower-case letters, digits"


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("services", 0, "name"), "Chat_1", f"services[0].name: {_NAME}"),
        (("services", 0, "name"), "-chat", f"services[0].name: {_NAME}"),
        (("services", 0, "name"), "a" * 64,
         "services[0].name: must be at most 63 characters, got 64"),
        (("services", 0, "name"), 7, f"services[0].name: {_NAME}"),
        (("services", 0, "vip"), "10.96.0.300", "services[0].vip: '10.96.0.300' is not an IPv4"),
        (("services", 0, "vip"), "fd00::g", "services[0].vip: 'fd00::g' is not an IPv6 address"),
        (("services", 0, "vip"), "10.96.0.010", "services[0].vip: '10.96.0.010' is not an IPv4"),
        (("services", 0, "vip"), "255.255.255.255",
         "services[0].vip: 255.255.255.255 is the broadcast"),
        (("services", 0, "vip"), 167772170, "services[0].vip: must be an IPv4 address string"),
        (("services", 0, "port"), 0, "services[0].port: must be in [1, 65535], got 0"),
        (("services", 0, "port"), "8000", "services[0].port: must be an integer, got '8000'"),
        (("services", 0, "port"), True, "services[0].port: must be an integer, got True"),
        (("services", 0, "port"), 80.0, "services[0].port: must be an integer, got 80.0"),
        (("services", 0, "protocol"), "sctp",
         "services[0].protocol: must be one of tcp, udp, got 'sctp'"),
        (("services", 0, "affinity"), "sticky",
         "services[0].affinity: must be one of none, client, session, got 'sticky'"),
        (("services", 0, "affinity_timeout"), 0,
         "services[0].affinity_timeout: must be in [1, 86400], got 0"),
        (("services", 0, "affinity_timeout"), 86401,
         "services[0].affinity_timeout: must be in [1, 86400], got 86401"),
        (("services", 0, "table_size"), 16383,
         "services[0].table_size: must be a prime number, got 16383"),
        (("services", 0, "table_size"), 5, "services[0].table_size: must be in [7, 131071], got 5"),
        (("services", 0, "table_size"), 262139,
         "services[0].table_size: must be in [7, 131071], got 262139"),
        (("services", 0, "epsilon"), -0.1,
         "services[0].epsilon: must be a finite number in [0, 10], got -0.1"),
        (("services", 0, "epsilon"), 10.5,
         "services[0].epsilon: must be a finite number in [0, 10], got 10.5"),
        (("services", 0, "epsilon"), "big", "services[0].epsilon: must be a number, got 'big'"),
        (("services", 0, "probe_share"), 1.5,
         "services[0].probe_share: must be a finite number in [0, 1], got 1.5"),
        (("services", 0, "saturated"), "yes", "services[0].saturated: must be true or false"),
        (("services", 0, "backends"), {"a": 1}, "services[0].backends: must be a list, got dict"),
        (("services", 0, "backends", 0, "address"), "x",
         "services[0].backends[0].address: 'x' is not an IPv4 address"),
        (("services", 0, "backends", 0, "port"), 65536,
         "services[0].backends[0].port: must be in [1, 65535], got 65536"),
        (("services", 0, "backends", 1, "weight"), 65536,
         "services[0].backends[1].weight: must be in [0, 65535], got 65536"),
        (("services", 0, "backends", 1, "weight"), -1,
         "services[0].backends[1].weight: must be in [0, 65535], got -1"),
        (("services", 0, "backends", 1, "state"), "dead",
         "services[0].backends[1].state: must be one of active, draining, open, probing, "
         "got 'dead'"),
        (("services", 0, "backends", 1, "load"), -1,
         "services[0].backends[1].load: must be in [0, 4294967295], got -1"),
        (("services", 0, "backends", 1, "load"), 1.5,
         "services[0].backends[1].load: must be an integer, got 1.5"),
        (("services", 0, "backends", 1), "10.0.0.1:80",
         "services[0].backends[1]: must be a mapping, got str"),
        (("services", 1), 5, "services[1]: must be a mapping, got int"),
        (("services",), "none", "services: must be a list, got str"),
        (("engines",), {"a": 1}, "engines: must be a list, got dict"),
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
    assert _problems(data) == ["services[1].backends[0].port: must be in [1, 65535], got 70000"]


@pytest.mark.parametrize(
    ("path", "key", "expected"),
    [
        ((), "table_size", "table_size: unknown key"),  # the top-level table_size is gone
        ((), "servces", "servces: unknown key"),
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
    del data["services"][1]["backends"][1]["address"]
    assert _problems(data) == [
        "services[0].vip: required",
        "services[0].backends[0].port: required",
        "services[1].backends[1].address: required",
    ]


def test_all_problems_reported_together() -> None:
    data = _base()
    data["services"][0]["port"] = -1
    data["services"][0]["backends"][0]["address"] = "nope"
    data["services"][0]["backends"][1]["state"] = "gone"
    data["services"][1]["protocol"] = "icmp"
    data["services"][2]["colour"] = "blue"
    problems = _problems(data)
    assert [p.split(":")[0] for p in problems] == [
        "services[0].port",  # the service's own field, with its backends' problems
        "services[0].backends[0].address",
        "services[0].backends[1].state",
        "services[1].protocol",
        "services[2].colour",
    ], problems


def test_duplicate_service_address_names_both_services() -> None:
    data = _base()
    dup = copy.deepcopy(data["services"][1])
    dup["name"] = "embed-copy"
    data["services"].append(dup)
    (problem,) = _problems(data)
    assert problem == ("services[embed-copy].vip: 10.96.0.11:9000/udp is already "
                       "service 'embed.v2'")


def test_same_vip_port_other_protocol_is_fine() -> None:
    data = _base()
    dup = copy.deepcopy(data["services"][1])
    dup["name"] = "embed-tcp"
    dup["protocol"] = "tcp"
    data["services"].append(dup)
    assert len(model.desired_from_dict(data).services) == 4


def test_cross_service_checks_wait_for_valid_services() -> None:
    # A duplicate address is only detectable between services that exist: a service with a
    # bad field reports that field, and the clash shows once it is fixed.
    data = _base()
    dup = copy.deepcopy(data["services"][0])
    dup["name"] = "again"
    dup["affinity"] = "bogus"
    data["services"].append(dup)
    assert [p.split(":")[0] for p in _problems(data)] == ["services[3].affinity"]
    dup["affinity"] = "session"
    (problem,) = _problems(data)
    assert problem.startswith("services[again].vip:") and "'llm-chat'" in problem


def test_duplicate_backend() -> None:
    data = _base()
    data["services"][0]["backends"].append({"address": "10.244.1.5", "port": 8000})
    assert _problems(data) == [
        "services[0].backends[2]: duplicate backend 10.244.1.5:8000 (also backends[0])"
    ]


def test_duplicate_service_name() -> None:
    data = _base()
    data["services"][2]["name"] = "llm-chat"
    assert _problems(data) == ["services[llm-chat]: name listed twice"]


def test_same_backend_in_two_services_is_fine() -> None:
    data = _base()
    data["services"][2]["backends"] = [{"address": "10.244.1.5", "port": 8000}]
    assert model.desired_from_dict(data).service("empty").backends[0].port == 8000  # type: ignore[union-attr]


@pytest.mark.parametrize("text", ["", "   \n", "# only a comment\n", "---\n"])
def test_empty_file_rejected(text: str) -> None:
    assert _parse_error(text) == "(top level): the desired state is empty"


def test_explicit_null_document_rejected() -> None:
    assert "empty" in _parse_error("null\n")


def test_yaml_syntax_error_has_line_number() -> None:
    text = "services:\n  - name: a\n    vip: [1.2.3.4\n    port: 80\n"
    message = _parse_error(text)
    assert message.startswith("YAML error at line 4, column 9:"), message


def test_not_a_mapping_rejected() -> None:
    assert _parse_error("- 1\n- 2\n") == "(value): must be a mapping, got list"


def test_load_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("services:\n  - {name: a, vip: 1.2.3.4, port: 0}\n"
                    "  - {name: b, vip: 1.2.3.4, port: 1, protocol: x}\n")
    assert _load_error(path) == (
        f"{path}: services[0].port: must be in [1, 65535], got 0\n"
        f"{path}: services[1].protocol: must be one of tcp, udp, got 'x'"
    )
    assert _load_error(tmp_path / "missing.yaml").startswith(
        f"{tmp_path / 'missing.yaml'}: cannot read")
    assert _load_error(tmp_path) == f"{tmp_path}: not a regular file"  # a directory


def test_no_services_is_valid() -> None:
    assert config.parse("services: []\n") == model.DesiredState()
    assert config.parse("{}\n") == model.DesiredState()
    assert config.parse("engines: []\n") == model.DesiredState()


def test_engines_are_read_and_checked() -> None:
    text = ("services: []\nengines:\n"
            "  - {identity: 10.0.0.1:8000/tcp, metrics_url: 'http://10.0.0.1:8000/metrics',"
            " health_url: 'http://10.0.0.1:8000/health', node: a}\n")
    (ref,) = config.parse(text).engines
    assert ref == model.EngineRef("10.0.0.1:8000/tcp", "http://10.0.0.1:8000/metrics",
                                  "http://10.0.0.1:8000/health", "a")
    message = _parse_error(text.replace("8000/tcp", "08000/tcp"))
    assert message.startswith("engines[0].identity: not in canonical form"), message
    message = _parse_error(text.replace("metrics_url", "metrics"))
    assert message.startswith("engines[0].metrics: unknown key"), message


def _service_with(backends: int, **kw: Any) -> dict[str, Any]:
    return {
        "name": "s",
        "vip": "10.96.0.1",
        "port": 80,
        "backends": [
            {"address": str(ipaddress.IPv4Address(0x0AF40001 + i)), "port": 80}
            for i in range(backends)
        ],
        **kw,
    }


@pytest.mark.parametrize(
    ("backends", "expected"),
    [
        (0, 251),
        (2, 251),
        (3, 509),  # 100 x 3 = 300 > 251
        (5, 509),
        (6, 1021),
        (10, 1021),
        (11, 2039),
        (40, 4093),
        (41, 8191),
        (81, 8191),
        (82, 16381),
        (163, 16381),
        (164, 32749),
        (327, 32749),
        (328, 65521),
        (655, 65521),
        (656, 131071),
        (1400, 131071),  # more than the largest size covers: the largest
    ],
)
@pytest.mark.parametrize("affinity", list(model.Affinity))
def test_auto_table_size(backends: int, expected: int, affinity: model.Affinity) -> None:
    state = model.desired_from_dict({"services": [_service_with(backends, affinity=affinity)]})
    assert state.services[0].table_size == expected
    assert model.auto_table_size(affinity, backends) == expected
    assert model.is_prime(expected)


def test_explicit_table_size_wins_and_survives_a_dump() -> None:
    explicit = model.desired_from_dict({"services": [_service_with(3, table_size=1021)]})
    assert explicit.services[0].table_size == 1021
    # A dump writes the size the service got, so a reload never re-derives it.
    auto = model.desired_from_dict({"services": [_service_with(3)]})
    assert yaml.safe_load(config.dump(auto))["services"][0]["table_size"] == 509


# --- the loader's own rules ---------------------------------------------------------------


def test_duplicate_key_refused_naming_key_and_both_lines() -> None:
    text = ("services:\n"
            "  - name: a\n"
            "    vip: 10.0.0.1\n"
            "    port: 80\n"
            "    port: 81\n")
    assert _parse_error(text) == (
        "YAML error at line 5, column 5: duplicate key 'port' (first at line 4)")
    # At the top level too (YAML itself would silently keep the second list).
    message = _parse_error("services: []\nengines: []\nservices: []\n")
    assert message == "YAML error at line 3, column 1: duplicate key 'services' (first at line 1)"


def test_unhashable_key_is_a_message() -> None:
    message = _parse_error("? [a, b]\n: 1\n")
    assert "a mapping key must be a plain value" in message and "line 1" in message


def _in_thread(fn: Any, timeout: float = 5.0) -> Any:
    """fn()'s result or exception, failing the test if it has not returned by timeout."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # handed to the test
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still running after {timeout} s"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def test_fifo_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "state.yaml"
    os.mkfifo(fifo)
    with pytest.raises(model.ModelError) as info:
        _in_thread(lambda: config.load_file(fifo))
    assert str(info.value) == f"{fifo}: not a regular file"


def test_symlink_to_dev_zero_refused(tmp_path: Path) -> None:
    link = tmp_path / "state.yaml"
    link.symlink_to("/dev/zero")
    with pytest.raises(model.ModelError) as info:
        _in_thread(lambda: config.load_file(link))
    assert str(info.value) == f"{link}: not a regular file"


def test_symlink_to_a_regular_file_is_read(tmp_path: Path) -> None:
    target = tmp_path / "real.yaml"
    target.write_text(GOOD)
    link = tmp_path / "state.yaml"
    link.symlink_to(target)
    assert config.load_file(link) == config.parse(GOOD)


def test_file_over_max_bytes_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.yaml"
    path.write_text(GOOD)
    size = len(GOOD.encode())
    monkeypatch.setattr(config, "MAX_BYTES", size)
    assert config.load_file(path) == config.parse(GOOD)  # exactly the limit is fine
    monkeypatch.setattr(config, "MAX_BYTES", size - 1)
    assert _load_error(path) == (
        f"{path}: {size} bytes, more than the {size - 1} a desired state may have")


def test_invalid_utf8_is_a_message(tmp_path: Path) -> None:
    path = tmp_path / "state.yaml"
    path.write_bytes(b"services:\n  - name: caf\xe9\n")
    assert _load_error(path) == f"{path}: not UTF-8 (byte 23)"
    assert config.read_text(_write(tmp_path / "ok.yaml", "services: [] # caf\u00e9\n")).endswith(
        "caf\u00e9\n")


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(("open_", "close"), [("[", "]"), ("{a: ", "}")])
def test_deep_nesting_is_a_message(open_: str, close: str, tmp_path: Path) -> None:
    text = open_ * 10_000 + close * 10_000 + "\n"
    assert _parse_error(text) == f"nested deeper than {config.MAX_DEPTH} levels"
    path = _write(tmp_path / "deep.yaml", text)
    assert _load_error(path) == f"{path}: nested deeper than {config.MAX_DEPTH} levels"


def test_nesting_just_past_max_depth_names_the_line() -> None:
    depth = config.MAX_DEPTH + 2
    text = "services:\n  - " + "[" * depth + "]" * depth + "\n"
    assert _parse_error(text) == f"line 2: nested deeper than {config.MAX_DEPTH} levels"
    ok = "services:\n  - " + "[" * 5 + "]" * 5 + "\n"  # within the limit: the model judges it
    assert _parse_error(ok) == "services[0]: must be a mapping, got list"


def _billion_laughs(width: int, levels: int) -> str:
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    for level in range(1, levels):
        lines.append(f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def test_billion_laughs_refused_quickly(tmp_path: Path) -> None:
    text = _billion_laughs(width=1000, levels=18)
    assert 90_000 <= len(text) <= 130_000
    path = _write(tmp_path / "laughs.yaml", text)
    start = time.monotonic()
    message = _in_thread(lambda: _load_error(path))
    assert time.monotonic() - start < 2.0
    assert message.startswith(f"{path}: line ") and (
        f"expands to more than {config.MAX_NODES} values" in message), message


def test_aliases_within_max_nodes_are_expanded() -> None:
    text = ("backend: &be {address: 10.0.0.1, port: 80}\n")
    assert "backend: unknown key" in _parse_error(text)  # aliases fine, the key is not
    ok = ("services:\n"
          "  - &svc {name: a, vip: 10.96.0.1, port: 80,"
          " backends: [&be {address: 10.0.0.1, port: 80}]}\n"
          "  - {name: b, vip: 10.96.0.2, port: 80, backends: [*be]}\n")
    a, b = config.parse(ok).services
    assert a.backends == b.backends


def test_huge_load_refused_with_path() -> None:
    text = ("services:\n  - name: a\n    vip: 10.0.0.1\n    port: 80\n    backends:\n"
            f"      - {{address: 10.0.0.2, port: 80, load: {2**40}}}\n")
    assert _parse_error(text) == (
        f"services[0].backends[0].load: must be in [0, {model.LOAD_MAX}], got {2**40}")
    assert config.parse(text.replace(str(2**40), str(model.LOAD_MAX))).services[0].backends[
        0].load == model.LOAD_MAX


# --- property: any valid state survives to_dict -> from_dict and dump -> parse ------------

# Any address the model takes (address_problem: no loopback, multicast, 0 or broadcast).
_ipv4 = st.integers(min_value=1, max_value=0xDFFFFFFF).filter(
    lambda n: model.address_problem(model.number_of(ipaddress.IPv4Address(n))) is None
).map(lambda n: str(ipaddress.IPv4Address(n)))
_port = st.integers(min_value=1, max_value=65535)
# Names YAML 1.1 would read as something else if written bare.
_tricky_names = st.sampled_from(["null", "yes", "no", "on", "off", "true", "y", "n", "017",
                                 "0x1f", "1.5", "1.0e3", "123", "0.0.0.0", "nan", "inf"])
_names = _tricky_names | st.from_regex(r"[a-z0-9]([-a-z0-9.]{0,20}[a-z0-9])?", fullmatch=True)


@st.composite
def _services(draw: st.DrawFn, name: str) -> model.Service:
    addrs = draw(st.lists(st.tuples(_ipv4, _port), max_size=6,
                          unique_by=lambda t: (ipaddress.IPv4Address(t[0]), t[1])))
    backends = [
        model.Backend(
            address=a,
            port=p,
            weight=draw(st.integers(min_value=0, max_value=model.WEIGHT_MAX)),
            state=draw(st.sampled_from(list(model.BackendState))),
            load=draw(st.integers(min_value=0, max_value=model.LOAD_MAX)),
        )
        for a, p in addrs
    ]
    taken = {b.address for b in backends}
    return model.Service(
        name=name,
        vip=draw(_ipv4.filter(lambda v: v not in taken)),  # a backend may not be the VIP
        port=draw(_port),
        protocol=draw(st.sampled_from(list(model.Protocol))),
        affinity=draw(st.sampled_from(list(model.Affinity))),
        affinity_timeout=draw(st.integers(min_value=1, max_value=model.AFFINITY_TIMEOUT_MAX)),
        table_size=draw(st.none() | st.sampled_from((*model.AUTO_TABLE_SIZES, 7, 65537))),
        epsilon=draw(st.none() | st.floats(min_value=0, max_value=model.EPSILON_MAX)),
        probe_share=draw(st.floats(min_value=0, max_value=1)),
        saturated=draw(st.booleans()),
        backends=tuple(backends),
    )


@st.composite
def _engine_refs(draw: st.DrawFn) -> model.EngineRef:
    address, port = draw(_ipv4), draw(_port)
    scheme = draw(st.sampled_from(["http", "https"]))
    return model.EngineRef(
        identity=model.backend_identity(address, port, draw(st.sampled_from(list(model.Protocol)))),
        metrics_url=f"{scheme}://{address}:{port}/metrics",
        health_url=f"{scheme}://{address}:{port}/health",
        node=draw(st.none() | _names),
    )


@st.composite
def _states(draw: st.DrawFn) -> model.DesiredState:
    services: list[model.Service] = []
    used: set[tuple[str, int, model.Protocol]] = set()
    for name in draw(st.lists(_names, max_size=4, unique=True)):
        svc = draw(_services(name))
        if svc.l4 not in used:
            used.add(svc.l4)
            services.append(svc)
    engines = draw(st.lists(_engine_refs(), max_size=3, unique_by=lambda e: e.identity))
    return model.DesiredState(tuple(services), tuple(engines))


@settings(max_examples=80, deadline=None)
@given(state=_states())
def test_property_state_round_trip(state: model.DesiredState) -> None:
    back = model.desired_from_dict(state.to_dict())
    assert back == state and back.hash == state.hash
    parsed = config.parse(config.dump(state))
    assert parsed == state and parsed.hash == state.hash
    # Without engines the services still survive, and only the engines are lost.
    services_only = config.parse(yaml.safe_dump(state.to_dict(engines=False)))
    assert services_only.services == state.services and services_only.engines == ()


@settings(max_examples=80, deadline=None)
@given(svc=_names.flatmap(_services))
def test_property_service_round_trip(svc: model.Service) -> None:
    back = model.service_from_dict(svc.to_dict())
    assert back == svc and back.digest == svc.digest
    parsed = config.parse(config.dump(model.DesiredState((svc,))))
    assert parsed.services == (svc,) and parsed.hash == model.DesiredState((svc,)).hash
    assert model.service_from_dict(yaml.safe_load(yaml.safe_dump(svc.to_dict()))) == svc
