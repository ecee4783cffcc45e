"""Run code inside a lab network namespace (and optionally a cgroup).

Two ways in: :func:`spawn` starts a program (setns and cgroup join happen in the child between
fork and exec), :func:`call` forks the current interpreter and runs a Python function there,
sending its result or exception back pickled. ``call`` costs a fork, not an interpreter start,
so a test can run thousands of connects inside one namespace in a single call.

The parent never changes namespace itself: a setns in a threaded test process would move
whichever thread ran it and leak into everything else that thread does next.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from typing import IO, Any, TypeVar

import pyroute2.netns

import lab.cgroup

T = TypeVar("T")

_CLONE_NEWNET = 0x40000000
# Loaded once here, so children never go through the dynamic loader between fork and exec.
_LIBC = ctypes.CDLL(None, use_errno=True)

# Child exit codes that tell the parent which step failed before any result could be sent.
_EXIT_OK = 0
_EXIT_NO_REPORT = 70

_File = int | IO[Any] | None


class ChildError(RuntimeError):
    """The child in :func:`call` died without reporting a result."""


def netns_path(netns: str) -> str:
    """``/run/netns/NAME`` for a name, a path unchanged."""
    return netns if "/" in netns else os.path.join(pyroute2.netns.NETNS_RUN_DIR, netns)


def _open_targets(netns: str, cgroup: lab.cgroup.Cgroup | None) -> tuple[int, int | None]:
    """Open the namespace and cgroup.procs in the parent, where errors can still be raised
    as ordinary exceptions with a useful message."""
    ns_fd = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        procs_fd = (
            os.open(cgroup.path / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
            if cgroup is not None
            else None
        )
    except BaseException:
        os.close(ns_fd)
        raise
    return ns_fd, procs_fd


def _enter(ns_fd: int, procs_fd: int | None) -> None:
    """Runs in the child: join the cgroup first (sockets made later carry it), then the netns."""
    if procs_fd is not None:
        # "0" means the writing process itself.
        os.write(procs_fd, b"0")
    if _LIBC.setns(ns_fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _close(*fds: int | None) -> None:
    for fd in fds:
        if fd is not None:
            os.close(fd)


def spawn(
    netns: str,
    argv: list[str],
    *,
    cgroup: lab.cgroup.Cgroup | None = None,
    env: Mapping[str, str] | None = None,
    stdout: _File = None,
    stderr: _File = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` inside ``netns`` (and ``cgroup``), in a new session so the whole process
    group can be killed at teardown. ``env`` adds to (not replaces) this process's
    environment, so PATH and the venv keep working."""
    ns_fd, procs_fd = _open_targets(netns, cgroup)
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    try:
        return subprocess.Popen(
            argv,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
            preexec_fn=lambda: _enter(ns_fd, procs_fd),
        )
    finally:
        _close(ns_fd, procs_fd)


def _report(write_fd: int, payload: bytes) -> None:
    view = memoryview(payload)
    while view:
        n = os.write(write_fd, view)
        view = view[n:]


def _child_main(
    write_fd: int,
    ns_fd: int,
    procs_fd: int | None,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    try:
        _enter(ns_fd, procs_fd)
        payload = pickle.dumps((True, fn(*args, **kwargs)))
    except BaseException as e:  # everything goes back to the parent
        e.add_note("in lab child process:\n" + "".join(traceback.format_exception(e)))
        try:
            payload = pickle.dumps((False, e))
        except Exception:  # an exception that cannot be pickled becomes one that can
            payload = pickle.dumps((False, ChildError("".join(traceback.format_exception(e)))))
    _report(write_fd, payload)


def call(
    netns: str,
    fn: Callable[..., T],
    *args: Any,
    cgroup: lab.cgroup.Cgroup | None = None,
    timeout: float = 60,
    **kwargs: Any,
) -> T:
    """Run ``fn(*args, **kwargs)`` in a forked child inside ``netns`` (and ``cgroup``).

    Returns what ``fn`` returned; re-raises what it raised (with the child's traceback as a
    note). ``fn``, its arguments and result cross a pipe pickled, but ``fn`` itself is
    inherited through fork, so lambdas and closures work. On timeout the child is killed and
    :class:`TimeoutError` raised.
    """
    ns_fd, procs_fd = _open_targets(netns, cgroup)
    read_fd, write_fd = os.pipe()
    # Flush first, or the child's copy of unwritten output would be written twice.
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child: never return into the caller's stack
        code = _EXIT_NO_REPORT
        try:
            os.close(read_fd)
            _child_main(write_fd, ns_fd, procs_fd, fn, args, kwargs)
            code = _EXIT_OK
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    os.close(write_fd)
    _close(ns_fd, procs_fd)
    try:
        data = _read_all(read_fd, time.monotonic() + timeout)
    except BaseException as e:
        # Timeout, or the caller interrupted: the child must not outlive this call.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if isinstance(e, TimeoutError):
            raise TimeoutError(
                f"{getattr(fn, '__name__', fn)} in {netns} took over {timeout}s"
            ) from None
        raise
    finally:
        os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    if not data:
        raise ChildError(
            f"{getattr(fn, '__name__', fn)} in {netns}: child ended without a result "
            f"({_describe(status)})"
        )
    ok, value = pickle.loads(data)
    if ok:
        return value
    raise value


def _read_all(fd: int, deadline: float) -> bytes:
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"
