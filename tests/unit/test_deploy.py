"""The Kubernetes manifests stay true to the CLI: every flag they pass exists."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
import yaml

from dataplane import cli

MANIFESTS = sorted((Path(__file__).parents[2] / "deploy" / "kubernetes").glob("*.yaml"))


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
