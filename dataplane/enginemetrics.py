"""vLLM ``/metrics`` text → :class:`EngineLoad`, the few numbers routing needs.

Only these families are read; everything else on the page is ignored:

- ``vllm:num_requests_running`` and ``vllm:num_requests_waiting`` (gauges, summed),
- ``vllm:kv_cache_usage_perc`` (gauge, a fraction: 1 means 100 %), falling back to
  ``vllm:gpu_cache_usage_perc`` on releases before the rename; averaged, because each
  engine of a data-parallel server has its own KV pool of the same size,
- ``vllm:time_to_first_token_seconds`` (histogram, optional: buckets, count and sum
  summed; p50/p90 estimated from the buckets the way PromQL's ``histogram_quantile``
  does).

:func:`parse_page` also returns the engine's :class:`Progress`, the cumulative counters
that say whether it serves its clients (judged between two scrapes by
:mod:`dataplane.health`):

- ``vllm:generation_tokens_total`` (counter, optional),
- ``http_requests_total{handler,method,status}`` (counter, optional; exported by
  prometheus-fastapi-instrumentator on vLLM's API server, statuses grouped as ``2xx``,
  ``4xx``, ``5xx``), summed over the inference handlers (:data:`INFERENCE_HANDLERS`).

vLLM labels every series with ``model_name`` and ``engine`` (one value per data-parallel
engine of the server); series are summed over all label sets, so one server with four
engines reports as one backend.

The text is untrusted input from a pod. Anything wrong in the families we use (a page the
parser refuses, NaN, ±Inf, a negative or absurdly large number, a usage above 100 %, a
histogram whose buckets go down, a required family missing, the same series twice)
raises :class:`MetricsError` with a message that names the family; the caller keeps the
previous value and counts a failed scrape. Nothing else escapes :func:`parse`.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence

from prometheus_client import parser as prom_parser

from dataplane import model

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"
KV_USAGE_OLD = "vllm:gpu_cache_usage_perc"
TTFT = "vllm:time_to_first_token_seconds"
GENERATION_TOKENS = "vllm:generation_tokens_total"
HTTP_REQUESTS = "http_requests_total"
# The handlers clients' inference requests reach; /health, /metrics and /v1/models say
# nothing about whether generation works (and vLLM's instrumentator excludes the first two).
INFERENCE_HANDLERS = frozenset({
    "/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings",
    "/generate", "/inference/v1/generate",
})

# Upper bounds of believable values. A real engine runs hundreds of requests, not
# millions; a counter stays well below 2**53 so float arithmetic on it is exact.
MAX_REQUESTS = 1_000_000.0
MAX_COUNT = 1e15
MAX_SECONDS = 1e12
MAX_TEXT_CHARS = 16 * 1024 * 1024
# Float noise in an engine's own division (used_blocks / total_blocks) may exceed 1 by a
# hair; more than this is a broken exporter.
_KV_SLACK = 1e-6


class MetricsError(ValueError):
    """The metrics text cannot be trusted; keep the previous load."""


@dataclasses.dataclass(frozen=True)
class EngineLoad:
    """Load of one backend (one vLLM server, all its engines together)."""

    running: float  # requests being decoded / prefilled now
    waiting: float  # requests queued for a slot or for KV blocks
    kv_usage: float  # KV-cache blocks in use, 0..1
    kv_family: str  # which family kv_usage came from (KV_USAGE or KV_USAGE_OLD)
    engines: int  # series seen for the running gauge (data-parallel engines x models)
    ttft_count: float | None = None  # first tokens observed since the engine started
    ttft_sum: float | None = None  # seconds, summed over those
    ttft_p50: float | None = None  # seconds, estimate from the buckets; None if no data
    ttft_p90: float | None = None
    # Cumulative (upper bound, count) pairs ending with +Inf, so a caller can diff two
    # scrapes and estimate quantiles over the interval (see histogram_quantile).
    ttft_buckets: tuple[tuple[float, float], ...] = ()

    @property
    def units(self) -> int:
        """Bounded-load units (:func:`dataplane.model.load_units`)."""
        return model.load_units(self.running, self.waiting, self.kv_usage)

    @property
    def ttft_mean(self) -> float | None:
        if not self.ttft_count or self.ttft_sum is None:
            return None
        return self.ttft_sum / self.ttft_count


@dataclasses.dataclass(frozen=True)
class Progress:
    """Cumulative counters of one engine that show whether it serves clients. None where
    the page lacks the family (an older engine, a simulator): that judgement is skipped."""

    running: float  # vllm:num_requests_running, summed (as EngineLoad.running)
    generation_tokens: float | None  # vllm:generation_tokens_total, summed
    http_2xx: float | None  # http_requests_total{status="2xx"} on inference handlers
    http_5xx: float | None  # http_requests_total{status="5xx"} on inference handlers


def parse(text: str) -> EngineLoad:
    """Parse one ``/metrics`` page. Raises :class:`MetricsError` and nothing else."""
    return parse_page(text)[0]


def parse_page(text: str) -> tuple[EngineLoad, Progress]:
    """Parse one ``/metrics`` page into its load and its progress counters, in one pass.
    Raises :class:`MetricsError` and nothing else."""
    if not isinstance(text, str):
        raise MetricsError(f"metrics text must be str, got {type(text).__name__}")
    if len(text) > MAX_TEXT_CHARS:
        raise MetricsError(f"metrics text too large ({len(text)} chars > {MAX_TEXT_CHARS})")
    samples = _collect(text)
    load = _load(samples)
    return load, _progress(samples, load.running)


def _load(samples: _Samples) -> EngineLoad:
    running = _sum_gauge(samples, RUNNING, MAX_REQUESTS)
    waiting = _sum_gauge(samples, WAITING, MAX_REQUESTS)
    kv_family = KV_USAGE if samples.get(KV_USAGE) else KV_USAGE_OLD
    kv_values = _gauge_values(samples, kv_family, 1.0 + _KV_SLACK)
    if not kv_values:
        raise MetricsError(f"missing family {KV_USAGE} (and {KV_USAGE_OLD})")
    kv_usage = min(1.0, math.fsum(kv_values) / len(kv_values))

    load = EngineLoad(
        running=running,
        waiting=waiting,
        kv_usage=kv_usage,
        kv_family=kv_family,
        engines=len(samples[RUNNING]),
    )
    buckets, count, total = _histogram(samples, TTFT)
    if buckets is None:
        return load
    return dataclasses.replace(
        load,
        ttft_count=count,
        ttft_sum=total,
        ttft_p50=histogram_quantile(buckets, 0.5),
        ttft_p90=histogram_quantile(buckets, 0.9),
        ttft_buckets=buckets,
    )


def histogram_quantile(buckets: Sequence[tuple[float, float]], q: float) -> float | None:
    """Estimate quantile ``q`` from cumulative ``(upper bound, count)`` buckets.

    Same rule as PromQL's ``histogram_quantile``: linear interpolation inside the bucket
    that holds the rank, 0 as the lower edge of the first bucket, and the highest finite
    bound when the rank falls in the +Inf bucket. None when there are no observations.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, cumulative in buckets:
        if cumulative >= rank and cumulative > below:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - below) / (cumulative - below)
        lower, below = upper, cumulative
    return lower


def subtract_buckets(
    current: Sequence[tuple[float, float]], previous: Sequence[tuple[float, float]]
) -> tuple[tuple[float, float], ...]:
    """Buckets of the observations made between two scrapes (``current - previous``).

    An engine restart (counts going down) or a changed bucket layout yields the current
    buckets unchanged: everything observed since the restart is in the interval.
    """
    if [b for b, _ in current] != [b for b, _ in previous]:
        return tuple(current)
    diff = tuple((b, c - p) for (b, c), (_, p) in zip(current, previous, strict=True))
    if any(c < 0 for _, c in diff):
        return tuple(current)
    return diff


# -- internals ---------------------------------------------------------------------------


def _progress(samples: _Samples, running: float) -> Progress:
    tokens = _gauge_values(samples, GENERATION_TOKENS, MAX_COUNT)
    http = samples.get(HTTP_REQUESTS)
    by_status: dict[str, float] | None = None
    if http:
        _unique(HTTP_REQUESTS, http)
        by_status = {"2xx": 0.0, "5xx": 0.0}
        for labels, value in http:
            value = _check_value(HTTP_REQUESTS, labels, value, MAX_COUNT)
            status = labels.get("status", "")
            if labels.get("handler") in INFERENCE_HANDLERS and status in by_status:
                by_status[status] += value
    return Progress(
        running=running,
        generation_tokens=math.fsum(tokens) if tokens else None,
        http_2xx=by_status["2xx"] if by_status is not None else None,
        http_5xx=by_status["5xx"] if by_status is not None else None,
    )

_LabelKey = tuple[tuple[str, str], ...]
_Samples = dict[str, list[tuple[Mapping[str, str], float]]]

_WANTED = frozenset(
    {
        RUNNING,
        WAITING,
        KV_USAGE,
        KV_USAGE_OLD,
        TTFT + "_bucket",
        TTFT + "_count",
        TTFT + "_sum",
        GENERATION_TOKENS,
        HTTP_REQUESTS,
    }
)


def _collect(text: str) -> _Samples:
    samples: _Samples = collections.defaultdict(list)
    try:
        # The parser is a lazy generator: iterate to the end so an error anywhere on the
        # page is seen, and samples are matched by sample name, not family name, so a
        # page without TYPE lines still works.
        for family in prom_parser.text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in _WANTED:
                    samples[sample.name].append((dict(sample.labels), float(sample.value)))
    except Exception as exc:
        # The parser signals bad input with ValueError mostly, but not only (index and
        # type errors on truncated lines); to the caller they all mean "bad page".
        raise MetricsError(f"unparseable metrics text: {type(exc).__name__}: {exc}") from exc
    return samples


def _check_value(name: str, labels: Mapping[str, str], value: float, limit: float) -> float:
    if math.isnan(value):
        raise MetricsError(f"{name}{_fmt(labels)} is NaN")
    if math.isinf(value):
        raise MetricsError(f"{name}{_fmt(labels)} is infinite")
    if value < 0:
        raise MetricsError(f"{name}{_fmt(labels)} is negative ({value})")
    if value > limit:
        raise MetricsError(f"{name}{_fmt(labels)} is too large ({value} > {limit})")
    return value


def _fmt(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def _key(labels: Mapping[str, str], drop: str = "") -> _LabelKey:
    return tuple(sorted((k, v) for k, v in labels.items() if k != drop))


def _unique(name: str, series: Iterable[tuple[Mapping[str, str], float]]) -> None:
    seen: set[_LabelKey] = set()
    for labels, _ in series:
        key = _key(labels)
        if key in seen:
            raise MetricsError(f"{name}{_fmt(labels)} appears twice")
        seen.add(key)


def _gauge_values(samples: _Samples, name: str, limit: float) -> list[float]:
    series = samples.get(name, [])
    _unique(name, series)
    return [_check_value(name, labels, value, limit) for labels, value in series]


def _sum_gauge(samples: _Samples, name: str, limit: float) -> float:
    values = _gauge_values(samples, name, limit)
    if not values:
        raise MetricsError(f"missing family {name}")
    total = math.fsum(values)
    if total > limit:
        raise MetricsError(f"{name} summed over {len(values)} series is too large ({total})")
    return total


def _parse_le(name: str, labels: Mapping[str, str]) -> float:
    raw = labels.get("le")
    if raw is None:
        raise MetricsError(f"{name}{_fmt(labels)} has no le label")
    try:
        bound = float(raw)
    except ValueError:
        raise MetricsError(f"{name}{_fmt(labels)} has a non-numeric le") from None
    if math.isnan(bound) or bound == -math.inf:
        raise MetricsError(f"{name}{_fmt(labels)} has an invalid le")
    return bound


def _histogram(
    samples: _Samples, name: str
) -> tuple[tuple[tuple[float, float], ...] | None, float, float]:
    """Summed (buckets, count, sum) of a histogram family, or (None, 0, 0) if absent."""
    bucket_name, count_name, sum_name = name + "_bucket", name + "_count", name + "_sum"
    per_series: dict[_LabelKey, dict[float, float]] = collections.defaultdict(dict)
    for labels, value in samples.get(bucket_name, []):
        bound = _parse_le(bucket_name, labels)
        series = per_series[_key(labels, drop="le")]
        if bound in series:
            raise MetricsError(f"{bucket_name}{_fmt(labels)} appears twice")
        series[bound] = _check_value(bucket_name, labels, value, MAX_COUNT)
    counts = samples.get(count_name, [])
    sums = samples.get(sum_name, [])
    _unique(count_name, counts)
    _unique(sum_name, sums)
    if not per_series:
        if counts or sums:
            raise MetricsError(f"{name} has _count/_sum but no buckets")
        return None, 0.0, 0.0

    count_by = {_key(lb): _check_value(count_name, lb, v, MAX_COUNT) for lb, v in counts}
    sum_by = {_key(lb): _check_value(sum_name, lb, v, MAX_SECONDS) for lb, v in sums}
    layout: list[float] | None = None
    merged: dict[float, float] = {}
    total_count = 0.0
    total_sum = 0.0
    for key, series in sorted(per_series.items()):
        where = _fmt(dict(key))
        bounds = sorted(series)
        if not bounds or not math.isinf(bounds[-1]):
            raise MetricsError(f"{bucket_name}{where} has no +Inf bucket")
        if layout is None:
            layout = bounds
        elif bounds != layout:
            raise MetricsError(f"{name}{where} has a bucket layout unlike the other series")
        previous = 0.0
        for bound in bounds:
            if series[bound] < previous:
                raise MetricsError(f"{bucket_name}{where} decreases at le={bound}")
            previous = series[bound]
            merged[bound] = merged.get(bound, 0.0) + series[bound]
        inf_count = series[bounds[-1]]
        count = count_by.pop(key, inf_count)
        if abs(count - inf_count) > 1e-9 * max(1.0, count):
            raise MetricsError(f"{count_name}{where} ({count}) != +Inf bucket ({inf_count})")
        if key not in sum_by:
            raise MetricsError(f"{sum_name}{where} missing")
        total_count += count
        total_sum += sum_by.pop(key)
    if count_by or sum_by:
        raise MetricsError(f"{name} has _count/_sum series without buckets")
    if total_count > MAX_COUNT or total_sum > MAX_SECONDS:
        raise MetricsError(f"{name} summed over series is too large")
    assert layout is not None
    return tuple((b, merged[b]) for b in layout), total_count, total_sum
