"""The kernel matrix (``make test-kernels``): which kernels, where their packages come
from, and what a guest reported. Pure; the edges are ``fetch.py`` (apt, dpkg-deb) and
``boot.py`` (virtme-ng)."""

from __future__ import annotations

import dataclasses
import re
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

LIST = Path(__file__).with_name("kernels.toml")
IMAGE_META = "linux-image-amd64"  # Debian's metapackage: depends on the suite's newest image
_NAME = re.compile(r"^\d+\.\d+$")


class MatrixError(ValueError):
    """The kernel list, a package index or a guest's report is not what it must be."""


@dataclasses.dataclass(frozen=True)
class Kernel:
    name: str        # the upstream series, "6.1": the image found must belong to it
    suite: str       # the Debian suite whose newest generic image is booted
    stands_for: str  # which nodes it stands for, for the README table
    # Why kvroute does not pass on this kernel yet (a bug to fix, README says which):
    # its failure is reported but does not fail the matrix, and a pass does (strict, so
    # the entry goes as soon as the bug is fixed).
    known_failure: str = ""

    @property
    def archive(self) -> str:
        """Which archive of the host's apt sources serves the suite."""
        return "security" if self.suite.endswith("-security") else "main"


def load(text: str) -> list[Kernel]:
    """The kernels of kernels.toml, in order; every problem named."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise MatrixError(f"{LIST.name}: {exc}") from None
    entries = data.get("kernel")
    if not isinstance(entries, list) or not entries:
        raise MatrixError(f"{LIST.name}: no [[kernel]] entries")
    out: list[Kernel] = []
    for i, entry in enumerate(entries):
        fields = {f.name for f in dataclasses.fields(Kernel)}
        required = fields - {"known_failure"}
        if not isinstance(entry, dict) or not required <= set(entry) <= fields or not all(
                isinstance(v, str) and v for v in entry.values()):
            raise MatrixError(f"{LIST.name}: kernel {i + 1} must have the string fields "
                              f"{', '.join(sorted(required))} (and may have known_failure)")
        kernel = Kernel(**entry)
        if not _NAME.match(kernel.name):
            raise MatrixError(f"{LIST.name}: kernel name {kernel.name!r} is not a series "
                              "such as 6.1")
        if any(k.name == kernel.name for k in out):
            raise MatrixError(f"{LIST.name}: kernel {kernel.name} is listed twice")
        out.append(kernel)
    return out


def select(kernels: list[Kernel], only: str | None) -> list[Kernel]:
    """The kernels ``--only a,b`` names (all when None), in list order."""
    if not only:
        return kernels
    wanted = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in {k.name for k in kernels}]
    if unknown:
        raise MatrixError(f"unknown kernel {', '.join(unknown)}; the list has "
                          f"{', '.join(k.name for k in kernels)}")
    return [k for k in kernels if k.name in wanted]


def mirrors(sources: list[str]) -> dict[str, str]:
    """The archive URIs of the host's apt sources (deb822 ``.sources`` files or one-line
    ``sources.list`` text): ``main`` serves the plain suites, ``security`` the
    ``-security`` ones. The kernel packages come from the mirrors the host already uses."""
    found: dict[str, str] = {}

    def note(uri: str, suites: list[str]) -> None:
        kind = "security" if any(s.endswith("-security") for s in suites) else "main"
        found.setdefault(kind, uri.rstrip("/"))

    for text in sources:
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                if line.startswith("deb ") or line.startswith("deb\t"):
                    parts = re.sub(r"\[[^]]*\]", "", line).split()
                    if len(parts) >= 3:
                        note(parts[1], [parts[2]])
                    continue
                key, sep, value = line.partition(":")
                if sep:
                    fields[key.strip().lower()] = value.strip()
            types = fields.get("types", "").split()
            if "deb" in types and fields.get("enabled", "yes") != "no" and "uris" in fields:
                note(fields["uris"].split()[0], fields.get("suites", "").split())
    return found


_DEPENDS = re.compile(r"^(linux-image-(\d+\.\d+)\.[^\s(]+)\s*\(=\s*([^)\s]+)\)$")


def image_package(kernel: Kernel, depends: str) -> tuple[str, str]:
    """(package, version) of the image the suite's metapackage depends on, checked to be
    of the kernel's series: ``linux-image-6.1.0-41-amd64 (= 6.1.158-1)``."""
    for alternative in depends.split(","):
        match = _DEPENDS.match(alternative.strip())
        if match and match.group(2) == kernel.name:
            return match.group(1), match.group(3)
    raise MatrixError(f"{IMAGE_META} in {kernel.suite} depends on {depends.strip()!r}, not "
                      f"on a {kernel.name} image: fix the suite of kernel {kernel.name} in "
                      f"{LIST.name}")


def release_of(package: str) -> str:
    """uname -r of an image package: linux-image-6.1.0-41-amd64 -> 6.1.0-41-amd64."""
    return package.removeprefix("linux-image-")


MARKER = "kernel_matrix"


def marked(modules: dict[str, str]) -> list[str]:
    """The test modules (path -> source) that mark some test ``kernel_matrix``: the guest
    is given only those, so it never imports the others (every import is slow there)."""
    return sorted(path for path, text in modules.items() if f"mark.{MARKER}" in text)


@dataclasses.dataclass(frozen=True)
class Result:
    kernel: str
    release: str
    passed: int = 0
    failed: int = 0      # failures and errors
    skipped: int = 0
    seconds: float = 0.0
    exit_code: int | None = None  # pytest's in the guest; None: the guest never reported
    problem: str = ""
    known_failure: str = ""  # the kernel's entry says it does not pass yet, and why

    @property
    def passed_all(self) -> bool:
        return self.exit_code == 0 and self.failed == 0 and self.passed > 0 and not self.problem

    @property
    def ok(self) -> bool:
        """As the list expects: every test passed, or (known failure) tests ran and some
        failed. A timeout or a missing report is never excused."""
        if self.known_failure:
            return self.exit_code is not None and self.failed > 0
        return self.passed_all

    def line(self) -> str:
        what = (f"{self.passed} passed, {self.skipped} skipped, {self.failed} failed"
                if self.exit_code is not None else "no report")
        if self.known_failure and self.ok:
            verdict = "known failure"
        elif self.known_failure and self.passed_all:
            verdict = f"FAILED: passes now, remove known_failure from {LIST.name}"
        else:
            verdict = "ok" if self.ok else "FAILED"
        tail = f" ({self.problem})" if self.problem else ""
        if self.known_failure and not self.passed_all:
            tail += f" [known: {self.known_failure}]"
        return (f"kernel {self.kernel} ({self.release}): {verdict}: {what} "
                f"in {self.seconds:.0f} s{tail}")


def junit_counts(xml_text: str) -> tuple[int, int, int]:
    """(passed, failed, skipped) of a pytest JUnit XML report (errors count as failed)."""
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError as exc:
        raise MatrixError(f"the guest's JUnit report does not parse: {exc}") from None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = failed = skipped = 0
    for suite in suites:
        total += int(suite.get("tests", 0))
        failed += int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skipped += int(suite.get("skipped", 0))
    return total - failed - skipped, failed, skipped


def guest_result(kernel: Kernel, release: str, seconds: float, exit_text: str | None,
                 junit: str | None, timed_out: bool) -> Result:
    """What one guest run came to, from the files it left (exit code, JUnit report)."""
    known = kernel.known_failure
    if timed_out:
        return Result(kernel.name, release, seconds=seconds, problem="timed out")
    if exit_text is None:
        return Result(kernel.name, release, seconds=seconds,
                      problem="the guest left no exit status (did it boot?)")
    try:
        code = int(exit_text.strip())
    except ValueError:
        return Result(kernel.name, release, seconds=seconds,
                      problem=f"unreadable exit status {exit_text.strip()!r}")
    if junit is None:
        return Result(kernel.name, release, seconds=seconds, exit_code=code,
                      problem="the guest left no JUnit report")
    passed, failed, skipped = junit_counts(junit)
    problem = "" if passed or failed else "no test ran"
    return Result(kernel.name, release, passed, failed, skipped, seconds, code, problem, known)
