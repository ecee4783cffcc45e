"""``python -m lab.kernels`` (``make test-kernels``): fetch each listed kernel (cached),
boot it with virtme-ng, run the kernel_matrix tests in it, and report per kernel.

Exits 0 only when every kernel ran tests and none failed."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from lab.kernels import boot, fetch, matrix

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / "build" / "kernels"


def _marked() -> list[str]:
    return matrix.marked({str(p.relative_to(REPO)): p.read_text()
                          for p in sorted((REPO / "tests" / "kernel").glob("test_*.py"))})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lab.kernels",
        description="Run the kernel_matrix tests inside every supported kernel "
                    f"({matrix.LIST.relative_to(REPO)}), each booted with virtme-ng "
                    "(no KVM needed), with no kernel headers in the guest.")
    parser.add_argument("--only", metavar="NAME[,NAME]", help="only these kernels (e.g. 5.10)")
    parser.add_argument("--list", action="store_true", help="print the kernels and exit")
    parser.add_argument("--timeout", type=float, default=600, metavar="S",
                        help="seconds one kernel may take, boot included (default 600: "
                             "three kernels stay within CI's budget)")
    parser.add_argument("--cpus", type=int, default=2, help="guest CPUs (default 2)")
    parser.add_argument("--memory", default="2G", help="guest memory (default 2G)")
    parser.add_argument("--cache", type=Path, default=CACHE,
                        help=f"where images and results go (default {CACHE})")
    parser.add_argument("pytest_args", nargs="*", metavar="PYTEST_ARG",
                        help="passed to pytest in the guest (after --); default: the "
                             f"modules of tests/kernel that mark tests {matrix.MARKER}")
    args = parser.parse_args(argv)
    try:
        kernels = matrix.select(matrix.load(matrix.LIST.read_text()), args.only)
    except matrix.MatrixError as exc:
        parser.error(str(exc))
    if args.list:
        for k in kernels:
            print(f"{k.name}\t{k.suite}\t{k.stands_for}")
        return 0
    if os.geteuid() != 0:
        parser.error("needs root (apt, and the guest runs the kernel tests as root)")
    results: list[matrix.Result] = []
    started = time.monotonic()
    for kernel in kernels:
        try:
            image = fetch.fetch(kernel, args.cache)
        except matrix.MatrixError as exc:
            results.append(matrix.Result(kernel.name, "?", problem=str(exc)))
            print(results[-1].line(), flush=True)
            continue
        print(f"kernel {kernel.name}: booting {image.release} ({image.version})", flush=True)
        result = boot.run(image, args.cache, REPO, args.pytest_args or _marked(),
                          args.timeout, args.cpus, args.memory)
        results.append(result)
        print(result.line(), flush=True)
        if not result.ok:
            print(boot.tail(args.cache, kernel), flush=True)
    bad = [r.kernel for r in results if not r.ok]
    total = time.monotonic() - started
    print(f"kernel matrix: {len(results) - len(bad)} of {len(results)} kernels ok "
          f"in {total:.0f} s" + (f"; failed: {', '.join(bad)}" if bad else ""), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
