"""Engines the conformance suite runs against: the simulator, and a real vLLM when installed.

``engine`` is parametrised over engine kinds. The simulator case carries the ``unit`` marker
(no root, seconds) so ``make test-unit`` runs it; the real case carries ``vllm`` and is skipped,
with the reason, when the vLLM venv (``make vllm``) or ``lab.vllm_engine`` is missing.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lab.engine_sim import model, server

REPO = Path(__file__).resolve().parents[2]
VLLM_VENV = REPO / ".venv-vllm"


@dataclasses.dataclass(frozen=True)
class EngineUnderTest:
    kind: str  # "sim" or "vllm"
    base_url: str
    model: str  # the served model name, read from /v1/models
    block_size: int


def _served_model(base_url: str) -> str:
    return str(httpx.get(f"{base_url}/v1/models", timeout=30).json()["data"][0]["id"])


def _sim() -> Iterator[EngineUnderTest]:
    with server.running_in_thread(server.ServerConfig(engine_id="conformance-sim"),
                                  model.EngineConfig(seed=1)) as (url, _):
        yield EngineUnderTest("sim", url, _served_model(url), model.EngineConfig().block_size)


def _vllm() -> Iterator[EngineUnderTest]:
    if not VLLM_VENV.exists():
        pytest.skip(f"no vLLM venv at {VLLM_VENV} (make vllm installs it)")
    try:
        vllm_engine = importlib.import_module("lab.vllm_engine")
    except ImportError as e:
        pytest.skip(f"lab.vllm_engine is not importable: {e}")
    if not vllm_engine.available():
        pytest.skip("lab.vllm_engine.available() is false: the vLLM venv is incomplete")
    with vllm_engine.running(host="127.0.0.1") as url:
        yield EngineUnderTest("vllm", url, _served_model(url),
                              int(getattr(vllm_engine, "BLOCK_SIZE", 16)))


@pytest.fixture(scope="session", params=[
    pytest.param("sim", marks=pytest.mark.unit),
    pytest.param("vllm", marks=pytest.mark.vllm),
])
def engine(request: pytest.FixtureRequest) -> Iterator[EngineUnderTest]:
    yield from (_sim() if request.param == "sim" else _vllm())
