"""The failover bench's pure parts: bursts, timelines and the two modelled baselines."""

from __future__ import annotations

import pytest

from lab import bench_failover as bf

pytestmark = pytest.mark.unit


def test_bursts_split_on_gaps_and_summary_counts_the_first() -> None:
    times = [0.01, 0.02, 0.5, 2.0, 2.1]
    assert bf.bursts(times) == [[0.01, 0.02, 0.5], [2.0, 2.1]]
    row = bf.summarise("x", [-0.5, *times, 20.0], -1.0, 10.0, False, "b")
    # -0.5 (before the death) and 20 (past the window) are left out
    assert (row["failed"], row["later_failed"], row["recovery_s"]) == (3, 2, 0.5)
    tl = row["timeline"]
    assert len(tl["failed"]) == 110 and sum(tl["failed"]) == 5
    assert tl["failed"][10] == 2  # 0.01 and 0.02 s fall in [0, 0.1)


def test_kube_proxy_model_fails_a_share_of_connects_until_the_endpoint_goes() -> None:
    row = bf.kube_proxy_model(rate=100.0, engines=4)
    # NotReady after 20 + 5 s on average, + 1 s sync: 26 s of 25 connects/s to the dead one
    assert row["recovery_s"] == pytest.approx(26.0, abs=0.05)
    assert row["failed"] == 650 and row["later_failed"] == 0
    assert row["modelled"]


def test_envoy_model_ejects_after_five_and_retries_after_the_ejection_time() -> None:
    row = bf.envoy_model(rate=100.0, engines=4)
    # 5 failures 40 ms apart, ejected at 0.2 s; back at the sweep after 30.2 s (35 s)
    assert row["failed"] == 5 and row["recovery_s"] == pytest.approx(0.2)
    assert row["later_failed"] == 5
    later = [i for i, n in enumerate(row["timeline"]["failed"]) if n][-1]
    assert 35.0 <= -1.0 + later * bf.BIN_S <= 35.3
    # twice the rate: the same 5 failures, ejected twice as fast
    assert bf.envoy_model(rate=200.0, engines=4)["recovery_s"] == pytest.approx(0.1)
