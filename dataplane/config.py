"""The desired state from a YAML file: text -> :class:`dataplane.model.DesiredState`.

This module only reads and parses; every value is checked by the model's constructors
(one validator for files, snapshots and the wire), and a file with any problem is
refused whole, every problem named by its path (``services[1].backends[0].port: must
be in [1, 65535], got 0``).

Shape (defaults in brackets; see :mod:`dataplane.model` for the limits)::

    services:
      - name: llm-chat              # [a-z0-9]([-a-z0-9.]*[a-z0-9])?, <= 63 chars, unique
        vip: 10.96.0.10             # IPv4
        port: 8000
        protocol: tcp               # [tcp] tcp | udp
        affinity: session           # [none] none | client | session
        affinity_timeout: 10800     # [10800] seconds
        table_size: 1021            # [smallest listed prime >= max(251, 100 x backends)]
        epsilon: 0.25               # [0.25] bounded-load epsilon, null disables
        probe_share: 0.05           # [0.05] share of new sessions a probing backend may take
        move_epsilon: 1.0           # [null] live sessions move off an engine over
                                    #   (1 + move_epsilon) x mean; > epsilon; null: never
        backends:
          - address: 10.244.1.5
            port: 8000
            weight: 100             # [100] 0..65535
            state: active           # [active] active | draining | open | probing
            load: 0                 # [0] bounded-load units

What a file may be, beyond valid YAML: a regular file of at most ``MAX_BYTES``, UTF-8,
no duplicate keys (YAML would silently keep the last), no deeper than ``MAX_DEPTH``, and
at most ``MAX_NODES`` values once aliases are expanded (a small file of nested aliases can
otherwise stand for millions of backends).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

from dataplane import model

MAX_BYTES = 16 * 1024 * 1024
MAX_DEPTH = 32
MAX_NODES = 2_000_000


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and counts what aliases expand to."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._sizes: dict[int, int] = {}

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, "a mapping key must be a plain value", key_node.start_mark
                ) from None
            if key in seen:
                line = seen[key].start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {line})",
                    key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def _expanded(node: yaml.Node, depth: int, sizes: dict[int, int]) -> int:
    """Values ``node`` stands for with every alias expanded (memoised per node, so a
    billion-laughs file costs one visit per distinct node)."""
    if depth > MAX_DEPTH:
        raise model.ModelError(f"line {node.start_mark.line + 1}: nested deeper than "
                               f"{MAX_DEPTH} levels")
    known = sizes.get(id(node))
    if known is not None:
        return known
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_expanded(child, depth + 1, sizes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        total += sum(_expanded(k, depth + 1, sizes) + _expanded(v, depth + 1, sizes)
                     for k, v in node.value)
    sizes[id(node)] = total
    if total > MAX_NODES:
        raise model.ModelError(f"line {node.start_mark.line + 1}: expands to more than "
                               f"{MAX_NODES} values (YAML aliases?)")
    return total


def parse(text: str) -> model.DesiredState:
    """Parse and validate YAML text; raises :class:`model.ModelError`."""
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            raise model.ModelError("(top level): the desired state is empty")
        _expanded(root, 0, {})
        data = loader.construct_document(root)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise model.ModelError(f"YAML error at {where}: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise model.ModelError(f"YAML error: {exc}") from None
    except RecursionError:
        raise model.ModelError(f"nested deeper than {MAX_DEPTH} levels") from None
    finally:
        loader.dispose()
    return model.desired_from_dict(data)


def read_text(path: str | Path) -> str:
    """A config file's text: a regular file (not a FIFO or device: those hang or never
    end), at most MAX_BYTES, UTF-8. Raises :class:`model.ModelError` naming the file."""
    p = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer before fstat refuses it.
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise model.ModelError(f"{p}: cannot read: {exc.strerror or exc}") from None
    # fstat before fdopen: fdopen itself raises IsADirectoryError on a directory.
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise model.ModelError(f"{p}: not a regular file")
    with os.fdopen(fd, "rb") as f:
        if info.st_size > MAX_BYTES:
            raise model.ModelError(f"{p}: {info.st_size} bytes, more than the "
                                   f"{MAX_BYTES} a desired state may have")
        raw = f.read(MAX_BYTES + 1)
    if len(raw) > MAX_BYTES:
        raise model.ModelError(f"{p}: more than the {MAX_BYTES} bytes a desired state may have")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise model.ModelError(f"{p}: not UTF-8 (byte {exc.start})") from None


def load_file(path: str | Path) -> model.DesiredState:
    """Read and validate a YAML file (the error names the file on every line)."""
    text = read_text(path)
    try:
        return parse(text)
    except model.ModelError as exc:
        raise model.ModelError([f"{path}: {line}" for line in exc.problems]) from None


def dump(state: model.DesiredState) -> str:
    """YAML text that :func:`parse` reads back to an equal state."""
    return yaml.safe_dump(state.to_dict(engines=bool(state.engines)), sort_keys=False)
