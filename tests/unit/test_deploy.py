"""The Kubernetes manifests, as kustomize renders them, stay true to the code and to
Kubernetes: every object validates against a recent Kubernetes schema; every flag, probe
path, port and annotation they (and README) name exists in the code; mutual TLS is on
with files that are mounted; only the agents reach the controller's gRPC port; and the
Grafana dashboard asks only for metrics the code exports."""

from __future__ import annotations

import ast
import asyncio
import functools
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from controller import grpc_server, reconcile
from controller import main as controller_main
from controller.discovery import discovered
from dataplane import agent as agent_mod
from dataplane import cli
from dataplane.api import identity
from dataplane.settings import Settings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parents[2]
K8S = ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir())
OPTIONAL = sorted(p.name for p in (K8S / "optional").iterdir())
DASHBOARD = K8S / "optional" / "monitoring" / "kvroute-dashboard.json"
TLS_FLAGS = ("--tls-ca", "--tls-cert", "--tls-key")
# Kinds of CRDs (cert-manager, the Prometheus Operator) whose schemas kubernetes-validate
# does not ship; everything else must validate.
CRD_KINDS = {"Certificate", "Issuer", "ServiceMonitor"}


# -- rendering ------------------------------------------------------------------------------

def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (make setup installs Debian's kubernetes-client)")
    return kubectl


@functools.cache
def _render(folder: Path) -> tuple[dict[str, Any], ...]:
    out = subprocess.run([_kubectl(), "kustomize", str(folder)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {folder}: {out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def rendered(name: str) -> tuple[dict[str, Any], ...]:
    for group in ("overlays", "optional"):
        if (K8S / group / name).is_dir():
            return _render(K8S / group / name)
    raise KeyError(name)


def _one(docs: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return doc


def _containers(docs: tuple[dict[str, Any], ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        pod = doc.get("spec", {}).get("template", {}).get("spec")
        if pod:
            for c in pod.get("containers", []):
                yield f"{doc['kind']}/{doc['metadata']['name']}:{c['name']}", c


def _args(container: dict[str, Any]) -> dict[str, str]:
    return dict(a.split("=", 1) if "=" in a else (a, "") for a in container["args"][1:])


def test_every_overlay_and_component_renders() -> None:
    assert OVERLAYS == ["beside-kube-proxy", "replace-kube-proxy"]
    assert OPTIONAL == ["cert-manager", "monitoring"]
    for name in OVERLAYS:
        kinds = {d["kind"] for d in rendered(name)}
        assert kinds >= {"Namespace", "DaemonSet", "Deployment", "Service", "NetworkPolicy",
                         "ClusterRole", "Role"}, name


@pytest.mark.parametrize("name", OVERLAYS + OPTIONAL)
def test_every_object_validates_against_a_recent_kubernetes(name: str) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="make setup installs the dev extras")
    version = kv.latest_version()
    assert tuple(int(x) for x in version.split(".")[:2]) >= (1, 33), version
    unchecked = set()
    for doc in rendered(name):
        try:
            kv.validate(doc, version, strict=True)
        except kv.SchemaNotFoundError:
            unchecked.add(doc["kind"])
        except kv.ValidationError as exc:
            raise AssertionError(f"{name}: {doc['kind']}/{doc['metadata']['name']}: "
                                 f"{exc.message} at {list(exc.path)}") from None
    assert unchecked <= CRD_KINDS, f"{name}: no schema for {unchecked - CRD_KINDS}"


# -- the code behind the manifests ----------------------------------------------------------

def _command(name: str) -> click.Command:
    command = cli.main.get_command(click.Context(cli.main), name)
    assert command is not None, f"no command {name!r}"
    return command


def _options(command: click.Command) -> set[str]:
    return {opt for p in command.params for opt in p.opts + p.secondary_opts}


def _all_options(command: click.Command) -> set[str]:
    found = _options(command)
    if isinstance(command, click.Group):
        ctx = click.Context(command)
        for sub in command.list_commands(ctx):
            sub_command = command.get_command(ctx, sub)
            assert sub_command is not None
            found |= _all_options(sub_command)
    return found


def _routes(app: Any) -> set[str]:
    return {r.canonical for r in app.router.resources()}


@functools.cache
def served_paths() -> dict[str, set[str]]:
    """HTTP paths each command serves, read from the apps the code builds."""
    agent = agent_mod.Agent(Settings(), Path("/"), Path("/dev/null"))

    class Never:
        def snapshot(self) -> list[Any]:
            return []

        async def watch(self) -> Any:  # pragma: no cover - never iterated here
            await asyncio.Event().wait()
            yield []

    ctl = controller_main.Controller(Never(), reconcile.Reconciler(),
                                     grpc_server.ControlServer(grpc_server.Publisher()))
    return {"agent": _routes(agent._app()), "controller": _routes(ctl._app())}


def _kvroute_containers() -> Iterator[tuple[str, dict[str, Any]]]:
    seen = set()
    for name in OVERLAYS:
        for where, c in _containers(rendered(name)):
            if c.get("args") and (name, where) not in seen:
                seen.add((name, where))
                yield f"{name}/{where}", c


def test_every_flag_probe_path_and_port_exists_in_the_code() -> None:
    checked = 0
    for where, c in _kvroute_containers():
        command_name = c["args"][0]
        known = _options(_command(command_name))
        for arg in c["args"][1:]:
            assert arg.startswith("--"), f"{where}: {arg!r} is not an option"
            assert arg.split("=", 1)[0] in known, f"{where}: {arg} is not an option"
        args = _args(c)
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        # The HTTP server the probes reach listens where the probes look.
        http_port = int(args["--metrics"].rsplit(":", 1)[1])
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            if probe in c:
                get = c[probe]["httpGet"]
                assert get["path"] in served_paths()[command_name], (
                    f"{where}: {probe} {get['path']} is not served by {command_name}")
                assert ports[get["port"]] == http_port, f"{where}: {probe} port"
                checked += 1
        if command_name == "controller":
            assert ports["grpc"] == int(args["--listen"].rsplit(":", 1)[1])
    assert checked >= 2 * (3 + 2)  # both overlays: the agent's three, the controller's two


def test_the_overlays_select_the_two_modes() -> None:
    def ctl_args(name: str) -> dict[str, str]:
        return _args(_one(rendered(name), "Deployment")["spec"]["template"]["spec"]
                     ["containers"][0])

    def agent_args(name: str) -> dict[str, str]:
        return _args(_one(rendered(name), "DaemonSet")["spec"]["template"]["spec"]
                     ["containers"][0])

    services = next(p for p in _command("controller").params if p.name == "service_scope")
    assert isinstance(services.type, click.Choice)
    assert set(services.type.choices) == {"all", "annotated"}
    assert ctl_args("beside-kube-proxy")["--services"] == "annotated"
    assert ctl_args("replace-kube-proxy")["--services"] == "all"
    # Beside kube-proxy the agent dials the controller's Service; replacing it, no
    # ClusterIP is translated before kvroute's tables hold it, so not a Service name.
    assert agent_args("beside-kube-proxy")["--controller"].endswith(".svc:7070")
    replaced = agent_args("replace-kube-proxy")["--controller"]
    assert replaced == "$(KVROUTE_CONTROLLER)"
    ds = _one(rendered("replace-kube-proxy"), "DaemonSet")
    env = {e["name"]: e for e in ds["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert ".svc" not in env["KVROUTE_CONTROLLER"]["value"]
    assert set(env) == {"KVROUTE_CONTROLLER", "NODE_NAME"}
    deploy = _one(rendered("replace-kube-proxy"), "Deployment")
    ctl_env = {e["name"] for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert ctl_env == {"POD_NAME", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"}


def test_the_agent_runs_unprivileged_with_a_bpffs_init_and_measured_resources() -> None:
    for name in OVERLAYS:
        ds = _one(rendered(name), "DaemonSet")
        pod = ds["spec"]["template"]["spec"]
        for c in pod["initContainers"] + pod["containers"]:
            sc = c["securityContext"]
            assert sc.get("privileged") is False and sc["capabilities"]["drop"] == ["ALL"]
            # The kubelet refuses allowPrivilegeEscalation: false beside CAP_SYS_ADMIN.
            assert "allowPrivilegeEscalation" not in sc
            assert c["resources"]["limits"]["memory"]
        (init,) = pod["initContainers"]
        assert "mount -t bpf bpf /sys/fs/bpf" in " ".join(init["command"])
        (agent,) = pod["containers"]
        assert set(agent["securityContext"]["capabilities"]["add"]) == {
            "BPF", "NET_ADMIN", "SYS_ADMIN", "PERFMON", "SYS_RESOURCE"}
        # Bidirectional propagation is for privileged containers only.
        assert all("mountPropagation" not in m for m in agent["volumeMounts"])
        text = (K8S / "base" / "daemonset.yaml").read_text()
        assert "python -m lab.bench_memory" in text  # the measurement says how it was made


def test_every_annotation_in_the_manifests_and_readme_exists() -> None:
    texts = [(p, p.read_text()) for p in K8S.rglob("*.yaml")]
    texts.append((ROOT / "README.md", (ROOT / "README.md").read_text()))
    found = {m for _, text in texts for m in re.findall(r"kvroute\.io/[a-z0-9-]+", text)}
    assert found, "no annotation named anywhere"
    assert found <= discovered.KNOWN_ANNOTATIONS, found - discovered.KNOWN_ANNOTATIONS


def test_every_flag_in_the_readme_exists() -> None:
    options = _all_options(cli.main)
    for name in cli.main.list_commands(click.Context(cli.main)):
        options |= _all_options(_command(name))
    sources = "".join(p.read_text() for d in ("dataplane", "controller", "lab")
                      for p in (ROOT / d).rglob("*.py"))
    readme = (ROOT / "README.md").read_text()
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", readme))
    # Options of kvroute's click commands, or of a project script's argparse (quoted in
    # its source, as `python -m lab.bench --only`).
    unknown = {f for f in flags if f not in options and f'"{f}"' not in sources}
    assert not unknown, f"README names options no command has: {sorted(unknown)}"


# -- security ---------------------------------------------------------------------------------

def test_mutual_tls_is_on_with_files_that_are_mounted() -> None:
    for where, c in _kvroute_containers():
        args = _args(c)
        assert "--insecure-listen" not in args, where
        mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]
        for flag in TLS_FLAGS:
            assert flag in args, f"{where}: mTLS is off ({flag} missing)"
            assert any(args[flag].startswith(m.rstrip("/") + "/") for m in mounts), (
                f"{where}: {args[flag]} is in no mounted volume")
        if c["args"][0] == "agent":
            # The certificate names the node: the agent must speak as that same node.
            assert args["--node"] == "$(NODE_NAME)"
            env = {e["name"]: e for e in c["env"]}
            assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_agents_reach_the_controllers_grpc_port(overlay: str) -> None:
    docs = rendered(overlay)
    labels = _one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    agent_labels = _one(docs, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    (policy,) = [p for p in policies
                 if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    grpc_rules = [r for r in policy["spec"]["ingress"]
                  if any(p["port"] == 7070 for p in r.get("ports", []))]
    assert grpc_rules, "nothing admits the agents"
    for rule in grpc_rules:
        sources = rule.get("from")
        assert sources, "port 7070 open to everyone"
        for source in sources:
            if "podSelector" in source:
                assert source["podSelector"]["matchLabels"].items() <= agent_labels.items()
                assert "namespaceSelector" not in source
            else:
                assert set(source) == {"ipBlock"}  # the nodes (hostNetwork agents)
                assert source["ipBlock"]["cidr"] != "0.0.0.0/0"
    # No other rule opens 7070 (a rule with no ports opens every port).
    for rule in policy["spec"]["ingress"]:
        assert rule in grpc_rules or rule.get("ports"), rule


def test_optional_cert_manager_issues_the_identities_the_controller_checks() -> None:
    docs = rendered("cert-manager")
    certificates = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Certificate"}
    node = certificates["kvroute-node-NODE"]
    assert node["uris"] == [identity.NODE_PREFIX + "NODE"]
    assert identity.node_of([identity.node_uri("gpu-1")]) == "gpu-1"
    assert "client auth" in node["usages"]
    server = certificates["kvroute-controller-tls"]
    assert server["uris"] == [identity.CONTROLLER_URI]
    assert "kvroute-controller.kvroute.svc" in server["dnsNames"]
    for overlay in OVERLAYS:
        volumes = _one(rendered(overlay), "Deployment")["spec"]["template"]["spec"]["volumes"]
        assert {"secretName": "kvroute-controller-tls"}.items() <= next(
            v["secret"] for v in volumes if "secret" in v).items()


def test_controller_replicas_spread_over_nodes() -> None:
    for overlay in OVERLAYS:
        deploy = _one(rendered(overlay), "Deployment")
        spec = deploy["spec"]["template"]["spec"]
        (term,) = spec["affinity"]["podAntiAffinity"][
            "preferredDuringSchedulingIgnoredDuringExecution"]
        assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
        assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= (
            deploy["spec"]["template"]["metadata"]["labels"].items())
        assert deploy["spec"]["replicas"] >= 2


# -- monitoring ------------------------------------------------------------------------------

_METRIC_CLASSES = {"Counter": "counter", "CounterMetricFamily": "counter", "Gauge": "gauge",
                   "GaugeMetricFamily": "gauge", "Histogram": "histogram",
                   "HistogramMetricFamily": "histogram", "Summary": "summary"}


def exported_metrics() -> dict[str, set[str] | None]:
    """Every sample name the code can export -> its label names (None: not literal)."""
    out: dict[str, set[str] | None] = {}
    for path in [*(ROOT / "dataplane").rglob("*.py"), *(ROOT / "controller").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)):
                continue
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(
                node.func, "id", "")
            kind = _METRIC_CLASSES.get(func)
            if kind is None:
                continue
            name = node.args[0].value
            label_node = next((k.value for k in node.keywords
                               if k.arg in ("labels", "labelnames")),
                              node.args[2] if len(node.args) > 2 else None)
            labels = None
            if label_node is None:
                labels = set()
            elif isinstance(label_node, ast.List | ast.Tuple) and all(
                    isinstance(e, ast.Constant) for e in label_node.elts):
                labels = {e.value for e in label_node.elts}  # type: ignore[attr-defined]
            suffixes = {"counter": ["_total"], "gauge": [""],
                        "histogram": ["_bucket", "_sum", "_count"],
                        "summary": ["_sum", "_count"]}[kind]
            for suffix in suffixes:
                sample_labels = labels | {"le"} if labels is not None and suffix == "_bucket" \
                    else labels
                out[name.removesuffix("_total") + suffix] = sample_labels
    return out


def test_the_dashboard_asks_only_for_metrics_the_code_exports() -> None:
    exported = exported_metrics()
    assert "kvroute_agent_service_connects_total" in exported  # the scan finds collectors
    assert "kvroute_controller_tick_seconds_bucket" in exported  # and instruments
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    # Labels Prometheus adds to every target (the ServiceMonitors' Services and pods).
    target_labels = {"pod", "namespace", "instance", "job", "service", "node"}
    used = set()
    for expr in exprs:
        for name in re.findall(r"\bkvroute_[a-z0-9_]+", expr):
            assert name in exported, f"dashboard: {name} is not exported by the code"
            used.add(name)
            labels = exported[name]
            if labels is None:
                continue
            selectors = re.findall(rf"{name}\{{([^}}]*)\}}", expr)
            named = {m.split("=")[0].strip() for s in selectors for m in s.split(",") if m}
            grouped = {x.strip() for g in re.findall(r"by \(([^)]*)\)", expr)
                       for x in g.split(",")}
            for label in named | grouped:
                assert label in labels | target_labels, f"dashboard: {name} has no {label!r}"
    assert any(n.startswith("kvroute_agent_") for n in used)
    assert any(n.startswith("kvroute_controller_") for n in used)


def test_the_servicemonitors_scrape_the_ports_the_code_serves() -> None:
    docs = rendered("monitoring")
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert len(monitors) == 2
    overlay = rendered(OVERLAYS[0])
    for monitor in monitors:
        selector = monitor["spec"]["selector"]["matchLabels"]
        (svc,) = [s for s in services.values()
                  if selector.items() <= s["metadata"]["labels"].items()]
        (endpoint,) = monitor["spec"]["endpoints"]
        (port,) = [p for p in svc["spec"]["ports"] if p["name"] == endpoint["port"]]
        workload = next(d for d in overlay if d["kind"] in ("Deployment", "DaemonSet")
                        and svc["spec"]["selector"].items()
                        <= d["spec"]["template"]["metadata"]["labels"].items())
        (c,) = workload["spec"]["template"]["spec"]["containers"]
        assert port["port"] == int(_args(c)["--metrics"].rsplit(":", 1)[1])
        assert endpoint["path"] in served_paths()[c["args"][0]]
    (dashboard,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["kvroute-dashboard.json"]) == json.loads(
        DASHBOARD.read_text())
