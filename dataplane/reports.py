"""What an agent reports to the controller: the version it applied, the engines it scraped
and the kernel's cumulative per-backend counters. Pure data with validating constructors
(field-path messages, :class:`dataplane.model.ModelError`), like the model.
"""

from __future__ import annotations

import dataclasses
import math

from dataplane import enginemetrics, health, model, scraper

TEXT_MAX = 4096  # error strings in reports
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1


# -- reports ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BackendCounters:
    """Cumulative kernel counters of one backend (dataplane.abi.BeCounter)."""

    identity: str  # "address:port/protocol" (dataplane.apply.identity)
    selected: int = 0
    connects: int = 0
    failed: int = 0
    established: int = 0
    closed: int = 0
    trips: int = 0

    def __post_init__(self) -> None:
        model.check_text("identity", self.identity, model.IDENTITY_MAX, empty=False)
        for field in COUNTER_FIELDS:
            model.check_int(field, getattr(self, field), 0, U64_MAX)


COUNTER_FIELDS = ("selected", "connects", "failed", "established", "closed", "trips")


@dataclasses.dataclass(frozen=True)
class Observations:
    """What an agent's report source supplies each interval."""

    engines: tuple[scraper.ScrapeResult, ...] = ()
    counters: tuple[BackendCounters, ...] = ()
    errors: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class AgentReport:
    agent_id: str
    node: str
    applied_version: int  # 0: nothing applied yet
    applied_hash: str  # "" with version 0
    apply_seconds: float = 0.0
    engines: tuple[scraper.ScrapeResult, ...] = ()
    counters: tuple[BackendCounters, ...] = ()
    errors: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        model.check_text("agent_id", self.agent_id, model.IDENTITY_MAX, empty=False)
        model.check_text("node", self.node, model.IDENTITY_MAX)
        model.check_int("applied_version", self.applied_version, 0, model.VERSION_MAX)
        if self.applied_version or self.applied_hash:
            model.check_hash("applied_hash", self.applied_hash)
        seconds = model.check_float("apply_seconds", self.apply_seconds, 0.0, 1e6)
        model.set_field(self, "apply_seconds", seconds)
        engines = tuple(self.engines)
        seen: set[str] = set()
        for i, result in enumerate(engines):
            if not isinstance(result, scraper.ScrapeResult):
                raise model.ModelError(f"engines[{i}]: must be a ScrapeResult, got {result!r}")
            _check_scrape(f"engines[{result.identity!r}]", result)
            if result.identity in seen:
                raise model.ModelError(f"engines[{result.identity!r}]: listed twice")
            seen.add(result.identity)
        counters = tuple(self.counters)
        names: set[str] = set()
        for i, c in enumerate(counters):
            if not isinstance(c, BackendCounters):
                raise model.ModelError(f"counters[{i}]: must be BackendCounters, got {c!r}")
            if c.identity in names:
                raise model.ModelError(f"counters[{c.identity!r}]: listed twice")
            names.add(c.identity)
        errors = tuple(self.errors)
        for i, text in enumerate(errors):
            model.check_text(f"errors[{i}]", text, TEXT_MAX)
        model.set_field(self, "engines", engines)
        model.set_field(self, "counters", counters)
        model.set_field(self, "errors", errors)


def _check_scrape(path: str, result: scraper.ScrapeResult) -> None:
    model.check_text(f"{path}.identity", result.identity, model.IDENTITY_MAX, empty=False)
    model.check_bool(f"{path}.metrics_ok", result.metrics_ok)
    model.check_bool(f"{path}.health_ok", result.health_ok)
    model.check_bool(f"{path}.unproven", result.unproven)
    model.check_float(f"{path}.latency", result.latency, 0.0, 1e6)
    if result.error is not None:
        model.check_text(f"{path}.error", result.error, TEXT_MAX)
    if result.failure is not None and result.failure not in health.FAILURES:
        raise model.ModelError(f"{path}.failure: must be one of {health.FAILURES} or None, "
                               f"got {result.failure!r}")
    load = result.load
    if load is None:
        return
    if not isinstance(load, enginemetrics.EngineLoad):
        raise model.ModelError(f"{path}.load: must be an EngineLoad, got {load!r}")
    req = enginemetrics.MAX_REQUESTS
    model.check_float(f"{path}.load.running", load.running, 0.0, req)
    model.check_float(f"{path}.load.waiting", load.waiting, 0.0, req)
    model.check_float(f"{path}.load.kv_usage", load.kv_usage, 0.0, 1.0 + 1e-6)
    model.check_text(f"{path}.load.kv_family", load.kv_family, model.IDENTITY_MAX)
    model.check_int(f"{path}.load.engines", load.engines, 0, U32_MAX)
    for name, limit in (("ttft_count", enginemetrics.MAX_COUNT),
                        ("ttft_sum", enginemetrics.MAX_SECONDS),
                        ("ttft_p50", enginemetrics.MAX_SECONDS),
                        ("ttft_p90", enginemetrics.MAX_SECONDS)):
        value = getattr(load, name)
        if value is not None:
            model.check_float(f"{path}.load.{name}", value, 0.0, limit)
    for i, pair in enumerate(load.ttft_buckets):
        le, count = pair
        if le != math.inf:  # the +Inf bucket is the one infinite bound allowed
            model.check_float(f"{path}.load.ttft_buckets[{i}].le", le, 0.0,
                              enginemetrics.MAX_SECONDS)
        model.check_float(f"{path}.load.ttft_buckets[{i}].count", count, 0.0,
                          enginemetrics.MAX_COUNT)
