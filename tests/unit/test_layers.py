"""The direction of dependencies (pyproject's import-linter contracts) holds: `make test`
fails on a broken layer, not only `make lint`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.unit
def test_import_contracts_are_kept() -> None:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "lint-imports (import-linter) is a dev dependency: make setup installs it"
    proc = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


@pytest.mark.unit
def test_the_cli_finds_plugin_commands_and_reports_broken_ones(monkeypatch:
                                                               pytest.MonkeyPatch) -> None:
    import importlib.metadata

    from click.testing import CliRunner

    from dataplane import cli
    listed = CliRunner().invoke(cli.main, ["--help"])
    assert listed.exit_code == 0
    for name in ("controller", "engine-sim", "lab", "agent", "maps"):
        assert name in listed.output
    broken = importlib.metadata.EntryPoint("ghost", "no_such_module.cli:command",
                                           cli.PLUGIN_GROUP)
    real = cli._Commands._plugins
    monkeypatch.setattr(cli._Commands, "_plugins",
                        lambda self: {**real(self), "ghost": broken})
    result = CliRunner().invoke(cli.main, ["ghost"])
    assert result.exit_code != 0
    assert "installed but cannot be loaded" in result.output
    assert "no_such_module" in result.output
