"""Which entries of a pin dir are kvroute's: the pure judgement behind `kvroute uninstall`.

A pin dir is only a path the operator names, so nothing in it is kvroute's because of where
it is. An entry is kvroute's when its name is one kvroute pins *and* the object behind it is
what kvroute pins there: a map whose own (kernel) name is the pin's name, or a cgroup link
under ``links/``. Everything else is someone else's and stays. The facts come from the edge
(:func:`dataplane.loader.uninstall`), so this module does no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence

LINKS_DIR = "links"  # the subfolder holding kvroute's pinned bpf links


@dataclasses.dataclass(frozen=True)
class Entry:
    """One entry of a pin dir, as the edge found it."""

    name: str
    kind: str  # "map", "link", "prog", "dir", "symlink", or "" (not a BPF object)
    object_name: str = ""  # a map's own name, as the kernel keeps it
    cgroup_link: bool = False  # a link of type BPF_LINK_TYPE_CGROUP
    problem: str = ""  # why the edge could not look at it, if it could not


@dataclasses.dataclass(frozen=True)
class Plan:
    """What uninstall removes, in order (links are detached first), and what it leaves."""

    links: tuple[str, ...]
    maps: tuple[str, ...]
    kept: tuple[str, ...]  # "NAME: why it is not kvroute's"

    @property
    def owns_anything(self) -> bool:
        return bool(self.links or self.maps)


def foreign_reason(entry: Entry, expected_kind: str, names: Collection[str]) -> str | None:
    """None when ``entry`` is kvroute's (a ``expected_kind`` pinned under one of ``names``),
    else why not, for the report."""
    if entry.problem:
        return entry.problem
    if entry.kind == "dir":
        return "a folder kvroute did not make"
    if entry.kind == "symlink":
        return "a symbolic link; kvroute pins none"
    if entry.name not in names:
        return "not one of kvroute's pins"
    if entry.kind != expected_kind:
        return f"named like kvroute's {expected_kind} but is {_kind_text(entry.kind)}"
    if expected_kind == "map" and entry.object_name != entry.name:
        return f"a map named {entry.object_name!r}, not kvroute's {entry.name}"
    if expected_kind == "link" and not entry.cgroup_link:
        return "a link that is not a cgroup attachment"
    return None


def _kind_text(kind: str) -> str:
    return {"map": "a map", "link": "a link", "prog": "a program"}.get(kind, "no BPF object")


def plan(top: Sequence[Entry], links: Sequence[Entry], map_names: Collection[str],
         program_names: Collection[str]) -> Plan:
    """Judge every entry of the pin dir (``top``) and of its ``links/`` folder (``links``,
    empty if there is none). ``links/`` itself is entered, never any other folder."""
    out_links: list[str] = []
    out_maps: list[str] = []
    kept: list[str] = []
    for entry in links:
        why = foreign_reason(entry, "link", program_names)
        if why is None:
            out_links.append(entry.name)
        else:
            kept.append(f"{LINKS_DIR}/{entry.name}: {why}")
    for entry in top:
        if entry.name == LINKS_DIR and entry.kind == "dir":
            continue  # judged entry by entry above
        why = foreign_reason(entry, "map", map_names)
        if why is None:
            out_maps.append(entry.name)
        else:
            kept.append(f"{entry.name}: {why}")
    return Plan(links=tuple(out_links), maps=tuple(out_maps), kept=tuple(kept))
