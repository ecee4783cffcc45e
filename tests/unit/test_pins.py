"""What `kvroute uninstall` may remove: only kvroute's pins, judged by name and by object, and
never anything in a folder that is not a pin dir (every --pin-dir gets that one check)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from dataplane import cli, host, loader, maps, pins

MAPS = maps.PINNED_MAPS
PROGRAMS = [p.name for p in loader.PROGRAMS]


def kvroute_map(name: str) -> pins.Entry:
    return pins.Entry(name, "map", object_name=name)


def kvroute_link(name: str) -> pins.Entry:
    return pins.Entry(name, "link", cgroup_link=True)


def test_kvroute_pins_go_and_everything_else_stays_with_a_reason() -> None:
    top = [kvroute_map("kvr_meta"), kvroute_map("kvr_sk"), pins.Entry("links", "dir"),
           pins.Entry("theirs", "dir"), pins.Entry("tc_map", "map", object_name="tc_map"),
           pins.Entry("kvr_health", "map", object_name="other_health"),
           pins.Entry("kvr_affinity", "prog"), pins.Entry("kvr_be_v1", "symlink"),
           pins.Entry("kvr_member", "", problem="cannot open it as a BPF object: EPERM")]
    links = [kvroute_link("sock4_connect"), pins.Entry("sock_ops", "link"),
             pins.Entry("xdp_thing", "link", cgroup_link=True), kvroute_map("kvr_reasons")]
    plan = pins.plan(top, links, MAPS, PROGRAMS)
    assert plan.links == ("sock4_connect",)
    assert plan.maps == ("kvr_meta", "kvr_sk")
    assert plan.kept == (
        "links/sock_ops: a link that is not a cgroup attachment",
        "links/xdp_thing: not one of kvroute's pins",
        "links/kvr_reasons: not one of kvroute's pins",
        "theirs: a folder kvroute did not make",
        "tc_map: not one of kvroute's pins",
        "kvr_health: a map named 'other_health', not kvroute's kvr_health",
        "kvr_affinity: named like kvroute's map but is a program",
        "kvr_be_v1: a symbolic link; kvroute pins none",
        "kvr_member: cannot open it as a BPF object: EPERM",
    )


def test_a_link_pinned_beside_the_maps_is_not_kvroutes() -> None:
    plan = pins.plan([pins.Entry("sock4_connect", "link", cgroup_link=True)], [], MAPS, PROGRAMS)
    assert not plan.owns_anything
    assert plan.kept == ("sock4_connect: not one of kvroute's pins",)


def test_every_name_the_programs_pin_is_known() -> None:
    source = (loader.bpf_dir() / "lib" / "maps.h").read_text()
    pinned = {line.split('KVR_PIN("')[1].split('"')[0]
              for line in source.splitlines() if 'KVR_PIN("' in line}
    # The socket programs' maps, and the packet path's (pinned when it is loaded).
    assert pinned == set(MAPS) | set(maps.NODEPORT_MAPS)


@pytest.fixture
def ordinary(tmp_path: Path) -> Path:
    """An ordinary folder that someone typed as --pin-dir: a file and a subfolder in it."""
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "kvr_meta").write_text("also mine")
    return tmp_path


def _contents(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() if p.is_file() else "<dir>"
            for p in sorted(folder.rglob("*"))}


def test_uninstall_refuses_an_ordinary_folder_and_changes_nothing(ordinary: Path) -> None:
    before = _contents(ordinary)
    with pytest.raises(host.HostError, match="is not on a bpffs mount"):
        loader.uninstall(ordinary)
    assert _contents(ordinary) == before


def test_every_pin_dir_command_refuses_a_file_or_a_folder_off_bpffs(ordinary: Path) -> None:
    before = _contents(ordinary)
    commands = [["uninstall"], ["maps", "services"], ["maps", "maglev", "x"],
                ["explain", "10.96.0.1:80", "--session", "s"],
                ["agent", "--config", str(ordinary / "notes.txt")]]
    for pin_dir, message in ((ordinary, "is not on a bpffs mount"),
                             (ordinary / "notes.txt", "is a file")):
        for command in commands:
            result = CliRunner().invoke(cli.main, [*command, "--pin-dir", str(pin_dir)])
            assert result.exit_code == 1, (command, result.output)
            assert result.stderr.startswith(f"Error: --pin-dir {pin_dir} {message}"), \
                (command, result.stderr)
            assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
            assert type(result.exception) is SystemExit
    assert _contents(ordinary) == before
