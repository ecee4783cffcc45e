"""Boot a fetched kernel with virtme-ng and run the kernel_matrix tests inside it.

virtme-ng shares the host's root read-only with the guest (overlays keep /etc, /tmp, ...
writable in guest memory), so the guest runs this very checkout and venv; only a results
folder is shared read-write. Without KVM (this CI's machines have none) QEMU emulates the
CPU: slow but faithful, since the kernel under test is the real one.

virtme-ng's own exit status does not carry the guest command's on every kernel, so the
guest writes its exit status and JUnit report into the results folder and the host reads
them (matrix.guest_result).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from lab.kernels import fetch, matrix

VIRTME_NG = "virtme-ng==1.42"
# Host tools: QEMU, depmod (virtme-ng prepares the image's modules), busybox (its
# initramfs). Installed on first use, like deploy/node-setup.sh does for a node.
DEBIAN_TOOLS = {"qemu-system-x86_64": "qemu-system-x86", "depmod": "kmod",
                "busybox": "busybox-static"}
GUEST_SCRIPT = Path(__file__).with_name("guest.sh")
# A second, read-only share of the host's root for guest.sh to mount with the guest's page
# cache: virtme-ng mounts its own without one, and a 9p share serves one mount at a time.
CACHED_SHARE = ("-fsdev local,id=kvrhost,path=/,security_model=none,readonly=on,"
                "multidevs=remap -device virtio-9p-pci,fsdev=kvrhost,mount_tag=kvrhost")


def ensure_tools(cache: Path) -> Path:
    """Install what booting needs, once; returns virtme-ng's bin folder."""
    missing = sorted({pkg for tool, pkg in DEBIAN_TOOLS.items()
                      if shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is None})
    if missing:
        print(f"kernel matrix: installing {' '.join(missing)}", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                        *missing], check=True, env=env, stdout=subprocess.DEVNULL)
    venv = cache / "vng"
    if not (venv / "bin" / "vng").exists():
        print(f"kernel matrix: installing {VIRTME_NG} into {venv}", flush=True)
        subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", VIRTME_NG], check=True)
    return venv / "bin"


def run(image: fetch.Image, cache: Path, repo: Path, pytest_args: list[str],
        timeout: float, cpus: int, memory: str) -> matrix.Result:
    """Boot ``image``, run the tests in it, and say what came of it."""
    bin_dir = ensure_tools(cache)
    results = (cache / "results" / image.kernel.name).resolve()
    shutil.rmtree(results, ignore_errors=True)
    results.mkdir(parents=True)
    guest_cmd = " ".join([str(GUEST_SCRIPT), str(results), str(repo), *pytest_args])
    cmd = [str(bin_dir / "vng"), "--run", str(image.vmlinuz), "--disable-kvm",
           "--cpus", str(cpus), "--memory", memory, f"--rwdir={results}",
           f"--qemu-opts={CACHED_SHARE}",
           "--exec", guest_cmd]
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
           # pytest's own time limit inside, a little under the host's
           "KVR_GUEST_TIMEOUT": str(int(max(60, timeout - 120)))}
    started = time.monotonic()
    timed_out = False
    with open(results / "vng.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, 9)  # QEMU and virtme-ng: the session this started
            proc.wait()
    seconds = time.monotonic() - started

    def text(name: str) -> str | None:
        path = results / name
        return path.read_text(errors="replace") if path.exists() else None

    return matrix.guest_result(image.kernel, image.release, seconds, text("exit"),
                               text("junit.xml"), timed_out)


def tail(cache: Path, kernel: matrix.Kernel, lines: int = 60) -> str:
    """The end of a guest's log, for a failed run's report."""
    for name in ("guest.log", "vng.log"):
        path = cache / "results" / kernel.name / name
        if path.exists():
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(the guest left no log)"

