"""The kernel matrix's pure core (lab/kernels/matrix.py): the list, the host's mirrors,
the image a suite names, and what a guest reported."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lab.kernels import matrix

K61 = matrix.Kernel("6.1", "bookworm-security", "Debian 12")
README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_shipped_list_loads_and_readme_states_it() -> None:
    kernels = matrix.load(matrix.LIST.read_text())
    assert [k.name for k in kernels] == sorted((k.name for k in kernels),
                                               key=lambda n: tuple(map(int, n.split("."))))
    text = README.read_text()
    section = text[text.index("## Supported kernels and nodes"):]
    section = section[:section.index("\n## ", 3)]
    rows = re.findall(r"^\| (\d+\.\d+) \| `([^`]+)` \|", section, re.MULTILINE)
    assert rows == [(k.name, k.suite) for k in kernels]


@pytest.mark.parametrize("text, problem", [
    ("", "no \\[\\[kernel\\]\\] entries"),
    ("[[kernel]]\nname = '6.1'\nsuite = 'bookworm'\n", "must have the string fields"),
    ("[[kernel]]\nname = '6.1'\nsuite = 's'\nstands_for = 'x'\nknown_failure = ''\n",
     "must have the string fields"),
    ("[[kernel]]\nname = 'six'\nsuite = 's'\nstands_for = 'x'\n", "not a series"),
    ("[[kernel]]\nname = '6.1'\nsuite = 's'\nstands_for = 'x'\n" * 2, "listed twice"),
    ("[[kernel]\n", "kernels.toml"),
])
def test_a_bad_list_is_refused_saying_why(text: str, problem: str) -> None:
    with pytest.raises(matrix.MatrixError, match=problem):
        matrix.load(text)


def test_select_keeps_list_order_and_refuses_unknown_names() -> None:
    ks = [matrix.Kernel("5.10", "a", "x"), K61, matrix.Kernel("6.12", "b", "y")]
    assert [k.name for k in matrix.select(ks, "6.12,5.10")] == ["5.10", "6.12"]
    assert matrix.select(ks, None) == ks
    with pytest.raises(matrix.MatrixError, match=r"unknown kernel 4\.19"):
        matrix.select(ks, "4.19")


def test_mirrors_come_from_deb822_and_one_line_sources() -> None:
    deb822 = ("Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm "
              "bookworm-updates\nComponents: main\n\n"
              "Types: deb\nURIs: http://mirror.example/debian-security/\n"
              "Suites: bookworm-security\nComponents: main\n\n"
              "Types: deb-src\nURIs: http://src.example/\nSuites: bookworm\n")
    assert matrix.mirrors([deb822]) == {"main": "http://mirror.example/debian",
                                        "security": "http://mirror.example/debian-security"}
    one_line = ("# comment\ndeb [arch=amd64] http://a.example/debian bullseye main\n"
                "deb http://a.example/security bullseye-security main\n")
    assert matrix.mirrors([one_line]) == {"main": "http://a.example/debian",
                                          "security": "http://a.example/security"}
    disabled = "Types: deb\nURIs: http://off.example/\nSuites: x\nEnabled: no\n"
    assert matrix.mirrors([disabled]) == {}


def test_the_image_must_be_of_the_listed_series() -> None:
    depends = " linux-image-6.1.0-41-amd64 (= 6.1.158-1)"
    assert matrix.image_package(K61, depends) == ("linux-image-6.1.0-41-amd64", "6.1.158-1")
    with pytest.raises(matrix.MatrixError, match=r"not on a 6\.1 image"):
        matrix.image_package(K61, " linux-image-6.12.57+deb13-amd64 (= 6.12.57-1)")
    assert matrix.release_of("linux-image-6.12.57+deb13-amd64") == "6.12.57+deb13-amd64"


JUNIT = ('<?xml version="1.0"?><testsuites><testsuite name="pytest" errors="{e}" '
         'failures="{f}" skipped="{s}" tests="{t}" time="1"/></testsuites>')


def test_a_guest_report_counts_passes_failures_and_skips() -> None:
    r = matrix.guest_result(K61, "6.1.0-41-amd64", 300.4, "0\n",
                            JUNIT.format(e=0, f=0, s=2, t=20), False)
    assert (r.passed, r.failed, r.skipped, r.exit_code, r.ok) == (18, 0, 2, 0, True)
    assert r.line() == ("kernel 6.1 (6.1.0-41-amd64): ok: 18 passed, 2 skipped, 0 failed "
                        "in 300 s")
    bad = matrix.guest_result(K61, "r", 1, "1", JUNIT.format(e=1, f=2, s=0, t=10), False)
    assert (bad.passed, bad.failed, bad.ok) == (7, 3, False)
    assert "FAILED" in bad.line()


@pytest.mark.parametrize("exit_text, junit, timed_out, problem", [
    (None, None, True, "timed out"),
    (None, None, False, "no exit status"),
    ("x", None, False, "unreadable exit status"),
    ("0", None, False, "no JUnit report"),
    ("5", JUNIT.format(e=0, f=0, s=0, t=0), False, "no test ran"),
    ("1", JUNIT.format(e=0, f=0, s=3, t=3), False, "no test ran"),
])
def test_a_guest_that_reported_nothing_useful_is_a_failure(
        exit_text: str | None, junit: str | None, timed_out: bool, problem: str) -> None:
    r = matrix.guest_result(K61, "r", 5, exit_text, junit, timed_out)
    assert not r.ok and problem in r.problem and problem in r.line()


def test_a_torn_junit_report_is_an_error_not_a_pass() -> None:
    with pytest.raises(matrix.MatrixError, match="does not parse"):
        matrix.junit_counts("<testsuites><testsuite")


def test_the_guest_gets_only_the_modules_that_mark_matrix_tests() -> None:
    modules = {"tests/kernel/test_a.py": "pytestmark = pytest.mark.kernel_matrix\n",
               "tests/kernel/test_b.py": "@pytest.mark.kernel_matrix\ndef test_x(): ...\n",
               "tests/kernel/test_c.py": "def test_y(): ...\n"}
    assert matrix.marked(modules) == ["tests/kernel/test_a.py", "tests/kernel/test_b.py"]


KNOWN = matrix.Kernel("6.1", "bookworm-security", "Debian 12", known_failure="bug 1")


def test_a_known_failure_is_reported_and_excused_only_while_it_fails() -> None:
    failing = matrix.guest_result(KNOWN, "r", 9, "1", JUNIT.format(e=9, f=0, s=0, t=9), False)
    assert failing.ok and "known failure" in failing.line() and "bug 1" in failing.line()
    passing = matrix.guest_result(KNOWN, "r", 9, "0", JUNIT.format(e=0, f=0, s=0, t=9), False)
    assert not passing.ok and "passes now, remove known_failure" in passing.line()
    timed_out = matrix.guest_result(KNOWN, "r", 9, None, None, True)
    assert not timed_out.ok and "timed out" in timed_out.line()
