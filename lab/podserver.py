"""A tiny HTTP server that says which pod answered, and the client helpers that ask it.

``python -m lab.podserver --name gpu0 --port 8000`` answers any HTTP/1.x request with 200,
``X-Pod: gpu0`` and the body ``gpu0``, over IPv4 and IPv6; any UDP datagram to the same port
gets ``gpu0`` back. It stands in for an engine wherever a test only needs to know where a
connection or datagram landed, and is cheap enough for thousands of sequential connects.

Connections follow HTTP/1.x persistence rules: HTTP/1.1 stays open unless the client sends
``Connection: close``; HTTP/1.0 closes unless it sends ``Connection: keep-alive``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import signal
import socket
import time
import typing
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the server itself never needs the lab (keeps its start-up light)
    import lab.netns

MAX_HEAD = 64 * 1024
_REQUEST = b"GET / HTTP/1.0\r\n\r\n"


class BadRequest(ValueError):
    pass


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    """(method, version, headers with lower-case names) of a request head."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(f"not an HTTP/1.x request line: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise BadRequest(f"malformed header line: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return parts[0], parts[2], headers


def keep_alive(version: str, headers: dict[str, str]) -> bool:
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    if version == "HTTP/1.0":
        return "keep-alive" in tokens
    return "close" not in tokens


async def _drain_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> None:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                # Trailers end with an empty line.
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return
            await reader.readexactly(size + 2)
    length = int(headers.get("content-length", "0") or "0")
    if length:
        await reader.readexactly(length)


def response(name: bytes, version: str, keep: bool, head_only: bool = False) -> bytes:
    head = (
        f"{version} 200 OK\r\n"
        f"X-Pod: {name.decode()}\r\n"
        "Content-Type: text/plain\r\n"
        f"Content-Length: {len(name)}\r\n"
        f"Connection: {'keep-alive' if keep else 'close'}\r\n"
        "\r\n"
    )
    return head.encode() + (b"" if head_only else name)


async def _serve_connection(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: bytes
) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return  # client closed between requests
            try:
                method, version, headers = _parse_head(head[:-4])
                await _drain_body(reader, headers)
            except (BadRequest, ValueError):
                writer.write(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
                return
            keep = keep_alive(version, headers)
            writer.write(response(name, version, keep, head_only=method == "HEAD"))
            await writer.drain()
            if not keep:
                return
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


class _Echo(asyncio.DatagramProtocol):
    """Answers every datagram with the pod name, to its sender."""

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's selector datagram transport does not subclass DatagramTransport.
        self.transport = typing.cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if self.transport is not None:
            self.transport.sendto(self.name, addr)


def _udp_socket(host: str | None, port: int) -> socket.socket:
    """One UDP socket for both families where the host has IPv6 (v4 senders arrive as
    ::ffff:a.b.c.d), else an IPv4 one."""
    if host is None and socket.has_ipv6:
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", port))
            return sock
        except OSError:
            sock.close()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host or "0.0.0.0", port))
    return sock


async def serve(name: str, port: int, host: str | None = None) -> None:
    """Serve until SIGTERM or SIGINT; ``host`` None: every address of both families."""
    encoded = name.encode()
    server = await asyncio.start_server(
        lambda r, w: _serve_connection(r, w, encoded),
        host=host,
        port=port,
        reuse_address=True,
        backlog=1024,
        limit=MAX_HEAD,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    udp, _ = await loop.create_datagram_endpoint(lambda: _Echo(encoded),
                                                 sock=_udp_socket(host, port))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        print(f"podserver {name} listening on {host or '*'}:{port} (tcp, udp)", flush=True)
        await stop.wait()
    udp.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--name", required=True, help="pod name sent back in X-Pod and body")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default=None,
                        help="address to listen on (default: all, IPv4 and IPv6)")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.name, args.port, args.host))


# --- client side: used inside Pod.call, so plain blocking sockets, no event loop ---


def ask_on(sock: socket.socket) -> str:
    """Send one HTTP/1.0 GET on an already connected socket and return the pod name from the
    body. Reads until the server closes; the caller still owns (and closes) ``sock``."""
    sock.sendall(_REQUEST)
    chunks: list[bytes] = []
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            break
        chunks.append(chunk)
    data = b"".join(chunks)
    head, sep, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split(b" ")
    if not sep or len(status) < 2 or status[1] != b"200":
        raise ConnectionError(f"unexpected answer from {sock.getpeername()}: {data[:120]!r}")
    return body.decode()


def ask(address: str, port: int, timeout: float = 2.0) -> str:
    """Connect to ``address:port``, GET /, and return which pod answered."""
    with socket.create_connection((str(address), port), timeout=timeout) as sock:
        return ask_on(sock)


def _poll_listening(address: str, port: int, timeout: float) -> float:
    start = time.monotonic()
    deadline = start + timeout
    while True:
        try:
            with socket.create_connection((address, port), timeout=0.2):
                return time.monotonic() - start
        except OSError as e:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {address}:{port} after {timeout}s") from e
            if e.errno not in (errno.ECONNREFUSED, errno.ETIMEDOUT, None):
                raise
            time.sleep(0.02)


def wait_listening(pod: lab.netns.Pod, port: int, timeout: float = 10.0) -> float:
    """Block until something accepts on ``pod.address:port``, probing from inside the pod
    itself (so no host-side hook or route is involved). Returns the seconds waited."""
    return pod.call(_poll_listening, str(pod.address), port, timeout, timeout=timeout + 5)


if __name__ == "__main__":
    main()
