"""vLLM metrics parsing: a realistic page, old engines, every kind of bad input, and
properties (arbitrary text only ever raises MetricsError; pages rendered by
prometheus-client itself round-trip)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest

from dataplane import enginemetrics as em

# A page shaped like a data-parallel vLLM v1 server with two engines ("0" and "1"):
# the families routing reads, the deprecated KV gauge next to the new one, and a few
# families it must ignore (counters, other histograms, info gauges). Values made up.
TTFT_BOUNDS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5)


def _ttft_lines(engine: str, cumulative: list[int], total: float) -> str:
    lines = []
    for bound, c in zip(TTFT_BOUNDS, cumulative, strict=True):
        lines.append(
            f'vllm:time_to_first_token_seconds_bucket{{engine="{engine}",le="{bound}",'
            f'model_name="tiny-llama"}} {float(c)}'
        )
    lines.append(
        f'vllm:time_to_first_token_seconds_bucket{{engine="{engine}",le="+Inf",'
        f'model_name="tiny-llama"}} {float(cumulative[-1])}'
    )
    lines.append(
        f'vllm:time_to_first_token_seconds_count{{engine="{engine}",model_name="tiny-llama"}}'
        f" {float(cumulative[-1])}"
    )
    lines.append(
        f'vllm:time_to_first_token_seconds_sum{{engine="{engine}",model_name="tiny-llama"}} {total}'
    )
    return "\n".join(lines)


# engine 0: 40 first tokens, engine 1: 60; together 100.
E0 = [0, 0, 2, 5, 10, 16, 22, 28, 36, 39, 40, 40, 40]
E1 = [0, 1, 3, 9, 18, 27, 35, 42, 55, 58, 60, 60, 60]

VLLM_PAGE = f"""\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{{generation="0"}} 12571.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="tiny-llama"}} 7.0
vllm:num_requests_running{{engine="1",model_name="tiny-llama"}} 5.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",model_name="tiny-llama"}} 3.0
vllm:num_requests_waiting{{engine="1",model_name="tiny-llama"}} 0.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage (deprecated name).
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{{engine="0",model_name="tiny-llama"}} 0.11
vllm:gpu_cache_usage_perc{{engine="1",model_name="tiny-llama"}} 0.22
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",model_name="tiny-llama"}} 0.75
vllm:kv_cache_usage_perc{{engine="1",model_name="tiny-llama"}} 0.25
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{{engine="0",model_name="tiny-llama"}} 183422.0
vllm:prompt_tokens_total{{engine="1",model_name="tiny-llama"}} 170001.0
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{{engine="0",finished_reason="stop",model_name="tiny-llama"}} 38.0
vllm:request_success_total{{engine="0",finished_reason="length",model_name="tiny-llama"}} 2.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
{_ttft_lines("0", E0, 4.1)}
{_ttft_lines("1", E1, 5.9)}
# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{{engine="0",le="1.0",model_name="tiny-llama"}} 3.0
vllm:e2e_request_latency_seconds_bucket{{engine="0",le="+Inf",model_name="tiny-llama"}} 40.0
vllm:e2e_request_latency_seconds_count{{engine="0",model_name="tiny-llama"}} 40.0
vllm:e2e_request_latency_seconds_sum{{engine="0",model_name="tiny-llama"}} 212.5
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{{block_size="16",engine="0",num_gpu_blocks="2048"}} 1.0
"""


def test_realistic_page() -> None:
    load = em.parse(VLLM_PAGE)
    assert load.running == 12.0
    assert load.waiting == 3.0
    assert load.kv_usage == pytest.approx(0.5)  # mean of the engines' pools
    assert load.kv_family == em.KV_USAGE  # the new name wins over the deprecated one
    assert load.engines == 2
    assert load.ttft_count == 100.0
    assert load.ttft_sum == pytest.approx(10.0)
    assert load.ttft_mean == pytest.approx(0.1)
    summed = [a + b for a, b in zip(E0, E1, strict=True)]
    assert [c for _, c in load.ttft_buckets] == [*map(float, summed), 100.0]
    # Rank 50 falls in (0.06, 0.08] where the cumulative goes 43 -> 57: 0.06 + 0.02*7/14.
    assert load.ttft_p50 == pytest.approx(0.07)
    # Rank 90 falls in (0.1, 0.25] where it goes 70 -> 91: 0.1 + 0.15*20/21.
    assert load.ttft_p90 == pytest.approx(0.1 + 0.15 * 20 / 21)


def test_old_engine_without_kv_rename_or_ttft() -> None:
    page = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 2.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.4
"""
    load = em.parse(page)
    assert (load.running, load.waiting, load.kv_usage) == (1.0, 2.0, 0.4)
    assert load.kv_family == em.KV_USAGE_OLD
    assert load.ttft_count is None and load.ttft_p50 is None and load.ttft_buckets == ()
    assert load.ttft_mean is None


def test_page_without_type_lines() -> None:
    page = (
        "vllm:num_requests_running 2\nvllm:num_requests_waiting 0\n"
        "vllm:kv_cache_usage_perc 0.1\n"
        'vllm:time_to_first_token_seconds_bucket{le="0.5"} 1\n'
        'vllm:time_to_first_token_seconds_bucket{le="+Inf"} 2\n'
        "vllm:time_to_first_token_seconds_sum 1.5\n"
    )
    load = em.parse(page)
    assert load.running == 2.0 and load.ttft_count == 2.0 and load.ttft_sum == 1.5


def test_empty_histogram_has_no_quantiles() -> None:
    page = (
        "vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n"
        "vllm:kv_cache_usage_perc 0\n"
        'vllm:time_to_first_token_seconds_bucket{le="0.5"} 0\n'
        'vllm:time_to_first_token_seconds_bucket{le="+Inf"} 0\n'
        "vllm:time_to_first_token_seconds_count 0\n"
        "vllm:time_to_first_token_seconds_sum 0\n"
    )
    load = em.parse(page)
    assert load.ttft_count == 0.0 and load.ttft_p50 is None and load.ttft_mean is None


def test_kv_hair_above_one_is_clamped() -> None:
    page = "vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n"
    page += "vllm:kv_cache_usage_perc 1.0000000001\n"
    assert em.parse(page).kv_usage == 1.0


_GOOD = {
    "running": "vllm:num_requests_running 1",
    "waiting": "vllm:num_requests_waiting 1",
    "kv": "vllm:kv_cache_usage_perc 0.5",
}


def _page(**replace: str) -> str:
    return "\n".join({**_GOOD, **replace}.values()) + "\n"


@pytest.mark.parametrize(
    ("page", "message"),
    [
        (_page(running="vllm:num_requests_running NaN"), "num_requests_running is NaN"),
        (_page(running="vllm:num_requests_running +Inf"), "infinite"),
        (_page(waiting="vllm:num_requests_waiting -1"), "num_requests_waiting is negative"),
        (_page(waiting="vllm:num_requests_waiting 1e300"), "too large"),
        (_page(kv="vllm:kv_cache_usage_perc 57"), "kv_cache_usage_perc is too large"),
        (_page(kv="vllm:kv_cache_usage_perc -Inf"), "infinite"),
        (_page(running=""), "missing family vllm:num_requests_running"),
        (_page(kv=""), "missing family vllm:kv_cache_usage_perc"),
        (
            _page(
                running='vllm:num_requests_running{engine="0"} 1\n'
                'vllm:num_requests_running{engine="0"} 2'
            ),
            "appears twice",
        ),
        (
            _page(
                running='vllm:num_requests_running{engine="0"} 600000\n'
                'vllm:num_requests_running{engine="1"} 600000'
            ),
            "summed over 2 series is too large",
        ),
        ("vllm:num_requests_running{engine=0} 1\n", "unparseable"),
        ("vllm:num_requests_running one\n", "unparseable"),
        ("<html><body>502 Bad Gateway</body></html>\n", "unparseable"),
        ("\x00\x01\x02", "unparseable"),
        ("", "missing family"),
    ],
)
def test_bad_pages_raise_metrics_error(page: str, message: str) -> None:
    with pytest.raises(em.MetricsError, match=message):
        em.parse(page)


_H = "vllm:time_to_first_token_seconds"


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([f'{_H}_bucket{{le="0.1"}} 3', f'{_H}_bucket{{le="+Inf"}} 2', f"{_H}_sum 1"], "decreases"),
        ([f'{_H}_bucket{{le="0.1"}} 1', f"{_H}_sum 1"], "no \\+Inf bucket"),
        ([f'{_H}_bucket{{le="abc"}} 1', f'{_H}_bucket{{le="+Inf"}} 1'], "non-numeric le"),
        ([f'{_H}_bucket{{le="NaN"}} 1', f'{_H}_bucket{{le="+Inf"}} 1'], "invalid le"),
        ([f"{_H}_bucket 1"], "no le label"),
        ([f'{_H}_bucket{{le="+Inf"}} 2', f"{_H}_count 3", f"{_H}_sum 1"], "!= \\+Inf bucket"),
        ([f'{_H}_bucket{{le="+Inf"}} 2', f"{_H}_count 2"], "_sum missing"),
        ([f'{_H}_bucket{{le="+Inf"}} 2', f"{_H}_sum NaN"], "_sum is NaN"),
        ([f'{_H}_bucket{{le="+Inf"}} 2', f"{_H}_sum 1e13"], "too large"),
        ([f"{_H}_count 2", f"{_H}_sum 1"], "no buckets"),
        (
            [
                f'{_H}_bucket{{engine="0",le="+Inf"}} 2',
                f'{_H}_sum{{engine="0"}} 1',
                f'{_H}_sum{{engine="1"}} 1',
            ],
            "without buckets",
        ),
        (
            [
                f'{_H}_bucket{{engine="0",le="1"}} 1',
                f'{_H}_bucket{{engine="0",le="+Inf"}} 2',
                f'{_H}_bucket{{engine="1",le="2"}} 1',
                f'{_H}_bucket{{engine="1",le="+Inf"}} 2',
                f'{_H}_sum{{engine="0"}} 1',
                f'{_H}_sum{{engine="1"}} 1',
            ],
            "bucket layout",
        ),
        ([f'{_H}_bucket{{le="+Inf"}} 2', f'{_H}_bucket{{le="+Inf"}} 2', f"{_H}_sum 1"], "twice"),
    ],
)
def test_bad_ttft_histograms_raise(lines: list[str], message: str) -> None:
    with pytest.raises(em.MetricsError, match=message):
        em.parse(_page() + "\n".join(lines) + "\n")


def test_non_str_and_oversized_input() -> None:
    with pytest.raises(em.MetricsError, match="must be str"):
        em.parse(b"vllm:num_requests_running 1")  # type: ignore[arg-type]
    with pytest.raises(em.MetricsError, match="too large"):
        em.parse("#" * (em.MAX_TEXT_CHARS + 1))


def test_garbage_in_unused_families_is_ignored() -> None:
    # A NaN in a family routing does not read (an idle engine's mean, say) is legitimate.
    page = _page() + "vllm:spec_decode_efficiency NaN\nother_metric -5\n"
    assert em.parse(page).running == 1.0


def test_histogram_quantile_edges() -> None:
    b = ((0.1, 0.0), (0.2, 10.0), (math.inf, 20.0))
    assert em.histogram_quantile(b, 0.25) == pytest.approx(0.15)
    assert em.histogram_quantile(b, 0.9) == 0.2  # in the +Inf bucket: highest finite bound
    assert em.histogram_quantile(((1.0, 4.0), (math.inf, 4.0)), 0.5) == pytest.approx(0.5)
    assert em.histogram_quantile((), 0.5) is None
    with pytest.raises(ValueError, match="quantile"):
        em.histogram_quantile(b, 1.5)


def test_subtract_buckets_window_and_restart() -> None:
    before = ((0.1, 5.0), (math.inf, 10.0))
    after = ((0.1, 5.0), (math.inf, 14.0))
    assert em.subtract_buckets(after, before) == ((0.1, 0.0), (math.inf, 4.0))
    assert em.histogram_quantile(em.subtract_buckets(after, before), 0.5) == 0.1
    restarted = ((0.1, 1.0), (math.inf, 2.0))
    assert em.subtract_buckets(restarted, before) == restarted
    relaid = ((0.5, 1.0), (math.inf, 20.0))
    assert em.subtract_buckets(relaid, before) == relaid


# -- properties -----------------------------------------------------------------------


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=400))
def test_arbitrary_text_only_raises_metrics_error(text: str) -> None:
    try:
        load = em.parse(text)
    except em.MetricsError:
        return
    assert load.running >= 0 and load.waiting >= 0 and 0 <= load.kv_usage <= 1


_names = st.sampled_from(
    [
        em.RUNNING,
        em.WAITING,
        em.KV_USAGE,
        em.KV_USAGE_OLD,
        _H + "_bucket",
        _H + "_count",
        _H + "_sum",
        "other",
    ]
)
_values = st.one_of(
    st.sampled_from(["NaN", "+Inf", "-Inf", "1e308", "-0", "0x10", "", "1_0", "nan"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10**20), 10**20).map(str),
)
_labels = st.one_of(
    st.just(""),
    st.sampled_from(
        [
            '{engine="0"}',
            '{le="0.1"}',
            '{le="+Inf"}',
            '{engine="1",le="1"}',
            '{le="x"}',
            '{engine="0",engine="1"}',
            "{",
            "{le=}",
            '{a="\\"}',
        ]
    ),
)
_lines = st.lists(
    st.tuples(_names, _labels, _values).map(lambda t: f"{t[0]}{t[1]} {t[2]}"), max_size=12
)


@settings(max_examples=400, deadline=None)
@given(_lines)
def test_plausible_garbage_only_raises_metrics_error(lines: list[str]) -> None:
    # Lines built from the real names reach deep into the validation, unlike random text.
    try:
        load = em.parse("\n".join(lines) + "\n")
    except em.MetricsError:
        return
    for value in (load.running, load.waiting, load.kv_usage):
        assert math.isfinite(value) and value >= 0
    for quantile in (load.ttft_p50, load.ttft_p90):
        assert quantile is None or (math.isfinite(quantile) and quantile >= 0)


_engine_state = st.tuples(
    st.integers(0, 5000),  # running
    st.integers(0, 5000),  # waiting
    st.floats(0.0, 1.0),  # kv usage
    st.lists(st.floats(0.0, 30.0), max_size=20),  # TTFT observations
)


@settings(max_examples=60, deadline=None)
@given(engines=st.lists(_engine_state, min_size=1, max_size=4), old_kv=st.booleans())
def test_pages_rendered_by_prometheus_client_round_trip(
    engines: list[tuple[int, int, float, list[float]]], old_kv: bool
) -> None:
    registry = CollectorRegistry()
    labels = ["model_name", "engine"]
    running = Gauge(em.RUNNING, "running", labels, registry=registry)
    waiting = Gauge(em.WAITING, "waiting", labels, registry=registry)
    kv = Gauge(em.KV_USAGE_OLD if old_kv else em.KV_USAGE, "kv", labels, registry=registry)
    ttft = Histogram(_H, "ttft", labels, registry=registry, buckets=TTFT_BOUNDS)
    for i, (r, w, k, obs) in enumerate(engines):
        running.labels("m", str(i)).set(r)
        waiting.labels("m", str(i)).set(w)
        kv.labels("m", str(i)).set(k)
        child = ttft.labels("m", str(i))
        for o in obs:
            child.observe(o)
    load = em.parse(generate_latest(registry).decode())

    assert load.running == sum(e[0] for e in engines)
    assert load.waiting == sum(e[1] for e in engines)
    assert load.kv_usage == pytest.approx(sum(e[2] for e in engines) / len(engines))
    assert load.kv_family == (em.KV_USAGE_OLD if old_kv else em.KV_USAGE)
    assert load.engines == len(engines)
    all_obs = sorted(o for e in engines for o in e[3])
    assert load.ttft_count == len(all_obs)
    assert load.ttft_sum == pytest.approx(math.fsum(all_obs))
    if not all_obs:
        assert load.ttft_p50 is None
        return
    # The estimate lies in the bucket that holds the true median (or at the last bound).
    assert load.ttft_p50 is not None
    true_median = all_obs[math.ceil(0.5 * len(all_obs)) - 1]
    bounds = (0.0, *TTFT_BOUNDS)
    hi = next((b for b in TTFT_BOUNDS if true_median <= b), TTFT_BOUNDS[-1])
    lo = max((b for b in bounds if b < hi), default=0.0)
    assert lo - 1e-12 <= load.ttft_p50 <= hi + 1e-12


_CAPTURED = Path(__file__).resolve().parents[1] / "data" / "vllm_metrics_0.32.txt"


@pytest.mark.skipif(not _CAPTURED.exists(), reason="captured vLLM 0.32 page not in the tree")
def test_page_captured_from_a_real_vllm_parses() -> None:
    load = em.parse(_CAPTURED.read_text())
    assert load.kv_family == em.KV_USAGE and load.engines >= 1
    assert load.ttft_count is not None and load.ttft_count == load.ttft_buckets[-1][1]
    assert math.isinf(load.ttft_buckets[-1][0])
