"""The pure engine model in virtual time: prefix caching, preemption, queueing, determinism."""

from __future__ import annotations

import dataclasses

import pytest

from lab.engine_sim import model


def _words(n: int, salt: str) -> str:
    return " ".join(f"{salt}{i}" for i in range(n))


def _first_token_time(outs: list[model.StepOutput], rid: str) -> float:
    for out in outs:
        for ev in out.events:
            if ev.request_id == rid and ev.word is not None:
                return out.end_time
    raise AssertionError(f"{rid} produced no token")


def _finished(outs: list[model.StepOutput]) -> dict[str, model.FinishedStats]:
    return {f.request_id: f for out in outs for f in out.finished}


def _reply(outs: list[model.StepOutput], rid: str) -> str:
    return " ".join(ev.word for out in outs for ev in out.events
                    if ev.request_id == rid and ev.word is not None)


def test_tokenizer_round_trips_generated_text() -> None:
    words = list(model.REPLY_WORDS[:40])
    assert model.tokenize(" ".join(words)) == [model.word_id(w) for w in words]
    assert model.tokenize("Hello, world!") == [model.word_id(w) for w in
                                               ("Hello", ",", "world", "!")]
    assert all(t >= 256 for t in model.tokenize("a b c"))


def test_block_hash_chains_over_prefix() -> None:
    a = list(range(300, 348))  # three full blocks of 16
    b = a[:32] + list(range(900, 916))
    ha, hb = model.block_hashes(a, 16), model.block_hashes(b, 16)
    assert len(ha) == 3
    assert ha[:2] == hb[:2] and ha[2] != hb[2]
    # Same block content after a different prefix hashes differently.
    c = list(range(700, 716)) + a[16:32]
    assert model.block_hashes(c, 16)[1] != ha[1]
    # A partial block is never hashed.
    assert len(model.block_hashes(a[:47], 16)) == 2


def test_prefix_reuse_lowers_ttft_across_turns() -> None:
    eng = model.Engine(model.EngineConfig(seed=3, jitter=0.0))
    turn1 = [("system", "you are terse"), ("user", _words(400, "q"))]
    eng.add_request("t1", model.render_chat(turn1), 32, now=0.0)
    outs1 = model.run_until_idle(eng, 0.0)
    ttft1 = _first_token_time(outs1, "t1") - 0.0
    reply = _reply(outs1, "t1")
    assert len(reply.split()) == _finished(outs1)["t1"].num_generation_tokens

    start = outs1[-1].end_time + 1.0
    turn2 = [*turn1, ("assistant", reply), ("user", "and then what")]
    prompt2 = model.render_chat(turn2)
    eng.add_request("t2", prompt2, 32, now=start)
    outs2 = model.run_until_idle(eng, start)
    ttft2 = _first_token_time(outs2, "t2") - start
    cached = _finished(outs2)["t2"].num_cached_tokens

    # Turn 1's prompt *and* reply are cached: everything but the last partial block hits.
    prev = len(model.render_chat(turn1)) + len(reply.split())
    assert cached == (prev // 16) * 16
    assert ttft2 < ttft1 / 3
    assert eng.prefix_hits == cached
    assert eng.prefix_queries == len(model.render_chat(turn1)) + len(prompt2)


def test_no_reuse_without_prefix_caching() -> None:
    eng = model.Engine(model.EngineConfig(enable_prefix_caching=False))
    prompt = model.render_prompt(_words(200, "x"))
    eng.add_request("a", prompt, 4, now=0.0)
    model.run_until_idle(eng, 0.0)
    eng.add_request("b", prompt, 4, now=10.0)
    outs = model.run_until_idle(eng, 10.0)
    assert _finished(outs)["b"].num_cached_tokens == 0


def test_full_hit_still_computes_last_token() -> None:
    eng = model.Engine(model.EngineConfig())
    prompt = model.render_prompt(_words(63, "y"))  # 64 tokens = exactly 4 blocks
    eng.add_request("a", prompt, 2, now=0.0)
    model.run_until_idle(eng, 0.0)
    eng.add_request("b", prompt, 2, now=5.0)
    outs = model.run_until_idle(eng, 5.0)
    assert _finished(outs)["b"].num_cached_tokens == 48


def test_lru_eviction_drops_oldest_prefix_first() -> None:
    # 12 blocks: each 4-block prompt leaves its blocks cached; the 4th prompt must evict the
    # least recently freed prompt (a), not the most recent (c).
    eng = model.Engine(model.EngineConfig(num_blocks=12, jitter=0.0))
    prompts = {k: model.render_prompt(_words(70, k)) for k in "abcd"}
    t = 0.0
    for k in "abcd":
        eng.add_request(k, prompts[k], 1, now=t)
        t = model.run_until_idle(eng, t)[-1].end_time + 1
    for k, expect_hit in (("c", True), ("a", False)):
        eng.add_request(k + "2", prompts[k], 1, now=t)
        outs = model.run_until_idle(eng, t)
        t = outs[-1].end_time + 1
        assert (_finished(outs)[k + "2"].num_cached_tokens > 0) is expect_hit, k


def test_preemption_under_a_small_cache() -> None:
    # 8 requests of 60 prompt + 60 output tokens need 8 blocks each at the end; 24 blocks
    # hold all 8 prompts (4 blocks each is 32 > 24, so not even that): decoding must preempt.
    cfg = model.EngineConfig(num_blocks=24, max_num_seqs=8, reply_min=60, reply_max=60)
    eng = model.Engine(cfg)
    for i in range(8):
        eng.add_request(f"r{i}", model.render_prompt(_words(59, f"p{i}_")), 60, now=0.0)
    outs = model.run_until_idle(eng, 0.0)
    fin = _finished(outs)
    assert len(fin) == 8
    assert all(f.num_generation_tokens == 60 for f in fin.values())
    assert sum(o.num_preempted for o in outs) > 0
    assert eng.total_preemptions == sum(o.num_preempted for o in outs)
    assert max(len(o.events) for o in outs) <= 8
    # All blocks are back in the pool afterwards.
    assert eng.pool.num_free == cfg.num_blocks
    assert eng.kv_usage() == 0.0


def test_no_preemption_with_a_large_cache() -> None:
    cfg = model.EngineConfig(num_blocks=4096, max_num_seqs=8, reply_min=60, reply_max=60)
    eng = model.Engine(cfg)
    for i in range(8):
        eng.add_request(f"r{i}", model.render_prompt(_words(59, f"p{i}_")), 60, now=0.0)
    outs = model.run_until_idle(eng, 0.0)
    assert sum(o.num_preempted for o in outs) == 0


def test_queueing_under_load() -> None:
    cfg = model.EngineConfig(max_num_seqs=4, jitter=0.0, reply_min=20, reply_max=20)
    eng = model.Engine(cfg)
    for i in range(12):
        eng.add_request(f"r{i}", model.render_prompt(_words(30, f"z{i}_")), 20, now=0.0)
    first = eng.step(0.0)
    assert len(eng.running) == 4 and len(eng.waiting) == 8
    outs = [first, *model.run_until_idle(eng, first.end_time)]
    fin = _finished(outs)
    assert len(fin) == 12
    # The first wave never waited; the last wave waited for two waves to finish.
    assert all(fin[f"r{i}"].queued_time == 0.0 for i in range(4))
    assert all(fin[f"r{i}"].queued_time > 0.0 for i in range(8, 12))
    assert fin["r11"].queued_time > fin["r5"].queued_time
    assert fin["r11"].e2e_latency > 2.5 * fin["r0"].e2e_latency


def test_token_budget_chunks_long_prefill() -> None:
    cfg = model.EngineConfig(max_num_batched_tokens=256, jitter=0.0)
    eng = model.Engine(cfg)
    eng.add_request("long", model.render_prompt(_words(1000, "l")), 4, now=0.0)
    outs = model.run_until_idle(eng, 0.0)
    prefill_steps = [o for o in outs if o.num_prefill_tokens]
    assert len(prefill_steps) == 4  # 1001 tokens / 256 per step
    assert all(o.num_prefill_tokens <= 256 for o in outs)


def test_step_time_grows_with_prefill_and_batch() -> None:
    cfg = model.EngineConfig(jitter=0.0)
    small = model.Engine(cfg)
    small.add_request("a", model.render_prompt("hi"), 2, now=0.0)
    big = model.Engine(cfg)
    big.add_request("a", model.render_prompt(_words(1500, "b")), 2, now=0.0)
    assert big.step(0.0).duration > 5 * small.step(0.0).duration


def _trace(seed: int) -> list[tuple[float, list[tuple[str, str | None]]]]:
    eng = model.Engine(model.EngineConfig(seed=seed, num_blocks=40, max_num_seqs=6))
    for i in range(10):
        eng.add_request(f"r{i}", model.render_prompt(_words(40 + 7 * i, "d")), 50, now=0.0)
    outs = model.run_until_idle(eng, 0.0)
    return [(o.duration, [(e.request_id, e.word) for e in o.events]) for o in outs]


def test_deterministic_with_a_seed() -> None:
    assert _trace(7) == _trace(7)
    assert _trace(7) != _trace(8)


def test_validation_errors() -> None:
    eng = model.Engine(model.EngineConfig(max_model_len=100))
    with pytest.raises(model.RequestError, match="maximum context length"):
        eng.add_request("a", list(range(300, 390)), 20, now=0.0)
    with pytest.raises(model.RequestError):
        eng.add_request("b", [], 4, now=0.0)
    with pytest.raises(model.RequestError):
        eng.add_request("c", [300], 0, now=0.0)


def test_shrunk_cache_aborts_requests_that_can_never_fit() -> None:
    eng = model.Engine(model.EngineConfig(num_blocks=64))
    eng.resize_kv(2)
    assert eng.pool.capacity == 2
    eng.add_request("big", model.render_prompt(_words(100, "s")), 4, now=0.0)
    outs = model.run_until_idle(eng, 0.0)
    assert _finished(outs)["big"].finish_reason == "abort"
    eng.resize_kv(64)
    assert eng.pool.capacity == 64 and eng.pool.num_free == 64


def test_resize_while_blocks_in_use_retires_them_later() -> None:
    eng = model.Engine(model.EngineConfig(num_blocks=16, reply_min=40, reply_max=40))
    eng.add_request("a", model.render_prompt(_words(100, "u")), 40, now=0.0)
    eng.step(0.0)
    used = 16 - eng.pool.num_free
    eng.resize_kv(4)
    assert eng.pool.num_free == 0 and eng.kv_usage() == 1.0
    model.run_until_idle(eng, 1.0)
    assert eng.pool.capacity == 4 and eng.pool.num_free == 4
    assert used > 4


def test_abort_returns_blocks() -> None:
    eng = model.Engine(model.EngineConfig(num_blocks=32))
    eng.add_request("a", model.render_prompt(_words(100, "v")), 50, now=0.0)
    eng.step(0.0)
    assert eng.pool.num_free < 32
    eng.abort("a")
    assert eng.pool.num_free == 32 and not eng.has_work()


def test_same_prompt_same_reply_across_engines() -> None:
    cfg = model.EngineConfig(seed=11)
    replies = []
    for _ in range(2):
        eng = model.Engine(dataclasses.replace(cfg))
        eng.add_request("x", model.render_chat([("user", "tell me")]), 30, now=0.0)
        replies.append(_reply(model.run_until_idle(eng, 0.0), "x"))
    assert replies[0] == replies[1] and replies[0]
