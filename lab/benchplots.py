"""PNG plots of the benchmark results (`make bench-report`), drawn from the same
bench/results/*.json files as README's tables, beside them. matplotlib (a dev extra) is
imported only here, with the Agg backend: no display needed."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib import ticker

from lab import benchreport

# Colours per family, so kvroute's modes read as one group against kube-proxy's.
KVROUTE = ("#1b7837", "#5aae61", "#a6dba0", "#00441b", "#762a83", "#9970ab", "#c2a5cf", "#40004b")
OTHERS = ("#d6604d", "#b2182b", "#f4a582", "#878787")
GREYS = ("#bdbdbd", "#636363")  # baselines of kvroute's own


def _footer(fig: Any, doc: Mapping[str, Any]) -> None:
    # a re-wrapped file (lab.bench_llm.as_results_doc) has no CPU count
    cpus = f"{doc['cpus']} CPUs" if doc.get("cpus") is not None else "CPUs not recorded"
    fig.text(0.01, 0.01, f"{doc['command']}  |  {doc['date']}  |  kernel {doc['kernel']}, "
             f"{cpus}", fontsize=7, color="#555555")


def connect(doc: Mapping[str, Any], path: Path) -> None:
    counts, labels, cells = benchreport.connect_cells(doc["rows"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharex=True)
    kvr = iter(KVROUTE)
    other = iter(OTHERS)
    for key, label in labels.items():
        if key == "direct":
            continue
        xs = [c for c in counts if "ratio" in cells.get((key, c), {})]
        if not xs:
            continue
        colour = next(kvr) if "kvroute" in label else next(other)
        style = "-" if "kvroute" in label else "--"
        for ax, field in zip(axes, ("ratio", "p99_ratio"), strict=True):
            ax.plot(xs, [cells[key, c][field] for c in xs], style, marker="o", color=colour,
                    label=label, linewidth=1.6, markersize=4)
    for ax, title in zip(axes, ("p50", "p99"), strict=True):
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(1.05, color="#1b7837", linewidth=0.8, linestyle=":", label="target 1.05x")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%gx"))
        ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%gx"))
        ax.set_xticks(counts, [f"{c:,}" for c in counts])
        ax.set_xlabel("services in the tables (x 10 backends)")
        ax.set_ylabel(f"connect() {title}, x direct to the pod")
        ax.set_title(f"connect() {title} vs service count")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _footer(fig, doc)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def maglev(doc: Mapping[str, Any], path: Path) -> None:
    rows = [r for r in doc["rows"] if "ratio_to_equal" in r]
    sizes = sorted({r["size"] for r in rows})
    ns = sorted({r["backends"] for r in rows})
    by = {(r["size"], r["backends"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / (2 * len(sizes))
    for i, m in enumerate(sizes):
        for j, (field, what) in enumerate((("equal_weights_seconds", "equal weights"),
                                           ("seconds", "controller's weights"))):
            xs = [k + (2 * i + j - len(sizes) + 0.5) * width for k in range(len(ns))]
            ax.bar(xs, [by[m, n][field] * 1e3 if (m, n) in by else 0 for n in ns], width,
                   label=f"M={m:,}, {what}", color=(KVROUTE if j else GREYS)[i])
    target = next((r["target_seconds"] for r in rows if "target_seconds" in r), None)
    if target:
        ax.axhline(target * 1e3, color="black", linestyle=":", linewidth=1,
                   label=f"target {target * 1e3:.0f} ms (M=65,537 x 1,000)")
    ax.set_xticks(range(len(ns)), [f"{n:,} backends" for n in ns])
    ax.set_ylabel("one table build, ms (best of runs)")
    ax.set_title("Maglev table build: controller's weights vs equal weights")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    _footer(fig, doc)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fanout(doc: Mapping[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r, colour in zip([r for r in doc["rows"] if r.get("latencies_ms")],
                         (KVROUTE[0], KVROUTE[4], OTHERS[0], OTHERS[3]), strict=False):
        lat = sorted(r["latencies_ms"])
        ax.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], color=colour,
                label=f"{r['reports_per_s']:g} reports/s x {r['engines_per_report']} engines "
                      f"({r['changes_per_s']:,.0f} changes/s)", drawstyle="steps-post")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("time from an engine's load change to the last of "
                  f"{doc['agents']:,} agents, ms")
    ax.set_ylabel("share of load changes")
    ax.set_title("Control plane fan-out: engine load to every agent")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _footer(fig, doc)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def failover(doc: Mapping[str, Any], path: Path) -> None:
    """Cumulative failed new connects since the death, on a log scale: kvroute's handful
    and kube-proxy's thousand on one axis."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colours = iter((KVROUTE[0], OTHERS[0], OTHERS[3]))
    for r in doc["rows"]:
        tl = r.get("timeline")
        if not tl:
            continue
        xs = [tl["start_s"] + i * tl["bin_s"] for i in range(len(tl["failed"]) + 1)]
        total, ys = 0, [0]
        for n in tl["failed"]:
            total += n
            ys.append(total)
        how = "modelled" if r.get("modelled") else f"measured, {r['window_s']:g} s"
        ax.step(xs, ys, where="post", color=next(colours), linewidth=1.8,
                label=f"{r['name']} ({how}): {r['failed'] + r['later_failed']:,}",
                linestyle="--" if r.get("modelled") else "-")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yscale("symlog", linthresh=1)
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("seconds since the engine died")
    ax.set_ylabel("failed new connects, cumulative")
    rate = next(r["rate_per_s"] for r in doc["rows"] if not r.get("modelled"))
    ax.set_title(f"Failover at {rate:,.0f} new connects/s: failed connects after an engine "
                 "dies")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    _footer(fig, doc)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def llm(doc: Mapping[str, Any], path: Path) -> None:
    """Prefix-cache hit ratio and TTFT p50 per router, one group of bars per engine kind:
    the affinity routers' gain in cache hits beside what it does to first-token time."""
    parts = {k: p for k, p in benchreport.llm_parts(doc).items() if p.get("rows")}
    policies = list(dict.fromkeys(r["policy"] for p in parts.values() for r in p["rows"]))
    colours = dict(zip(policies, (GREYS[0], OTHERS[3], KVROUTE[0], OTHERS[0]), strict=False))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    width = 0.8 / max(1, len(policies))
    kinds = list(parts)
    for ax, field, what in ((axes[0], "prefix", "prefix-cache hit ratio, %"),
                            (axes[1], "ttft", "TTFT p50, ms (x random above the bar)")):
        for i, policy in enumerate(policies):
            xs, ys, notes = [], [], []
            for k, kind in enumerate(kinds):
                row = next((r for r in parts[kind]["rows"] if r["policy"] == policy), None)
                if row is None:
                    continue
                xs.append(k + (i - (len(policies) - 1) / 2) * width)
                if field == "prefix":
                    hit = row["prefix_cache_hit_ratio"]
                    ys.append(0.0 if hit is None else hit * 100)
                    notes.append("-" if hit is None else f"{hit:.0%}")
                else:
                    ys.append(row["ttft_ms"]["p50"])
                    notes.append(f"{row['vs_random']['ttft_p50_x']:.2f}x")
            bars = ax.bar(xs, ys, width, label=policy, color=colours.get(policy))
            ax.bar_label(bars, notes, fontsize=7, padding=2)
        ax.set_xticks(range(len(kinds)),
                      [f"{benchreport.LLM_KINDS[k]} (x{parts[k]['engines']})" for k in kinds])
        ax.set_ylabel(what)
        ax.grid(True, axis="y", alpha=0.3)
        ax.margins(y=0.12)
    axes[0].set_title("Prefix-cache hits per router")
    axes[1].set_title("Time to first token per router")
    axes[0].legend(fontsize=8, loc="upper right")
    _footer(fig, doc)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


DRAW = {"connect": connect, "maglev": maglev, "fanout": fanout, "failover": failover,
        "llm": llm}


def write_all(folder: Path) -> list[Path]:
    """Draw every plot whose results file is in ``folder``; the paths written."""
    results = benchreport.load(folder)
    written = []
    for name, draw in DRAW.items():
        if name in results:
            path = folder / benchreport.PLOTS[name][0]
            draw(results[name], path)
            written.append(path)
    return written
