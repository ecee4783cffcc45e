"""The simulator's HTTP edge on 127.0.0.1 (ephemeral ports): API shapes, metrics, faults."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import parser

from lab import traffic
from lab.engine_sim import faults, model, server

MODEL = "kvroute/tiny-sim"
# One pooled client: building a client per request costs tens of ms (its TLS context).
H = httpx.Client(timeout=10)
FAST = model.EngineConfig(step_base_s=0.001, prefill_token_s=0.000002, decode_seq_s=0.00001,
                          context_token_s=0.0, seed=5)


@pytest.fixture
def sim() -> Iterator[tuple[str, server.EngineServer]]:
    with server.running_in_thread(server.ServerConfig(engine_id="sim-a"), FAST) as pair:
        yield pair


@pytest.fixture
def url(sim: tuple[str, server.EngineServer]) -> str:
    return sim[0]


def _sse(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]


def _metrics(url: str) -> dict[str, parser.Metric]:
    text = H.get(f"{url}/metrics").text
    return {f.name: f for f in parser.text_string_to_metric_families(text)}


def _value(fams: dict[str, parser.Metric], family: str, sample: str) -> float:
    return sum(s.value for s in fams[family].samples if s.name == sample)


def test_chat_streaming_chunks_usage_and_done(url: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True}}
    r = H.post(f"{url}/v1/chat/completions", json=body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-engine-id"] == "sim-a"
    data = _sse(r.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    content = [c["choices"][0] for c in chunks[1:-1]]
    assert [c["finish_reason"] for c in content] == [None] * 5 + ["length"]
    text = "".join(c["delta"]["content"] for c in content)
    assert len(text.split()) == 6 == usage["completion_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + 6
    # <bos> <user> hello there <end> <assistant>
    assert usage["prompt_tokens"] == 6


def test_stream_without_usage_has_no_usage_chunk(url: str) -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "stream": True}
    chunks = [json.loads(d) for d in _sse(H.post(f"{url}/v1/chat/completions",
                                                     json=body).text)[:-1]]
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_completions_streaming(url: str) -> None:
    body = {"model": MODEL, "prompt": "once upon a time", "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}
    data = _sse(H.post(f"{url}/v1/completions", json=body).text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[0]["id"].startswith("cmpl-")
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert len("".join(texts).split()) == 4
    assert chunks[-1]["usage"]["completion_tokens"] == 4


def test_non_streaming_chat_and_completion(url: str) -> None:
    r = H.post(f"{url}/v1/chat/completions",
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                         "max_tokens": 5})
    j = r.json()
    assert r.status_code == 200 and j["object"] == "chat.completion"
    choice = j["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"].split()) == 5 == j["usage"]["completion_tokens"]
    assert choice["finish_reason"] == "length"
    r = H.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi",
                                                  "max_tokens": 300})
    j = r.json()
    assert j["object"] == "text_completion"
    # Replies end by themselves (finish "stop") before a generous max_tokens.
    assert j["choices"][0]["finish_reason"] == "stop"
    assert FAST.reply_min <= j["usage"]["completion_tokens"] <= FAST.reply_max


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                              "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 100000}, None),
    ("/v1/completions", {"prompt": {"x": 1}}, "prompt"),
])
def test_400_error_shape(url: str, path: str, body: dict[str, object],
                         param: str | None) -> None:
    r = H.post(f"{url}{path}", json=body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "BadRequestError" and err["code"] == 400
    assert err["param"] == param
    assert err["message"] and "Traceback" not in r.text


def test_error_shape_matches_captured_vllm(url: str) -> None:
    captured = json.loads((Path(__file__).parent.parent / "data" / "vllm_error_400.json")
                          .read_text())
    r = H.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi",
                                                 "max_tokens": -1})
    ours = r.json()
    assert set(ours) == set(captured)
    assert set(ours["error"]) == set(captured["error"])
    for key in ("type", "param", "code"):
        assert ours["error"][key] == captured["error"][key]


def test_bad_json_unknown_model_and_route(url: str) -> None:
    r = H.post(f"{url}/v1/completions", content=b"{nope")
    assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"
    r = H.post(f"{url}/v1/completions", json={"model": "other", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"
    r = H.get(f"{url}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == 404


def test_models_and_health(url: str) -> None:
    r = H.get(f"{url}/v1/models")
    j = r.json()
    assert j["object"] == "list" and j["data"][0]["id"] == MODEL
    assert j["data"][0]["object"] == "model" and j["data"][0]["max_model_len"] == 8192
    h = H.get(f"{url}/health")
    assert h.status_code == 200 and h.headers["x-engine-id"] == "sim-a"


def test_metrics_families_and_prefix_hits_across_turns(url: str) -> None:
    before = _metrics(url)
    for fam, typ in (("vllm:num_requests_running", "gauge"),
                     ("vllm:num_requests_waiting", "gauge"),
                     ("vllm:kv_cache_usage_perc", "gauge"),
                     ("vllm:prefix_cache_queries", "counter"),
                     ("vllm:prefix_cache_hits", "counter"),
                     ("vllm:num_preemptions", "counter"),
                     ("vllm:prompt_tokens", "counter"),
                     ("vllm:generation_tokens", "counter"),
                     ("vllm:request_success", "counter"),
                     ("vllm:time_to_first_token_seconds", "histogram"),
                     ("vllm:inter_token_latency_seconds", "histogram"),
                     ("vllm:e2e_request_latency_seconds", "histogram"),
                     ("vllm:request_queue_time_seconds", "histogram")):
        assert before[fam].type == typ, fam
        labels = before[fam].samples[0].labels
        assert labels["model_name"] == MODEL and labels["engine"] == "0"
    ttft_les = [s.labels["le"] for s in before["vllm:time_to_first_token_seconds"].samples
                if s.name.endswith("_bucket")]
    assert ttft_les[:3] == ["0.001", "0.005", "0.01"] and ttft_les[-1] == "+Inf"

    msgs = [{"role": "user", "content": " ".join(f"w{i}" for i in range(200))}]
    first = H.post(f"{url}/v1/chat/completions", json={"messages": msgs,
                                                          "max_tokens": 20}).json()
    msgs += [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
             {"role": "user", "content": "more please"}]
    second = H.post(f"{url}/v1/chat/completions", json={"messages": msgs,
                                                           "max_tokens": 20}).json()
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 208  # 203 + 20 tokens of turn 1, in whole 16-token blocks
    after = _metrics(url)
    hits = (_value(after, "vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total")
            - _value(before, "vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total"))
    queries = (_value(after, "vllm:prefix_cache_queries", "vllm:prefix_cache_queries_total")
               - _value(before, "vllm:prefix_cache_queries",
                        "vllm:prefix_cache_queries_total"))
    assert hits == cached
    assert queries == first["usage"]["prompt_tokens"] + second["usage"]["prompt_tokens"]
    succ = {s.labels["finished_reason"]: s.value for s in after["vllm:request_success"].samples
            if s.name == "vllm:request_success_total"}
    assert succ["length"] == 2
    assert _value(after, "vllm:time_to_first_token_seconds",
                  "vllm:time_to_first_token_seconds_count") == 2


def test_metrics_registry_is_per_engine() -> None:
    with server.running_in_thread(server.ServerConfig(model_name="m1"), FAST) as (u1, _), \
            server.running_in_thread(server.ServerConfig(model_name="m2"), FAST) as (u2, _):
        H.post(f"{u1}/v1/completions", json={"prompt": "a b c", "max_tokens": 2})
        m1, m2 = _metrics(u1), _metrics(u2)
    assert _value(m1, "vllm:generation_tokens", "vllm:generation_tokens_total") == 2
    assert _value(m2, "vllm:generation_tokens", "vllm:generation_tokens_total") == 0
    assert {s.labels["model_name"] for s in m2["vllm:generation_tokens"].samples} == {"m2"}


def _set_faults(url: str, client: httpx.Client | None = None, **update: object) -> httpx.Response:
    return (client or H).post(f"{url}/admin/faults", json=update)


def _refused(url: str) -> bool:
    """Whether a new TCP connect to the engine is refused (the listener is closed)."""
    host, port = httpx.URL(url).host, httpx.URL(url).port
    assert port is not None
    try:
        socket.create_connection((host, port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_fault_latency_and_errors(url: str) -> None:
    assert _set_faults(url, latency_ms=150).status_code == 200
    t0 = time.monotonic()
    assert H.get(f"{url}/health").status_code == 200
    assert time.monotonic() - t0 >= 0.14
    _set_faults(url, latency_ms=0, error_rate=1.0, error_code=500)
    r = H.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "InternalServerError"
    assert H.get(f"{url}/metrics").status_code == 200  # scrapes are not faulted
    _set_faults(url, error_rate=0.5, error_code=503)
    codes = [H.get(f"{url}/health").status_code for _ in range(60)]
    assert 10 < codes.count(503) < 50 and set(codes) == {200, 503}
    state = H.get(f"{url}/admin/state").json()
    assert state["faults"]["error_rate"] == 0.5 and state["engine_id"] == "sim-a"


def test_fault_update_validation(url: str) -> None:
    for bad in ({"error_code": 404}, {"bogus": 1}, {"hang": "yes"}, {"error_rate": 2},
                {"kv_blocks": -3}):
        r = _set_faults(url, **bad)
        assert r.status_code == 400, bad
        assert r.json()["error"]["type"] == "BadRequestError"


def test_fault_hang_then_release(url: str) -> None:
    _set_faults(url, hang=True)
    with pytest.raises(httpx.ReadTimeout), httpx.Client() as c:
        c.get(f"{url}/health", timeout=0.3)
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(
        httpx.get(f"{url}/health", timeout=5).status_code))
    t.start()
    time.sleep(0.2)
    assert not result  # still held
    _set_faults(url, hang=False)
    t.join(5)
    assert result == [200]


def test_fault_refuse_closes_listener_keeps_connections(url: str) -> None:
    with httpx.Client() as kept:
        assert kept.get(f"{url}/health").status_code == 200
        assert _set_faults(url, kept, refuse=True).status_code == 200
        assert _refused(url)
        # The established keep-alive connection still reaches the admin endpoint.
        assert kept.get(f"{url}/admin/state").json()["listening"] is False
        _set_faults(url, kept, refuse=False)
    time.sleep(0.1)
    assert not _refused(url)
    assert H.get(f"{url}/health").status_code == 200


def test_fault_refuse_for_a_while(url: str) -> None:
    _set_faults(url, refuse=True, refuse_s=0.3)
    assert _refused(url)
    deadline = time.monotonic() + 3
    while _refused(url):
        assert time.monotonic() < deadline, "engine did not listen again after refuse_s"
        time.sleep(0.05)


def test_fault_saturate_shrinks_kv_cache(url: str) -> None:
    _set_faults(url, kv_blocks=8)
    state = H.get(f"{url}/admin/state").json()
    assert state["engine"]["kv_blocks_capacity"] == 8
    # 300 tokens need 19 blocks: it can never fit, the engine aborts instead of wedging.
    r = H.post(f"{url}/v1/completions",
                   json={"prompt": " ".join(["z"] * 300), "max_tokens": 4}, timeout=5)
    assert r.json()["choices"][0]["finish_reason"] == "abort"
    _set_faults(url, kv_blocks=0)
    assert H.get(f"{url}/admin/state").json()["engine"]["kv_blocks_capacity"] == 4096


def test_fault_crash_calls_exit() -> None:
    calls: list[int] = []
    with server.running_in_thread(engine_config=FAST, exit_fn=calls.append) as (url, _):
        assert _set_faults(url, crash=True).status_code == 200
        time.sleep(0.2)
    assert calls == [1]


def test_startup_faults() -> None:
    start = faults.FaultState(error_rate=1.0, error_code=503)
    with server.running_in_thread(engine_config=FAST, faults=start) as (url, _):
        assert H.get(f"{url}/health").status_code == 503


def test_client_disconnect_aborts_request(url: str) -> None:
    # 8000 tokens would take > 8 s at 1 ms a step: only an abort empties the engine in 3 s.
    body = {"prompt": "go", "max_tokens": 8000, "ignore_eos": True, "stream": True}
    with httpx.Client() as c, c.stream("POST", f"{url}/v1/completions", json=body) as r:
        for _ in r.iter_lines():
            break
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and H.get(f"{url}/admin/state").json()[
            "engine"]["running"]:
        time.sleep(0.05)
    assert H.get(f"{url}/admin/state").json()["engine"]["running"] == 0


def test_cli_subprocess_signals_toggle_refuse(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lab.engine_sim", "--port", "0", "--engine-id", "cli-sim"],
        cwd=repo, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert m, line
        url = f"http://127.0.0.1:{m.group(1)}"
        r = H.get(f"{url}/health")
        assert r.headers["x-engine-id"] == "cli-sim"
        os.kill(proc.pid, signal.SIGUSR2)
        time.sleep(0.2)
        assert _refused(url)
        os.kill(proc.pid, signal.SIGUSR2)
        time.sleep(0.2)
        assert not _refused(url)
    finally:
        proc.terminate()
        proc.wait(5)


# -- lab.traffic against simulators ------------------------------------------------------------

def test_traffic_pure_helpers() -> None:
    assert traffic.percentiles([]) == {"p50": None, "p90": None, "p99": None, "mean": None}
    p = traffic.percentiles([float(i) for i in range(1, 101)])
    assert (p["p50"], p["p90"], p["p99"], p["mean"]) == (50.0, 90.0, 99.0, 50.5)
    engines = ["a", "b", "c"]
    rng = random.Random(0)
    assert len({traffic.pick_engine("sticky", "s1", engines, rng) for _ in range(20)}) == 1
    assert len({traffic.pick_engine("random", "s1", engines, rng) for _ in range(50)}) == 3
    page = ('# TYPE vllm:prefix_cache_queries counter\n'
            'vllm:prefix_cache_queries_total{engine="0",model_name="m"} 40.0\n'
            '# TYPE vllm:prefix_cache_hits counter\n'
            'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 16.0\n')
    assert traffic.prefix_counters(page) == (40.0, 16.0)
    assert traffic.user_message(1, "s", 0, 5) == traffic.user_message(1, "s", 0, 5)
    assert traffic.user_message(1, "s", 0, 5) != traffic.user_message(1, "s", 1, 5)


def _traffic(urls: list[str], routing: str) -> dict[str, object]:
    cfg = traffic.Config(engines=tuple(urls), routing=routing, sessions=6, turns=4,
                         concurrency=6, think_time=0.0, prompt_words=40, max_tokens=16,
                         seed=2)
    return asyncio.run(traffic.run(cfg))


@pytest.mark.parametrize("routing", ["sticky", "random"])
def test_traffic_routing_and_prefix_ratio(routing: str) -> None:
    with server.running_in_thread(server.ServerConfig(engine_id="e0"), FAST) as (u0, _), \
            server.running_in_thread(server.ServerConfig(engine_id="e1"), FAST) as (u1, _), \
            server.running_in_thread(server.ServerConfig(engine_id="e2"), FAST) as (u2, _):
        rep = _traffic([u0, u1, u2], routing)
    assert rep["ok"] == rep["requests"] == 24 and not rep["errors"]
    sessions = rep["sessions"]
    assert isinstance(sessions, list) and len(sessions) == 6
    assert all(set(s["engines"]) <= {"e0", "e1", "e2"} for s in sessions)
    ratio = rep["prefix_cache_hit_ratio"]
    assert isinstance(ratio, float)
    ttft = rep["ttft_s"]
    assert isinstance(ttft, dict) and ttft["p50"] is not None
    if routing == "sticky":
        assert all(s["distinct_engines"] == 1 for s in sessions)
        assert rep["turns_on_same_engine_as_previous"] == 1.0
        # Turns 2-4 reuse everything before the last partial block of the previous turn.
        assert ratio > 0.55
    else:
        assert any(s["distinct_engines"] > 1 for s in sessions)
        assert ratio < 0.55


def test_traffic_counts_errors() -> None:
    start = faults.FaultState(error_rate=1.0, error_code=503)
    with server.running_in_thread(engine_config=FAST, faults=start) as (url, _):
        cfg = traffic.Config(engines=(url,), sessions=2, turns=2, think_time=0.0,
                             model=MODEL, max_tokens=4)
        rep = asyncio.run(traffic.run(cfg))
    assert rep["ok"] == 0 and rep["errors"] == {"HTTP 503": 4}


def test_engine_step_failure_aborts_in_flight_and_recovers(
        sim: tuple[str, server.EngineServer]) -> None:
    url, srv = sim

    def broken(now: float) -> model.Batch:
        raise RuntimeError("model bug")

    srv.engine.schedule = broken  # type: ignore[method-assign]
    r = H.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 3}, timeout=5)
    assert r.json()["choices"][0]["finish_reason"] == "abort"
    r = H.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 3}, timeout=5)
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_http_requests_counted_like_vllms_instrumentator(url: str) -> None:
    body = {"model": MODEL, "prompt": "count me", "max_tokens": 2}
    assert H.post(f"{url}/v1/completions", json=body).status_code == 200
    _set_faults(url, error_rate=1.0, error_code=503)
    assert H.post(f"{url}/v1/completions", json=body).status_code == 503
    _set_faults(url, error_rate=0.0)
    H.get(f"{url}/health")
    samples = {(s.labels["handler"], s.labels["method"], s.labels["status"]): s.value
               for s in _metrics(url)["http_requests"].samples
               if s.name == "http_requests_total"}
    assert samples == {("/v1/completions", "POST", "2xx"): 1.0,
                       ("/v1/completions", "POST", "5xx"): 1.0}  # /health, /metrics: not counted


def test_fault_stall_holds_running_requests_without_tokens(url: str) -> None:
    before = _value(_metrics(url), "vllm:generation_tokens", "vllm:generation_tokens_total")
    _set_faults(url, stall=True)
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(H.post(
        f"{url}/v1/completions", json={"model": MODEL, "prompt": "stuck", "max_tokens": 4}
    ).status_code))
    t.start()
    time.sleep(0.3)
    fams = _metrics(url)
    assert not result  # held
    assert _value(fams, "vllm:num_requests_running", "vllm:num_requests_running") == 1
    assert _value(fams, "vllm:generation_tokens", "vllm:generation_tokens_total") == before
    assert H.get(f"{url}/health").status_code == 200  # the server itself still answers
    _set_faults(url, stall=False)
    t.join(5)
    assert result == [200]
    after = _value(_metrics(url), "vllm:generation_tokens", "vllm:generation_tokens_total")
    assert after == before + 4


def test_fault_spare_health_fails_clients_but_not_the_health_check(url: str) -> None:
    _set_faults(url, error_rate=1.0, error_code=503, spare_health=True)
    assert H.get(f"{url}/health").status_code == 200
    assert H.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 1}
                  ).status_code == 503
    _set_faults(url, spare_health=False)
    assert H.get(f"{url}/health").status_code == 503
