"""Lab owner records: what a killed run's lab is recognised by, with no root and no lab."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from lab import owner

# /proc/PID/stat of a process whose name holds a space and a ')'.
STAT = "4242 (we) ird) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1 2 3"


def test_start_time_is_field_22_counted_after_the_last_parenthesis() -> None:
    assert owner.start_time_of(STAT) == 987654
    assert owner.start_time_of(STAT.replace(") S ", ") Z ")) is None  # a zombie has ended


def test_this_process_is_running_and_a_reused_pid_is_not_taken_for_it() -> None:
    value = owner.process_value(os.getpid())
    assert value is not None and owner.is_running(value) == os.getpid()
    pid, _, start = value.partition(":")
    assert owner.is_running(f"{pid}:{int(start) + 1}") is None


def test_records_round_trip_and_name_what_was_made_in_order() -> None:
    record = owner.Record(names="kvrab123", subnet="10.77.100.0/24", owner_pid=1,
                          owner_start=2)
    record.add("link", "kvrab123br")
    record.add("link", "kvrab123v0")
    record.add("process", "7:8")
    again = owner.Record.from_json(record.to_json())
    assert again == record and again.items("link") == ["kvrab123br", "kvrab123v0"]
    assert again.items("netns") == []


def test_a_picked_subnet_overlaps_nothing_in_use() -> None:
    used = [ipaddress.IPv4Network("10.77.0.0/17"), ipaddress.IPv4Network("10.77.128.0/18")]
    for _ in range(50):
        picked = owner.pick_subnet(used)
        assert picked is not None and not any(picked.overlaps(u) for u in used)
    assert owner.pick_subnet([ipaddress.IPv4Network("10.77.0.0/16")]) is None


def test_store_refuses_a_second_lab_of_a_name_and_only_one_sweeper_claims(tmp_path: Path) -> None:
    store = owner.Store(tmp_path)
    record = owner.Record(names="kvrab123", subnet="10.77.100.0/24", owner_pid=1,
                          owner_start=2)
    with store.allocation():
        store.create(record)
    with pytest.raises(owner.RecordError, match="exists already"):
        store.create(record)
    record.add("netns", "kvrab123-gpu0")
    store.save(record)
    assert store.load_all() == [record]
    with store.claim(record) as mine:
        assert mine
        with store.claim(record) as other:
            assert not other
        store.remove(record)
    with store.claim(record) as late:
        assert not late
    assert store.load_all() == []
