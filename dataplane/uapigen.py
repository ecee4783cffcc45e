"""Generate the UAPI header set kvroute ships (dataplane/_uapi; see dataplane.uapi).

The headers come unchanged from Debian's linux-libc-dev, found through dpkg, so the
set's origin and version are on record (its MANIFEST); ``make setup`` runs this when
the programs' includes or the stand-ins change.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

from dataplane import loader, uapi


def _libc_dev() -> tuple[str, dict[str, Path]]:
    """linux-libc-dev's version and its headers by include name (linux/in.h, asm/...)."""
    try:
        version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", uapi.LIBC_DEV],
                                 check=True, capture_output=True, text=True).stdout.strip()
        listing = subprocess.run(["dpkg", "-L", uapi.LIBC_DEV], check=True, capture_output=True,
                                 text=True).stdout.split()
    except (OSError, subprocess.CalledProcessError) as exc:
        raise uapi.HeadersMissing(f"{uapi.LIBC_DEV} is not installed "
                                  f"(apt-get install {uapi.LIBC_DEV}): {exc}") from None
    files: dict[str, Path] = {}
    for line in listing:
        name = uapi.include_name(line)
        if name is not None and Path(line).is_file():
            files[name] = Path(line)
    return version, files


def generate(out: Path, bpf_dir: Path) -> list[str]:
    """Write the shipped header set into ``out`` (replaced whole); returns its manifest."""
    version, files = _libc_dev()
    stub_dir = bpf_dir / "uapi-stubs"
    stubs = uapi.stub_names(stub_dir)
    found, missing = uapi.closure([*uapi.BCC_INCLUDES, *uapi.program_includes(bpf_dir)], stubs,
                                  lambda name: files[name].read_text() if name in files else None)
    if missing:
        raise uapi.HeadersMissing(
            f"{uapi.LIBC_DEV} {version} lacks {', '.join(missing)}, which the programs "
            f"include: include only UAPI headers, or add a stub in {stub_dir}")
    tmp = out.with_name(out.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    manifest = [f"# UAPI headers from Debian's {uapi.LIBC_DEV} {version} "
                "(GPL-2.0 WITH Linux-syscall-note), unchanged;",
                f"# stand-ins from bpf/uapi-stubs (Apache-2.0). arch={uapi.ARCH}",
                f"{uapi.LIBC_DEV} {version}"]
    for name in sorted(found):
        dest = uapi.destination(name)
        assert dest is not None
        target = tmp / dest
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(found[name])
        manifest.append(f"{hashlib.sha256(found[name].encode()).hexdigest()}  {dest}")
    for path in sorted(stub_dir.rglob("*.h")):
        rel = path.relative_to(stub_dir).as_posix()
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        manifest.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {rel}")
    (tmp / uapi.MANIFEST).write_text("\n".join(manifest) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dataplane.uapigen",
        description="Generate the UAPI header set kvroute ships for nodes without kernel "
                    f"headers, from Debian's {uapi.LIBC_DEV} (see the module docstring).")
    parser.add_argument("--out", type=Path, default=uapi.SHIPPED_DIR,
                        help=f"folder to write (replaced whole; default {uapi.SHIPPED_DIR})")
    args = parser.parse_args(argv)
    try:
        manifest = generate(args.out, loader.bpf_dir())
    except uapi.HeadersMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    files = sum(1 for line in manifest if not line.startswith("#")) - 1
    print(f"{args.out}: {files} headers ({manifest[2]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
