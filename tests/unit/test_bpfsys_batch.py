"""Batch map writes on a kernel without a batch operation for the map's type (5.10 answers
ENOTSUPP for some of kvroute's maps): the rest goes one entry at a time, same result.
A stand-in for libbpf records the calls; no kernel is involved."""

from __future__ import annotations

import ctypes as ct
import errno

import numpy as np
import pytest

from dataplane import bpfsys


class FakeLib:
    """A map as libbpf would see it, with batch ops that refuse after ``batch_ok`` rows."""

    def __init__(self, batch_ok: int, supported: bool) -> None:
        self.batch_ok, self.supported = batch_ok, supported
        self.map: dict[int, int] = {}
        self.single_updates = 0

    def bpf_map_update_batch(self, fd: int, keys: int, values: int,
                             n: object, opts: object) -> int:
        want = ct.cast(n, ct.POINTER(ct.c_uint32)).contents
        if not self.supported:
            # The kernel refuses before touching anything, and libbpf copies back the
            # count it was given: n says "all done" when nothing was.
            return -bpfsys.ENOTSUPP_KERNEL
        take = min(want.value, self.batch_ok)
        for i in range(take):
            self.map[ct.c_uint32.from_address(keys + 4 * i).value] = \
                ct.c_uint32.from_address(values + 4 * i).value
        want.value = take
        return 0

    def bpf_map_update_elem(self, fd: int, key: ct.c_void_p, value: ct.c_void_p,
                            flags: int) -> int:
        self.single_updates += 1
        assert key.value is not None and value.value is not None
        self.map[ct.c_uint32.from_address(key.value).value] = \
            ct.c_uint32.from_address(value.value).value
        return 0

    def bpf_map_delete_batch(self, fd: int, keys: int, n: object, opts: object) -> int:
        return -bpfsys.ENOTSUPP_KERNEL  # n left as given, as libbpf does

    def bpf_map_delete_elem(self, fd: int, key: ct.c_void_p) -> int:
        assert key.value is not None
        return 0 if self.map.pop(ct.c_uint32.from_address(key.value).value, None) is not None \
            else -errno.ENOENT


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeLib:
    lib = FakeLib(batch_ok=0, supported=False)
    monkeypatch.setattr(bpfsys, "_lib", lambda: lib)
    return lib


def test_update_batch_writes_one_at_a_time_where_the_kernel_has_no_batch_op(
        fake: FakeLib) -> None:
    keys = np.array([1, 2, 3], dtype=np.uint32)
    values = np.array([10, 20, 30], dtype=np.uint32)
    bpfsys.update_batch(3, keys, values)
    assert fake.map == {1: 10, 2: 20, 3: 30}
    assert fake.single_updates == 3


def test_a_supported_batch_stays_a_batch(fake: FakeLib) -> None:
    fake.batch_ok, fake.supported = 100, True
    bpfsys.update_batch(3, np.array([1, 2], dtype=np.uint32), np.array([5, 6], dtype=np.uint32))
    assert fake.map == {1: 5, 2: 6} and fake.single_updates == 0


def test_delete_batch_falls_back_and_still_stops_at_an_absent_key(fake: FakeLib) -> None:
    fake.map = {1: 10, 2: 20}
    bpfsys.delete_batch(3, np.array([1, 2], dtype=np.uint32))
    assert fake.map == {}
    fake.map = {1: 10}
    with pytest.raises(OSError) as raised:
        bpfsys.delete_batch(3, np.array([1, 7], dtype=np.uint32))
    assert raised.value.errno == errno.ENOENT
