"""Client helper: session hash vectors, socket tagging, and the httpx transports.

No root: the kvroute setsockopt hook is not attached to this process, so the
kernel answers ENOPROTOOPT, which is exactly the "not installed" path.  The
transport tests inject a recording tagger and talk to a local HTTP server.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import http.server
import logging
import socket
import struct
import sys
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from dataplane import client

# --- session hash -----------------------------------------------------------

_KB = "".join(chr(0x21 + i % 94) for i in range(1024))


@pytest.mark.parametrize(
    ("session", "hex16"),
    [
        ("", "e3b0c44298fc1c14"),  # the well-known SHA-256 of nothing
        ("user-42", "6d894aa3ee802549"),
        ("séance", "3795e14e1453e36a"),  # UTF-8, not Latin-1
        ("x" * 1024, "49abd65bbf7f7e40"),
    ],
)
def test_session_hash_vectors(session: str, hex16: str) -> None:
    assert client.session_hash(session) == int(hex16, 16)
    expected = int.from_bytes(hashlib.sha256(session.encode("utf-8")).digest()[:8], "big")
    assert client.session_hash(session) == expected


def test_session_hash_long_string_matches_hashlib() -> None:
    digest = hashlib.sha256(_KB.encode()).digest()
    assert client.session_hash(_KB) == struct.unpack(">Q", digest[:8])[0]
    assert client.session_hash(_KB) != client.session_hash(_KB[:-1])


def test_session_hash_zero_becomes_one(monkeypatch: pytest.MonkeyPatch) -> None:
    class Zero:
        def __init__(self, data: bytes) -> None:
            pass

        def digest(self) -> bytes:
            return bytes(32)

    monkeypatch.setattr(client.hashlib, "sha256", Zero)
    assert client.session_hash("anything") == 1


def test_constants() -> None:
    assert client.SOL_KVROUTE == 27510 == 0x6B76
    assert client.KVROUTE_SESSION == 1


# --- tag_session ------------------------------------------------------------


class _RecordingSocket:
    def __init__(self, fail: int | None = None) -> None:
        self.calls: list[tuple[int, int, bytes]] = []
        self.fail = fail

    def setsockopt(self, level: int, name: int, value: bytes) -> None:
        if self.fail is not None:
            raise OSError(self.fail, "refused")
        self.calls.append((level, name, value))


def test_tag_session_sets_native_u64_option() -> None:
    sock = _RecordingSocket()
    h = client.tag_session(sock, "user-42")  # type: ignore[arg-type]
    assert h == client.session_hash("user-42")
    assert sock.calls == [(0x6B76, 1, struct.pack("=Q", h))]
    assert client.tag_session(sock, 12345) == 12345  # type: ignore[arg-type]
    assert sock.calls[-1][2] == (12345).to_bytes(8, sys.byteorder)


@pytest.mark.parametrize("bad", [0, -1, 1 << 64])
def test_tag_session_rejects_out_of_range_hash(bad: int) -> None:
    with pytest.raises(ValueError, match="session hash"):
        client.tag_session(_RecordingSocket(), bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("code", [errno.ENOPROTOOPT, errno.EINVAL, errno.EOPNOTSUPP])
def test_tag_session_unavailable_errnos(code: int) -> None:
    with pytest.raises(client.SessionTagUnavailable) as info:
        client.tag_session(_RecordingSocket(fail=code), "s")  # type: ignore[arg-type]
    assert info.value.errno == code
    assert isinstance(info.value, OSError)


def test_tag_session_other_errors_propagate_unchanged() -> None:
    with pytest.raises(OSError) as info:
        client.tag_session(_RecordingSocket(fail=errno.EPERM), "s")  # type: ignore[arg-type]
    assert not isinstance(info.value, client.SessionTagUnavailable)
    assert info.value.errno == errno.EPERM


def test_tag_session_on_real_socket_without_kvroute() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            client.tag_session(sock, "user-42")
        except client.SessionTagUnavailable as exc:
            assert exc.errno == errno.ENOPROTOOPT
        else:
            pytest.skip("a kvroute setsockopt hook is attached to this process's cgroup")


# --- transports against a local server ---------------------------------------


class _Server:
    def __init__(self) -> None:
        self.seen: list[tuple[str | None, int]] = []
        seen = self.seen

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, so reuse is observable

            def do_GET(self) -> None:
                seen.append((self.headers.get("X-Session-ID"), self.client_address[1]))
                body = f"port={self.client_address[1]}".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def ports(self, session: str | None) -> set[int]:
        return {port for sid, port in self.seen if sid == session}

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    yield srv
    srv.stop()


class _Recorder:
    """A tagger that records (hash, whether the socket was still unconnected)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, bool]] = []

    def __call__(self, sock: socket.socket, session: str | int) -> int:
        assert isinstance(session, int)
        try:
            sock.getpeername()
            unconnected = False
        except OSError:
            unconnected = True
        self.calls.append((session, unconnected))
        return session


_SESSIONS = ["alice", "bob", "alice", "carol", "bob", "alice"]


def _check_per_session_connections(
    server: _Server, recorder: _Recorder, sessions: list[str]
) -> None:
    per_session = {s: server.ports(s) for s in set(sessions)}
    for s, ports in per_session.items():
        assert len(ports) == 1, (s, server.seen)  # one connection, reused
    all_ports = [p for ports in per_session.values() for p in ports]
    assert len(set(all_ports)) == len(per_session)  # no sharing across sessions
    # Tagged once per connection, with the session's hash, before connect().
    assert sorted(recorder.calls) == sorted((client.session_hash(s), True) for s in per_session)


def test_sync_transport_one_tagged_connection_per_session(server: _Server) -> None:
    recorder = _Recorder()
    with httpx.Client(transport=client.SessionTransport(tagger=recorder)) as http:
        for s in _SESSIONS:
            r = http.get(server.url, headers={"X-Session-ID": s})
            assert r.status_code == 200
        untagged = [http.get(server.url).text for _ in range(2)]
    _check_per_session_connections(server, recorder, _SESSIONS)
    assert len(server.ports(None)) == 1 and untagged[0] == untagged[1]
    assert server.ports(None).isdisjoint(server.ports("alice") | server.ports("bob"))


def test_async_transport_one_tagged_connection_per_session(server: _Server) -> None:
    recorder = _Recorder()

    async def run() -> None:
        transport = client.AsyncSessionTransport(tagger=recorder)
        async with httpx.AsyncClient(transport=transport) as http:
            for s in _SESSIONS:
                r = await http.get(server.url, headers={"X-Session-ID": s})
                assert r.status_code == 200 and r.text.startswith("port=")
            await http.get(server.url)

    asyncio.run(run())
    _check_per_session_connections(server, recorder, _SESSIONS)
    assert len(server.ports(None)) == 1


def test_concurrent_requests_of_one_session_share_its_connection(server: _Server) -> None:
    recorder = _Recorder()

    async def run() -> None:
        transport = client.AsyncSessionTransport(tagger=recorder)
        async with httpx.AsyncClient(transport=transport) as http:
            await asyncio.gather(
                *(http.get(server.url, headers={"X-Session-ID": "busy"}) for _ in range(5))
            )

    asyncio.run(run())
    assert len(server.seen) == 5 and len(server.ports("busy")) == 1
    assert len(recorder.calls) == 1


def test_header_name_is_configurable(server: _Server) -> None:
    recorder = _Recorder()
    transport = client.SessionTransport(header="X-Conversation", tagger=recorder)
    with httpx.Client(transport=transport) as http:
        http.get(server.url, headers={"X-Conversation": "c1"})
        http.get(server.url, headers={"X-Session-ID": "ignored"})
    assert recorder.calls == [(client.session_hash("c1"), True)]


def test_lru_evicts_and_closes_oldest_session(server: _Server) -> None:
    recorder = _Recorder()
    transport = client.SessionTransport(max_sessions=2, tagger=recorder)
    with httpx.Client(transport=transport) as http:
        for s in ["a", "b", "a", "c", "a", "b"]:  # c evicts b (a was used last)
            http.get(server.url, headers={"X-Session-ID": s})
    assert len(server.ports("a")) == 1
    assert len(server.ports("b")) == 2  # reconnected after eviction
    assert [h for h, _ in recorder.calls] == [client.session_hash(s) for s in "abcb"]


def test_unavailable_tagging_warns_once_and_keeps_working(
    server: _Server, caplog: pytest.LogCaptureFixture
) -> None:
    attempts: list[int] = []

    def refusing(sock: socket.socket, session: str | int) -> int:
        attempts.append(int(session))
        raise client.SessionTagUnavailable(errno.ENOPROTOOPT, "no kvroute")

    caplog.set_level(logging.WARNING, logger="dataplane.client")
    with httpx.Client(transport=client.SessionTransport(tagger=refusing)) as http:
        for s in ["a", "b", "c", "a"]:
            assert http.get(server.url, headers={"X-Session-ID": s}).status_code == 200
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "untagged" in warnings[0].getMessage()
    assert attempts == [client.session_hash("a")]  # no further syscalls after the refusal
    assert len(server.ports("a")) == 1 and len(server.ports("b")) == 1


def test_default_tagger_on_this_machine_falls_back(server: _Server) -> None:
    # The real tag_session: without kvroute the kernel refuses, requests still work.
    with httpx.Client(transport=client.SessionTransport()) as http:
        r = http.get(server.url, headers={"X-Session-ID": "real"})
    assert r.status_code == 200 and len(server.ports("real")) == 1


def test_connect_errors_are_httpx_errors() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, not listening: connection refused
        with (
            httpx.Client(transport=client.SessionTransport(tagger=_Recorder())) as http,
            pytest.raises(httpx.ConnectError),
        ):
            http.get(f"http://127.0.0.1:{port}/", headers={"X-Session-ID": "x"})


def test_max_sessions_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_sessions"):
        client.SessionTransport(max_sessions=0)
