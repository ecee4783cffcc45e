"""The plots draw from results files of every shape the benchmarks write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lab import bench_failover, bench_llm, benchplots
from tests.unit import test_benchreport as tb

pytestmark = pytest.mark.unit


def test_every_plot_is_drawn_from_its_results_file(tmp_path: Path) -> None:
    maglev = tb._doc("maglev", [
        {"name": f"maglev.build {n} backends M={m} weighted", "seconds": 0.01 * n ** 0.5,
         "equal_weights_seconds": 0.01, "ratio_to_equal": n ** 0.5, "backends": n, "size": m,
         **({"target_seconds": 0.05} if (n, m) == (1000, 65537) else {})}
        for m in (16381, 65537) for n in (10, 100, 1000)])
    fanout = tb._doc("fanout", [
        {"reports_per_s": 10, "engines_per_report": k, "changes_per_s": 10 * k,
         "latencies_ms": [1.0 + i for i in range(50)]} for k in (1, 8)], agents=1000)
    kvr = bench_failover.summarise("kvroute", [0.01, 0.02, 0.05], -2, 10, False, "m",
                                   rate_per_s=200.0)
    failover = tb._doc("failover", [kvr, bench_failover.kube_proxy_model(200.0, 4),
                                    bench_failover.envoy_model(200.0, 4)])
    llm = bench_llm.as_results_doc(tb.LLM_RESULT, "a test's own result")
    for doc in (tb.CONNECT, maglev, fanout, failover, llm):
        (tmp_path / f"{doc['bench']}.json").write_text(json.dumps(doc))
    written = benchplots.write_all(tmp_path)
    assert sorted(p.name for p in written) == sorted(
        png for png, _ in benchplots.benchreport.PLOTS.values())
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
