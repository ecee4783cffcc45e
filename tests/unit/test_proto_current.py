"""The committed dataplane/api/pb code is what proto/kvroute/v1/kvroute.proto generates."""

from __future__ import annotations

import difflib
import importlib.metadata
from pathlib import Path

import pytest

from dataplane.api.pb import generate


def test_generated_code_is_current() -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools regenerates the code")
    fresh = generate.render()
    assert sorted(fresh) == sorted(generate.GENERATED)
    stale = []
    for name, data in fresh.items():
        committed = (generate.PACKAGE_DIR / name).read_bytes()
        if committed != data:
            diff = difflib.unified_diff(committed.decode().splitlines(),
                                        data.decode().splitlines(),
                                        f"committed/{name}", f"generated/{name}", lineterm="")
            stale.append("\n".join(list(diff)[:40]))
    version = importlib.metadata.version("grpcio-tools")
    assert not stale, (
        "dataplane/api/pb is out of date with proto/kvroute/v1/kvroute.proto: run "
        f"`python -m dataplane.api.pb.generate` (grpcio-tools {version}; the committed code "
        "came from grpcio-tools 1.85.1, and another version also changes it)\n"
        + "\n\n".join(stale)
    )


def test_a_changed_proto_is_detected(tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison above can fail: a proto edited without regenerating differs."""
    pytest.importorskip("grpc_tools", reason="grpcio-tools regenerates the code")
    root = tmp_path / "proto"
    (root / "kvroute" / "v1").mkdir(parents=True)
    original = (generate.PROTO_ROOT / generate.PROTO_FILE).read_text()
    edited = original.replace("message ReportAck {",
                              "message ReportAck {\n  string note = 2;")
    assert edited != original
    (root / generate.PROTO_FILE).write_text(edited)
    monkeypatch.setattr(generate, "PROTO_ROOT", root)
    fresh = generate.render()
    assert fresh["kvroute_pb2.py"] != (generate.PACKAGE_DIR / "kvroute_pb2.py").read_bytes()
