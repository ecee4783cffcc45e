"""The kernel headers bcc compiles the programs against: the node's, or kvroute's own.

bcc compiles at load time inside a kernel header directory: the node's
``/lib/modules/$(uname -r)/build``, or whatever ``BCC_KERNEL_SOURCE`` names. Many nodes
(COS, Bottlerocket, Talos, most container images) have none, and the programs include
only UAPI headers, so the package ships a pinned UAPI header set of its own
(``dataplane/_uapi``), laid out as bcc expects a kernel header directory:

- the UAPI headers the programs and bcc's ``helpers.h`` include, and what those include
  in turn, copied unchanged from Debian's ``linux-libc-dev`` (GPL-2.0 WITH
  Linux-syscall-note; ``MANIFEST`` names the package version and each file's SHA-256);
- the stand-ins in ``bpf/uapi-stubs`` for the few kernel-internal headers bcc's
  ``helpers.h`` includes.

``python -m dataplane.uapigen`` generates the set (``make setup`` runs it); the parts here
are pure (which files, where they go, which set a load uses) but for :func:`find`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

SHIPPED_DIR = Path(__file__).resolve().parent / "_uapi"
MANIFEST = "MANIFEST"
MODES = ("auto", "node", "shipped")
LIBC_DEV = "linux-libc-dev"
ARCH = "x86"            # the kernel's name for the one architecture the set covers
MACHINES = ("x86_64",)  # uname -m values it serves

# What bcc's own headers include before the programs' (helpers.h and its bpf.h).
BCC_INCLUDES = ("linux/types.h", "linux/bpf_common.h", "uapi/linux/if_packet.h",
                "linux/version.h", "linux/log2.h", "asm/page.h")

_INCLUDE = re.compile(r"^\s*#\s*include\s*<([^>]+)>", re.MULTILINE)


class HeadersMissing(RuntimeError):
    """No header set the programs can compile against; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Headers:
    kind: str   # "node" or "shipped"
    path: Path

    def environ(self) -> dict[str, str]:
        """Environment for bcc's compile. The node's headers are bcc's default lookup
        (which handles Debian's split build/ and source/ trees); the shipped set is named
        with BCC_KERNEL_SOURCE."""
        return {"BCC_KERNEL_SOURCE": str(self.path)} if self.kind == "shipped" else {}


def node_dir(release: str) -> Path | None:
    """The node's kernel headers as bcc looks them up, when it would find them: under
    /lib/modules/RELEASE, source/ when both build/ and source/ exist (Debian splits its
    headers so), else build/; usable when it has include/linux/kconfig.h (bcc's test)."""
    kdir = Path("/lib/modules") / release
    split = (kdir / "build").is_dir() and (kdir / "source").is_dir()
    path = kdir / ("source" if split else "build")
    return path if (path / "include" / "linux" / "kconfig.h").is_file() else None


def choose(mode: str, node: Path | None, shipped: Path | None, machine: str) -> Headers:
    """Which headers a load uses. ``node`` / ``shipped``: the usable directories found
    (None when absent). ``auto`` prefers the node's own headers and falls back to the
    shipped set, so the headers mounts of a DaemonSet are optional."""
    if mode not in MODES:
        raise ValueError(f"kernel headers: {mode!r} is not one of {', '.join(MODES)}")
    shipped_ok = shipped is not None and machine in MACHINES
    if mode in ("auto", "node") and node is not None:
        return Headers("node", node)
    if mode in ("auto", "shipped") and shipped_ok:
        assert shipped is not None
        return Headers("shipped", shipped)
    wants = []
    if mode in ("auto", "node"):
        wants.append("the node's kernel headers (install the linux-headers package of the "
                     "running kernel, or run deploy/node-setup.sh)")
    if mode in ("auto", "shipped"):
        if shipped is None:
            wants.append("kvroute's shipped UAPI header set (generate it with "
                         "`python -m dataplane.uapigen`; make setup does)")
        else:
            wants.append(f"kvroute's shipped UAPI header set, which covers "
                         f"{', '.join(MACHINES)} only, not {machine}")
    raise HeadersMissing("no kernel headers to compile the programs with: needs "
                         + ", or ".join(wants))


def find(mode: str) -> Headers:
    """The headers this node's load uses (see :func:`choose`)."""
    uname = os.uname()
    return choose(mode, node_dir(uname.release),
                  SHIPPED_DIR if (SHIPPED_DIR / MANIFEST).is_file() else None, uname.machine)


# -- generation ----------------------------------------------------------------------------

def includes(text: str) -> list[str]:
    """The <...> includes of a C file, in order (conditional ones too: a superset is safe)."""
    return _INCLUDE.findall(text)


def include_name(packaged: str) -> str | None:
    """The include name of a file linux-libc-dev installs (``/usr/include/linux/in.h`` ->
    ``linux/in.h``; the x86-64 ``asm/`` lives under the multiarch triplet), or None for
    one that is no header of the set's architecture."""
    parts = Path(packaged).parts
    if not packaged.endswith(".h") or parts[:3] != ("/", "usr", "include") or len(parts) < 5:
        return None
    rest = parts[3:]
    if rest[0] in ("linux", "asm-generic"):
        return "/".join(rest)
    if rest[:2] == ("x86_64-linux-gnu", "asm"):
        return "/".join(rest[1:])
    return None


def destination(name: str) -> str | None:
    """Where an include name lives in a bcc kernel header directory, or None for one the
    set does not carry (bcc's own virtual headers)."""
    if name.startswith("bcc/"):
        return None
    if name.startswith("uapi/"):
        name = name[len("uapi/"):]
    if name.startswith("asm/"):
        return f"arch/{ARCH}/include/uapi/{name}"
    return f"include/uapi/{name}"


def closure(roots: Iterable[str], stubs: dict[str, str],
            read: Callable[[str], str | None]) -> tuple[dict[str, str], list[str]]:
    """Every UAPI header reachable from ``roots``.

    ``stubs`` maps include names kvroute stands in for to their text (their own includes
    are followed); ``read`` returns a UAPI header's text by include name (``linux/in.h``),
    None when the package has no such file. Returns (include name -> text of each UAPI
    header needed, names no one could provide).
    """
    found: dict[str, str] = {}
    missing: list[str] = []
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen or destination(name) is None:
            continue
        seen.add(name)
        if name in stubs:
            todo.extend(includes(stubs[name]))
            continue
        key = name[len("uapi/"):] if name.startswith("uapi/") else name
        if key in found:
            continue
        text = read(key)
        if text is None:
            missing.append(name)
            continue
        found[key] = text
        todo.extend(includes(text))
    return found, sorted(missing)


def stub_names(stub_dir: Path) -> dict[str, str]:
    """The stand-ins by the include name they answer to (asm/page.h, linux/types.h, ...)."""
    out: dict[str, str] = {}
    for path in sorted(stub_dir.rglob("*.h")):
        rel = path.relative_to(stub_dir).as_posix()
        for prefix in (f"arch/{ARCH}/include/", "include/"):
            if rel.startswith(prefix):
                out[rel[len(prefix):]] = path.read_text()
                break
    return out


def program_includes(bpf_dir: Path) -> list[str]:
    names: list[str] = []
    for path in sorted([*bpf_dir.glob("*.c"), *bpf_dir.glob("lib/*.h")]):
        names.extend(includes(path.read_text()))
    return names
