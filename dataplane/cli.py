"""`kvroute`: the command line. It parses, validates and calls the core; tables
for people (80 columns), --json for machines."""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dataplane import host, model, settings, uapi
from dataplane.api import channel

F = TypeVar("F", bound=Callable[..., Any])
console = Console(width=max(80, Console().width), highlight=False)


def _checked_pin_dir(ctx: click.Context, param: click.Parameter, value: Path) -> Path:
    # One check for every command: a file, a folder off bpffs or the bpffs root itself is
    # refused here, in one line, before a command opens (or removes) anything in it.
    try:
        host.check_pin_dir(value)
    except host.HostError as exc:
        raise click.ClickException(str(exc)) from None
    return value


def pin_dir_option(f: F) -> F:
    return click.option(
        "--pin-dir", type=click.Path(path_type=Path), default=settings.DEFAULT_PIN_DIR,
        show_default=True, envvar="KVROUTE_PIN_DIR", callback=_checked_pin_dir,
        help="bpffs folder holding kvroute's pinned maps and links.")(f)


def kernel_headers_option(f: F) -> F:
    return click.option(
        "--kernel-headers", type=click.Choice(uapi.MODES), default="auto", show_default=True,
        help="What bcc compiles the programs against: the node's kernel headers "
             "(/lib/modules/$(uname -r)/build), the UAPI header set shipped in the "
             "package, or (auto) the node's when it has them, else the shipped set.")(f)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")(f)


def _fail(message: str) -> None:
    raise click.ClickException(message)


def with_maps(f: F) -> F:
    """Open the pinned maps (root only), turning every known failure into a clear error."""
    @functools.wraps(f)
    def wrapper(*args: Any, pin_dir: Path, **kwargs: Any) -> Any:
        from dataplane import inspect, maps
        if os.geteuid() != 0:
            _fail("reading kvroute's maps needs root")
        try:
            with maps.MapSet(pin_dir) as m:
                return f(*args, maps=m, **kwargs)
        except maps.NotPinned as exc:
            _fail(str(exc))
        except (inspect.LookupError_, ValueError) as exc:
            _fail(str(exc))
    return wrapper  # type: ignore[return-value]


def _emit(data: Any, as_json: bool, table: Callable[[], Table] | None) -> None:
    if as_json or table is None:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        console.print(table())


PLUGIN_GROUP = "kvroute.commands"


class _Commands(click.Group):
    """The built-in commands plus those other packages of the distribution provide
    (``controller``, ``engine-sim``, ``lab``) through the ``kvroute.commands`` entry
    points, loaded only when used: ``kvroute maps`` on a node needs neither the
    controller's nor the lab's dependencies. A listed command that fails to import is an
    error naming the cause, never a silently missing command."""

    def _plugins(self) -> dict[str, importlib.metadata.EntryPoint]:
        return {ep.name: ep for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP)}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._plugins()})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        builtin = super().get_command(ctx, cmd_name)
        if builtin is not None:
            return builtin
        ep = self._plugins().get(cmd_name)
        if ep is None:
            return None
        try:
            command = ep.load()
        except Exception as exc:
            raise click.ClickException(
                f"command {cmd_name!r} ({ep.value}) is installed but cannot be loaded: "
                f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(command, click.Command):
            raise click.ClickException(f"command {cmd_name!r}: {ep.value} is not a click command")
        return command


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug detail.")
def main(verbose: bool) -> None:
    """kvroute: connect-time routing for LLM inference fleets, in the kernel.

    eBPF programs attached to a cgroup rewrite each connect() to a Service VIP
    into a GPU pod, keeping sessions on the engine that holds their KV cache.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # The HTTP client would log every engine scrape (several a second per engine).
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(logging.DEBUG if verbose else logging.WARNING)


def _hostport(value: str | None, what: str) -> tuple[str, int] | None:
    if value is None:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.UsageError(f"{what}: expected HOST:PORT, got {value!r}")
    return host or "127.0.0.1", int(port)


@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Desired state (YAML); reloaded when it changes or on SIGHUP.")
@click.option("--controller", "controller_target", metavar="HOST:PORT",
              help="Follow a kvroute controller's snapshots instead of a file.")
@click.option("--node", default=None, help="This node's name [default: the hostname]; "
              "with --controller, the engines on it are scraped here.")
@click.option("--agent-id", default=None, help="Name in the controller's view "
              "[default: NODE-PIN_DIR_NAME].")
@click.option("--scrape-interval", type=click.FloatRange(0.01, 60), default=0.25,
              show_default=True, help="Seconds between scrapes of this node's engines.")
@click.option("--stall-window", type=click.FloatRange(0.05, 3600), default=2.0,
              show_default=True, help="Seconds an engine may hold running requests without "
              "generating a token before its scrapes count as failures.")
@click.option("--tls-ca", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--tls-cert", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--tls-key", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--cgroup", type=click.Path(path_type=Path, file_okay=False),
              help="cgroup v2 folder to attach to [default: the cgroup v2 root, found].")
@pin_dir_option
@click.option("--hash-seed", type=int, default=None, help="Hash seed; the same on every node.")
@click.option("--fail-k", type=click.IntRange(1, 1000), default=3, show_default=True,
              help="Consecutive failed connects after which the kernel trips a backend open.")
@click.option("--affinity-entries", type=click.IntRange(16, 1 << 24),
              default=settings.Settings.affinity_entries, show_default=True,
              help="Size of the kernel's session map. Following a controller every node "
                   "holds every live session of the fleet (about 100 bytes each): size it "
                   "for the fleet's live sessions. Fixed when the maps are first pinned "
                   "(`kvroute uninstall` to change it).")
@kernel_headers_option
@click.option("--external-interface", "external_ifaces", multiple=True, metavar="IFACE",
              help="Serve NodePorts and external IPs to traffic arriving on IFACE (repeat): "
                   "loads the packet path (tc) there. Backends whose node is --node are "
                   "local; flows to others' are SNATed.")
@click.option("--snat-ip", default=None, metavar="IPV4",
              help="Source address of flows to other nodes' backends [default: the first "
                   "address of the first --external-interface].")
@click.option("--snat-ports", default="{}-{}".format(*model.SNAT_PORTS), show_default=True,
              metavar="MIN-MAX",
              help="Source ports of SNATed flows (keep them out of the node's ephemeral "
                   "range, net.ipv4.ip_local_port_range). A remote backend takes about "
                   "(MAX - MIN + 1) new flows a second from this node.")
@click.option("--ct-entries", type=click.IntRange(16, 1 << 24),
              default=settings.Settings.ct_entries, show_default=True,
              help="Size of the packet path's conntrack (two entries a flow, about 200 "
                   "bytes each, preallocated). Fixed when first pinned.")
@click.option("--metrics", "metrics_at", metavar="HOST:PORT",
              help="Serve HTTP: /metrics (kernel counters read at scrape time), /readyz "
                   "(programs attached, maps pinned, first desired state applied) and /livez "
                   "(the agent's loop and its tasks run).")
@click.option("--detach-on-exit", is_flag=True,
              help="Detach the programs and remove the maps when the agent exits "
                   "(default: leave them routing, so a restart is hitless).")
@click.option("--ready-file", type=click.Path(path_type=Path, dir_okay=False),
              help="Written once the first desired state is applied.")
def agent(config_path: Path | None, controller_target: str | None, node: str | None,
          agent_id: str | None, scrape_interval: float, stall_window: float,
          tls_ca: Path | None,
          tls_cert: Path | None, tls_key: Path | None, cgroup: Path | None, pin_dir: Path,
          hash_seed: int | None, fail_k: int, affinity_entries: int, kernel_headers: str,
          external_ifaces: tuple[str, ...], snat_ip: str | None, snat_ports: str,
          ct_entries: int,
          metrics_at: str | None, detach_on_exit: bool, ready_file: Path | None) -> None:
    """Run the node agent: load and attach the programs, apply the desired state.

    The desired state comes from --config FILE or from --controller HOST:PORT.
    """
    import socket as socket_mod

    from dataplane import agent as agent_mod
    from dataplane import apply, loader
    if (config_path is None) == (controller_target is None):
        raise click.UsageError("give exactly one of --config FILE or --controller HOST:PORT")
    if any((tls_ca, tls_cert, tls_key)) and not all((tls_ca, tls_cert, tls_key)):
        raise click.UsageError("mTLS needs all of --tls-ca, --tls-cert and --tls-key")
    try:
        opts = settings.Settings(pin_dir=pin_dir, fail_k=fail_k,
                                 affinity_entries=affinity_entries,
                                 kernel_headers=kernel_headers, ct_entries=ct_entries,
                                 **({"hash_seed": hash_seed} if hash_seed is not None else {}))
        target = cgroup or host.cgroup2_root()
    except (ValueError, host.HostError) as exc:
        raise click.UsageError(str(exc)) from None
    ctrl = None
    if controller_target:
        _hostport(controller_target, "--controller")
        node = node or socket_mod.gethostname()
        tls = None
        if tls_ca and tls_cert and tls_key:
            tls = channel.TLSFiles(ca=tls_ca, cert=tls_cert, key=tls_key)
        ctrl = agent_mod.ControllerOptions(
            target=controller_target, node=node, agent_id=agent_id or f"{node}-{pin_dir.name}",
            scrape_interval=scrape_interval, stall_window=stall_window, tls=tls)
    external = None
    if snat_ip is not None and not external_ifaces:
        raise click.UsageError("--snat-ip needs --external-interface")
    if external_ifaces:
        if snat_ip is not None:
            try:
                model.ipv4("--snat-ip", snat_ip)
            except model.ModelError as exc:
                raise click.UsageError(str(exc)) from None
        low, sep, high = snat_ports.partition("-")
        if not (sep and low.isdigit() and high.isdigit()
                and 1024 <= int(low) <= int(high) <= 65535):
            raise click.UsageError(f"--snat-ports: expected MIN-MAX within 1024-65535, "
                                   f"got {snat_ports!r}")
        external = agent_mod.ExternalOptions(tuple(external_ifaces),
                                             node or socket_mod.gethostname(), snat_ip,
                                             (int(low), int(high)))
    a = agent_mod.Agent(opts, target, config_path, ready_file, controller=ctrl,
                        metrics_addr=_hostport(metrics_at, "--metrics"), external=external)
    try:
        a.start()
    except model.ModelError as exc:
        _fail(f"not applied, nothing changed:\n{exc}")
    except (host.HostError, loader.LoadError, OSError, apply.ApplyError) as exc:
        _fail(str(exc))
    try:
        a.run()
    finally:
        a.close(detach=detach_on_exit)


@main.command()
@pin_dir_option
def uninstall(pin_dir: Path) -> None:
    """Detach every kvroute program and remove its pinned maps from this node.

    Only what kvroute pinned goes: anything else in the folder stays, and is named.
    """
    from dataplane import loader
    if os.geteuid() != 0:
        _fail("uninstall needs root")
    if not pin_dir.exists():
        click.echo(f"nothing to remove: {pin_dir} does not exist")
        return
    try:
        done = loader.remove_pins(pin_dir)
    except (loader.NotKvroute, host.HostError) as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"uninstall stopped half-way: {exc}; run it again to remove the rest")
    for line in done.removed:
        click.echo(f"removed {line}")
    for line in done.kept:
        click.echo(f"left in place: {line}")
    if not done.removed:
        click.echo(f"nothing to remove: {pin_dir} is empty")


@main.command("certs")
@click.argument("out", type=click.Path(path_type=Path, file_okay=False))
@click.option("--node", "nodes", multiple=True, metavar="NODE",
              help="Issue an agent certificate for this node (repeat); its identity is the "
                   "URI SAN spiffe://kvroute/node/NODE, and the agent must run with "
                   "--node NODE.")
@click.option("--server-name", "server_names", multiple=True, metavar="NAME",
              help="DNS name or IP agents dial the controller by (repeat) [default: "
                   "localhost, 127.0.0.1, kvroute-controller(.kvroute.svc(.cluster.local))].")
@click.option("--no-server", is_flag=True, help="Issue no controller certificate.")
@click.option("--days", type=click.IntRange(1, 3650), default=365, show_default=True,
              help="Validity of the certificates issued (the CA: ten years).")
def certs_command(out: Path, nodes: tuple[str, ...], server_names: tuple[str, ...],
                  no_server: bool, days: int) -> None:
    """Issue mutual-TLS files for the controller and agents into OUT.

    OUT/ca.crt and OUT/ca.key are the CA (made once, reused later: keep ca.key
    offline); OUT/controller/ and OUT/nodes/NODE/ each hold ca.crt, tls.crt and
    tls.key for --tls-ca, --tls-cert and --tls-key. See README "Security model".
    """
    from dataplane import certs

    if no_server and server_names:
        raise click.UsageError("--server-name and --no-server exclude each other")
    names = () if no_server else (server_names or certs.DEFAULT_SERVER_NAMES)
    try:
        written = certs.issue(out, names, nodes, days)
    except (ValueError, OSError) as exc:  # ModelError is a ValueError: a bad node name
        _fail(str(exc))
    for path in written:
        click.echo(str(path))


@main.command("check-kernel")
@kernel_headers_option
@json_option
def check_kernel(kernel_headers: str, as_json: bool) -> None:
    """Show what the running kernel offers the programs and which headers bcc would use.

    Each feature is probed by loading a tiny program or creating a tiny map (root
    needed); a missing one is named with the Linux release that brought it. Exits 1 when
    the programs cannot load on this node.
    """
    from dataplane import features, loader
    if os.geteuid() != 0:
        _fail("probing the kernel needs root (it loads tiny test programs)")
    try:
        found = loader.probe_kernel()
    except loader.LoadError as exc:
        _fail(str(exc))
    plan = features.decide(found, os.uname().release)
    problems = [f"{f.what} (Linux {f.since})" for f in plan.missing]
    try:
        chosen = uapi.find(kernel_headers)
        headers = f"{chosen.kind}: {chosen.path}"
    except uapi.HeadersMissing as exc:
        headers = str(exc)
        problems.append(headers)
    rows = features.rows(found)
    # The packet path is optional (--external-interface): what it lacks is shown apart
    # and does not fail the check.
    data = {"kernel": plan.release, "features": rows, "cflags": list(plan.cflags),
            "headers": headers, "ok": not problems,
            "packet_path": not plan.packet_missing}

    def table() -> Table:
        t = Table(title=f"kernel {plan.release}; headers {headers}")
        for col in ("feature", "since", "here", "without it"):
            t.add_column(col)
        for r in rows:
            t.add_row(str(r["what"]), str(r["since"]), "yes" if r["present"] else "NO",
                      str(r["without"]))
        return t

    _emit(data, as_json, table)
    if plan.packet_missing and not as_json:
        click.echo("the packet path (--external-interface) cannot load here: " + "; ".join(
            f"{f.what} (Linux {f.since})" for f in plan.packet_missing))
    if problems:
        _fail("the programs cannot load here: " + "; ".join(problems))


@main.command("check-config")
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False, exists=True))
def check_config(path: Path) -> None:
    """Validate a desired-state file without touching the kernel; says how many services
    are UDP, dual-stack (vip and vip6) and IPv6-only."""
    from dataplane import config
    try:
        state = config.load_file(path)
        model.check_capacity(state)  # what an agent with the default capacity would refuse
    except model.ModelError as exc:
        _fail(f"not valid:\n{exc}")
    n_be = sum(len(s.backends) for s in state.services)
    udp = sum(s.protocol == model.Protocol.UDP for s in state.services)
    dual = sum(s.vip6 is not None for s in state.services)
    only6 = sum(":" in s.vip for s in state.services)
    click.echo(f"{path}: ok ({len(state.services)} services, {n_be} backends; "
               f"{udp} udp, {dual} dual-stack, {only6} IPv6-only)")


@main.group()
def maps() -> None:
    """Show what is in the kernel's maps (works with or without a running agent)."""


@maps.command("services")
@pin_dir_option
@json_option
@with_maps
def maps_services(maps: Any, as_json: bool) -> None:
    """Services: VIP(s) (a dual-stack service shows both, one row), affinity, table size M,
    backends, and counters: connects and new UDP flows translated (SEL), affinity hits,
    bounded-load spills, refused (REF: no usable backend or saturated). --json (and
    `maps stats`) add every counter, UDP datagrams sent through the VIP (dgrams) and
    replies given the VIP back as source (replies) among them."""
    from dataplane import inspect
    rows = inspect.services(maps)

    def table() -> Table:
        t = Table(box=None, pad_edge=False)
        # An address is never cut short: other columns give way to it.
        widest = max((len(f) for s in rows for f in s["frontends"]), default=8)
        for col in ("ID", "NAME", "FRONTEND", "AFFINITY", "M", "BE", "SEL", "HIT", "SPILL",
                    "REF"):
            t.add_column(col, no_wrap=True, min_width=widest if col == "FRONTEND" else None)
        for s in rows:
            c = s["counters"]
            # escape: rich would read "[fd00::a]" as markup and drop it.
            t.add_row(str(s["id"]), s["name"], escape("\n".join(s["frontends"])), s["affinity"],
                      str(s["table_size"]), str(s["backends"]), str(c["selected"]),
                      str(c["aff_hit"]), str(c["spilled"]), str(c["no_backend"] + c["saturated"]))
        return t
    _emit(rows, as_json, table)


@maps.command("backends")
@pin_dir_option
@json_option
@with_maps
def maps_backends(maps: Any, as_json: bool) -> None:
    """Backends: address(es) (a dual-stack pod shows both), state (with the kernel's own
    trips), load, fleet-wide sessions (SESS) and connect counters."""
    from dataplane import inspect
    rows = inspect.backends(maps)

    def table() -> Table:
        t = Table(box=None, pad_edge=False)
        widest = max((len(a) for b in rows for a in b["addresses"]), default=7)
        for col in ("ID", "ADDRESS", "STATE", "LOAD", "SESS", "SEL", "CONN", "FAIL", "EST",
                    "RTT(us)"):
            t.add_column(col, no_wrap=True, min_width=widest if col == "ADDRESS" else None)
        for b in rows:
            c = b["counters"]
            state = b["state"] + ("*" if b["kernel_tripped"] else "")
            t.add_row(str(b["id"]), escape("\n".join(b["addresses"])), state, str(b["load"]),
                      str(b["sessions"]),
                      str(c["selected"]),
                      str(c["connects"]), str(c["failed"]), str(c["established"]),
                      str(b["srtt_us"]))
        return t
    _emit(rows, as_json, table)
    if not as_json and any(b["kernel_tripped"] for b in rows):
        click.echo("* tripped open by the kernel after consecutive failed connects")


@maps.command("affinity")
@click.option("--service", "service_id", type=int, help="Only this service id.")
@pin_dir_option
@json_option
@with_maps
def maps_affinity(maps: Any, as_json: bool, service_id: int | None) -> None:
    """Live affinity entries: (service, key) -> backend."""
    from dataplane import inspect
    rows = inspect.affinity(maps, service_id)

    def table() -> Table:
        t = Table("SERVICE", "KEY", "BACKEND", "IDLE(s)", box=None)
        for a in rows:
            t.add_row(str(a["service"]), a["key"], str(a["backend"]), str(a["idle_seconds"]))
        return t
    _emit(rows, as_json, table)


@maps.command("stats")
@pin_dir_option
@json_option
@with_maps
def maps_stats(maps: Any, as_json: bool) -> None:
    """All counters: per service, per backend, the fail-open reasons, and the UDP
    sockets' reverse translations (created, freed as sockets closed, live, evicted by
    the LRU bound)."""
    from dataplane import inspect
    data = inspect.stats(maps)

    def table() -> Table:
        t = Table("SCOPE", "NAME", "COUNTER", "VALUE", box=None)
        for scope in ("services", "backends"):
            for name, counters in data[scope].items():
                for counter, value in counters.items():
                    if value:
                        t.add_row(scope[:-1], name, counter, str(value))
        for reason, value in data["reasons"].items():
            if value:
                t.add_row("kernel", "-", reason, str(value))
        for counter, value in data["udp_sockets"].items():
            t.add_row("udp", "sockets", counter, str(value))
        return t
    _emit(data, as_json, table)


def _np_maps(pin_dir: Path) -> Any:
    from dataplane import maps as maps_mod
    from dataplane import nodeport
    try:
        return nodeport.NodePortMaps(pin_dir)
    except maps_mod.NotPinned as exc:
        _fail(str(exc))


@maps.command("conntrack")
@click.option("--service", "service_id", type=int, help="Only this service id.")
@pin_dir_option
@json_option
@with_maps
def maps_conntrack(maps: Any, as_json: bool, service_id: int | None) -> None:
    """The packet path's flows: each direction's tuple as it arrives (SRC -> DST), what
    it is rewritten to, the backend, state (syn, established, fin, closing, expired),
    age and idle seconds, packets."""
    from dataplane import nodeport
    with _np_maps(maps.pin_dir) as npm:
        rows = [r for r in nodeport.ct_rows(npm.conntrack())
                if service_id is None or r["svc_id"] == service_id]

    def table() -> Table:
        t = Table(box=None, pad_edge=False)
        for col in ("SVC", "DIR", "PROTO", "SRC", "DST", "TO SRC", "TO DST", "BE", "STATE",
                    "AGE(s)", "IDLE(s)", "PKTS"):
            t.add_column(col, no_wrap=True)
        for r in rows:
            t.add_row(str(r["svc_id"]), r["dir"], r["proto"], r["src"], r["dst"],
                      r["to_src"], r["to_dst"], str(r["be_id"]), r["state"], str(r["age_s"]),
                      str(r["idle_s"]), str(r["packets"]))
        return t
    _emit(rows, as_json, table)


@maps.command("nodeport")
@pin_dir_option
@json_option
@with_maps
def maps_nodeport(maps: Any, as_json: bool) -> None:
    """The packet path: frontends (NodePorts on any node address, external IPs), their
    service and policy, and per-service packet counters: flows started (NEW), packets
    translated each way (FWD, REV), flows SNATed or to local backends, dropped for no
    usable backend (DROP), mid-flow misses (evicted or expired entries, MISS); --json adds
    flows closed and client-affinity hits."""
    from dataplane import abi, inspect
    names = {s["id"]: s["name"] for s in inspect.services(maps)}
    with _np_maps(maps.pin_dir) as npm:
        rows = []
        for key, fe in npm.frontends():
            svc = maps.get("kvr_svc_v2", fe.svc, abi.Svc)
            svc_id = svc.id if svc else None
            counters = npm.counters(svc_id) if svc_id is not None else []
            rows.append({
                "frontend": ("*" if fe.flags & abi.NP_F_NODEPORT else
                             abi.format_host(abi.ip_of(abi.from_words(key.addr))))
                + f":{abi.be16_to_port(key.port)}/{abi.PROTO_NAME.get(key.proto, key.proto)}",
                "service": abi.format_endpoint(abi.from_words(fe.svc.addr), fe.svc.port,
                                               fe.svc.proto),
                "name": names.get(svc_id, "-") if svc_id is not None else "(gone)",
                "service_id": svc_id,
                "policy": "local" if fe.flags & abi.NP_F_LOCAL else "cluster",
                "local_backends": npm.local(svc_id) if svc_id is not None else [],
                "counters": {c.name.lower(): counters[c] if counters else 0
                             for c in abi.NpCounter},
            })
        cfg = npm.config()
        data = {"frontends": sorted(rows, key=lambda r: r["frontend"]),
                "snat": {"address": str(abi.be32_to_ip(cfg.snat_addr)) if cfg.snat_addr
                         else None, "ports": [cfg.snat_min, cfg.snat_max]},
                "reasons": npm.reasons(),
                "conntrack_entries": len(npm.conntrack())}

    def table() -> Table:
        # 80 columns: the service by VIP (its name is in `maps services`), the policy
        # as C/L; --json has every counter.
        t = Table(box=None, pad_edge=False)
        for col in ("FRONTEND", "SERVICE", "POL", "LOCAL", "NEW", "FWD", "REV", "SNAT",
                    "DROP", "MISS"):
            t.add_column(col, no_wrap=True, min_width=len(col))
        for r in data["frontends"]:
            c = r["counters"]
            t.add_row(r["frontend"], r["service"], r["policy"][0].upper(),
                      str(len(r["local_backends"])), str(c["new"]), str(c["fwd"]),
                      str(c["rev"]), str(c["snat"]), str(c["no_backend"]), str(c["midflow"]))
        return t
    _emit(data, as_json, table)
    if not as_json:
        snat = data["snat"]
        click.echo(f"SNAT: {snat['address'] or 'none'} ports {snat['ports'][0]}-"
                   f"{snat['ports'][1]}; conntrack entries: {data['conntrack_entries']}")
        for reason, value in data["reasons"].items():
            if value:
                click.echo(f"  {reason}: {value}")


@maps.command("maglev")
@click.argument("service")
@pin_dir_option
@json_option
@with_maps
def maps_maglev(maps: Any, as_json: bool, service: str) -> None:
    """A service's Maglev table: slots per backend (--json adds the whole table).

    SERVICE is a name or VIP:PORT[/tcp|udp] ([IPV6]:PORT for an IPv6 VIP).
    """
    from dataplane import inspect
    data = inspect.maglev(maps, service)

    def table() -> Table:
        t = Table("BACKEND", "SLOTS", "SHARE", box=None, title=escape(
            f"{data['frontend']} M={data['table_size']}"))
        for be, n in data["slots"].items():
            t.add_row(escape(be), str(n), f"{100 * n / max(data['table_size'], 1):.2f}%")
        return t
    _emit(data, as_json, table)


@main.command()
@click.argument("service")
@click.option("--session", help="Session ID (as in X-Session-ID) the client tags its socket with.")
@click.option("--client", "client_netns", help="Client network namespace (name or path).")
@click.option("--client-ip", metavar="IPV4",
              help="A client outside the node: SERVICE is then a frontend of the packet "
                   "path (EXTERNAL_IP:PORT, NODE_IP:NODEPORT or *:NODEPORT).")
@pin_dir_option
@json_option
@with_maps
def explain(maps: Any, as_json: bool, service: str, session: str | None,
            client_netns: str | None, client_ip: str | None) -> None:
    """Which backend a key gets for SERVICE (name, VIP:PORT[/udp] or [IPV6]:PORT[/udp]),
    and why. Either VIP of a dual-stack service gives the same answer: they share the
    table and the sessions.

    With --client-ip, which backend a new flow from that address to a NodePort or
    external IP gets, and whether it is SNATed.
    """
    from dataplane import client, inspect, nodeport
    if sum(x is not None for x in (session, client_netns, client_ip)) != 1:
        raise click.UsageError("give exactly one of --session ID, --client NETNS or "
                               "--client-ip IPV4")
    if client_ip is not None:
        try:
            model.ipv4("--client-ip", client_ip)
        except model.ModelError as exc:
            raise click.UsageError(str(exc)) from None
        with _np_maps(maps.pin_dir) as npm:
            data = nodeport.explain(maps, npm, service, client_ip)
    elif session is not None:
        key, kind = client.session_hash(session), f"session {session!r}"
    else:
        assert client_netns is not None
        key, kind = inspect.netns_cookie(client_netns), f"client netns {client_netns!r}"
    if client_ip is None:
        data = inspect.explain(maps, service, key, kind)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for step in data["steps"]:
        click.echo(f"{step['what']:>12}: {step['detail']}")
    click.echo(f"{'backend':>12}: {data['backend'] or 'none'} ({data['reason']})")
