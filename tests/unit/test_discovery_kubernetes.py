"""Kubernetes discovery through the real `kubernetes` client, against a small fake API
server on 127.0.0.1 that serves the recorded objects in tests/data/k8s/.

The fake keeps what matters for list+watch: a global resourceVersion, an event history a
watch replays from the version it asks for, compaction (a watch from before it gets an
ERROR 410 event), paged lists (limit/continue), namespace paths, label selectors, and
hooks to end a watch, fail a request with a status, or send garbage lines.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import http.server
import ipaddress
import json
import logging
import re
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

from controller.discovery import discovered, k8s, k8sobjects

DATA = Path(__file__).resolve().parents[1] / "data" / "k8s"
TOKEN = "kvroute-test-token"

_PATHS = [
    (re.compile(r"^/api/v1/services$"), k8s.SERVICES),
    (re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/services$"), k8s.SERVICES),
    (re.compile(r"^/apis/discovery\.k8s\.io/v1/endpointslices$"), k8s.ENDPOINT_SLICES),
    (
        re.compile(r"^/apis/discovery\.k8s\.io/v1/namespaces/(?P<ns>[^/]+)/endpointslices$"),
        k8s.ENDPOINT_SLICES,
    ),
]
_LIST_KIND = {k8s.SERVICES: "ServiceList", k8s.ENDPOINT_SLICES: "EndpointSliceList"}


def fixture(name: str) -> Any:
    return json.loads((DATA / name).read_text())


@dataclasses.dataclass
class Request:
    resource: str
    verb: str  # "list" or "watch"
    path: str
    params: dict[str, str]
    auth: str | None


@dataclasses.dataclass
class Event:
    rv: int
    type: str
    obj: dict[str, Any]


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return (meta.get("namespace", ""), meta.get("name", ""))


def _selects(selector: str | None, labels: dict[str, str]) -> bool:
    for term in filter(None, (selector or "").split(",")):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k) == v:
                return False
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            if labels.get(k) != v:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class FakeApiServer:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.rv = 1000
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {
            k8s.SERVICES: {},
            k8s.ENDPOINT_SLICES: {},
        }
        self.history: dict[str, list[Event]] = {k8s.SERVICES: [], k8s.ENDPOINT_SLICES: []}
        self.compacted = 0  # a watch from a version below this gets 410
        self.commands: dict[str, deque[tuple[str, str]]] = {
            k8s.SERVICES: deque(),
            k8s.ENDPOINT_SLICES: deque(),
        }
        self.fail: dict[tuple[str, str], deque[int]] = {}
        self.requests: list[Request] = []
        self.active: dict[str, int] = {k8s.SERVICES: 0, k8s.ENDPOINT_SLICES: 0}
        self.stopping = False
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 2  # an idle keep-alive connection must not hold teardown forever

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server._handle(self)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = False  # joined by server_close: no thread left behind
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, args=(0.05,), name="fake-apiserver"
        )
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()

    # --- state changes -------------------------------------------------------------

    def load(self, resource: str, items: list[dict[str, Any]]) -> None:
        with self.cond:
            for obj in items:
                self.objects[resource][_key(obj)] = copy.deepcopy(obj)

    def change(self, resource: str, kind: str, obj: dict[str, Any], *, record: bool = True) -> int:
        """ADDED/MODIFIED/DELETED; ``record=False`` changes state with no event, as if
        the event were compacted away."""
        obj = copy.deepcopy(obj)
        with self.cond:
            self.rv += 1
            obj.setdefault("metadata", {})["resourceVersion"] = str(self.rv)
            if kind == "DELETED":
                self.objects[resource].pop(_key(obj), None)
            else:
                self.objects[resource][_key(obj)] = obj
            if record:
                self.history[resource].append(Event(self.rv, kind, obj))
            self.cond.notify_all()
            return self.rv

    def command(self, resource: str, what: str, payload: str = "") -> None:
        with self.cond:
            self.commands[resource].append((what, payload))
            self.cond.notify_all()

    def fail_next(self, resource: str, verb: str, status: int) -> None:
        with self.cond:
            self.fail.setdefault((resource, verb), deque()).append(status)

    def seen(self, resource: str, verb: str) -> list[Request]:
        with self.cond:
            return [r for r in self.requests if r.resource == resource and r.verb == verb]

    # --- HTTP ----------------------------------------------------------------------

    def _handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(h.path)
        params = dict(urllib.parse.parse_qsl(url.query))
        routes = [(m, r) for p, r in _PATHS if (m := p.match(url.path)) is not None]
        if not routes:
            self._status(h, 404, "NotFound", f"no route for {url.path}")
            return
        match, resource = routes[0]
        namespace = match.groupdict().get("ns")
        verb = "watch" if params.get("watch") in ("true", "1") else "list"
        with self.cond:
            self.requests.append(
                Request(resource, verb, url.path, params, h.headers.get("Authorization"))
            )
            failures = self.fail.get((resource, verb))
            status = failures.popleft() if failures else None
        if status is not None:
            self._status(h, status, "Forced", f"forced {status} for {verb} {resource}")
        elif verb == "list":
            self._list(h, resource, namespace, params)
        else:
            self._watch(h, resource, namespace, params)

    def _visible(self, obj: dict[str, Any], namespace: str | None, params: dict[str, str]) -> bool:
        meta = obj.get("metadata") or {}
        if namespace is not None and meta.get("namespace") != namespace:
            return False
        return _selects(params.get("labelSelector"), meta.get("labels") or {})

    def _list(
        self,
        h: http.server.BaseHTTPRequestHandler,
        resource: str,
        namespace: str | None,
        params: dict[str, str],
    ) -> None:
        with self.cond:
            items = [
                o
                for _, o in sorted(self.objects[resource].items())
                if self._visible(o, namespace, params)
            ]
            rv = self.rv
        start = int(params.get("continue", "0"))
        limit = int(params.get("limit", "0")) or len(items)
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if start + limit < len(items):
            meta["continue"] = str(start + limit)
        body = {
            "kind": _LIST_KIND[resource],
            "apiVersion": "v1" if resource == k8s.SERVICES else "discovery.k8s.io/v1",
            "metadata": meta,
            "items": items[start : start + limit],
        }
        self._send(h, 200, json.dumps(body).encode())

    def _watch(
        self,
        h: http.server.BaseHTTPRequestHandler,
        resource: str,
        namespace: str | None,
        params: dict[str, str],
    ) -> None:
        cursor = int(params.get("resourceVersion") or self.rv)
        deadline = time.monotonic() + int(params.get("timeoutSeconds", "3600"))
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        with self.cond:
            self.active[resource] += 1
            self.cond.notify_all()
        try:
            if cursor < self.compacted:
                self._chunk(h, _gone_event(cursor))
                return
            while True:
                with self.cond:
                    pending = [
                        e
                        for e in self.history[resource]
                        if e.rv > cursor and self._visible(e.obj, namespace, params)
                    ]
                    cmd = self.commands[resource].popleft() if self.commands[resource] else None
                    if not pending and cmd is None and not self.stopping:
                        self.cond.wait(0.05)
                    stopping = self.stopping
                for e in pending:
                    self._chunk(h, json.dumps({"type": e.type, "object": e.obj}))
                    cursor = e.rv
                if pending:
                    cursor = max(cursor, pending[-1].rv)
                if cmd is not None:
                    what, payload = cmd
                    if what == "end":
                        return
                    if what == "gone":
                        self._chunk(h, _gone_event(cursor))
                        return
                    self._chunk(h, payload)  # "raw"
                if stopping or time.monotonic() > deadline:
                    return
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True
        finally:
            with self.cond:
                self.active[resource] -= 1
                self.cond.notify_all()
            try:
                h.wfile.write(b"0\r\n\r\n")
                h.wfile.flush()
            except OSError:
                h.close_connection = True

    @staticmethod
    def _chunk(h: http.server.BaseHTTPRequestHandler, line: str) -> None:
        data = line.encode() + b"\n"
        h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        h.wfile.flush()

    def _status(
        self, h: http.server.BaseHTTPRequestHandler, code: int, reason: str, message: str
    ) -> None:
        body = {
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }
        self._send(h, code, json.dumps(body).encode())

    @staticmethod
    def _send(h: http.server.BaseHTTPRequestHandler, code: int, data: bytes) -> None:
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)


def _gone_event(rv: int) -> str:
    status = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": f"too old resource version: {rv} (1500)",
        "reason": "Expired",
        "code": 410,
    }
    return json.dumps({"type": "ERROR", "object": status})


def wait_for(pred: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    srv = FakeApiServer()
    srv.load(k8s.SERVICES, fixture("services.json")["items"])
    srv.load(k8s.ENDPOINT_SLICES, fixture("endpointslices.json")["items"])
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def api(server: FakeApiServer, tmp_path: Path) -> Iterator[kubernetes.client.ApiClient]:
    """A client built the way the controller builds one: from a kubeconfig file."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": server.url}}],
                "users": [{"name": "ctl", "user": {"token": TOKEN}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "ctl"}}],
                "current-context": "fake",
            }
        )
    )
    client = k8s.api_client(kubeconfig=str(kubeconfig))
    try:
        yield client
    finally:
        client.close()


FAST = k8s.Settings(debounce=0.02, backoff_initial=0.02, backoff_max=0.1)


@pytest.fixture
def discovery(api: kubernetes.client.ApiClient) -> Iterator[k8s.KubernetesDiscovery]:
    disc = k8s.KubernetesDiscovery(api, FAST)
    try:
        yield disc
    finally:
        disc.close()
        assert not [t for t in threading.enumerate() if t.name.startswith("kvroute-k8s-")]


def by_port(
    specs: list[discovered.ServiceSpec],
) -> dict[tuple[str, int, str], discovered.ServiceSpec]:
    return {(s.name, s.port, s.protocol): s for s in specs}


def endpoints(spec: discovered.ServiceSpec) -> dict[str, str]:
    return {f"{e.address}:{e.port}": e.state.value for e in spec.endpoints}


# --- pure conversion of the recorded objects ---------------------------------------


def test_build_from_recorded_objects() -> None:
    result = k8sobjects.build(
        fixture("services.json")["items"], fixture("endpointslices.json")["items"]
    )
    specs = by_port(result.specs)
    assert sorted(specs) == [
        ("default/diameter", 3868, "tcp"),  # the SCTP port is dropped
        ("default/dual", 80, "tcp"),
        ("default/llm", 80, "tcp"),
        ("default/llm", 9000, "tcp"),
        ("default/v6only", 80, "tcp"),
        ("default/web", 80, "tcp"),
        ("kube-system/kube-dns", 53, "tcp"),
        ("kube-system/kube-dns", 53, "udp"),
        ("kube-system/kube-dns", 9153, "tcp"),
        ("team-a/typo", 8000, "tcp"),
    ]  # no headless, ExternalName, bare or port-less service

    llm = specs[("default/llm", 80, "tcp")]
    assert llm.vip == ipaddress.IPv4Address("10.96.0.10") and llm.port_name == "http"
    assert llm.llm and llm.affinity == "session" and llm.affinity_timeout == 1800
    assert (llm.table_size, llm.epsilon, llm.probe_share, llm.metrics_port) == (
        65537,
        0.5,
        0.1,
        8000,
    )
    assert dict(llm.breaker) == {
        "consecutive_failures": 3,
        "failure_ratio": 0.4,
        "cooldown_base": 2.0,
    }
    # Two slices: 10.244.1.10 is ready in one and not in the other (churn): kept active.
    # Nil conditions read as ready; an endpoint without addresses is dropped.
    assert endpoints(llm) == {
        "10.244.1.10:8000": "active",
        "10.244.1.13:8000": "active",
        "10.244.2.11:8000": "draining",
        "10.244.2.14:8000": "active",
        "10.244.3.12:8000": "excluded",
    }
    first = llm.endpoints[0]
    assert (first.node, first.pod) == ("node-a", "default/vllm-0")
    nil = llm.endpoints[1]
    assert (nil.ready, nil.serving, nil.terminating, nil.node, nil.pod) == (
        True,
        True,
        False,
        None,
        None,
    )
    # Ports join by name: grpc only exists in the first slice, as 9001.
    grpc = specs[("default/llm", 9000, "tcp")]
    assert grpc.port_name == "grpc"
    assert set(endpoints(grpc)) == {
        "10.244.1.10:9001",
        "10.244.1.13:9001",
        "10.244.2.11:9001",
        "10.244.3.12:9001",
    }

    web = specs[("default/web", 80, "tcp")]
    assert (web.affinity, web.affinity_timeout, web.llm) == ("client", 600, False)
    # The unnamed port joins "" and a missing name alike; bad endpoints are skipped.
    assert endpoints(web) == {"10.244.1.20:8080": "active", "10.244.1.22:8080": "active"}

    dns_udp = specs[("kube-system/kube-dns", 53, "udp")]
    dns_tcp = specs[("kube-system/kube-dns", 53, "tcp")]
    assert (dns_udp.port_name, dns_tcp.port_name) == ("dns", "dns-tcp")
    assert not dns_udp.llm and dns_udp.affinity == "none" and dns_udp.problems == ()
    assert set(endpoints(dns_udp)) == {"10.244.0.2:53", "10.244.0.3:53"}

    dual = specs[("default/dual", 80, "tcp")]
    assert dual.vip == ipaddress.IPv4Address("10.96.0.77") and dual.endpoints == ()
    assert dual.vip6 == ipaddress.IPv6Address("fd00:10:96::77")
    v6only = specs[("default/v6only", 80, "tcp")]
    assert (v6only.vip, v6only.vip6) == (ipaddress.IPv6Address("fd00:10:96::99"), None)

    typo = specs[("team-a/typo", 8000, "tcp")]
    assert not typo.llm and typo.affinity == "none" and typo.table_size is None
    assert len(typo.problems) == 2
    assert "service team-a/typo: annotation kvroute.io/affinity='sticky'" in typo.problems[0]
    assert "kvroute.io/table-size='1000'" in typo.problems[1]
    assert endpoints(typo) == {"10.244.5.5:8000": "active"}

    notes = "\n".join(result.notes)
    for expected in (
        "default/bare: no clusterIP",
        "default/noports: no ports",
        "default/diameter: ports[0] protocol 'SCTP'",
        "llm-7xk2p endpoints[4] has no addresses",
        "web-garbage endpoints[0] address 'not-an-ip'",
        "web-garbage endpoints[1] condition ready='yes'",
        "web-garbage endpoints[2] is not an object",
        "team-a/typo: annotations ignored",
    ):
        assert expected in notes
    assert "headless" not in notes and "external" not in notes  # normal, not noteworthy
    assert len(result.notes) == len(set(result.notes))


def test_beside_kube_proxy_only_annotated_services_are_taken() -> None:
    services = fixture("services.json")["items"]
    slices = fixture("endpointslices.json")["items"]
    every = {s.name for s in k8sobjects.build(services, slices).specs}
    annotated = {s.name for s in k8sobjects.build(services, slices, annotated_only=True).specs}
    expected = {f"{s['metadata'].get('namespace', '')}/{s['metadata']['name']}"
                for s in services if k8sobjects.is_annotated(s)}
    # The recorded objects hold both kinds, so the test can fail either way.
    assert annotated and every - annotated
    assert annotated == every & expected
    assert "kube-system/kube-dns" in every - annotated  # kube-proxy keeps DNS
    # A typo in a kvroute.io/ key still opts the service in (balanced plainly, noted).
    assert "team-a/typo" in annotated


def _slice(name: str, service: str, family: str, endpoints: list[dict[str, Any]],
           protocol: str = "UDP") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "kube-system",
                         "labels": {k8sobjects.SERVICE_NAME_LABEL: service}},
            "addressType": family, "ports": [{"name": "dns", "port": 53, "protocol": protocol}],
            "endpoints": endpoints}


def _ep(address: str, pod: str | None, ready: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"addresses": [address], "conditions": {"ready": ready}}
    if pod is not None:
        out["targetRef"] = {"kind": "Pod", "namespace": "kube-system", "name": pod}
    return out


def test_dual_stack_udp_service_pairs_each_pod_s_two_addresses() -> None:
    """One spec with both VIPs; each pod one endpoint with both addresses; an endpoint
    whose other family is not listed yet waits, with a note."""
    svc = {"metadata": {"name": "dns", "namespace": "kube-system"},
           "spec": {"clusterIP": "fd00:96::a", "clusterIPs": ["fd00:96::a", "10.96.0.10"],
                    "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}}
    slices = [
        _slice("dns-v4", "dns", "IPv4", [_ep("10.244.0.2", "coredns-a"),
                                         _ep("10.244.0.3", "coredns-b", ready=False),
                                         _ep("10.244.0.4", "coredns-c")]),
        _slice("dns-v6", "dns", "IPv6", [_ep("fd00:244::2", "coredns-a"),
                                         _ep("fd00:244::3", "coredns-b"),
                                         _ep("fd00:244::5", None)]),
        _slice("dns-fqdn", "dns", "FQDN", [_ep("dns.example", "coredns-a")]),
    ]
    result = k8sobjects.build([svc], slices)
    (spec,) = result.specs
    assert (spec.vip, spec.vip6, spec.protocol) == (
        ipaddress.IPv4Address("10.96.0.10"), ipaddress.IPv6Address("fd00:96::a"), "udp")
    got = {(str(e.address), str(e.address6), e.state.value) for e in spec.endpoints}
    # coredns-b is not ready in one family: the pair is not ready.
    assert got == {("10.244.0.2", "fd00:244::2", "active"),
                   ("10.244.0.3", "fd00:244::3", "excluded")}
    notes = "\n".join(result.notes)
    assert "10.244.0.4:53 has no IPv6 endpoint of the same pod yet" in notes
    assert "IPv6 endpoint fd00:244::5 has no targetRef" in notes


def test_ipv6_only_service_takes_ipv6_slices_only() -> None:
    svc = {"metadata": {"name": "dns", "namespace": "kube-system"},
           "spec": {"clusterIP": "fd00:96::a", "ports": [{"name": "dns", "port": 53,
                                                          "protocol": "UDP"}]}}
    slices = [_slice("dns-v4", "dns", "IPv4", [_ep("10.244.0.2", "coredns-a")]),
              _slice("dns-v6", "dns", "IPv6", [_ep("fd00:244::2", "coredns-a")])]
    (spec,) = k8sobjects.build([svc], slices).specs
    assert spec.vip == ipaddress.IPv6Address("fd00:96::a") and spec.vip6 is None
    assert [(str(e.address), e.address6) for e in spec.endpoints] == [("fd00:244::2", None)]


def test_build_survives_any_shape() -> None:
    junk: list[Any] = [
        {},
        {"metadata": None},
        {"metadata": {"name": 3}},
        {"metadata": {"name": "a", "namespace": "n"}, "spec": "nope"},
        {"metadata": {"name": "b", "namespace": "n"}, "spec": {"clusterIP": "x", "ports": [1]}},
        {
            "metadata": {"name": "c", "namespace": "n"},
            "spec": {"clusterIP": "10.0.0.1", "ports": 5},
        },
        {
            "metadata": {"name": "d", "namespace": "n", "annotations": ["x"]},
            "spec": {"clusterIP": "10.0.0.2", "ports": [{"port": 80, "name": 7}, {"port": True}]},
        },
    ]
    slices: list[Any] = [
        {
            "metadata": {
                "name": "s",
                "namespace": "n",
                "labels": {"kubernetes.io/service-name": "d"},
            },
            "addressType": "IPv4",
            "ports": "x",
            "endpoints": {"a": 1},
        },
        "garbage",
    ]
    result = k8sobjects.build(junk, slices)
    assert result.specs == []
    assert "skipping a Service without metadata.name" in result.notes
    assert any("n/d: ports[0] has a non-string name" in n for n in result.notes)


def test_duplicate_vip_keeps_the_first() -> None:
    svc = fixture("services.json")["items"][1]  # default/web, 10.96.0.20:80
    clash = copy.deepcopy(svc)
    clash["metadata"]["name"] = "web2"
    result = k8sobjects.build([clash, svc], [])
    assert [s.name for s in result.specs] == ["default/web"]
    assert any(
        "default/web2: 10.96.0.20:80/tcp is already used by default/web" in n for n in result.notes
    )


@pytest.mark.parametrize(
    ("annotations", "client_ip", "timeout", "expected"),
    [
        ({}, False, None, ("none", 0)),
        ({}, True, None, ("client", discovered.DEFAULT_AFFINITY_TIMEOUT)),
        ({}, True, 60, ("client", 60)),
        ({discovered.AFFINITY: "session"}, True, 60, ("session", 60)),
        ({discovered.AFFINITY: "none"}, True, 60, ("none", 0)),
        ({discovered.AFFINITY: "client", discovered.AFFINITY_TIMEOUT: "30"}, False, None,
         ("client", 30)),
        ({"example.com/other": "x"}, False, None, ("none", 0)),
    ],
)
def test_affinity_from_annotations_and_session_affinity(
    annotations: dict[str, str], client_ip: bool, timeout: int | None, expected: tuple[str, int]
) -> None:
    options, problems = discovered.parse_options(
        "ns/s", annotations, client_ip_affinity=client_ip, client_ip_timeout=timeout
    )
    assert problems == ()
    assert (options.affinity, options.affinity_timeout) == expected


def test_bad_annotation_falls_back_to_kube_proxy_behaviour() -> None:
    options, problems = discovered.parse_options(
        "ns/s",
        {discovered.ENGINE: "vllm", discovered.EPSILON: "-1", discovered.AFFINITY: "session"},
        client_ip_affinity=True,
        client_ip_timeout=90,
    )
    # Nothing of the annotations half-applies; ClientIP is kept as kube-proxy would.
    assert options == discovered.Options(affinity="client", affinity_timeout=90)
    assert problems == (
        "service ns/s: annotation kvroute.io/epsilon='-1': must be a finite number in [0, 10], "
        "got -1.0",
    )
    _, problems = discovered.parse_options("ns/s", {"kvroute.io/enigne": "vllm"})
    assert "unknown kvroute annotation" in problems[0] and "kvroute.io/engine" in problems[0]
    options, problems = discovered.parse_options("ns/s", {discovered.BREAKER_FAILURE_RATIO: "1.5"})
    assert problems and options == discovered.Options()
    _, problems = discovered.parse_options("ns/s", {}, client_ip_affinity=True, client_ip_timeout=0)
    assert "timeoutSeconds" in problems[0]


# --- the real client against the fake API server ------------------------------------


def test_initial_list_then_watch_from_its_version(
    server: FakeApiServer, discovery: k8s.KubernetesDiscovery
) -> None:
    source: discovered.Discovery = discovery  # mypy checks the protocol
    discovery.start()
    assert discovery.wait_synced(5)
    specs = by_port(source.snapshot())
    assert len(specs) == 10  # the recorded IPv6-only service counts too
    assert endpoints(specs[("default/llm", 80, "tcp")])["10.244.2.11:8000"] == "draining"
    wait_for(lambda: all(server.active.values()), what="both watches")

    for resource in k8s.KINDS:
        (listed,) = server.seen(resource, "list")
        assert listed.path.startswith("/api/v1/") or listed.path.startswith("/apis/discovery")
        assert listed.auth == f"Bearer {TOKEN}"
        assert listed.params["limit"] == "500"
        (watched,) = server.seen(resource, "watch")
        assert watched.params["resourceVersion"] == "1000"  # the list's version
        assert watched.params["allowWatchBookmarks"] == "true"
        assert watched.params["timeoutSeconds"] == "300"
    assert server.seen(k8s.ENDPOINT_SLICES, "watch")[0].params["labelSelector"] == (
        "kubernetes.io/service-name"
    )
    assert discovery.resource_versions() == {k8s.SERVICES: "1000", k8s.ENDPOINT_SLICES: "1000"}


def _run_watch(
    discovery: k8s.KubernetesDiscovery,
    steps: list[Callable[[], object]],
) -> list[list[discovered.ServiceSpec]]:
    """Collect the first yield, then one yield after each step."""

    async def main() -> list[list[discovered.ServiceSpec]]:
        gen = discovery.watch()
        seen = [await asyncio.wait_for(anext(gen), 5)]
        try:
            for step in steps:
                await asyncio.to_thread(step)
                seen.append(await asyncio.wait_for(anext(gen), 5))
        finally:
            await gen.aclose()
        return seen

    return asyncio.run(main())


def test_added_modified_deleted_events(
    server: FakeApiServer,
    discovery: k8s.KubernetesDiscovery,
    caplog: pytest.LogCaptureFixture,
) -> None:
    services = fixture("services.json")["items"]
    llm_svc, web_svc = services[0], services[1]
    new_svc = copy.deepcopy(web_svc)
    new_svc["metadata"].update(name="chat", namespace="team-b")
    new_svc["spec"].update(clusterIP="10.96.3.3", clusterIPs=["10.96.3.3"])
    bad_llm = copy.deepcopy(llm_svc)
    bad_llm["metadata"]["annotations"]["kvroute.io/probe-share"] = "1.5"

    steps: list[Callable[[], object]] = [
        lambda: server.change(
            k8s.ENDPOINT_SLICES, "MODIFIED", fixture("endpointslice-llm-rollout.json")
        ),
        lambda: server.change(k8s.SERVICES, "ADDED", new_svc),
        lambda: server.change(k8s.SERVICES, "DELETED", web_svc),
        lambda: server.change(k8s.SERVICES, "MODIFIED", bad_llm),
    ]
    with caplog.at_level(logging.WARNING, logger=k8s.__name__):
        seen = _run_watch(discovery, steps)
    first, rollout, added, deleted, bad = (by_port(s) for s in seen)

    assert endpoints(first[("default/llm", 80, "tcp")])["10.244.1.10:8000"] == "active"
    # vllm-0 terminating (still serving: draining), vllm-4 new; vllm-1/vllm-2 and the
    # address-less entry went with the old version of that slice.
    assert endpoints(rollout[("default/llm", 80, "tcp")]) == {
        "10.244.1.10:8000": "draining",
        "10.244.2.14:8000": "active",
        "10.244.3.15:8000": "active",
    }
    assert endpoints(rollout[("default/llm", 9000, "tcp")]) == {
        "10.244.1.10:9001": "draining",
        "10.244.3.15:9001": "active",
    }
    assert ("team-b/chat", 80, "tcp") in added and ("team-b/chat", 80, "tcp") not in rollout
    assert ("default/web", 80, "tcp") not in deleted and ("default/web", 80, "tcp") in added
    llm = bad[("default/llm", 80, "tcp")]
    assert not llm.llm and llm.affinity == "none" and llm.table_size is None
    assert "kvroute.io/probe-share='1.5'" in llm.problems[0]
    # Logged once, however many times the list is rebuilt.
    assert caplog.text.count("kvroute.io/probe-share='1.5'") == 1
    discovery.snapshot()
    assert caplog.text.count("kvroute.io/probe-share='1.5'") == 1
    # Watching resumed nowhere: one list per kind, and the watches are the first ones.
    assert len(server.seen(k8s.SERVICES, "list")) == 1
    assert len(server.seen(k8s.SERVICES, "watch")) == 1


def test_watch_that_ends_resumes_from_the_last_version(
    server: FakeApiServer, discovery: k8s.KubernetesDiscovery
) -> None:
    web_svc = fixture("services.json")["items"][1]
    discovery.start()
    assert discovery.wait_synced(5)
    wait_for(lambda: server.active[k8s.SERVICES] == 1, what="services watch")

    changed = copy.deepcopy(web_svc)
    changed["spec"]["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"] = 60
    rv1 = server.change(k8s.SERVICES, "MODIFIED", changed)
    wait_for(lambda: discovery.resource_versions()[k8s.SERVICES] == str(rv1), what="event")

    # The watch ends; its reconnection fails once (500), and meanwhile a service goes.
    server.fail_next(k8s.SERVICES, "watch", 500)
    server.command(k8s.SERVICES, "end")
    wait_for(lambda: len(server.seen(k8s.SERVICES, "watch")) >= 2, what="reconnect")
    rv2 = server.change(k8s.SERVICES, "DELETED", changed)
    wait_for(lambda: len(server.seen(k8s.SERVICES, "watch")) >= 3, what="second reconnect")
    wait_for(lambda: discovery.resource_versions()[k8s.SERVICES] == str(rv2), what="replay")

    watches = server.seen(k8s.SERVICES, "watch")
    assert [w.params["resourceVersion"] for w in watches[:3]] == ["1000", str(rv1), str(rv1)]
    assert len(server.seen(k8s.SERVICES, "list")) == 1  # resumed, never listed again
    assert ("default/web", 80, "tcp") not in by_port(discovery.snapshot())
    assert discovery.synced


def test_410_gone_event_relists(server: FakeApiServer, discovery: k8s.KubernetesDiscovery) -> None:
    discovery.start()
    assert discovery.wait_synced(5)
    wait_for(lambda: server.active[k8s.ENDPOINT_SLICES] == 1, what="slices watch")
    slices = fixture("endpointslices.json")["items"]

    # History lost: the slice of web disappears with no event anyone can replay.
    server.change(k8s.ENDPOINT_SLICES, "DELETED", slices[3], record=False)
    with server.cond:
        server.compacted = server.rv
    server.command(k8s.ENDPOINT_SLICES, "gone")
    wait_for(lambda: len(server.seen(k8s.ENDPOINT_SLICES, "list")) == 2, what="relist")
    wait_for(
        lambda: (
            "10.244.1.20:8080"
            not in endpoints(by_port(discovery.snapshot())[("default/web", 80, "tcp")])
        ),
        what="state from the relist",
    )
    wait_for(lambda: len(server.seen(k8s.ENDPOINT_SLICES, "watch")) == 2, what="new watch")
    assert server.seen(k8s.ENDPOINT_SLICES, "watch")[1].params["resourceVersion"] == str(server.rv)
    assert len(server.seen(k8s.SERVICES, "list")) == 1  # only the expired kind relists


def test_410_status_and_stale_version_relist(
    server: FakeApiServer, discovery: k8s.KubernetesDiscovery
) -> None:
    discovery.start()
    assert discovery.wait_synced(5)
    wait_for(lambda: server.active[k8s.SERVICES] == 1, what="services watch")
    # The API server answers a watch from a compacted version with an HTTP 410 too.
    server.fail_next(k8s.SERVICES, "watch", 410)
    server.command(k8s.SERVICES, "end")
    wait_for(lambda: len(server.seen(k8s.SERVICES, "list")) == 2, what="relist after 410")
    # And a watch the server starts at a compacted version answers with an ERROR event.
    with server.cond:
        server.compacted = server.rv + 1
    server.command(k8s.SERVICES, "end")
    wait_for(lambda: len(server.seen(k8s.SERVICES, "list")) == 3, what="relist after ERROR")
    with server.cond:
        server.compacted = 0
    wait_for(lambda: server.active[k8s.SERVICES] == 1, what="watching again")
    assert discovery.synced and len(discovery.snapshot()) == 10


def test_bookmarks_garbage_and_errors_on_the_stream(
    server: FakeApiServer, discovery: k8s.KubernetesDiscovery
) -> None:
    discovery.start()
    assert discovery.wait_synced(5)
    wait_for(lambda: server.active[k8s.SERVICES] == 1, what="services watch")
    bookmark = {
        "type": "BOOKMARK",
        "object": {"kind": "Service", "apiVersion": "v1", "metadata": {"resourceVersion": "1234"}},
    }
    server.command(k8s.SERVICES, "raw", "this is not json")
    server.command(k8s.SERVICES, "raw", json.dumps({"type": "ADDED", "object": {"spec": {}}}))
    server.command(k8s.SERVICES, "raw", json.dumps({"type": "WEIRD", "object": {}}))
    server.command(k8s.SERVICES, "raw", json.dumps(bookmark))
    wait_for(lambda: discovery.resource_versions()[k8s.SERVICES] == "1234", what="bookmark")
    assert len(discovery.snapshot()) == 10  # the nameless object changed nothing

    # A non-410 ERROR event: reconnect from where we were, no relist.
    error = {
        "type": "ERROR",
        "object": {
            "kind": "Status",
            "code": 500,
            "reason": "InternalError",
            "message": "etcd hiccup",
        },
    }
    server.command(k8s.SERVICES, "raw", json.dumps(error))
    wait_for(lambda: len(server.seen(k8s.SERVICES, "watch")) >= 2, what="reconnect")
    assert server.seen(k8s.SERVICES, "watch")[1].params["resourceVersion"] == "1234"
    assert len(server.seen(k8s.SERVICES, "list")) == 1


def test_list_failures_are_retried(server: FakeApiServer, api: kubernetes.client.ApiClient) -> None:
    server.fail_next(k8s.SERVICES, "list", 500)
    server.fail_next(k8s.SERVICES, "list", 403)
    with k8s.KubernetesDiscovery(api, FAST) as disc:
        assert disc.wait_synced(5)
        assert len(server.seen(k8s.SERVICES, "list")) == 3
        assert len(disc.snapshot()) == 10


def test_watch_waits_for_both_kinds(
    server: FakeApiServer, api: kubernetes.client.ApiClient
) -> None:
    # Slices unavailable at first: yielding services without endpoints would drain them all.
    for _ in range(3):
        server.fail_next(k8s.ENDPOINT_SLICES, "list", 503)
    with k8s.KubernetesDiscovery(api, FAST) as disc:
        (first,) = _run_watch(disc, [])
    assert len(server.seen(k8s.ENDPOINT_SLICES, "list")) == 4
    assert endpoints(by_port(first)[("default/llm", 80, "tcp")])["10.244.2.14:8000"] == "active"


def test_namespace_selector_and_paging(
    server: FakeApiServer, api: kubernetes.client.ApiClient
) -> None:
    settings = dataclasses.replace(
        FAST, namespace="default", label_selector="kvroute=on", page_size=2
    )
    with k8s.KubernetesDiscovery(api, settings) as disc:
        assert disc.wait_synced(5)
        specs = disc.snapshot()
    assert sorted({s.name for s in specs}) == ["default/llm"]
    assert len(by_port(specs)[("default/llm", 80, "tcp")].endpoints) == 5
    svc_lists = server.seen(k8s.SERVICES, "list")
    assert {r.path for r in svc_lists} == {"/api/v1/namespaces/default/services"}
    assert svc_lists[0].params["labelSelector"] == "kvroute=on"
    slice_lists = server.seen(k8s.ENDPOINT_SLICES, "list")
    # 6 slices in "default" carry the service-name label: three pages of two.
    assert [r.params.get("continue") for r in slice_lists] == [None, "2", "4"]
    assert {r.path for r in slice_lists} == {
        "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
    }


def test_close_interrupts_blocked_watches(
    server: FakeApiServer, api: kubernetes.client.ApiClient
) -> None:
    disc = k8s.KubernetesDiscovery(api, FAST)
    disc.start()
    assert disc.wait_synced(5)
    wait_for(lambda: all(server.active.values()), what="both watches")
    started = time.monotonic()
    disc.close()
    assert time.monotonic() - started < 1.0
    assert not [t for t in threading.enumerate() if t.name.startswith("kvroute-k8s-")]
    with pytest.raises(RuntimeError):
        disc.start()


def test_unreachable_api_server_backs_off_without_crashing() -> None:
    cfg = kubernetes.client.Configuration(host="http://127.0.0.1:9")  # discard: refused
    with kubernetes.client.ApiClient(cfg) as client:
        disc = k8s.KubernetesDiscovery(client, FAST)
        disc.start()
        assert not disc.wait_synced(0.3)
        assert disc.snapshot() == []
        disc.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("kvroute-k8s-")]


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError):
        k8s.Settings(namespace="")
    with pytest.raises(ValueError):
        k8s.Settings(backoff_initial=2, backoff_max=1)
