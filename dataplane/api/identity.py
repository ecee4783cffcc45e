"""Who a peer on the kvroute.v1 stream is, read from its mutual-TLS certificate.

One definition, used by the controller (to authorize) and by ``kvroute certs`` (to issue):

- an agent's certificate carries exactly one URI SAN ``spiffe://kvroute/node/<node>``,
  where ``<node>`` is the Kubernetes node name the agent runs on (``--node``);
- the controller's certificate carries ``spiffe://kvroute/controller`` (and DNS names);
- an agent's ``agent_id`` is its node name or starts with ``<node>-`` (the agent's default
  is ``<node>-<pin dir name>``).

The common name is informational only; nothing here trusts it. Pure: no grpc, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from dataplane import model

TRUST_DOMAIN = "kvroute"
NODE_PREFIX = f"spiffe://{TRUST_DOMAIN}/node/"
CONTROLLER_URI = f"spiffe://{TRUST_DOMAIN}/controller"
# A Kubernetes node name is a DNS subdomain; the URI path allows nothing else.
_NODE_RE = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
NODE_MAX = 253


def check_node(node: str) -> str:
    """``node`` if it can name a node in a certificate; ModelError otherwise."""
    if len(node) > NODE_MAX or not _NODE_RE.fullmatch(node):
        raise model.ModelError(f"node: {node!r} is not a node name (lowercase DNS subdomain)")
    return node


def node_uri(node: str) -> str:
    """The URI SAN of the agent certificate for ``node``."""
    return NODE_PREFIX + check_node(node)


def node_of(uris: Iterable[str]) -> str | None:
    """The node a certificate with these URI SANs speaks for: exactly one well-formed
    node URI, else None (no node, or an ambiguous certificate)."""
    nodes = {u[len(NODE_PREFIX):] for u in uris if u.startswith(NODE_PREFIX)}
    if len(nodes) != 1:
        return None
    (node,) = nodes
    try:
        return check_node(node)
    except model.ModelError:
        return None


def agent_id_fits(node: str, agent_id: str) -> bool:
    """An agent on ``node`` may call itself ``node`` or ``node-<anything>``."""
    return agent_id == node or agent_id.startswith(node + "-")
