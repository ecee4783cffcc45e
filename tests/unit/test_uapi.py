"""Which headers a load compiles against, and which UAPI headers the shipped set holds
(dataplane/uapi.py), without dpkg or a kernel."""

from __future__ import annotations

from pathlib import Path

import pytest

from dataplane import loader, uapi

NODE = Path("/lib/modules/6.1.0-41-amd64/source")
SHIPPED = Path("/pkg/dataplane/_uapi")


def test_auto_prefers_the_nodes_headers_and_falls_back_to_the_shipped_set() -> None:
    assert uapi.choose("auto", NODE, SHIPPED, "x86_64") == uapi.Headers("node", NODE)
    assert uapi.choose("auto", None, SHIPPED, "x86_64") == uapi.Headers("shipped", SHIPPED)


def test_explicit_modes_take_only_what_they_name() -> None:
    assert uapi.choose("shipped", NODE, SHIPPED, "x86_64").kind == "shipped"
    assert uapi.choose("node", NODE, SHIPPED, "x86_64").kind == "node"
    with pytest.raises(uapi.HeadersMissing, match="node's kernel headers") as caught:
        uapi.choose("node", None, SHIPPED, "x86_64")
    assert "shipped" not in str(caught.value)
    with pytest.raises(uapi.HeadersMissing, match="uapigen"):
        uapi.choose("shipped", NODE, None, "x86_64")


def test_nothing_to_compile_with_names_both_ways_out() -> None:
    with pytest.raises(uapi.HeadersMissing) as caught:
        uapi.choose("auto", None, None, "x86_64")
    assert "linux-headers" in str(caught.value) and "uapigen" in str(caught.value)


def test_the_shipped_set_serves_only_its_architecture() -> None:
    with pytest.raises(uapi.HeadersMissing, match="not aarch64"):
        uapi.choose("auto", None, SHIPPED, "aarch64")
    assert uapi.choose("auto", NODE, SHIPPED, "aarch64").kind == "node"


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="auto, node, shipped"):
        uapi.choose("kernel", NODE, SHIPPED, "x86_64")


def test_only_the_shipped_set_is_named_to_bcc() -> None:
    assert uapi.Headers("shipped", SHIPPED).environ() == {"BCC_KERNEL_SOURCE": str(SHIPPED)}
    assert uapi.Headers("node", NODE).environ() == {}


def test_include_names_of_linux_libc_dev_files() -> None:
    assert uapi.include_name("/usr/include/linux/in.h") == "linux/in.h"
    assert uapi.include_name("/usr/include/linux/byteorder/little_endian.h") == \
        "linux/byteorder/little_endian.h"
    assert uapi.include_name("/usr/include/asm-generic/errno.h") == "asm-generic/errno.h"
    assert uapi.include_name("/usr/include/x86_64-linux-gnu/asm/types.h") == "asm/types.h"
    for other in ("/usr/include/linux", "/usr/share/doc/linux-libc-dev/copyright",
                  "/usr/include/aarch64-linux-gnu/asm/types.h", "/usr/include/sound/asound.h",
                  "/usr/include/linux/README"):
        assert uapi.include_name(other) is None, other


def test_destinations_follow_bccs_kernel_directory_layout() -> None:
    assert uapi.destination("linux/in.h") == "include/uapi/linux/in.h"
    assert uapi.destination("uapi/linux/in.h") == "include/uapi/linux/in.h"
    assert uapi.destination("asm/types.h") == "arch/x86/include/uapi/asm/types.h"
    assert uapi.destination("asm-generic/int-ll64.h") == "include/uapi/asm-generic/int-ll64.h"
    assert uapi.destination("bcc/bpf.h") is None


def test_closure_follows_includes_through_stubs_and_reports_what_is_missing() -> None:
    package = {
        "linux/in.h": "#include <linux/types.h>\n#include <linux/libc-compat.h>\n",
        "linux/types.h": "#include <asm/types.h>\n",
        "asm/types.h": "#include <asm-generic/int-ll64.h>\n",
        "asm-generic/int-ll64.h": "/* leaf */\n",
        "linux/libc-compat.h": "",
        "linux/unused.h": "",
    }
    stubs = {"linux/types.h": "#include <uapi/linux/types.h>\n",
             "uapi/linux/bpf.h": "#include <bcc/bpf.h>\n"}
    found, missing = uapi.closure(["uapi/linux/in.h", "uapi/linux/bpf.h", "linux/gone.h"],
                                  stubs, package.get)
    assert set(found) == {"linux/in.h", "linux/types.h", "asm/types.h",
                          "asm-generic/int-ll64.h", "linux/libc-compat.h"}
    assert missing == ["linux/gone.h"]


def test_includes_are_read_from_c_text() -> None:
    text = '#include <uapi/linux/bpf.h>\n#  include <linux/in.h>\n#include "lib/abi.h"\n'
    assert uapi.includes(text) == ["uapi/linux/bpf.h", "linux/in.h"]


def test_stubs_answer_to_the_names_bcc_includes() -> None:
    stubs = uapi.stub_names(loader.bpf_dir() / "uapi-stubs")
    assert set(stubs) == {"linux/kconfig.h", "linux/types.h", "linux/log2.h", "asm/page.h",
                          "uapi/linux/bpf.h"}
    assert "CONFIG_BPF_SYSCALL" in stubs["linux/kconfig.h"]
    # Every stub is kvroute's own: no kernel text pasted in.
    assert all("SPDX-License-Identifier: Apache-2.0" in t for t in stubs.values())


def test_the_programs_include_only_uapi_headers() -> None:
    # What the shipped set can serve: <uapi/...> names, or linux/asm ones it carries.
    names = uapi.program_includes(loader.bpf_dir())
    assert names and all(n.startswith(("uapi/linux/", "linux/", "asm/")) for n in names)
