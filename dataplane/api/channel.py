"""The wire's transport settings, shared by both ends of the kvroute.v1 stream: keepalive,
message size, and mutual-TLS credentials from PEM files. Pure configuration; the servers
and clients that use it live with their owners (controller.grpc_server, dataplane.stream).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import grpc

# Dead peers are found by HTTP/2 pings even while a stream is idle; the server has to
# allow pings that often or it closes the connection with "too_many_pings".
KEEPALIVE_MS = 10_000
KEEPALIVE_TIMEOUT_MS = 5_000
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a full snapshot of a large fleet, with headroom

SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


@dataclasses.dataclass(frozen=True)
class TLSFiles:
    """PEM files for mutual TLS. The same shape serves both ends: each side presents
    ``cert``/``key`` and trusts peers signed by ``ca``."""

    ca: Path
    cert: Path
    key: Path
    # Client only: the name to check in the server's certificate when it differs from
    # the host in the target (e.g. dialling an IP whose cert names a DNS name).
    server_name: str | None = None

    def read(self) -> tuple[bytes, bytes, bytes]:
        return Path(self.ca).read_bytes(), Path(self.cert).read_bytes(), Path(self.key).read_bytes()


def server_credentials(tls: TLSFiles) -> grpc.ServerCredentials:
    ca, cert, key = tls.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=True)


def channel_credentials(tls: TLSFiles) -> grpc.ChannelCredentials:
    ca, cert, key = tls.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                        certificate_chain=cert)


def channel_options(tls: TLSFiles | None) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # The agent runs its own backoff with jitter; one attempt per channel.
        ("grpc.enable_retries", 0),
        # ... and a channel of its own: by default gRPC shares subchannels between
        # channels to the same target, with their own reconnect backoff (1 s, x1.6),
        # so a new channel after a controller restart could wait out a backoff the
        # agent never asked for (reconvergence up to 2.3 s instead of < 1 s).
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 500),
    ]
    if tls is not None and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return options
