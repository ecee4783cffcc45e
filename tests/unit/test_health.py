"""dataplane.health: counters in, verdict out (5xx, stalled) — and the progress counters
enginemetrics reads from a real vLLM page."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dataplane import enginemetrics, health

CFG = health.JudgeConfig(stall_window=2.0, error_share=0.5)


def prog(running: float = 0.0, tokens: float | None = 0.0, ok: float | None = 0.0,
         bad: float | None = 0.0) -> enginemetrics.Progress:
    return enginemetrics.Progress(running=running, generation_tokens=tokens, http_2xx=ok,
                                  http_5xx=bad)


def run(readings: list[tuple[float, enginemetrics.Progress]]) -> list[str | None]:
    """Verdicts of a sequence of (time, counters) scrapes of one engine."""
    previous: health.Reading | None = None
    out = []
    for now, p in readings:
        verdict, previous = health.judge(previous, p, now, CFG)
        out.append(verdict)
    return out


# -- 5xx ------------------------------------------------------------------------------------


def test_the_first_reading_is_a_baseline() -> None:
    assert run([(0.0, prog(running=5, bad=1000))]) == [None]


def test_5xx_without_2xx_fail() -> None:
    assert run([(0.0, prog(ok=10, bad=0)), (0.25, prog(ok=10, bad=1))]) == [None, "5xx"]


def test_5xx_beside_enough_2xx_pass_and_a_high_share_fails() -> None:
    assert run([(0.0, prog(ok=0, bad=0)), (0.25, prog(ok=10, bad=4)),  # 4/14 < 0.5
                (0.5, prog(ok=12, bad=7))]) == [None, None, "5xx"]  # 3/5 >= 0.5


def test_no_new_answers_is_no_verdict() -> None:
    assert run([(0.0, prog(ok=10, bad=10)), (0.25, prog(ok=10, bad=10))]) == [None, None]


def test_a_restarted_engine_counts_from_zero() -> None:
    # 5xx went down (a restart): the new value is the increase, 2 errors and no 2xx.
    assert run([(0.0, prog(ok=100, bad=50)), (0.25, prog(ok=0, bad=2))]) == [None, "5xx"]


def test_pages_without_http_counters_are_not_judged_on_5xx() -> None:
    assert run([(0.0, prog(ok=None, bad=None)), (0.25, prog(ok=None, bad=None))]) == [None, None]
    # The counter vanished (another exporter after a restart): nothing to judge either.
    assert run([(0.0, prog(ok=3, bad=0)), (0.25, prog(ok=None, bad=None))]) == [None, None]


def test_a_family_that_appears_counts_from_zero() -> None:
    """Exporters create series on the first request: absent before means none then."""
    assert run([(0.0, prog(ok=None, bad=None)), (0.25, prog(ok=0, bad=1))]) == [None, "5xx"]
    assert run([(0.0, prog(ok=None, bad=None)), (0.25, prog(ok=9, bad=1))]) == [None, None]


def test_after_5xx_quiet_intervals_are_unproven_until_a_2xx() -> None:
    previous: health.Reading | None = None
    seen = []
    for now, p in [(0.0, prog(ok=5, bad=0)), (0.25, prog(ok=5, bad=3)),  # 5xx
                   (0.5, prog(ok=5, bad=3)), (0.75, prog(ok=5, bad=3)),  # quiet
                   (1.0, prog(ok=6, bad=3)), (1.25, prog(ok=6, bad=3))]:  # a 2xx, quiet
        verdict, previous = health.judge(previous, p, now, CFG)
        seen.append((verdict, health.unproven(previous)))
    assert seen == [(None, False), ("5xx", True), (None, True), (None, True),
                    (None, False), (None, False)]


def test_quiet_intervals_of_a_healthy_engine_are_proven() -> None:
    previous = health.judge(None, prog(ok=5), 0.0, CFG)[1]
    verdict, reading = health.judge(previous, prog(ok=5), 0.25, CFG)
    assert verdict is None and not health.unproven(reading)


# -- stalled ----------------------------------------------------------------------------------


def test_running_requests_without_new_tokens_stall_after_the_window() -> None:
    verdicts = run([(t, prog(running=3, tokens=50)) for t in (0.0, 1.0, 2.0, 2.01, 3.0)])
    assert verdicts == [None, None, None, "stalled", "stalled"]


def test_advancing_tokens_or_an_idle_engine_never_stall() -> None:
    assert run([(float(t), prog(running=3, tokens=10 * t)) for t in range(6)]) == [None] * 6
    assert run([(float(t), prog(running=0, tokens=7)) for t in range(6)]) == [None] * 6


def test_the_stall_clock_starts_at_the_last_reading_that_moved() -> None:
    readings = [(0.0, prog(running=0, tokens=5)), (1.0, prog(running=2, tokens=5)),
                (2.5, prog(running=2, tokens=9)), (4.0, prog(running=2, tokens=9)),
                (4.6, prog(running=2, tokens=9))]
    assert run(readings) == [None, None, None, None, "stalled"]


def test_tokens_moving_again_clear_the_verdict() -> None:
    readings = [(0.0, prog(running=1, tokens=5)), (3.0, prog(running=1, tokens=5)),
                (3.25, prog(running=1, tokens=6))]
    assert run(readings) == [None, "stalled", None]


def test_pages_without_the_token_counter_are_not_judged_on_stalls() -> None:
    assert run([(float(t), prog(running=3, tokens=None)) for t in range(5)]) == [None] * 5


@given(st.lists(st.tuples(st.floats(0, 1e3), st.floats(0, 1e3), st.floats(0, 1e6),
                          st.floats(0, 1e6), st.floats(0, 1e6)), min_size=1, max_size=30),
       st.floats(0.01, 1.0))
def test_verdicts_follow_the_rules(steps: list[tuple[float, float, float, float, float]],
                                   dt: float) -> None:
    """Whatever the counters do: a 5xx verdict only when 5xx grew, a stall only while
    running and never before a full window without token progress."""
    previous: health.Reading | None = None
    now = 0.0
    for running, _, tokens, ok, bad in steps:
        current = prog(running=running, tokens=tokens, ok=ok, bad=bad)
        verdict, reading = health.judge(previous, current, now, CFG)
        if verdict == "5xx":
            assert previous is not None and previous.progress.http_5xx != bad and bad > 0
        if verdict == "stalled":
            assert running > 0 and previous is not None
            assert previous.progress.generation_tokens == tokens
            assert now - reading.moving_since > CFG.stall_window
        assert reading.at == now and reading.moving_since <= now
        previous, now = reading, now + dt


@pytest.mark.parametrize("kw", [{"stall_window": 0}, {"stall_window": float("nan")},
                                {"error_share": 0}, {"error_share": 1.5}])
def test_bad_configs_are_refused(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        health.JudgeConfig(**kw)


# -- the counters on a page -------------------------------------------------------------------

_CAPTURED = Path(__file__).resolve().parents[1] / "data" / "vllm_metrics_0.32.txt"


def test_progress_from_the_captured_vllm_page() -> None:
    load, progress = enginemetrics.parse_page(_CAPTURED.read_text())
    assert progress.running == load.running == 0.0
    assert progress.generation_tokens == 47.0
    # 5 chat + 1 completion 2xx; the one 4xx is a client error and counts nowhere.
    assert (progress.http_2xx, progress.http_5xx) == (6.0, 0.0)


def test_progress_counts_inference_handlers_only() -> None:
    page = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0"} 2
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0"} 0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0"} 0.1
# TYPE http_requests_total counter
http_requests_total{handler="/v1/completions",method="POST",status="5xx"} 3
http_requests_total{handler="/v1/chat/completions",method="POST",status="5xx"} 4
http_requests_total{handler="/v1/chat/completions",method="POST",status="2xx"} 9
http_requests_total{handler="/v1/models",method="GET",status="5xx"} 100
"""
    _, progress = enginemetrics.parse_page(page)
    assert (progress.running, progress.http_2xx, progress.http_5xx) == (2.0, 9.0, 7.0)
    assert progress.generation_tokens is None


def test_a_bad_http_counter_fails_the_page() -> None:
    page = """vllm:num_requests_running 0
vllm:num_requests_waiting 0
vllm:kv_cache_usage_perc 0
http_requests_total{handler="/v1/completions",method="POST",status="5xx"} -3
"""
    with pytest.raises(enginemetrics.MetricsError, match="http_requests_total"):
        enginemetrics.parse_page(page)
