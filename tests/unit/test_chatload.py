"""The LLM workload (lab.chatload): its pure summaries, and the openai client path
against the engine simulator on 127.0.0.1."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest

from lab import chatload, traffic
from lab.engine_sim import model, server

FAST = model.EngineConfig(step_base_s=0.001, prefill_token_s=0.000002, decode_seq_s=0.00001,
                          context_token_s=0.0, seed=3)


def _turn(session: str, turn: int, engine: str = "e0", ok: bool = True,
          ttft: float | None = 0.1, tokens: int = 10) -> traffic.TurnResult:
    return traffic.TurnResult(session=session, turn=turn, url="u", engine=engine, ok=ok,
                              error=None if ok else "APIConnectionError",
                              ttft=ttft if ok else None, completion_tokens=tokens if ok else None)


def test_imbalance_is_the_mean_of_max_over_mean_skipping_idle_samples() -> None:
    assert chatload.imbalance([[2, 2, 2, 2], [4, 0, 0, 0], [0, 0, 0, 0]]) == pytest.approx(2.5)
    assert chatload.imbalance([[0, 0]]) is None
    assert chatload.imbalance([]) is None


def test_prefix_delta_counts_a_restarted_engine_from_zero() -> None:
    before = {"a": (100.0, 50.0), "b": (200.0, 100.0)}
    after = {"a": (150.0, 90.0), "b": (30.0, 10.0)}  # b restarted: its counters went down
    assert chatload.prefix_delta(before, after) == (50.0 + 30.0, 40.0 + 10.0)
    # An engine only seen after (started during the run) counts whole.
    assert chatload.prefix_delta({}, {"c": (5.0, 1.0)}) == (5.0, 1.0)


def test_summarize_counts_failures_tokens_and_engine_changes() -> None:
    turns = [_turn("s1", 0, "e0"), _turn("s1", 1, "e0"), _turn("s1", 2, "e1"),
             _turn("s2", 0, "e1", ttft=0.3), _turn("s2", 1, ok=False)]
    row = chatload.summarize(turns, wall=2.0, prefix=(1000.0, 250.0),
                             running_samples=[[1, 3]])
    assert (row["requests"], row["ok"], row["failed"]) == (5, 4, 1)
    assert row["errors"] == {"APIConnectionError": 1}
    assert row["tokens_per_s"] == 20.0  # 4 ok turns x 10 tokens / 2 s
    assert row["prefix_cache_hit_ratio"] == 0.25
    assert row["imbalance_running"] == 1.5
    # s1: e0 -> e0 (same), e0 -> e1 (moved); s2's failed turn says nothing.
    assert row["turns_on_previous_engine"] == 0.5
    assert row["ttft_ms"]["p50"] == 100.0 and row["ttft_ms"]["p99"] == 300.0


def test_summarize_of_nothing_has_no_ratios() -> None:
    row = chatload.summarize([], wall=1.0, prefix=(0.0, 0.0), running_samples=[])
    assert row["prefix_cache_hit_ratio"] is None and row["turns_on_previous_engine"] is None
    assert row["ttft_ms"]["p50"] is None and row["failed"] == 0


def test_ratios_against_a_baseline() -> None:
    base = {"ttft_ms": {"p50": 100.0, "p99": 400.0}, "tokens_per_s": 50.0,
            "prefix_cache_hit_ratio": 0.30}
    row = {"ttft_ms": {"p50": 50.0, "p99": 600.0}, "tokens_per_s": 75.0,
           "prefix_cache_hit_ratio": 0.80}
    assert chatload.ratios(row, base) == {"ttft_p50_x": 0.5, "ttft_p99_x": 1.5,
                                          "tokens_per_s_x": 1.5, "prefix_hit_points": 50.0}


def test_runs_share_shapes_but_no_prefix() -> None:
    wl = chatload.Workload(first_words=40, turn_words=7)
    a, b = (chatload.user_message(wl, run, 3, 0) for run in ("run-a", "run-b"))
    assert a.split()[0] == "run-a" and b.split()[0] == "run-b"
    assert a.split()[1:] == b.split()[1:] and len(a.split()) == 41
    # Later turns carry no nonce (the conversation before them already differs).
    assert chatload.user_message(wl, "run-a", 3, 1) == chatload.user_message(wl, "run-b", 3, 1)
    assert len(chatload.user_message(wl, "run-a", 3, 1).split()) == 7


@pytest.mark.parametrize("bad", [{"users": 0}, {"turns": 0}, {"think_time": -1},
                                 {"seconds": 0}, {"timeout": 0}])
def test_workload_refuses_nonsense(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        chatload.Workload(**bad)  # type: ignore[arg-type]


@pytest.fixture
def sim() -> Iterator[str]:
    with server.running_in_thread(server.ServerConfig(engine_id="sim-a"), FAST) as (url, _):
        yield url


def test_drive_streams_multi_turn_chats_through_the_openai_client(sim: str, tmp_path) -> None:
    wl = chatload.Workload(users=2, sessions=3, turns=3, first_words=120, turn_words=10,
                           max_tokens=5, think_time=0)
    model_name = chatload.warm(sim)
    with chatload.EngineWatch({"sim-a": sim}, interval=0.05) as watch:
        before = watch.prefix()
        turns, wall = chatload.drive_blocking(sim, wl, "t1", model_name,
                                              progress=tmp_path / "p.jsonl")
        row = chatload.summarize(turns, wall, chatload.prefix_delta(before, watch.prefix()),
                                 watch.samples)
    assert row["ok"] == row["requests"] == 9, row
    assert {t.session for t in turns} == {"t1-00000", "t1-00001", "t1-00002"}
    assert all(t.completion_tokens == 5 and t.engine == "sim-a" for t in turns)  # ignore_eos
    # Every turn re-sends the conversation: later turns find it in the prefix cache.
    assert row["prefix_cache_hit_ratio"] > 0.5
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 9


def test_each_turn_opens_a_new_connection(sim: str) -> None:
    """The per-connection policies decide every turn only if each turn connects anew."""
    host, port = sim.split("//")[1].split(":")
    accepted = []
    front = socket.create_server(("127.0.0.1", 0))

    def relay() -> None:
        while True:
            try:
                conn, _ = front.accept()
            except OSError:
                return
            accepted.append(conn)
            back = socket.create_connection((host, int(port)))
            for a, b in ((conn, back), (back, conn)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()

    threading.Thread(target=relay, daemon=True).start()
    url = f"http://127.0.0.1:{front.getsockname()[1]}"
    wl = chatload.Workload(users=1, sessions=2, turns=3, first_words=5, turn_words=2,
                           max_tokens=2, think_time=0)
    try:
        turns, _ = chatload.drive_blocking(url, wl, "conn", chatload.warm(sim))
    finally:
        front.close()
    assert all(t.ok for t in turns) and len(turns) == 6
    assert len(accepted) == 6


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def test_a_dead_target_fails_turns_and_ends_their_sessions() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connects are refused
        wl = chatload.Workload(users=2, sessions=4, turns=3, first_words=5, turn_words=2,
                               max_tokens=2, timeout=5)
        turns, _ = chatload.drive_blocking(f"http://127.0.0.1:{port}", wl, "dead", "m")
    assert len(turns) == 4 and not any(t.ok for t in turns)
    assert {t.error for t in turns} == {"APIConnectionError"}
