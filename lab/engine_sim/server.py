"""HTTP edge of the engine simulator: vLLM's OpenAI-compatible API, /metrics, faults.

Endpoints: POST /v1/completions, POST /v1/chat/completions (SSE streaming and plain JSON),
GET /v1/models, GET /health, GET /metrics (Prometheus text with vLLM's metric names, types,
labels and buckets, from a registry owned by this engine), POST /admin/faults and
GET /admin/state. Every response carries ``X-Engine-ID`` so a client can tell which engine
served it (real vLLM does not send it).

Errors use vLLM's current shape, ``{"error": {"message", "type", "param", "code"}}`` (vLLM moved
from the flat ``{"object": "error", ...}`` object to this nested OpenAI form in 0.10).
Known deviations from vLLM, on purpose: ``n`` > 1 and ``best_of`` are refused with a 400;
sampling parameters other than ``max_tokens``/``ignore_eos`` are accepted and ignored; usage
always carries ``prompt_tokens_details.cached_tokens`` (vLLM sends it only with
``--enable-prompt-tokens-details``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import random
import signal
import socket
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from typing import Any

import prometheus_client
from aiohttp import web

from lab.engine_sim import faults as faults_mod
from lab.engine_sim import model

ENGINE_HEADER = "X-Engine-ID"
_log = logging.getLogger(__name__)

_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
_ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0]
_REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                            40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
_ITERATION_TOKEN_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
_UNCOUNTED_PATHS = frozenset({"/metrics", "/health"})
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")
_PREEMPTION_BUCKETS = [1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0]


def build_1_2_5_buckets(max_value: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value`` (vLLM's token-count buckets)."""
    out: list[float] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return out
            out.append(float(m * scale))
        scale *= 10


class EngineMetrics:
    """vLLM v1's Prometheus metrics (vllm/v1/metrics/loggers.py), in a registry of our own."""

    def __init__(self, model_name: str, max_model_len: int, cache: model.EngineConfig,
                 registry: prometheus_client.CollectorRegistry | None = None) -> None:
        self.registry = registry or prometheus_client.CollectorRegistry(auto_describe=True)
        r = self.registry
        labels = ["model_name", "engine"]
        # vLLM labels by engine-core index; a single-engine server is always engine "0".
        values = [model_name, "0"]

        def gauge(name: str, doc: str) -> prometheus_client.Gauge:
            return prometheus_client.Gauge(name, doc, labels, registry=r)

        def counter(name: str, doc: str) -> prometheus_client.Counter:
            return prometheus_client.Counter(name, doc, labels, registry=r)

        def histogram(name: str, doc: str, buckets: list[float]) -> prometheus_client.Histogram:
            return prometheus_client.Histogram(name, doc, labels, registry=r, buckets=buckets)

        self.running = gauge("vllm:num_requests_running",
                             "Number of requests in model execution batches.").labels(*values)
        self.waiting = gauge("vllm:num_requests_waiting",
                             "Number of requests waiting to be processed.").labels(*values)
        by_reason = prometheus_client.Gauge(
            "vllm:num_requests_waiting_by_reason",
            "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for "
            "scheduling capacity; 'deferred' = deferred by transient constraints (LoRA budget, "
            "KV transfer, blocked status). Sum of all reasons equals vllm:num_requests_waiting.",
            [*labels, "reason"], registry=r)
        self.waiting_capacity = by_reason.labels(*values, "capacity")
        by_reason.labels(*values, "deferred").set(0)
        sleep = prometheus_client.Gauge(
            "vllm:engine_sleep_state",
            "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is "
            "awake; weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep "
            "level 2.", [*labels, "sleep_state"], registry=r)
        for state, v in (("awake", 1), ("weights_offloaded", 0), ("discard_all", 0)):
            sleep.labels(*values, state).set(v)
        self.kv_usage = gauge("vllm:kv_cache_usage_perc",
                              "KV-cache usage. 1 means 100 percent usage.").labels(*values)
        self.prefix_queries = counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.").labels(*values)
        self.prefix_hits = counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.").labels(*values)
        self.preemptions = counter("vllm:num_preemptions",
                                   "Cumulative number of preemption from the engine."
                                   ).labels(*values)
        self.prompt_tokens = counter("vllm:prompt_tokens",
                                     "Number of prefill tokens processed.").labels(*values)
        self.generation_tokens = counter("vllm:generation_tokens",
                                         "Number of generation tokens processed."
                                         ).labels(*values)
        by_source = prometheus_client.Counter(
            "vllm:prompt_tokens_by_source", "Number of prompt tokens by source.",
            [*labels, "source"], registry=r)
        self.prompt_computed = by_source.labels(*values, "local_compute")
        self.prompt_cache_hit = by_source.labels(*values, "local_cache_hit")
        by_source.labels(*values, "external_kv_transfer")
        self.prompt_cached = counter("vllm:prompt_tokens_cached",
                                     "Number of cached prompt tokens (local + external)."
                                     ).labels(*values)
        success = prometheus_client.Counter(
            "vllm:request_success", "Count of successfully processed requests.",
            [*labels, "finished_reason"], registry=r)
        self.success = {reason: success.labels(*values, reason) for reason in FINISH_REASONS}
        tok_buckets = build_1_2_5_buckets(max_model_len)
        self.req_prompt_tokens = histogram("vllm:request_prompt_tokens",
                                           "Number of prefill tokens processed.",
                                           tok_buckets).labels(*values)
        self.req_generation_tokens = histogram("vllm:request_generation_tokens",
                                               "Number of generation tokens processed.",
                                               tok_buckets).labels(*values)
        self.req_max_tokens = histogram("vllm:request_params_max_tokens",
                                        "Histogram of the max_tokens request parameter.",
                                        tok_buckets).labels(*values)
        self.req_max_gen_tokens = histogram(
            "vllm:request_max_num_generation_tokens",
            "Histogram of maximum number of requested generation tokens.",
            tok_buckets).labels(*values)
        self.req_n = histogram("vllm:request_params_n", "Histogram of the n request parameter.",
                               [1.0, 2.0, 5.0, 10.0, 20.0]).labels(*values)
        self.req_preemptions = histogram(
            "vllm:request_num_preemptions",
            "Histogram of the number of times a request was preempted.",
            _PREEMPTION_BUCKETS).labels(*values)
        self.req_prefill_computed = histogram(
            "vllm:request_prefill_kv_computed_tokens",
            "Histogram of new KV tokens computed during prefill (excluding cached tokens).",
            tok_buckets).labels(*values)
        self.iteration_tokens = histogram("vllm:iteration_tokens_total",
                                          "Histogram of number of tokens per engine_step.",
                                          [float(b) for b in _ITERATION_TOKEN_BUCKETS]
                                          ).labels(*values)
        self.ttft = histogram("vllm:time_to_first_token_seconds",
                              "Histogram of time to first token in seconds.",
                              _TTFT_BUCKETS).labels(*values)
        self.itl = histogram("vllm:inter_token_latency_seconds",
                             "Histogram of inter-token latency in seconds.",
                             _ITL_BUCKETS).labels(*values)
        self.req_tpot = histogram("vllm:request_time_per_output_token_seconds",
                                  "Histogram of time_per_output_token_seconds per request.",
                                  _ITL_BUCKETS).labels(*values)
        self.e2e = histogram("vllm:e2e_request_latency_seconds",
                             "Histogram of e2e request latency in seconds.",
                             _REQUEST_LATENCY_BUCKETS).labels(*values)
        self.queue_time = histogram("vllm:request_queue_time_seconds",
                                    "Histogram of time spent in WAITING phase for request.",
                                    _REQUEST_LATENCY_BUCKETS).labels(*values)
        self.inference_time = histogram("vllm:request_inference_time_seconds",
                                        "Histogram of time spent in RUNNING phase for request.",
                                        _REQUEST_LATENCY_BUCKETS).labels(*values)
        self.prefill_time = histogram("vllm:request_prefill_time_seconds",
                                      "Histogram of time spent in PREFILL phase for request.",
                                      _REQUEST_LATENCY_BUCKETS).labels(*values)
        self.decode_time = histogram("vllm:request_decode_time_seconds",
                                     "Histogram of time spent in DECODE phase for request.",
                                     _REQUEST_LATENCY_BUCKETS).labels(*values)
        # prometheus-fastapi-instrumentator on vLLM's API server: status grouped by its
        # first digit, handler the route template; vLLM excludes /metrics and /health.
        self.http_requests = prometheus_client.Counter(
            "http_requests", "Total number of requests by method, status and handler.",
            ["handler", "method", "status"], registry=r)
        info = prometheus_client.Gauge(
            "vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
            ["block_size", "num_gpu_blocks", "enable_prefix_caching", "engine"], registry=r)
        info.labels(str(cache.block_size), str(cache.num_blocks),
                    str(cache.enable_prefix_caching), "0").set(1)

    def record_step(self, out: model.StepOutput) -> None:
        self.prefix_queries.inc(out.prefix_queries)
        self.prefix_hits.inc(out.prefix_hits)
        self.prompt_cached.inc(out.prefix_hits)
        self.prompt_cache_hit.inc(out.prefix_hits)
        self.prompt_computed.inc(out.prefix_queries - out.prefix_hits)
        self.preemptions.inc(out.num_preempted)
        self.prompt_tokens.inc(out.num_prompt_tokens)
        self.generation_tokens.inc(out.num_generation_tokens)
        if out.num_prefill_tokens or out.num_decode_seqs:
            self.iteration_tokens.observe(out.num_prefill_tokens + out.num_decode_seqs)
        for v in out.ttfts:
            self.ttft.observe(v)
        for v in out.itls:
            self.itl.observe(v)
        for f in out.finished:
            if f.finish_reason in self.success:
                self.success[f.finish_reason].inc()
            self.e2e.observe(f.e2e_latency)
            self.queue_time.observe(f.queued_time)
            self.inference_time.observe(f.inference_time)
            self.prefill_time.observe(f.prefill_time)
            self.decode_time.observe(f.decode_time)
            self.req_prompt_tokens.observe(f.num_prompt_tokens)
            self.req_generation_tokens.observe(f.num_generation_tokens)
            self.req_max_tokens.observe(f.max_tokens)
            self.req_max_gen_tokens.observe(f.max_tokens)
            self.req_n.observe(1)
            self.req_preemptions.observe(f.num_preemptions)
            self.req_prefill_computed.observe(f.num_prompt_tokens - f.num_cached_tokens)
            if f.num_generation_tokens > 1:
                self.req_tpot.observe(f.decode_time / (f.num_generation_tokens - 1))

    def refresh(self, engine: model.Engine) -> None:
        self.running.set(len(engine.running))
        self.waiting.set(len(engine.waiting))
        self.waiting_capacity.set(len(engine.waiting))
        self.kv_usage.set(engine.kv_usage())

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


@dataclasses.dataclass
class ServerConfig:
    model_name: str = "kvroute/tiny-sim"
    engine_id: str = "sim-0"
    seed: int = 0


class ApiError(Exception):
    def __init__(self, status: int, message: str, err_type: str = "BadRequestError",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param


def error_body(status: int, message: str, err_type: str, param: str | None = None
               ) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError",
                503: "ServiceUnavailableError"}


@dataclasses.dataclass
class _Parsed:
    prompt_ids: list[int]
    max_tokens: int | None
    ignore_eos: bool
    stream: bool
    include_usage: bool


class EngineServer:
    """One simulated engine: the model, its step loop, the HTTP app and the fault switches."""

    def __init__(self, config: ServerConfig, engine_config: model.EngineConfig,
                 faults: faults_mod.FaultState | None = None,
                 exit_fn: Callable[[int], None] = os._exit) -> None:
        self.config = config
        self.engine_config = engine_config
        self.engine = model.Engine(engine_config)
        self.metrics = EngineMetrics(config.model_name, engine_config.max_model_len,
                                     engine_config)
        self.faults = faults_mod.FaultState()
        self._exit_fn = exit_fn
        self._rng = random.Random(f"server:{config.seed}")
        self._streams: dict[str, asyncio.Queue[model.TokenEvent]] = {}
        self._wake = asyncio.Event()
        self._unhang = asyncio.Event()
        self._unstall = asyncio.Event()
        self._unstall.set()
        self._pending_aborts: list[str] = []  # client aborts held by a stalled step
        self._loop_task: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self._servers: list[asyncio.Server] = []
        self._host = "127.0.0.1"
        self.port = 0
        self._refuse_timer: asyncio.TimerHandle | None = None
        self._counter = 0
        self.created = int(time.time())
        self.app = self._build_app()
        self._initial_faults = faults

    # -- lifecycle --------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/admin/faults", self._admin_faults)
        app.router.add_get("/admin/state", self._admin_state)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._engine_loop())

    async def _on_cleanup(self, app: web.Application) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0 = ephemeral) and return the bound port."""
        self._runner = web.AppRunner(self.app, handle_signals=False, access_log=None)
        await self._runner.setup()
        self._host = host
        self.port = port
        await self._listen()
        if self._initial_faults is not None:
            self.set_faults(self._initial_faults)
        return self.port

    async def stop(self) -> None:
        self._stop_listening()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _listen(self) -> None:
        assert self._runner is not None and self._runner.server is not None
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, self.port))
        sock.listen(1024)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        srv = await asyncio.get_running_loop().create_server(self._runner.server, sock=sock)
        self._servers.append(srv)

    def _stop_listening(self) -> None:
        # Closing the listening socket is all "refuse" means: the kernel then answers new
        # connects with RST (connection refused); established connections keep working.
        for srv in self._servers:
            srv.close()
        self._servers.clear()

    @property
    def listening(self) -> bool:
        return bool(self._servers)

    # -- faults -----------------------------------------------------------------------------

    def set_faults(self, new: faults_mod.FaultState) -> None:
        old = self.faults
        self.faults = new
        if new.kv_blocks != old.kv_blocks:
            self.engine.resize_kv(new.kv_blocks or self.engine_config.num_blocks)
        if new.hang:
            self._unhang.clear()
        else:
            self._unhang.set()
        if new.stall:
            self._unstall.clear()
        else:
            self._unstall.set()
        if new.crash:
            # Let the admin answer leave first; a crash that eats its own reply is confusing.
            asyncio.get_running_loop().call_later(0.05, self._exit_fn, 1)
        if new.refuse != old.refuse and self._runner is not None:
            if new.refuse:
                self._stop_listening()
            else:
                asyncio.get_running_loop().create_task(self._resume_listening())
        if self._refuse_timer is not None:
            self._refuse_timer.cancel()
            self._refuse_timer = None
        if new.refuse and new.refuse_s is not None:
            self._refuse_timer = asyncio.get_running_loop().call_later(
                new.refuse_s, self._end_refuse)

    def _end_refuse(self) -> None:
        self._refuse_timer = None
        self.set_faults(dataclasses.replace(self.faults, refuse=False, refuse_s=None))

    async def _resume_listening(self) -> None:
        if not self._servers and not self.faults.refuse:
            await self._listen()

    def install_signal_handlers(self) -> None:
        """SIGUSR1 toggles hang, SIGUSR2 toggles refuse (for when HTTP cannot reach us)."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, lambda: self.set_faults(
            dataclasses.replace(self.faults, hang=not self.faults.hang)))
        loop.add_signal_handler(signal.SIGUSR2, lambda: self.set_faults(
            dataclasses.replace(self.faults, refuse=not self.faults.refuse, refuse_s=None)))

    # -- engine loop ------------------------------------------------------------------------

    async def _engine_loop(self) -> None:
        while True:
            if not self.engine.has_work():
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                batch = self.engine.schedule(time.monotonic())
                if batch.scheduled and not self._unstall.is_set():
                    # The stall fault: this step never ends. Its requests stay running,
                    # their tokens and the step's counters come out when it is cleared.
                    await self._unstall.wait()
                out = self.engine.run_batch(batch)
            except Exception:
                # A bug in the model must not leave every client hanging: fail what is in
                # flight, start over with an empty cache, keep serving.
                _log.exception("engine step failed; aborting %d requests", len(self._streams))
                self.engine = model.Engine(self.engine_config)
                for rid, stream in list(self._streams.items()):
                    stream.put_nowait(model.TokenEvent(rid, None, None, "abort"))
                continue
            if out.duration <= 0:
                # Nothing ran (only aborts, or no room): back off one step's worth.
                await asyncio.sleep(self.engine_config.step_base_s)
            else:
                delay = out.end_time - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            for rid in self._pending_aborts:  # after the step that held them
                self.engine.abort(rid)
            self._pending_aborts.clear()
            self.metrics.record_step(out)
            for ev in out.events:
                q = self._streams.get(ev.request_id)
                if q is not None:
                    q.put_nowait(ev)

    async def _generate(self, prefix: str, parsed: _Parsed
                        ) -> tuple[str, model.Request, AsyncGenerator[model.TokenEvent, None]]:
        self._counter += 1
        rid = f"{prefix}-{self._rng.getrandbits(64):016x}{self._counter:08x}"
        try:
            req = self.engine.add_request(rid, parsed.prompt_ids, parsed.max_tokens,
                                          time.monotonic(), parsed.ignore_eos)
        except model.RequestError as e:
            raise ApiError(400, str(e)) from None
        queue: asyncio.Queue[model.TokenEvent] = asyncio.Queue()
        self._streams[rid] = queue
        self._wake.set()

        async def events() -> AsyncGenerator[model.TokenEvent, None]:
            try:
                while True:
                    ev = await queue.get()
                    yield ev
                    if ev.finish_reason is not None:
                        return
            finally:
                self._streams.pop(rid, None)
                if self._unstall.is_set():
                    self.engine.abort(rid)  # no-op when it finished
                else:
                    # A wedged step holds its batch: like vLLM's engine core, which
                    # handles aborts between steps, the request stays running until then.
                    self._pending_aborts.append(rid)

        return rid, req, events()

    # -- HTTP -------------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                          ) -> web.StreamResponse:
        try:
            if not (request.path.startswith("/admin/") or request.path == "/metrics"
                    or (request.path == "/health" and self.faults.spare_health)):
                await self._apply_faults()
            resp = await handler(request)
        except ApiError as e:
            resp = web.json_response(error_body(e.status, e.message, e.err_type, e.param),
                                     status=e.status)
        except web.HTTPException as e:
            status = e.status
            resp = web.json_response(
                error_body(status, e.reason, _ERROR_TYPES.get(status, e.reason.replace(" ", ""))),
                status=status)
        if not resp.prepared:
            resp.headers[ENGINE_HEADER] = self.config.engine_id
        self._count_request(request, resp.status)
        return resp

    def _count_request(self, request: web.Request, status: int) -> None:
        """http_requests_total as vLLM's instrumentator counts: once the handler returned
        (a hung request never counts), by route template ("none" when no route matched)."""
        if request.path in _UNCOUNTED_PATHS or request.path.startswith("/admin/"):
            return
        resource = request.match_info.route.resource
        handler = resource.canonical if resource is not None else "none"
        self.metrics.http_requests.labels(handler, request.method, f"{status // 100}xx").inc()

    async def _apply_faults(self) -> None:
        f = self.faults
        if f.latency_ms > 0:
            await asyncio.sleep(f.latency_ms / 1000.0)
        action = faults_mod.decide(f, self._rng)
        if action is faults_mod.Action.HANG:
            await self._unhang.wait()
        elif action is faults_mod.Action.ERROR:
            code = f.error_code
            raise ApiError(code, f"simulated fault: HTTP {code}", _ERROR_TYPES[code])

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "Request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise ApiError(400, "Request body must be a JSON object.")
        return body

    def _common(self, body: dict[str, Any], prompt_ids: list[int],
                max_tokens_keys: tuple[str, ...]) -> _Parsed:
        name = body.get("model")
        if name is not None and name != self.config.model_name:
            raise ApiError(404, f"The model `{name}` does not exist.", "NotFoundError", "model")
        max_tokens: int | None = None
        for key in max_tokens_keys:
            v = body.get(key)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int):
                raise ApiError(400, f"{key} must be an integer", param=key)
            if v < 1:
                raise ApiError(400, f"max_tokens must be at least 1, got {v}.", param=key)
            max_tokens = v
            break
        n = body.get("n", 1)
        if n != 1:
            raise ApiError(400, "The simulator supports only n=1.", param="n")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "stream must be a boolean", param="stream")
        opts = body.get("stream_options")
        if opts is not None and not stream:
            raise ApiError(400, "Stream options can only be defined when `stream=True`.",
                           param="stream_options")
        include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
        ignore_eos = bool(body.get("ignore_eos", False))
        return _Parsed(prompt_ids, max_tokens, ignore_eos, stream, include_usage)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._json_body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "Field required: messages must be a non-empty list.",
                           param="messages")
        conv: list[tuple[str, str]] = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, "Each message needs a string role.", param="messages")
            content = m.get("content")
            if content is None:
                content = ""
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content
                                  if isinstance(p, dict) and p.get("type") == "text")
            if not isinstance(content, str):
                raise ApiError(400, "Message content must be a string or a list of parts.",
                               param="messages")
            conv.append((m["role"], content))
        parsed = self._common(body, model.render_chat(conv),
                              ("max_completion_tokens", "max_tokens"))
        return await self._serve(request, parsed, chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._json_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = model.render_prompt(prompt)
        elif (isinstance(prompt, list) and prompt
              and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
            ids = list(prompt)
        else:
            raise ApiError(400, "prompt must be a string or a list of token ids "
                           "(the simulator does not batch prompts).", param="prompt")
        parsed = self._common(body, ids, ("max_tokens",))
        return await self._serve(request, parsed, chat=False)

    def _usage(self, req: model.Request) -> dict[str, Any]:
        p, c = len(req.prompt_token_ids), len(req.output_token_ids)
        return {"prompt_tokens": p, "total_tokens": p + c, "completion_tokens": c,
                "prompt_tokens_details": {"cached_tokens": max(0, req.num_cached_tokens)}}

    async def _serve(self, request: web.Request, parsed: _Parsed, chat: bool
                     ) -> web.StreamResponse:
        rid, req, events = await self._generate("chatcmpl" if chat else "cmpl", parsed)
        created = int(time.time())
        name = self.config.model_name
        obj = "chat.completion" if chat else "text_completion"
        if not parsed.stream:
            words: list[str] = []
            reason = None
            async for ev in events:
                if ev.word is not None:
                    words.append(ev.word)
                reason = ev.finish_reason
            text = " ".join(words)
            choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": reason,
                                      "stop_reason": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": text, "tool_calls": []}
            else:
                choice["text"] = text
            return web.json_response({"id": rid, "object": obj, "created": created,
                                      "model": name, "choices": [choice],
                                      "usage": self._usage(req)})

        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-cache",
                                           ENGINE_HEADER: self.config.engine_id})
        await resp.prepare(request)
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        async def send(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None
                       ) -> None:
            chunk: dict[str, Any] = {"id": rid, "object": chunk_obj, "created": created,
                                     "model": name, "choices": choices}
            if usage is not None:
                chunk["usage"] = usage
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

        try:
            if chat:
                await send([{"index": 0, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}])
            first = True
            async for ev in events:
                text = "" if ev.word is None else (ev.word if first else " " + ev.word)
                if ev.word is not None:
                    first = False
                if chat:
                    c: dict[str, Any] = {"index": 0, "delta": {"content": text},
                                         "logprobs": None, "finish_reason": ev.finish_reason}
                else:
                    c = {"index": 0, "text": text, "logprobs": None,
                         "finish_reason": ev.finish_reason}
                if ev.finish_reason is not None:
                    c["stop_reason"] = None
                await send([c])
            if parsed.include_usage:
                await send([], self._usage(req))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:
            # The client went away mid-stream: free its KV blocks, nothing else to tell.
            await events.aclose()
        except asyncio.CancelledError:
            await events.aclose()
            raise
        return resp

    async def _models(self, request: web.Request) -> web.Response:
        name = self.config.model_name
        card = {"id": name, "object": "model", "created": self.created, "owned_by": "vllm",
                "root": name, "parent": None,
                "max_model_len": self.engine_config.max_model_len,
                "permission": [{"id": f"modelperm-{self.config.engine_id}",
                                "object": "model_permission", "created": self.created,
                                "allow_create_engine": False, "allow_sampling": True,
                                "allow_logprobs": True, "allow_search_indices": False,
                                "allow_view": True, "allow_fine_tuning": False,
                                "organization": "*", "group": None, "is_blocking": False}]}
        return web.json_response({"object": "list", "data": [card]})

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _metrics(self, request: web.Request) -> web.Response:
        self.metrics.refresh(self.engine)
        return web.Response(body=self.metrics.exposition(),
                            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})

    async def _admin_faults(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        try:
            new = faults_mod.apply_update(self.faults, body)
        except faults_mod.FaultError as e:
            raise ApiError(400, str(e)) from None
        self.set_faults(new)
        return web.json_response({"faults": self.faults.to_json()})

    async def _admin_state(self, request: web.Request) -> web.Response:
        return web.json_response({
            "engine_id": self.config.engine_id,
            "model": self.config.model_name,
            "port": self.port,
            "listening": self.listening,
            "faults": self.faults.to_json(),
            "engine": self.engine.snapshot(),
        })


async def serve_forever(server: EngineServer, host: str, port: int,
                        ready: Callable[[int], None] | None = None) -> None:
    """Run ``server`` until cancelled or SIGTERM/SIGINT (the CLI's main loop)."""
    bound = await server.start(host, port)
    if ready is not None:
        ready(bound)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server.install_signal_handlers()
    try:
        await stop.wait()
    finally:
        await server.stop()


@contextlib.contextmanager
def running_in_thread(config: ServerConfig | None = None,
                      engine_config: model.EngineConfig | None = None,
                      faults: faults_mod.FaultState | None = None, host: str = "127.0.0.1",
                      port: int = 0, exit_fn: Callable[[int], None] | None = None,
                      ) -> Iterator[tuple[str, EngineServer]]:
    """Run one simulator on its own event loop in a thread; yields (base_url, server).

    For tests and in-process experiments. ``exit_fn`` replaces os._exit for the crash fault
    (default: stop this server's loop instead of killing the caller's process).
    """
    import threading

    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, Any] = {}

    def crash(code: int) -> None:
        holder["crashed"] = code
        loop.call_soon_threadsafe(loop.stop)

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            srv = EngineServer(config or ServerConfig(), engine_config or model.EngineConfig(),
                               faults, exit_fn=exit_fn or crash)
            holder["server"] = srv
            holder["port"] = loop.run_until_complete(srv.start(host, port))
        except BaseException as e:  # surfaced to the caller below
            holder["error"] = e
            started.set()
            return
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="engine-sim", daemon=True)
    thread.start()
    started.wait(10)
    if "error" in holder:
        raise holder["error"]
    srv = holder["server"]
    url_host = f"[{host}]" if ":" in host else host
    try:
        yield f"http://{url_host}:{holder['port']}", srv
    finally:
        if loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(srv.stop(), loop)
            with contextlib.suppress(Exception):
                fut.result(10)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        if not loop.is_running():
            loop.close()
