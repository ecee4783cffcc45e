"""Static (YAML file) discovery: parsing, validation messages, reload and watch."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.discovery import discovered, static

FULL = """\
services:
  - name: web
    vip: 10.96.0.20
    port: 8080
    endpoints:
      - {address: 10.0.0.9, port: 80}
  - name: llm
    vip: 10.96.0.10
    port: 80
    engine: vllm
    affinity: session
    affinity_timeout: 600
    table-size: 65537
    epsilon: 0.5
    probe-share: 0.1
    breaker: {consecutive-failures: 3, failure_ratio: 0.25, cooldown: 2.5}
    metrics-port: 9000
    metrics-path: /stats
    endpoints:
      - {address: 10.0.0.2, port: 8000, ready: false, serving: true, terminating: true,
         node: node-b, pod: default/gpu1}
      - {address: 10.0.0.1, port: 8000, node: node-a, pod: default/gpu0}
      - {address: 10.0.0.3, port: 8000, ready: false, serving: false}
  - name: dns
    vip: 10.96.0.53
    port: 53
    protocol: UDP
"""


def write(path: Path, text: str) -> None:
    # Bump mtime explicitly: two writes within one filesystem tick must still differ.
    old = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    os.utime(path, ns=(old + 10**9, old + 10**9))


def test_full_file() -> None:
    specs = static.parse(FULL)
    assert [(s.name, s.port, s.protocol) for s in specs] == [
        ("dns", 53, "udp"),
        ("llm", 80, "tcp"),
        ("web", 8080, "tcp"),
    ]
    dns, llm, web = specs
    assert llm.vip == ipaddress.IPv4Address("10.96.0.10")
    assert llm.llm and llm.affinity == "session" and llm.affinity_timeout == 600
    assert (llm.table_size, llm.epsilon, llm.probe_share) == (65537, 0.5, 0.1)
    assert dict(llm.breaker) == {
        "consecutive_failures": 3,
        "failure_ratio": 0.25,
        "cooldown_base": 2.5,
    }
    assert (llm.metrics_port, llm.metrics_path) == (9000, "/stats")
    assert llm.problems == ()
    cfg = llm.breaker_config()
    assert (cfg.consecutive_failures, cfg.failure_ratio, cfg.cooldown_base) == (3, 0.25, 2.5)
    # Sorted by address; conditions default like Kubernetes' nil ones.
    assert [str(e.address) for e in llm.endpoints] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    states = [e.state for e in llm.endpoints]
    assert states == [discovered.State.ACTIVE, discovered.State.DRAINING, discovered.State.EXCLUDED]
    first = llm.endpoints[0]
    assert (first.ready, first.serving, first.terminating) == (True, True, False)
    assert (first.node, first.pod) == ("node-a", "default/gpu0")
    # No behaviour keys: plain random balancing, like kube-proxy.
    assert not web.llm and web.affinity == "none" and web.affinity_timeout == 0
    assert web.table_size is None and web.epsilon is None and dict(web.breaker) == {}
    assert web.metrics_path == "/metrics" and web.metrics_port is None
    assert dns.endpoints == ()


def test_client_affinity_gets_default_timeout() -> None:
    text = "services: [{name: a, vip: 10.96.0.1, port: 80, affinity: client}]"
    (spec,) = static.parse(text)
    assert spec.affinity == "client"
    assert spec.affinity_timeout == discovered.DEFAULT_AFFINITY_TIMEOUT


def test_empty_file_means_no_services() -> None:
    assert static.parse("") == []
    assert static.parse("services: []") == []


def _one(**fields: Any) -> str:
    svc = {"name": "svc", "vip": "10.96.0.1", "port": 80, **fields}
    return yaml.safe_dump({"services": [svc]})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("services: [", "not valid YAML"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("services: {}\nextra: 1\n", "unknown top-level keys ['extra']"),
        (_one(vip="10.96.0.300"), "services[0] (svc): 'vip' must be an IPv4 or IPv6 address"),
        (_one(vip="10.96.0.1", vip6="10.96.0.2"), "'vip6' must be an IPv6 address"),
        (_one(port=0), "'port' must be an integer in [1, 65535], got 0"),
        (_one(port="80"), "'port' must be an integer"),
        (_one(protocol="sctp"), "'protocol' must be tcp or udp"),
        (_one(affinity="sticky"), "service svc: annotation kvroute.io/affinity='sticky'"),
        (_one(afinity="client"), "unknown key 'afinity'"),
        (_one(**{"table-size": 16384}), "kvroute.io/table-size='16384': must be a prime number"),
        (_one(**{"table-size": 131101}), "must be in [7, 131071]"),
        (_one(epsilon=10.5), "kvroute.io/epsilon='10.5': must be a finite number in [0, 10]"),
        (_one(epsilon="lots"), "kvroute.io/epsilon='lots': must be a number"),
        (_one(epsilon=float("nan")), "must be a finite number"),
        (_one(**{"probe-share": 1}), "kvroute.io/probe-share='1': must be strictly between"),
        (_one(engine="sglang"), "kvroute.io/engine='sglang': engine must be one of ['vllm']"),
        (_one(engine=True), "'engine' must be a string or a number"),
        (_one(breaker={"cooldown": 600}), "cooldown_max"),
        (_one(breaker={"cooldwn": 1}), "unknown breaker key 'cooldwn'"),
        (_one(breaker={"failure-ratio": 0}), "breaker-failure-ratio='0': must be in (0, 1]"),
        (_one(**{"metrics-path": "metrics"}), "kvroute.io/metrics-path='metrics'"),
        (_one(**{"metrics-port": 70000}), "kvroute.io/metrics-port='70000'"),
        (_one(**{"affinity-timeout": 60}), "affinity is 'none'"),
        (_one(endpoints=[{"address": "10.0.0.1"}]), "endpoints[0]: 'port' must be"),
        (_one(endpoints=[{"address": "10.0.0.1", "port": 1, "ready": "yes"}]), "'ready' must"),
        (_one(endpoints=[{"address": "10.0.0.1", "port": 1, "weight": 3}]), "unknown keys"),
        (
            _one(
                endpoints=[{"address": "10.0.0.1", "port": 1}, {"address": "10.0.0.1", "port": 1}]
            ),
            "endpoints listed twice: 10.0.0.1:1",
        ),
        (
            "services: [{name: a, vip: 10.96.0.1, port: 80}, {name: b, vip: 10.96.0.1, port: 80}]",
            "services 'a' and 'b' both use 10.96.0.1:80/tcp",
        ),
        (
            "services: [{name: a, vip: 10.96.0.1, port: 80}, {name: a, vip: 10.96.0.2, port: 80}]",
            "service 'a' port 80/tcp listed twice",
        ),
    ],
)
def test_rejects_with_a_clear_message(text: str, expected: str) -> None:
    with pytest.raises(ValueError) as info:
        static.parse(text, "f.yaml")
    assert expected in str(info.value)
    assert str(info.value).startswith("f.yaml")


def test_every_problem_is_reported_at_once() -> None:
    text = yaml.safe_dump(
        {
            "services": [
                {"name": "a", "vip": "bad", "port": 80},
                {"name": "b", "vip": "10.96.0.2", "port": 80, "affinity": "x"},
            ]
        }
    )
    with pytest.raises(ValueError) as info:
        static.parse(text)
    message = str(info.value)
    assert "(a): 'vip'" in message and "kvroute.io/affinity='x'" in message


def test_reload_and_invalid_file_keeps_previous(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "services.yaml"
    write(path, FULL)
    disc = static.StaticDiscovery(path)
    before = disc.snapshot()
    assert len(before) == 3
    assert disc.reload() is False  # same content: no change
    assert not disc.changed_on_disk()

    write(path, _one(affinity="sticky"))
    assert disc.changed_on_disk()
    with caplog.at_level(logging.ERROR, logger=static.__name__):
        assert disc.reload() is False
    assert disc.snapshot() == before
    assert disc.last_error is not None and "kvroute.io/affinity='sticky'" in disc.last_error
    assert "keeping the previous services" in caplog.text
    assert not disc.changed_on_disk()  # a bad file is read (and logged) once

    path.unlink()
    assert disc.changed_on_disk()
    assert disc.reload() is False
    assert disc.snapshot() == before and "No such file" in str(disc.last_error)

    write(path, _one())
    assert disc.reload() is True
    assert [s.name for s in disc.snapshot()] == ["svc"]
    assert disc.last_error is None


def test_constructor_refuses_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    with pytest.raises(OSError):
        static.StaticDiscovery(path)
    write(path, "services: 3")
    with pytest.raises(ValueError, match="'services' must be a list"):
        static.StaticDiscovery(path)


def test_snapshot_is_a_copy(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    write(path, FULL)
    disc: discovered.Discovery = static.StaticDiscovery(path)  # mypy checks the protocol
    disc.snapshot().clear()
    assert len(disc.snapshot()) == 3


def test_watch_yields_initial_then_changes_only(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    write(path, _one())
    disc = static.StaticDiscovery(path, poll_interval=0.01, debounce=0.0)

    async def main() -> list[list[discovered.ServiceSpec]]:
        seen: list[list[discovered.ServiceSpec]] = []
        gen = disc.watch()
        seen.append(await asyncio.wait_for(anext(gen), 2))
        write(path, _one(affinity="nope"))  # invalid: nothing yielded
        write(path, _one(port=81))  # valid again: yielded
        seen.append(await asyncio.wait_for(anext(gen), 2))
        write(path, _one(port=81))  # rewritten, same content: nothing yielded
        disc.reload()
        write(path, _one(port=82))
        seen.append(await asyncio.wait_for(anext(gen), 2))
        await gen.aclose()
        return seen

    seen = asyncio.run(main())
    assert [[s.port for s in specs] for specs in seen] == [[80], [81], [82]]
