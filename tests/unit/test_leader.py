"""Lease leader election through the real `kubernetes` client against a fake
coordination.k8s.io/v1 server on 127.0.0.1 that enforces resourceVersion on writes."""

from __future__ import annotations

import copy
import http.server
import json
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest

from controller import leader

_ITEM = re.compile(
    r"^/apis/coordination\.k8s\.io/v1/namespaces/(?P<ns>[^/]+)/leases/(?P<name>[^/]+)$"
)
_COLL = re.compile(r"^/apis/coordination\.k8s\.io/v1/namespaces/(?P<ns>[^/]+)/leases$")


class LeaseServer:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.leases: dict[tuple[str, str], dict[str, Any]] = {}
        self.rv = 1
        self.fail: deque[int] = deque()  # statuses for the next requests, any verb
        self.writes: list[tuple[str, dict[str, Any]]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 2

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server._handle(self, "GET")

            def do_POST(self) -> None:
                server._handle(self, "POST")

            def do_PUT(self) -> None:
                server._handle(self, "PUT")

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = False
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,))
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()

    def holder(self) -> str | None:
        with self.lock:
            lease = self.leases.get(("kvroute", "ctl"))
            return None if lease is None else lease["spec"].get("holderIdentity")

    def spec(self) -> dict[str, Any]:
        with self.lock:
            return copy.deepcopy(self.leases[("kvroute", "ctl")]["spec"])

    def touch(self) -> None:
        """Another writer changed the lease (its resourceVersion moves on)."""
        with self.lock:
            self.rv += 1
            self.leases[("kvroute", "ctl")]["metadata"]["resourceVersion"] = str(self.rv)

    def _handle(self, h: http.server.BaseHTTPRequestHandler, verb: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = json.loads(h.rfile.read(length)) if length else None
        with self.lock:
            if self.fail:
                code = self.fail.popleft()
                return self._send(h, code, _status(code, "forced"))
            item, coll = _ITEM.match(h.path), _COLL.match(h.path)
            if verb == "GET" and item:
                lease = self.leases.get((item["ns"], item["name"]))
                if lease is None:
                    return self._send(h, 404, _status(404, "leases not found"))
                return self._send(h, 200, lease)
            if verb == "POST" and coll and body is not None:
                key = (coll["ns"], body["metadata"]["name"])
                if key in self.leases:
                    return self._send(h, 409, _status(409, "already exists"))
                return self._store(h, key, body, verb, 201)
            if verb == "PUT" and item and body is not None:
                key = (item["ns"], item["name"])
                current = self.leases.get(key)
                if current is None:
                    return self._send(h, 404, _status(404, "not found"))
                sent = body["metadata"].get("resourceVersion")
                if sent != current["metadata"]["resourceVersion"]:
                    return self._send(h, 409, _status(409, "the object has been modified"))
                return self._store(h, key, body, verb, 200)
            return self._send(h, 405, _status(405, "unsupported"))

    def _store(
        self,
        h: http.server.BaseHTTPRequestHandler,
        key: tuple[str, str],
        body: dict[str, Any],
        verb: str,
        code: int,
    ) -> None:
        self.writes.append((verb, copy.deepcopy(body)))
        self.rv += 1
        body = copy.deepcopy(body)
        body.update(kind="Lease", apiVersion="coordination.k8s.io/v1")
        body["metadata"]["resourceVersion"] = str(self.rv)
        self.leases[key] = body
        self._send(h, code, body)

    @staticmethod
    def _send(h: http.server.BaseHTTPRequestHandler, code: int, obj: dict[str, Any]) -> None:
        data = json.dumps(obj).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)


def _status(code: int, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "code": code,
        "message": message,
    }


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def server() -> Iterator[LeaseServer]:
    srv = LeaseServer()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def api(server: LeaseServer) -> Iterator[kubernetes.client.ApiClient]:
    with kubernetes.client.ApiClient(kubernetes.client.Configuration(host=server.url)) as c:
        yield c


def elector(
    api: kubernetes.client.ApiClient, who: str, clock: Clock, changes: list[bool] | None = None
) -> leader.LeaderElector:
    cfg = leader.Config(namespace="kvroute", name="ctl", identity=who)
    return leader.LeaderElector(
        api, cfg, clock=clock, on_change=None if changes is None else changes.append
    )


def test_decide() -> None:
    rec = leader.Record("a", 15, 2, None, None, "7")
    args = {"now": 100.0, "observed_at": 90.0, "default_duration": 15.0}
    assert leader.decide(None, "b", **args) == "create"
    assert leader.decide(rec, "a", **args) == "renew"
    assert leader.decide(rec, "b", **args) == "wait"
    assert leader.decide(rec, "b", now=105.0, observed_at=90.0, default_duration=1) == "take"
    released = leader.Record(None, 15, 2, None, None, "8")
    assert leader.decide(released, "b", **args) == "take"
    no_duration = leader.Record("a", None, 0, None, None, "9")
    assert leader.decide(no_duration, "b", now=104.0, observed_at=90.0, default_duration=15) == (
        "wait"
    )


def test_one_leader_and_takeover_after_expiry(
    server: LeaseServer, api: kubernetes.client.ApiClient
) -> None:
    clock = Clock()
    a_changes: list[bool] = []
    a, b = elector(api, "a", clock, a_changes), elector(api, "b", clock)
    assert a.try_acquire_or_renew() and server.holder() == "a"
    assert server.writes[0][0] == "POST"
    assert not b.try_acquire_or_renew()  # first sight of a's record

    clock.t += 2
    first_renew = server.spec()["renewTime"]
    assert a.try_acquire_or_renew()
    spec = server.spec()
    assert spec["renewTime"] != first_renew and spec["leaseTransitions"] == 0
    assert server.writes[-1][1]["metadata"]["resourceVersion"]  # optimistic concurrency

    # a renewed 2 s after b first looked: b's count starts again from the new record.
    clock.t += 14
    assert not b.try_acquire_or_renew()
    clock.t += 15.5  # a silent for longer than the lease (by b's own clock)
    assert b.try_acquire_or_renew() and server.holder() == "b"
    assert server.spec()["leaseTransitions"] == 1

    # a comes back: it sees b's name on the lease and stops at once.
    assert not a.try_acquire_or_renew()
    assert a_changes == [True, False]


def test_a_lost_race_is_a_409_not_a_takeover(
    server: LeaseServer, api: kubernetes.client.ApiClient
) -> None:
    clock = Clock()
    a = elector(api, "a", clock)
    assert a.try_acquire_or_renew()
    lease_api = kubernetes.client.CoordinationV1Api(api)
    original = lease_api.read_namespaced_lease
    # Another writer slips in between a's read and a's write.

    def read_then_touch(*args: Any, **kwargs: Any) -> Any:
        got = original(*args, **kwargs)
        server.touch()
        return got

    a._api.read_namespaced_lease = read_then_touch  # type: ignore[method-assign]
    writes = len(server.writes)
    assert a.try_acquire_or_renew()  # still leading: well within the renew deadline
    assert len(server.writes) == writes  # the stale write was refused
    clock.t += 10
    assert not a.try_acquire_or_renew()  # renewals kept failing for renew_deadline


def test_renew_failures_stop_leading_before_the_lease_expires(
    server: LeaseServer, api: kubernetes.client.ApiClient
) -> None:
    clock = Clock()
    changes: list[bool] = []
    a = elector(api, "a", clock, changes)
    assert a.try_acquire_or_renew()
    server.fail.extend([500] * 10)
    clock.t += 9.9
    assert a.try_acquire_or_renew()  # one failed round is not the end
    clock.t += 0.1
    assert not a.try_acquire_or_renew()  # renew_deadline (10 s) < lease_duration (15 s)
    assert changes == [True, False]


def test_release_hands_over_at_once(server: LeaseServer, api: kubernetes.client.ApiClient) -> None:
    clock = Clock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    a.release()
    assert not a.is_leader and server.holder() is None
    assert b.try_acquire_or_renew() and server.holder() == "b"
    assert server.spec()["leaseTransitions"] == 1


def test_thread_campaigns_and_close_releases(
    server: LeaseServer, api: kubernetes.client.ApiClient
) -> None:
    changes: list[bool] = []
    cfg = leader.Config(
        namespace="kvroute",
        name="ctl",
        identity="pod-0",
        lease_duration=1.0,
        renew_deadline=0.5,
        retry_period=0.05,
    )
    e = leader.LeaderElector(api, cfg, on_change=changes.append)
    e.start()
    deadline = time.monotonic() + 5
    while not e.is_leader and time.monotonic() < deadline:
        time.sleep(0.01)
    assert e.is_leader and server.holder() == "pod-0"
    e.close()
    assert changes == [True, False] and server.holder() is None
    assert not [t for t in threading.enumerate() if t.name == "kvroute-leader"]


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="retry_period < renew_deadline < lease_duration"):
        leader.Config(namespace="n", name="l", identity="i", renew_deadline=20)
    with pytest.raises(ValueError):
        leader.Config(namespace="", name="l", identity="i")
