"""The agent's readiness and liveness verdicts (served as ``/readyz`` and ``/livez``).

Pure: the agent's HTTP edge gathers the facts (which pins exist, whether a desired state
was applied, which of its tasks still run) and these functions judge them, so what
"ready" means is defined once and tested without a kernel.

Ready means this node routes as the fleet wants: every program is attached (its link is
pinned), every map is pinned, and the first desired state (a file, or the controller's
first snapshot) has been applied. Losing the controller later does not make an agent
unready: its tables stay and keep routing (static stability), and an unready DaemonSet
pod would only stall a rolling update for nothing.

Live means the agent's event loop answers and none of its tasks (controller stream,
engine scrapes, kernel binding relay, config file) has ended. The endpoint is served on
that same loop, so a loop that hangs fails the probe by not answering.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping


@dataclasses.dataclass(frozen=True)
class Facts:
    """What the edge found; names are pin names (``links/<program>``, ``<map>``)."""

    links: frozenset[str]  # program names whose link is pinned under links/
    maps: frozenset[str]  # map names pinned in the pin dir
    applied: bool  # the first desired state has been applied


@dataclasses.dataclass(frozen=True)
class Verdict:
    ok: bool
    problems: tuple[str, ...]

    def text(self) -> str:
        """The probe's body: "ok", or one problem per line."""
        return "ok\n" if self.ok else "".join(f"{p}\n" for p in self.problems)


def _missing(what: str, wanted: Collection[str], found: frozenset[str]) -> list[str]:
    gone = sorted(set(wanted) - found)
    return [f"{what} not pinned: {', '.join(gone)}"] if gone else []


def readiness(facts: Facts, programs: Collection[str], maps: Collection[str]) -> Verdict:
    """Ready when every program in ``programs`` is attached, every map in ``maps`` pinned
    and a desired state applied."""
    problems = [*_missing("links", programs, facts.links), *_missing("maps", maps, facts.maps)]
    if not facts.applied:
        problems.append("no desired state applied yet")
    return Verdict(not problems, tuple(problems))


def liveness(tasks: Mapping[str, bool]) -> Verdict:
    """Live when the loop has started its tasks (``tasks``: name -> still running) and
    every one of them is still running."""
    if not tasks:
        return Verdict(False, ("the agent's loop has not started",))
    problems = tuple(f"task {name} has ended" for name, running in sorted(tasks.items())
                     if not running)
    return Verdict(not problems, problems)
