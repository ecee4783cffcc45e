"""The agent's /readyz and /livez: the pure verdicts, and the HTTP edge serving them from
what it finds in a pin dir (plain files stand in for the pins: readiness looks at names)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from dataplane import agent as agent_mod
from dataplane import loader, pins, probes
from dataplane.maps import PINNED_MAPS
from dataplane.settings import Settings

pytestmark = pytest.mark.unit

PROGRAMS = [p.name for p in loader.PROGRAMS]
ALL = probes.Facts(links=frozenset(PROGRAMS), maps=frozenset(PINNED_MAPS), applied=True)


def test_ready_needs_links_maps_and_an_applied_state() -> None:
    assert probes.readiness(ALL, PROGRAMS, PINNED_MAPS) == probes.Verdict(True, ())
    assert probes.readiness(ALL, PROGRAMS, PINNED_MAPS).text() == "ok\n"
    no_link = probes.Facts(ALL.links - {"sock4_connect"}, ALL.maps, True)
    verdict = probes.readiness(no_link, PROGRAMS, PINNED_MAPS)
    assert not verdict.ok and verdict.problems == ("links not pinned: sock4_connect",)
    no_map = probes.Facts(ALL.links, ALL.maps - {PINNED_MAPS[0]}, True)
    assert probes.readiness(no_map, PROGRAMS, PINNED_MAPS).problems == (
        f"maps not pinned: {PINNED_MAPS[0]}",)
    unapplied = probes.Facts(ALL.links, ALL.maps, False)
    assert probes.readiness(unapplied, PROGRAMS, PINNED_MAPS).problems == (
        "no desired state applied yet",)
    nothing = probes.readiness(probes.Facts(frozenset(), frozenset(), False), PROGRAMS,
                               PINNED_MAPS)
    assert len(nothing.problems) == 3 and nothing.text().count("\n") == 3


def test_live_needs_every_task_running() -> None:
    assert probes.liveness({"controller-stream": True, "engine-scrapes": True}).ok
    dead = probes.liveness({"controller-stream": True, "engine-scrapes": False})
    assert not dead.ok and dead.problems == ("task engine-scrapes has ended",)
    assert not probes.liveness({}).ok  # before the loop started its tasks


def _fake_pins(pin_dir: Path) -> None:
    (pin_dir / pins.LINKS_DIR).mkdir(parents=True)
    for name in PROGRAMS:
        (pin_dir / pins.LINKS_DIR / name).touch()
    for name in PINNED_MAPS:
        (pin_dir / name).touch()


def test_the_agent_serves_readyz_livez_and_metrics(tmp_path: Path) -> None:
    pin_dir = tmp_path / "pins"
    cfg = tmp_path / "kvroute.yaml"
    cfg.write_text("services: []\n")
    agent = agent_mod.Agent(Settings(pin_dir=pin_dir), tmp_path, cfg)
    agent._http_sock = agent_mod._bind("127.0.0.1", 0)
    port = agent._http_sock.getsockname()[1]

    async def scenario() -> list[tuple[str, int, str]]:
        seen: list[tuple[str, int, str]] = []
        never = asyncio.Event()
        agent._tasks = {"config-file": asyncio.create_task(never.wait())}  # type: ignore[dict-item]
        runner = await agent._serve_http()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                     trust_env=False) as http:
            async def get(path: str, step: str) -> None:
                r = await http.get(path)
                seen.append((step, r.status_code, r.text))
            await get("/readyz", "nothing pinned")
            _fake_pins(pin_dir)
            await get("/readyz", "pinned, not applied")
            agent._ready()
            await get("/readyz", "ready")
            (pin_dir / PINNED_MAPS[0]).unlink()  # someone uninstalled under the agent
            await get("/readyz", "a map gone")
            await get("/livez", "live")
            await get("/metrics", "metrics")
            agent._tasks["config-file"].cancel()
            await asyncio.sleep(0)
            await get("/livez", "a task ended")
        await runner.cleanup()
        return seen

    try:
        seen = {step: (status, body) for step, status, body in asyncio.run(scenario())}
    finally:
        agent.close(detach=False)
    assert seen["nothing pinned"][0] == 503
    assert "links not pinned" in seen["nothing pinned"][1]
    assert seen["pinned, not applied"] == (503, "no desired state applied yet\n")
    assert seen["ready"] == (200, "ok\n")
    assert seen["a map gone"] == (503, f"maps not pinned: {PINNED_MAPS[0]}\n")
    assert seen["live"] == (200, "ok\n")
    assert seen["metrics"][0] == 200 and "kvroute_agent_apply_seconds" in seen["metrics"][1]
    assert seen["a task ended"] == (503, "task config-file has ended\n")
