"""The Kubernetes manifests stay true to the CLI: every flag they pass exists; and they
are secure by default: mutual TLS on both ends with files that are mounted, and a
NetworkPolicy that admits only the agents to the controller's gRPC port."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from dataplane import cli
from dataplane.api import identity

DEPLOY = Path(__file__).parents[2] / "deploy" / "kubernetes"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))
TLS_FLAGS = ("--tls-ca", "--tls-cert", "--tls-key")


def _docs(*paths: Path) -> list[dict[str, Any]]:
    return [doc for path in paths for doc in yaml.safe_load_all(path.read_text()) if doc]


def _pod_specs() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"])
            for doc in _docs(*MANIFESTS) if "template" in doc.get("spec", {})]


def _containers() -> list[tuple[str, list[str]]]:
    out = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            spec = (doc or {}).get("spec", {}).get("template", {}).get("spec", {})
            for c in spec.get("containers", []):
                out.append((f"{path.name}:{c['name']}", c.get("args", [])))
    return out


def test_manifests_parse() -> None:
    assert {p.name for p in MANIFESTS} >= {"daemonset.yaml", "controller.yaml"}
    assert len(_containers()) == 2


@pytest.mark.parametrize(("where", "args"), _containers())
def test_container_args_are_real_options(where: str, args: list[str]) -> None:
    command = cli.main.get_command(click.Context(cli.main), args[0])
    assert command is not None, f"{where}: no command {args[0]!r}"
    known = {opt for p in command.params for opt in p.opts + p.secondary_opts}
    for arg in args[1:]:
        if arg.startswith("--"):
            assert arg.split("=", 1)[0] in known, f"{where}: {arg} is not an option"


@pytest.mark.parametrize(("where", "pod"), _pod_specs())
def test_mutual_tls_is_on_with_files_that_are_mounted(where: str, pod: dict[str, Any]) -> None:
    (container,) = pod["containers"]
    args = dict(a.split("=", 1) if "=" in a else (a, "") for a in container["args"][1:])
    assert "--insecure-listen" not in args, where
    mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
    for flag in TLS_FLAGS:
        assert flag in args, f"{where}: mTLS is off ({flag} missing)"
        assert any(args[flag].startswith(m.rstrip("/") + "/") for m in mounts), (
            f"{where}: {args[flag]} is in no mounted volume")
    if container["args"][0] == "agent":
        # The certificate names the node: the agent must speak as that same node.
        assert args["--node"] == "$(NODE_NAME)"
        env = {e["name"]: e for e in container["env"]}
        assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_only_agents_reach_the_controllers_grpc_port() -> None:
    policies = [d for d in _docs(*MANIFESTS) if d["kind"] == "NetworkPolicy"]
    (controller,) = [d for d in _docs(DEPLOY / "controller.yaml") if d["kind"] == "Deployment"]
    (agent,) = [d for d in _docs(DEPLOY / "daemonset.yaml") if d["kind"] == "DaemonSet"]
    labels = controller["spec"]["template"]["metadata"]["labels"]
    agent_labels = agent["spec"]["template"]["metadata"]["labels"]
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
    docs = _docs(DEPLOY / "optional" / "cert-manager.yaml")
    certificates = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Certificate"}
    node = certificates["kvroute-node-NODE"]
    assert node["uris"] == [identity.NODE_PREFIX + "NODE"]
    assert identity.node_of([identity.node_uri("gpu-1")]) == "gpu-1"
    assert "client auth" in node["usages"]
    server = certificates["kvroute-controller-tls"]
    assert server["uris"] == [identity.CONTROLLER_URI]
    assert "kvroute-controller.kvroute.svc" in server["dnsNames"]
    (controller,) = [d for d in _docs(DEPLOY / "controller.yaml") if d["kind"] == "Deployment"]
    volumes = controller["spec"]["template"]["spec"]["volumes"]
    assert {"secretName": "kvroute-controller-tls"}.items() <= next(
        v["secret"] for v in volumes if "secret" in v).items()
