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

# Reading LLVM over 9p costs ~10x a local read on every compile: copy the libraries bcc
# maps into the guest's memory once, and bind them over the shared files.
mkdir -p /tmp/kvr-libs
for lib in $(ldd /usr/lib/x86_64-linux-gnu/libbcc.so.0 | awk '/LLVM|clang/ {print $3}') \
           /usr/lib/x86_64-linux-gnu/libbcc.so.0; do
  cp "$lib" /tmp/kvr-libs/ && mount --bind "/tmp/kvr-libs/$(basename "$lib")" "$lib" \
    || echo "guest: could not copy $lib (slower, still correct)"
done

step "libraries copied"
for mod in veth bridge; do modprobe "$mod" 2>/dev/null || true; done

cd "$repo" || finish 94
step "running pytest"
# Plugins are named, not discovered: hypothesis alone costs seconds to import here.
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
# --basetemp: the repo is read-only here; the JUnit report goes to the shared folder.
timeout --kill-after=10 "${KVR_GUEST_TIMEOUT:-900}" \
  .venv/bin/python -m pytest -p no:cacheprovider -p pytest_timeout --basetemp=/tmp/kvr-pytest \
  --junitxml="$out/junit.xml" -o junit_family=xunit2 -m kernel_matrix "$@"
finish $?
