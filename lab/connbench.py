"""The pieces of the connect benchmark that are not the run itself: the C client
(lab/connbench.c, compiled here with the machine's cc), its JSON, and kube-proxy's rule
shapes as restore files, so kvroute is compared with what it replaces.

kube-proxy's shapes, as its iptables and nftables proxiers write them (one service port,
one endpoint per backend):

* iptables (``nat`` table): OUTPUT and PREROUTING jump to ``KUBE-SERVICES``, which holds
  one rule per service (``-d VIP/32 -p tcp --dport P -j KUBE-SVC-*``), walked in order;
  ``KUBE-SVC-*`` picks an endpoint with ``-m statistic --mode random --probability
  1/(n-i)`` rules (the last one unconditional) jumping to ``KUBE-SEP-*``, which marks
  hairpin traffic for masquerade and DNATs to the backend.
* nftables (``table ip kube-proxy``): one verdict map keyed by ``daddr . l4proto .
  dport`` sends a service's packets to its chain, which picks an endpoint chain with
  ``numgen random mod N vmap``; the endpoint chain DNATs.

Left out of both: the filter-table chains (firewall and no-endpoint checks, empty or one
set lookup when every service has endpoints) and the masquerade-all / cluster-CIDR rule.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).with_name("connbench.c")
HEADER = Path(__file__).with_name("benchtime.h")  # included by every lab C client
# lab/.cache is ignored by git: the binary is built per machine, never committed.
CACHE = Path(__file__).with_name(".cache") / "connbench"
MASQ_MARK = "0x4000"


class BuildError(RuntimeError):
    """The C client did not compile; the message holds the compiler's output."""


@dataclasses.dataclass(frozen=True)
class Svc:
    """One service port as kube-proxy sees it: a cluster IP, a port, its endpoints."""

    name: str  # "namespace/name"
    vip: str
    port: int
    backends: tuple[tuple[str, int], ...]


@dataclasses.dataclass(frozen=True)
class Result:
    """One connbench run: latencies in ns over the connects that succeeded."""

    n: int
    ok: int
    errors: int
    errno: int
    p50_ns: int
    p90_ns: int
    p99_ns: int
    min_ns: int
    max_ns: int
    mean_ns: int
    rate: float  # connects a second over the whole loop (socket to close)


def parse(text: str) -> Result:
    """The JSON object the client prints on its last line. Raises ValueError when the
    run had no successful connect (the object then says which errno)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError("connbench printed nothing")
    raw: dict[str, Any] = json.loads(lines[-1])
    if not raw.get("ok"):
        raise ValueError(f"connbench: no connect succeeded ({raw.get('errors')} errors, "
                         f"errno {raw.get('errno')}: {raw.get('error', '?')})")
    return Result(n=int(raw["n"]), ok=int(raw["ok"]), errors=int(raw["errors"]),
                  errno=int(raw["errno"]), p50_ns=int(raw["p50_ns"]),
                  p90_ns=int(raw["p90_ns"]), p99_ns=int(raw["p99_ns"]),
                  min_ns=int(raw["min_ns"]), max_ns=int(raw["max_ns"]),
                  mean_ns=int(raw["mean_ns"]), rate=float(raw["rate"]))


def build(cache: Path = CACHE, source_file: Path = SOURCE) -> Path:
    """Compile lab/connbench.c (or another of the lab's C clients) with the machine's cc
    (once per source version) and return the binary's path."""
    # The shared header is part of what is built: a change to it is a new binary.
    source = source_file.read_bytes() + HEADER.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:12]
    out = cache / f"{source_file.stem}-{digest}"
    if out.exists():
        return out
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise BuildError("no C compiler (cc) on PATH: apt-get install -y gcc")
    cache.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed: two benches at once never run half a file.
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=f".{source_file.stem}-")
    os.close(fd)
    try:
        done = subprocess.run([cc, "-O2", "-Wall", "-Wextra", "-Werror", "-o", tmp,
                               str(source_file)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BuildError(f"{cc} failed on {source_file}:\n{done.stderr}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def connect_argv(binary: Path, addr: str, port: int, count: int, warmup: int = 0,
                 tag: str = "none", seed: int | None = None) -> list[str]:
    """The client's command line. ``seed`` is the first session tag; None takes a random
    one, so "new" tags never repeat a tag an earlier run left in the affinity map (a
    repeated tag would be a live session, measuring the wrong path)."""
    if tag not in ("none", "new", "fixed"):
        raise ValueError(f"tag must be none, new or fixed, got {tag!r}")
    if seed is None:
        seed = secrets.randbits(62) << 1 | 1  # non-zero, and far from the next run's
    return [str(binary), "connect", addr, str(port), str(count), str(warmup), tag, str(seed)]


def serve_argv(binary: Path, ports: Sequence[int]) -> list[str]:
    """The server's command line: accept and close on every port."""
    if not 1 <= len(ports) <= 64:
        raise ValueError(f"serve takes 1 to 64 ports, got {len(ports)}")
    return [str(binary), "serve", *(str(p) for p in ports)]


def _kube_hash(prefix: str, *parts: str) -> str:
    """kube-proxy's chain names: a prefix and 16 base32 characters of a SHA-256."""
    digest = hashlib.sha256("".join(parts).encode()).digest()
    return prefix + base64.b32encode(digest).decode()[:16]


def svc_chain(svc: Svc) -> str:
    return _kube_hash("KUBE-SVC-", svc.name, ":http/TCP")


def sep_chain(svc: Svc, backend: tuple[str, int]) -> str:
    return _kube_hash("KUBE-SEP-", svc.name, ":http/TCP", f"{backend[0]}:{backend[1]}")


def iptables_restore(services: Sequence[Svc]) -> str:
    """An ``iptables-restore`` file for the ``nat`` table in kube-proxy's shape; the
    services' rules in KUBE-SERVICES in the order given."""
    chains = [":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
              ":POSTROUTING ACCEPT [0:0]", ":KUBE-SERVICES - [0:0]",
              ":KUBE-POSTROUTING - [0:0]", ":KUBE-MARK-MASQ - [0:0]"]
    rules = [
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" '
        "-j KUBE-POSTROUTING",
        f"-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}",
        f"-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN",
        f"-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring '
        'SNAT" -j MASQUERADE --random-fully',
    ]
    for svc in services:
        svc_name = svc_chain(svc)
        chains.append(f":{svc_name} - [0:0]")
        comment = f'-m comment --comment "{svc.name}:http"'
        rules.append(f"-A KUBE-SERVICES -d {svc.vip}/32 -p tcp -m comment --comment "
                     f'"{svc.name}:http cluster IP" -m tcp --dport {svc.port} -j {svc_name}')
        n = len(svc.backends)
        for i, be in enumerate(svc.backends):
            sep = sep_chain(svc, be)
            chains.append(f":{sep} - [0:0]")
            to = f'-m comment --comment "{svc.name}:http -> {be[0]}:{be[1]}"'
            pick = (f"-m statistic --mode random --probability {1 / (n - i):.10f} "
                    if i < n - 1 else "")
            rules.append(f"-A {svc_name} {to} {pick}-j {sep}")
            rules.append(f"-A {sep} -s {be[0]}/32 {comment} -j KUBE-MARK-MASQ")
            rules.append(f"-A {sep} -p tcp {comment} -m tcp -j DNAT "
                         f"--to-destination {be[0]}:{be[1]}")
    return "\n".join(["*nat", *chains, *rules, "COMMIT", ""])


def nft_ruleset(services: Sequence[Svc], table: str = "kube-proxy") -> str:
    """An ``nft -f`` file in kube-proxy's nftables shape; it replaces ``table`` whole
    (and touches nothing else in the namespace)."""
    lines = [f"table ip {table}", f"delete table ip {table}", f"table ip {table} {{",
             f"\tchain mark-for-masquerade {{ meta mark set meta mark or {MASQ_MARK}; }}",
             "\tchain masquerading {",
             f"\t\tmeta mark & {MASQ_MARK} == 0 return",
             f"\t\tmeta mark set meta mark xor {MASQ_MARK}",
             "\t\tmasquerade fully-random", "\t}",
             "\tchain nat-output { type nat hook output priority -100; policy accept; "
             "jump services; }",
             "\tchain nat-prerouting { type nat hook prerouting priority -100; "
             "policy accept; jump services; }",
             "\tchain nat-postrouting { type nat hook postrouting priority 100; "
             "policy accept; jump masquerading; }",
             "\tmap service-ips {", "\t\ttype ipv4_addr . inet_proto . inet_service : verdict"]
    elements = []
    chains = []
    for i, svc in enumerate(services):
        chain = f"service-{i}"
        elements.append(f"{svc.vip} . tcp . {svc.port} : goto {chain}")
        picks = []
        for j, be in enumerate(svc.backends):
            ep = f"endpoint-{i}-{j}"
            picks.append(f"{j} : goto {ep}")
            chains.append(f"\tchain {ep} {{ ip saddr {be[0]} jump mark-for-masquerade; "
                          f"meta l4proto tcp dnat to {be[0]}:{be[1]}; }}")
        chains.append(f"\tchain {chain} {{ numgen random mod {len(svc.backends)} vmap "
                      f"{{ {', '.join(picks)} }}; }}")
    if elements:
        lines.append("\t\telements = { " + ",\n\t\t\t".join(elements) + " }")
    lines.append("\t}")
    lines.append("\tchain services { ip daddr . meta l4proto . th dport vmap @service-ips; }")
    lines.extend(chains)
    lines.append("}")
    return "\n".join(lines) + "\n"


def tools_missing() -> list[str]:
    """The restore commands the bench needs that are not on PATH."""
    return [tool for tool in ("iptables-nft-restore", "iptables-legacy-restore", "nft")
            if shutil.which(tool) is None]


def ensure_tools() -> str | None:
    """Install Debian's iptables and nftables if a restore command is missing
    (idempotent: nothing runs when all are there). Returns what was done, or None."""
    missing = tools_missing()
    if not missing:
        return None
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    done = subprocess.run(["apt-get", "install", "-y", "iptables", "nftables"], env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"apt-get install -y iptables nftables failed:\n{done.stderr}")
    still = tools_missing()
    if still:
        raise RuntimeError(f"still missing after apt-get install: {', '.join(still)}")
    return f"installed iptables and nftables with apt-get (missing: {', '.join(missing)})"
