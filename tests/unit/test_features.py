"""The probe -> build decision (dataplane/features.py), without a kernel."""

from __future__ import annotations

import errno

import pytest

from dataplane import features

ALL = {f.name: True for f in features.FEATURES}


def test_a_kernel_with_everything_builds_with_every_feature_and_no_fallback() -> None:
    plan = features.decide(ALL, "6.18.0")
    assert plan.cflags == ("-DENABLE_SET_RETVAL",)
    assert plan.fallbacks == () and plan.missing == () and plan.notes() == []
    assert plan.set_retval and plan.refuse_errno == errno.ECONNREFUSED
    plan.require()  # nothing missing: no exception


def test_without_set_retval_the_fallback_is_chosen_and_said() -> None:
    plan = features.decide({**ALL, "helper_set_retval": False}, "5.10.0-46-amd64")
    assert plan.cflags == () and plan.missing == ()
    assert not plan.set_retval and plan.refuse_errno == errno.EPERM
    [note] = plan.notes()
    assert "bpf_set_retval" in note and "5.18" in note and "5.10.0-46-amd64" in note
    assert "EPERM" in note
    plan.require()


def test_a_missing_required_feature_stops_with_its_name_and_release() -> None:
    plan = features.decide({**ALL, "map_ringbuf": False, "attach_getpeername4": False},
                           "5.4.0")
    with pytest.raises(features.Unsupported) as caught:
        plan.require()
    message = str(caught.value)
    assert "BPF_MAP_TYPE_RINGBUF" in message and "(Linux 5.8)" in message
    assert "getpeername4" in message and "5.4.0" in message
    assert "Linux 5.8 or newer" in message  # the newest release among the missing
    assert "verifier" not in message


def test_an_unanswered_feature_counts_as_absent() -> None:
    answered = {k: v for k, v in ALL.items() if k != "link_create"}
    plan = features.decide(answered, "x")
    assert [f.name for f in plan.missing] == ["link_create"]


def test_an_answer_for_an_unknown_feature_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown features"):
        features.decide({**ALL, "warp_drive": True}, "x")


def test_newest_missing_release_compares_as_numbers_not_text() -> None:
    plan = features.decide({**ALL, "map_inner_mmap": False, "helper_netns_cookie": False},
                           "5.4")
    with pytest.raises(features.Unsupported, match=r"Linux 5\.10 or newer"):
        plan.require()  # 5.10 > 5.7, though "5.10" < "5.7" as text


def test_the_table_is_well_formed() -> None:
    names = [f.name for f in features.FEATURES]
    assert len(names) == len(set(names))
    for f in features.FEATURES:
        assert all(p.isdigit() for p in f.since.split(".")), f
        assert (f.enable_flag is None) == (f.without == ""), f
        assert f.enable_flag is None or f.enable_flag.startswith("ENABLE_"), f
    rows = features.rows(ALL)
    assert [r["name"] for r in rows] == names and all(r["present"] for r in rows)


def test_only_compat_h_calls_bpf_set_retval() -> None:
    # The fallback works only if every call goes through kvr_set_retval (bpf/lib/compat.h):
    # a direct call would fail to verify on kernels before 5.18.
    from dataplane import loader
    root = loader.bpf_dir()
    offenders = [p.name for p in [*root.glob("*.c"), *root.glob("lib/*.h")]
                 if p.name != "compat.h" and "bpf_set_retval(" in p.read_text()]
    assert offenders == []


def test_a_missing_packet_path_feature_stops_only_the_packet_path() -> None:
    # bpf_redirect_neigh is 5.10's: a kernel without it still runs the socket path.
    plan = features.decide({**ALL, "helper_redirect_neigh": False}, "5.4.0")
    assert plan.missing == () and plan.fallbacks == ()
    plan.require()  # the socket path loads
    with pytest.raises(features.Unsupported) as caught:
        plan.require_packet_path()
    message = str(caught.value)
    assert "bpf_redirect_neigh" in message and "(Linux 5.10)" in message
    assert "--external-interface" in message
    features.decide(ALL, "6.18").require_packet_path()  # nothing missing: no exception
    row = next(r for r in features.rows({}) if r["name"] == "prog_sched_cls")
    assert row["without"] == "no packet path (--external-interface)"
