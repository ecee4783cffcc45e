"""Requests/s through a NodePort vs. direct to the pod, in the NodePort lab.

``python -m lab.bench_nodeport`` builds the lab (lab/nodeport.py), serves HTTP from both
pods with lab/httpserve.c, and runs wrk in the client namespace against four targets,
alternating NodePort and direct runs so drift on a shared machine hits both alike:

- the NodePort with a local backend vs. the local pod's own address (both routed by the
  node; the NodePort adds the packet path's DNAT and conntrack);
- the NodePort with a remote backend (SNAT, through the second node) vs. the remote
  pod's address;

each with keep-alive connections (the per-packet cost) and with a new connection per
request (``Connection: close``: the per-flow cost, a conntrack pair written and closed
per request). Reports medians of the rounds and the ratio NodePort / direct.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
from typing import Any

from lab import connbench
from lab import netns as lab_netns
from lab import nodeport as nplab

SOURCE = connbench.SOURCE.with_name("httpserve.c")
_RATE = re.compile(r"^Requests/sec:\s+([0-9.]+)", re.MULTILINE)
_ERRORS = re.compile(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)")


def wrk(address: str, port: int, seconds: float, connections: int, close: bool) -> float:
    """Requests/s of one wrk run (run inside the client namespace)."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
            f"http://{address}:{port}/"]
    if close:
        argv[1:1] = ["-H", "Connection: close"]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    match = _RATE.search(done.stdout)
    if done.returncode != 0 or not match:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}{done.stderr}")
    return float(match.group(1))


def run(rounds: int = 5, seconds: float = 3.0, connections: int = 16) -> list[dict[str, Any]]:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    binary = connbench.build(source_file=SOURCE)
    rows = []
    with nplab.NodePortLab() as lab:
        # The client closes first (httpserve): let it reuse its TIME_WAIT ports, or a new
        # connection per request runs out of them within seconds.
        lab_netns.sysctl(lab.ns["client"], "net.ipv4.tcp_tw_reuse", 1)
        lab.serve("pod", "pod", [str(binary), str(nplab.POD_PORT)])
        lab.serve("rpod", "rpod", [str(binary), str(nplab.POD_PORT)])
        cases = (("local backend", (nplab.LOCAL_POD,), nplab.LOCAL_POD),
                 ("remote backend (SNAT)", (nplab.REMOTE_POD,), nplab.REMOTE_POD))
        for label, backends, pod in cases:
            lab.apply(lab.service(backends=backends))
            for close in (False, True):
                direct, via = [], []
                for _ in range(rounds):
                    direct.append(lab.call("client", wrk, pod, nplab.POD_PORT, seconds,
                                           connections, close))
                    via.append(lab.call("client", wrk, nplab.NODE_IP, nplab.NODE_PORT,
                                        seconds, connections, close))
                d, v = statistics.median(direct), statistics.median(via)
                rows.append({
                    "bench": f"NodePort vs direct, {label}, "
                             f"{'new connection per request' if close else 'keep-alive'}",
                    "direct_rps": round(d), "nodeport_rps": round(v),
                    "ratio": round(v / d, 3),
                    "direct_runs": [round(x) for x in direct],
                    "nodeport_runs": [round(x) for x in via],
                })
        assert lab.np is not None
        rows.append({"bench": "packet path reasons after the runs",
                     **{k: v for k, v in lab.np.reasons().items() if v}})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="wrk runs per target (median)")
    ap.add_argument("--seconds", type=float, default=3.0, help="length of one wrk run")
    ap.add_argument("--connections", type=int, default=16, help="wrk connections")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = run(args.rounds, args.seconds, args.connections)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            shown = dict(row)
            print(f"{shown.pop('bench'):<62} " + "  ".join(f"{k}={v}" for k, v in shown.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
