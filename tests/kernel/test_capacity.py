"""A desired state the kernel maps cannot hold is refused before the first write: the
maps end exactly as they began (no E2BIG part-way through)."""

from __future__ import annotations

import pytest

from dataplane import apply, model
from tests.kernel.conftest import Node
from tests.kernel.test_sock_lb import svc


def test_over_capacity_changes_nothing(kv: Node) -> None:
    kv.apply([svc("kept", "10.96.20.1", [kv.backend("gpu0")])])
    before = apply.read_view(kv.maps)
    small = apply.Applier(kv.maps, kv.settings.hash_seed, max_services=2, max_backends=3)
    try:
        state = model.desired_from_dict({"services": [
            svc(f"s{i}", f"10.96.20.{i + 1}", [kv.backend("gpu0"), kv.backend("gpu1")])
            for i in range(2)]})
        with pytest.raises(model.ModelError, match="4 \\(service, backend\\) pairs"):
            small.apply(state)
        assert apply.read_view(kv.maps) == before
    finally:
        small.close()
