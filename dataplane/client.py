"""kvroute client helper: tag connections with a session before ``connect()``.

For application pods (no bcc, no root).  On a node running kvroute, a Service
with ``affinity: session`` sends every connection whose socket carries the same
session tag to the same backend (the engine holding that session's KV cache).
The tag is a u64 set with ``setsockopt(SOL_KVROUTE, KVROUTE_SESSION, u64)``
*before* ``connect()``; kvroute's ``cgroup/setsockopt`` program keeps it and
hides the option from the kernel.  Untagged sockets fall back to client affinity.

Session hash (stable; implement it the same way in any language)::

    h = big-endian u64 of the first 8 bytes of SHA-256(UTF-8 bytes of the session ID)
    if h == 0: h = 1          # 0 means "untagged" to the kernel

The option value is that u64 in the host's byte order (``struct.pack("=Q", h)``,
a C ``__u64``).  ``SOL_KVROUTE = 0x6B76`` ("kv"), ``KVROUTE_SESSION = 1``.

One socket::

    sock = socket.socket()
    client.tag_session(sock, "user-42")        # raises SessionTagUnavailable off kvroute
    sock.connect(("10.96.0.10", 8000))

httpx (each ``X-Session-ID`` gets its own connection, tagged before connect)::

    import httpx
    from dataplane import client
    http = httpx.Client(transport=client.SessionTransport())
    http.post(url, json=body, headers={"X-Session-ID": "user-42"})

OpenAI's SDK takes an httpx client::

    openai.OpenAI(http_client=httpx.Client(transport=client.SessionTransport()))
    # per call: extra_headers={"X-Session-ID": "user-42"}

``AsyncSessionTransport`` is the same for ``httpx.AsyncClient`` (asyncio; written
against anyio, so trio should work too, but only asyncio is tested).

Requests without the header share one untagged pool.  Each session has a pool
of at most one connection (so all its requests reuse the connection the kernel
routed), kept in an LRU of ``max_sessions`` pools; the least recently used is
closed when a new session arrives.  Where kvroute is not installed, tagging
fails with ENOPROTOOPT: the transports log one warning and carry on untagged.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import logging
import os
import socket
import ssl
import struct
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

import anyio
import anyio.abc
import httpcore
import httpx

# httpcore keeps its stream classes private; they are the documented return
# types of NetworkBackend.connect_tcp, and wrapping a socket we connected
# ourselves is the only way to tag it before connect().
from httpcore._backends.anyio import AnyIOStream
from httpcore._backends.sync import SyncStream

SOL_KVROUTE = 0x6B76
KVROUTE_SESSION = 1
DEFAULT_HEADER = "X-Session-ID"
DEFAULT_MAX_SESSIONS = 1024

_U64_MAX = (1 << 64) - 1
# What the kernel answers for an unknown socket-option level when no kvroute
# program intercepts it (ENOPROTOOPT from ip_setsockopt); the others cover
# socket types and kernels that refuse differently.
_UNAVAILABLE = frozenset({errno.ENOPROTOOPT, errno.EINVAL, errno.EOPNOTSUPP})

log = logging.getLogger(__name__)

Tagger = Callable[[socket.socket, "str | int"], int]


class SessionTagUnavailable(OSError):
    """The kernel refused the session option: kvroute is not active for this socket."""


def session_hash(session_id: str) -> int:
    """The u64 a session ID is routed by (see the module docstring); never 0."""
    digest = hashlib.sha256(session_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") or 1


def tag_session(sock: socket.socket, session: str | int) -> int:
    """Tag ``sock`` (before ``connect()``) with a session ID or a precomputed hash.

    Returns the u64 tag.  Raises ``SessionTagUnavailable`` when the kernel does
    not know the option (kvroute is not installed on this node).
    """
    h = session_hash(session) if isinstance(session, str) else session
    if not 1 <= h <= _U64_MAX:
        raise ValueError(f"session hash must be in 1..2**64-1, got {h}")
    try:
        sock.setsockopt(SOL_KVROUTE, KVROUTE_SESSION, struct.pack("=Q", h))
    except OSError as exc:
        if exc.errno in _UNAVAILABLE:
            raise SessionTagUnavailable(
                exc.errno, f"kvroute session tagging is not available here: {exc.strerror}"
            ) from exc
        raise
    return h


# --- socket set-up shared by both backends ----------------------------------


class _Tagging:
    """Tags sockets for one transport; after the first refusal it stops trying."""

    def __init__(self, tagger: Tagger) -> None:
        self._tagger = tagger
        self._unavailable = False

    def tag(self, sock: socket.socket, h: int | None) -> None:
        if h is None or self._unavailable:
            return
        try:
            self._tagger(sock, h)
        except SessionTagUnavailable as exc:
            self._unavailable = True
            log.warning("session affinity disabled, connections go untagged: %s", exc)


def _prepare(
    family: int,
    kind: int,
    proto: int,
    tag: Callable[[socket.socket], None],
    local_address: str | None,
    socket_options: Iterable[Any] | None,
) -> socket.socket:
    sock = socket.socket(family, kind, proto)
    try:
        tag(sock)
        for option in socket_options or ():
            sock.setsockopt(*option)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if local_address is not None:
            sock.bind((local_address, 0))
    except BaseException:
        sock.close()
        raise
    return sock


@contextlib.contextmanager
def _connect_errors() -> Iterator[None]:
    try:
        yield
    except TimeoutError as exc:  # socket.timeout is an alias
        raise httpcore.ConnectTimeout(str(exc)) from exc
    except OSError as exc:
        raise httpcore.ConnectError(str(exc)) from exc


class _TaggingBackend(httpcore.NetworkBackend):
    """httpcore backend that tags each socket before it connects (SyncBackend tags after)."""

    def __init__(self, tag: Callable[[socket.socket], None]) -> None:
        self._tag = tag

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        with _connect_errors():
            last: OSError | None = None
            for family, kind, proto, _, addr in socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            ):
                sock = _prepare(family, kind, proto, self._tag, local_address, socket_options)
                try:
                    sock.settimeout(timeout)
                    sock.connect(addr)
                except OSError as exc:
                    sock.close()
                    last = exc
                    continue
                return SyncStream(sock)
            raise last or OSError(f"no address for {host}")

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        return httpcore.SyncBackend().connect_unix_socket(path, timeout, socket_options)


class _AsyncTaggingBackend(httpcore.AsyncNetworkBackend):
    """The anyio counterpart of ``_TaggingBackend`` (asyncio and trio)."""

    def __init__(self, tag: Callable[[socket.socket], None]) -> None:
        self._tag = tag

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        with _connect_errors():
            last: OSError | None = None
            infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            for family, kind, proto, _, addr in infos:
                sock = _prepare(family, kind, proto, self._tag, local_address, socket_options)
                sock.setblocking(False)
                try:
                    with anyio.fail_after(timeout):
                        await _connect(sock, addr)
                except OSError as exc:
                    sock.close()
                    if isinstance(exc, TimeoutError):
                        raise
                    last = exc
                    continue
                except BaseException:
                    sock.close()
                    raise
                # from_socket is recent in anyio (present in the installed 4.16).
                stream = await anyio.abc.SocketStream.from_socket(sock)
                return AnyIOStream(stream)
            raise last or OSError(f"no address for {host}")

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return await httpcore.AnyIOBackend().connect_unix_socket(path, timeout, socket_options)

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


async def _connect(sock: socket.socket, addr: Any) -> None:
    try:
        sock.connect(addr)
    except BlockingIOError:
        pass
    else:
        return
    await anyio.wait_writable(sock)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


# --- httpx transports --------------------------------------------------------


def _httpx_error(exc: Exception) -> Exception:
    # httpx names its transport errors after httpcore's; take the closest one.
    for cls in type(exc).__mro__:
        mapped = getattr(httpx, cls.__name__, None)
        if isinstance(mapped, type) and issubclass(mapped, httpx.TransportError):
            return mapped(str(exc))
    return httpx.TransportError(str(exc))


@contextlib.contextmanager
def _mapped() -> Iterator[None]:
    try:
        yield
    except httpcore.UnsupportedProtocol as exc:
        raise httpx.UnsupportedProtocol(str(exc)) from exc
    except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError) as exc:
        raise _httpx_error(exc) from exc


def _core_request(request: httpx.Request) -> httpcore.Request:
    return httpcore.Request(
        method=request.method,
        url=httpcore.URL(
            scheme=request.url.raw_scheme,
            host=request.url.raw_host,
            port=request.url.port,
            target=request.url.raw_path,
        ),
        headers=request.headers.raw,
        content=request.stream,
        extensions=request.extensions,
    )


class _SyncBody(httpx.SyncByteStream):
    def __init__(self, stream: Iterable[bytes]) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        with _mapped():
            yield from self._stream

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()


class _AsyncBody(httpx.AsyncByteStream):
    def __init__(self, stream: Any) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _mapped():
            async for chunk in self._stream:
                yield chunk

    async def aclose(self) -> None:
        aclose = getattr(self._stream, "aclose", None)
        if aclose is not None:
            await aclose()


class _SessionPools:
    """Session ID -> pool, least recently used first; shared by both transports."""

    def __init__(self, header: str, max_sessions: int, tagger: Tagger) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        self.header = header
        self.max_sessions = max_sessions
        self.tagging = _Tagging(tagger)
        self.pools: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.lock = threading.Lock()

    def get(self, request: httpx.Request, create: Callable[[int], Any]) -> tuple[Any, list[Any]]:
        """Return the pool for ``request`` and any pools evicted to make room."""
        session = request.headers.get(self.header)
        if session is None:
            return None, []
        evicted = []
        with self.lock:
            pool = self.pools.get(session)
            if pool is not None:
                self.pools.move_to_end(session)
                return pool, []
            pool = self.pools[session] = create(session_hash(session))
            while len(self.pools) > self.max_sessions:
                evicted.append(self.pools.popitem(last=False)[1])
        return pool, evicted

    def drain(self) -> list[Any]:
        with self.lock:
            pools = list(self.pools.values())
            self.pools.clear()
        return pools


def _ssl(verify: ssl.SSLContext | str | bool, trust_env: bool) -> ssl.SSLContext:
    return httpx.create_ssl_context(verify=verify, trust_env=trust_env)


class SessionTransport(httpx.BaseTransport):
    """httpx transport: one tagged connection per session ID header value.

    ``tagger`` is the function that tags a socket (``tag_session`` unless a test
    or a special platform passes another); it is called with the socket and the
    session hash, before ``connect()``.
    """

    def __init__(
        self,
        *,
        header: str = DEFAULT_HEADER,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        verify: ssl.SSLContext | str | bool = True,
        trust_env: bool = True,
        http2: bool = False,
        max_connections: int = 100,
        tagger: Tagger = tag_session,
    ) -> None:
        self._sessions = _SessionPools(header, max_sessions, tagger)
        self._ssl = _ssl(verify, trust_env)
        self._http2 = http2
        self._default = self._pool(None, max_connections)

    def _pool(self, h: int | None, max_connections: int) -> httpcore.ConnectionPool:
        tagging = self._sessions.tagging
        return httpcore.ConnectionPool(
            ssl_context=self._ssl,
            max_connections=max_connections,
            http2=self._http2,
            network_backend=_TaggingBackend(lambda sock: tagging.tag(sock, h)),
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        pool, evicted = self._sessions.get(request, lambda h: self._pool(h, 1))
        for old in evicted:
            old.close()
        if pool is None:
            pool = self._default
        with _mapped():
            resp = pool.handle_request(_core_request(request))
        return httpx.Response(
            status_code=resp.status,
            headers=resp.headers,
            stream=_SyncBody(resp.stream),
            extensions=resp.extensions,
        )

    def close(self) -> None:
        for pool in self._sessions.drain():
            pool.close()
        self._default.close()


class AsyncSessionTransport(httpx.AsyncBaseTransport):
    """The ``httpx.AsyncClient`` counterpart of ``SessionTransport``."""

    def __init__(
        self,
        *,
        header: str = DEFAULT_HEADER,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        verify: ssl.SSLContext | str | bool = True,
        trust_env: bool = True,
        http2: bool = False,
        max_connections: int = 100,
        tagger: Tagger = tag_session,
    ) -> None:
        self._sessions = _SessionPools(header, max_sessions, tagger)
        self._ssl = _ssl(verify, trust_env)
        self._http2 = http2
        self._default = self._pool(None, max_connections)

    def _pool(self, h: int | None, max_connections: int) -> httpcore.AsyncConnectionPool:
        tagging = self._sessions.tagging
        return httpcore.AsyncConnectionPool(
            ssl_context=self._ssl,
            max_connections=max_connections,
            http2=self._http2,
            network_backend=_AsyncTaggingBackend(lambda sock: tagging.tag(sock, h)),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        pool, evicted = self._sessions.get(request, lambda h: self._pool(h, 1))
        for old in evicted:
            await old.aclose()
        if pool is None:
            pool = self._default
        with _mapped():
            resp = await pool.handle_async_request(_core_request(request))
        return httpx.Response(
            status_code=resp.status,
            headers=resp.headers,
            stream=_AsyncBody(resp.stream),
            extensions=resp.extensions,
        )

    async def aclose(self) -> None:
        for pool in self._sessions.drain():
            await pool.aclose()
        await self._default.aclose()
