"""Fault state of one simulated engine and the pure decisions it implies.

The server (lab.engine_sim.server) owns the side effects: sleeping, answering errors, holding a
request forever, closing its listening socket, exiting. This module only validates updates and
decides, with an injected random source, what a given request should suffer.
"""

from __future__ import annotations

import dataclasses
import enum
import random
from collections.abc import Mapping
from typing import Any

ERROR_CODES = (500, 503)


@dataclasses.dataclass
class FaultState:
    latency_ms: float = 0.0  # added before every API answer
    error_rate: float = 0.0  # share of API requests answered with error_code
    error_code: int = 503
    hang: bool = False  # accept, never answer (until cleared)
    # generation stops: requests are admitted and held (running > 0), no token comes out
    # and vllm:generation_tokens stands still until cleared (a wedged GPU step)
    stall: bool = False
    # faults spare /health: an API server that fails clients while its health check still
    # answers 200 (only the engine's own counters show it)
    spare_health: bool = False
    crash: bool = False  # the process exits (os._exit) right after this is set
    refuse: bool = False  # close the listening socket: new connects are refused
    refuse_s: float | None = None  # if set with refuse, listen again after this many seconds
    kv_blocks: int | None = None  # saturate: shrink the KV cache to this many blocks

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Action(enum.Enum):
    SERVE = "serve"
    ERROR = "error"
    HANG = "hang"


class FaultError(ValueError):
    """An invalid fault update (the admin endpoint answers 400)."""


_BOOL_FIELDS = ("hang", "stall", "spare_health", "crash", "refuse")


def apply_update(state: FaultState, update: Mapping[str, Any]) -> FaultState:
    """Validate ``update`` (a JSON object) and return the new state; unknown keys are errors."""
    known = {f.name for f in dataclasses.fields(FaultState)}
    unknown = set(update) - known
    if unknown:
        raise FaultError(f"unknown fault fields: {sorted(unknown)}; known: {sorted(known)}")
    new = dataclasses.replace(state)
    for key, value in update.items():
        if key in _BOOL_FIELDS:
            if not isinstance(value, bool):
                raise FaultError(f"{key} must be true or false")
            setattr(new, key, value)
        elif key == "latency_ms":
            new.latency_ms = _number(key, value, 0.0, 3_600_000.0)
        elif key == "error_rate":
            new.error_rate = _number(key, value, 0.0, 1.0)
        elif key == "error_code":
            if value not in ERROR_CODES or isinstance(value, bool):
                raise FaultError(f"error_code must be one of {ERROR_CODES}")
            new.error_code = int(value)
        elif key == "refuse_s":
            new.refuse_s = None if value is None else _number(key, value, 0.0, 86_400.0)
        elif key == "kv_blocks":
            if value is None or value == 0:
                new.kv_blocks = None
            elif isinstance(value, int) and not isinstance(value, bool) and value > 0:
                new.kv_blocks = value
            else:
                raise FaultError("kv_blocks must be a positive integer, or 0/null to restore")
    return new


def _number(key: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FaultError(f"{key} must be a number")
    if not lo <= float(value) <= hi:
        raise FaultError(f"{key} must be within [{lo}, {hi}]")
    return float(value)


def decide(state: FaultState, rng: random.Random) -> Action:
    """What an API request meets under ``state`` (latency is applied on top by the caller)."""
    if state.hang:
        return Action.HANG
    if state.error_rate > 0 and rng.random() < state.error_rate:
        return Action.ERROR
    return Action.SERVE
