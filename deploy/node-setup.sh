#!/usr/bin/env bash
# Prepare a node (or a lab machine) for kvroute, idempotently:
# Debian packages, kernel headers for bcc, the bpffs mount.
# Used by `make setup`, the Vagrant provisioning and the DaemonSet's init container.
set -euo pipefail

need_pkgs=()
for p in python3-bpfcc python3-venv iproute2; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$p")
done

kver=$(uname -r)
mods=/lib/modules/$kver
# bcc compiles against the running kernel's headers. Use the node's own when present;
# otherwise any recent Debian header set works, because the programs include only UAPI headers.
if [ ! -e "$mods/build/include" ]; then
  if ! ls -d /usr/src/linux-headers-*-common >/dev/null 2>&1; then
    need_pkgs+=(linux-headers-amd64)
  fi
fi

if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "node-setup: installing ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

if [ ! -e "$mods/build/include" ]; then
  arch_dir=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  common_dir=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$arch_dir" ] || [ -z "$common_dir" ]; then
    echo "node-setup: no kernel headers found under /usr/src" >&2
    exit 1
  fi
  mkdir -p "$mods"
  ln -sfn "$arch_dir" "$mods/build"
  ln -sfn "$common_dir" "$mods/source"
  echo "node-setup: linked $mods/build -> $arch_dir"
fi

if ! mountpoint -q /sys/fs/bpf; then
  mkdir -p /sys/fs/bpf
  mount -t bpf bpf /sys/fs/bpf
  echo "node-setup: mounted bpffs at /sys/fs/bpf"
fi
