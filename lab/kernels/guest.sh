#!/usr/bin/env bash
# Runs inside a virtme-ng guest (lab/kernels/boot.py): the host's root, read-only, under
# another kernel. Runs the kernel_matrix tests and leaves, in OUT (a folder shared
# read-write with the host): guest.log, junit.xml and exit (pytest's exit status).
#   guest.sh OUT REPO [pytest args...]
set -uo pipefail
out=$1 repo=$2
shift 2
exec >"$out/guest.log" 2>&1
finish() { echo "$1" >"$out/exit"; sync; exit 0; }
t0=$(date +%s)
step() { echo "guest: +$(($(date +%s) - t0)) s: $*"; }
step "$(uname -r), $(nproc) CPUs"

mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf || finish 90
mountpoint -q /sys/fs/cgroup || mount -t cgroup2 none /sys/fs/cgroup || finish 91

# The node has no kernel headers: nothing under /lib/modules/$(uname -r) but the image's
# modules, and /usr/src (the host's headers for its own kernel) hidden, so bcc can only
# compile against the UAPI set kvroute ships (dataplane/uapi.py).
mount -t tmpfs none /usr/src || finish 92
if [ -e "/lib/modules/$(uname -r)/build" ]; then
  echo "guest: /lib/modules/$(uname -r)/build exists; the run must not see node headers"
  finish 93
fi

# virtme-ng mounts the host's root over 9p without a cache: every process start reads
# Python, LLVM and the venv again, file by file, through the emulated machine. boot.py
# adds a second share of it (tag kvrhost) to mount with the guest's page cache (the host's
# files do not change during a run); the read-mostly trees are bound from it. /usr/lib/modules (the image's modules) and
# the shared results folder stay as they are: the folder is reached through its own bind.
mkdir -p /tmp/kvr-host /tmp/kvr-out
mount --bind "$out" /tmp/kvr-out || finish 95
out=/tmp/kvr-out
if mount -t 9p -o ro,trans=virtio,version=9p2000.L,access=any,msize=524288,cache=loose \
    kvrhost /tmp/kvr-host; then
  for tree in /usr/bin /usr/lib/python3 /usr/lib/python3.11 /usr/lib/x86_64-linux-gnu \
              /usr/lib/llvm-14 "$repo"; do
    mount --bind "/tmp/kvr-host$tree" "$tree" || step "could not cache $tree (slower)"
  done
else
  step "could not mount the host's root with a cache (slower, still correct)"
fi
step "host trees cached"
for mod in veth bridge; do modprobe "$mod" 2>/dev/null || true; done

cd "$repo" || finish 94
step "running pytest"
# Plugins are named, not discovered: hypothesis alone costs seconds to import here.
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
# --basetemp: the repo is read-only here; the JUnit report goes to the shared folder.
timeout --kill-after=10 "${KVR_GUEST_TIMEOUT:-900}" \
  .venv/bin/python -m pytest -p no:cacheprovider -p pytest_timeout -p lab.kernels.slow_guest --basetemp=/tmp/kvr-pytest \
  --junitxml="$out/junit.xml" -o junit_family=xunit2 -m kernel_matrix "$@"
finish $?
