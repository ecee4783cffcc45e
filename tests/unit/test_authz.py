"""The identity format (dataplane.api.identity) and the controller's rules on it
(controller.authz), without gRPC."""

from __future__ import annotations

import pytest

from controller import authz
from dataplane import model, reports, scraper
from dataplane.api import identity


def test_node_uri_round_trips_and_refuses_what_is_not_a_node_name() -> None:
    assert identity.node_uri("gpu-7.zone-a") == "spiffe://kvroute/node/gpu-7.zone-a"
    assert identity.node_of([identity.node_uri("gpu-7")]) == "gpu-7"
    for bad in ("", "GPU", "a/b", "-a", "a" * 254, "a b"):
        with pytest.raises(model.ModelError):
            identity.node_uri(bad)


@pytest.mark.parametrize(("uris", "node"), [
    ([], None),
    (["spiffe://kvroute/controller"], None),
    (["spiffe://other/node/a"], None),
    (["spiffe://kvroute/node/a", "spiffe://kvroute/node/b"], None),  # ambiguous
    (["spiffe://kvroute/node/a", "spiffe://kvroute/node/a"], "a"),
    (["spiffe://kvroute/node/a/../b"], None),
    (["spiffe://kvroute/node/"], None),
    (["https://x", "spiffe://kvroute/node/n1"], "n1"),
])
def test_node_of(uris: list[str], node: str | None) -> None:
    assert identity.node_of(uris) == node


def test_claims() -> None:
    peer = authz.Peer(True, "n1")
    assert authz.claim_refused(peer, "n1", "n1") is None
    assert authz.claim_refused(peer, "n1-kvroute", "n1") is None
    assert "not the certificate's" in (authz.claim_refused(peer, "n1", "n2") or "")
    assert "does not belong" in (authz.claim_refused(peer, "n2", "n1") or "")
    assert "does not belong" in (authz.claim_refused(peer, "n10", "n1") or "")
    assert "names no kvroute node" in (authz.claim_refused(authz.Peer(True, None), "n1", "n1")
                                        or "")
    assert authz.claim_refused(authz.PLAINTEXT, "anything", "") is None  # the lab


def test_scoped_report_keeps_own_and_unclaimed_engines() -> None:
    ids = [f"10.0.0.{i}:8000/tcp" for i in range(1, 5)]  # the last: no engine of the fleet
    refs = {i: model.EngineRef(i, f"http://{i[:-4]}/metrics", f"http://{i[:-4]}/health", node)
            for i, node in zip(ids, ("n1", "n2", None), strict=False)}
    report = reports.AgentReport(
        "n1", "n1", 0, "",
        engines=tuple(scraper.ScrapeResult(i, True, True, 0.0, None, None) for i in ids),
        counters=tuple(reports.BackendCounters(i, connects=1) for i in ids))
    scoped, dropped = authz.scoped_report(authz.Peer(True, "n1"), report, refs.get)
    assert [r.identity for r in scoped.engines] == [ids[0], ids[2]]
    assert [c.identity for c in scoped.counters] == [ids[0], ids[2]]
    assert dropped == 4
    assert authz.scoped_report(authz.PLAINTEXT, report, refs.get) == (report, 0)
