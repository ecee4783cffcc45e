"""Who may say what to the controller: an agent speaks only for its own node.

Pure rules, no grpc: :class:`Peer` is what the server's edge read from the connection
(the node in the client certificate, :mod:`dataplane.api.identity`); the functions decide.

- Without TLS the server listens on loopback only (or was told ``--insecure-listen``),
  and a plaintext peer is trusted as it always was: the one-machine lab.
- With mutual TLS every RPC needs a certificate naming a node. A ``WatchRequest``,
  ``AgentReport`` or ``BindingReport`` whose ``node`` is not the certificate's, or whose
  ``agent_id`` does not fit that node, is refused whole.
- Within an accepted ``AgentReport``, scrapes and kernel counters count only for engines of
  that node or of no node (the engines the agent scrapes: ``EngineWatcher.mine``); the rest
  are dropped, so one node cannot open another node's breakers or set its loads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from dataplane import model
from dataplane import reports as agent_reports
from dataplane.api import identity

EngineLookup = Callable[[str], model.EngineRef | None]


@dataclasses.dataclass(frozen=True)
class Peer:
    authenticated: bool  # the connection is mutual TLS
    node: str | None  # the node its certificate names (None: none, or ambiguous)


PLAINTEXT = Peer(authenticated=False, node=None)


def claim_refused(peer: Peer, agent_id: str, node: str) -> str | None:
    """Why ``peer`` may not speak as ``agent_id`` on ``node``, or None."""
    if not peer.authenticated:
        return None
    if peer.node is None:
        return "the client certificate names no kvroute node (URI SAN " \
               f"{identity.NODE_PREFIX}<node>)"
    if node != peer.node:
        return f"node {node[:64]!r} is not the certificate's node {peer.node!r}"
    if not identity.agent_id_fits(peer.node, agent_id):
        return (f"agent_id {agent_id[:64]!r} does not belong to node {peer.node!r} "
                f"(expected {peer.node!r} or {peer.node + '-…'!r})")
    return None


def _speaks_for(node: str, ref: model.EngineRef | None) -> bool:
    return ref is not None and (ref.node is None or ref.node == node)


def scoped_report(peer: Peer, report: agent_reports.AgentReport,
                  engine: EngineLookup) -> tuple[agent_reports.AgentReport, int]:
    """The part of ``report`` its peer may make (see the module docstring), and how many
    entries (scrapes + counters) were dropped. A plaintext peer's report is whole."""
    if not peer.authenticated or peer.node is None:
        return report, 0
    node = peer.node
    engines = tuple(r for r in report.engines if _speaks_for(node, engine(r.identity)))
    counters = tuple(c for c in report.counters if _speaks_for(node, engine(c.identity)))
    dropped = len(report.engines) - len(engines) + len(report.counters) - len(counters)
    if not dropped:
        return report, 0
    return dataclasses.replace(report, engines=engines, counters=counters), dropped
