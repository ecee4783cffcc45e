"""pytest plugin guest.sh loads (``-p lab.kernels.slow_guest``): the lab's waits are
sized for real machines, and an emulated guest starts a Python process or answers a
child in tens of seconds, not in the 2-10 s those waits allow. Raised here, for the
guest only; nothing else changes."""

from __future__ import annotations

from typing import Any

import pyroute2.config

from lab import podserver

WAIT = 600.0  # seconds: a pod server's start, a namespace helper's answer


def pytest_configure(config: Any) -> None:
    pyroute2.config.default_communicate_timeout = int(WAIT)
    pyroute2.config.default_create_socket_timeout = int(WAIT)
    # conftest calls podserver.wait_listening(pod, port) with its default timeout.
    podserver.wait_listening.__defaults__ = (WAIT,)
