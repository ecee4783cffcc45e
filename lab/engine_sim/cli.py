"""``kvroute engine-sim``: run one simulated vLLM engine (parse, validate, call the server)."""

from __future__ import annotations

import asyncio
import os
import socket
import sys

import click

from lab.engine_sim import faults as faults_mod
from lab.engine_sim import model, server


@click.command("engine-sim")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="Port (0 = ephemeral; the bound port is printed).")
@click.option("--model", "model_name", default="kvroute/tiny-sim", show_default=True,
              help="Served model name (what /v1/models lists and requests must name).")
@click.option("--engine-id", default=None,
              help="Sent as X-Engine-ID (default: host:port; hostname-pid:port on 0.0.0.0).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--max-num-seqs", default=64, show_default=True, type=click.IntRange(1))
@click.option("--num-blocks", default=4096, show_default=True, type=click.IntRange(1),
              help="KV cache size in blocks.")
@click.option("--block-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--max-batched-tokens", default=2048, show_default=True, type=click.IntRange(1),
              help="Token budget of one engine step (chunked prefill).")
@click.option("--max-model-len", default=8192, show_default=True, type=click.IntRange(2))
@click.option("--no-prefix-caching", is_flag=True, help="Disable prefix caching.")
@click.option("--speed", default=1.0, show_default=True, type=click.FloatRange(0.01),
              help="Divide every step time by this (2 = a GPU twice as fast).")
@click.option("--fault-latency-ms", default=0.0, type=click.FloatRange(0),
              help="Start with this latency added to every API answer.")
@click.option("--fault-error-rate", default=0.0, type=click.FloatRange(0, 1),
              help="Start answering this share of API requests with --fault-error-code.")
@click.option("--fault-error-code", default=503, type=click.Choice(["500", "503"]),
              show_default=True)
@click.option("--fault-hang", is_flag=True, help="Start hung: accept, never answer.")
@click.option("--fault-refuse", is_flag=True, help="Start with the listener closed.")
@click.option("--fault-kv-blocks", default=None, type=click.IntRange(1),
              help="Start with the KV cache shrunk to this many blocks (saturate).")
def command(host: str, port: int, model_name: str, engine_id: str | None, seed: int,
            max_num_seqs: int, num_blocks: int, block_size: int, max_batched_tokens: int,
            max_model_len: int, no_prefix_caching: bool, speed: float,
            fault_latency_ms: float, fault_error_rate: float, fault_error_code: str,
            fault_hang: bool, fault_refuse: bool, fault_kv_blocks: int | None) -> None:
    """Run a simulated vLLM engine (OpenAI API, vLLM metrics, faults).

    Faults change at run time with POST /admin/faults (JSON: latency_ms, error_rate,
    error_code, hang, stall, spare_health, crash, refuse, refuse_s,
    kv_blocks), GET /admin/state shows them;
    SIGUSR1 toggles hang and SIGUSR2 toggles refuse.
    """
    defaults = model.EngineConfig()
    engine_config = model.EngineConfig(
        num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_batched_tokens, max_model_len=max_model_len,
        enable_prefix_caching=not no_prefix_caching, seed=seed,
        step_base_s=defaults.step_base_s / speed,
        prefill_token_s=defaults.prefill_token_s / speed,
        decode_seq_s=defaults.decode_seq_s / speed,
        context_token_s=defaults.context_token_s / speed)
    faults = faults_mod.FaultState(
        latency_ms=fault_latency_ms, error_rate=fault_error_rate,
        error_code=int(fault_error_code), hang=fault_hang, refuse=fault_refuse,
        kv_blocks=fault_kv_blocks)
    config = server.ServerConfig(model_name=model_name,
                                 engine_id=engine_id or f"{host}:{port}", seed=seed)
    srv = server.EngineServer(config, engine_config, faults)

    def ready(bound: int) -> None:
        if engine_id is None:
            # host:port names an engine only when host is a real address; on a wildcard
            # every pod would claim the same id, so fall back to hostname and pid.
            wildcard = host in ("", "0.0.0.0", "::")
            who = f"{socket.gethostname()}-{os.getpid()}" if wildcard else host
            srv.config.engine_id = f"{who}:{bound}"
        click.echo(f"engine-sim {srv.config.engine_id} serving {model_name} on "
                   f"http://{host}:{bound}", err=True)
        sys.stderr.flush()

    asyncio.run(server.serve_forever(srv, host, port, ready))
