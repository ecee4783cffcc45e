#!/usr/bin/env bash
# Tools `make test` uses beyond a node's (deploy/node-setup.sh), idempotently:
#   kubectl   renders the kustomize overlays (tests/unit/test_deploy.py); Debian's
#             kubernetes-client unless some kubectl is already installed (another
#             package's /usr/bin/kubectl would conflict with it);
#   vagrant   `vagrant validate` of the multi-node lab (tests/unit/test_vagrant.py),
#             with the libvirt plugin so its provider blocks are validated too.
# A tool that cannot be installed is reported; its tests skip, saying why.
set -euo pipefail

need=()
command -v kubectl >/dev/null 2>&1 || need+=(kubernetes-client)
command -v vagrant >/dev/null 2>&1 || need+=(vagrant)
# validates the Vagrantfile's libvirt provider blocks too (VirtualBox is not in Debian)
dpkg-query -W -f='${Status}' vagrant-libvirt 2>/dev/null | grep -q "install ok installed" \
  || need+=(vagrant-libvirt)
[ ${#need[@]} -eq 0 ] && exit 0

echo "dev-tools: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq || true
for pkg in "${need[@]}"; do
  apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null \
    || echo "dev-tools: could not install $pkg; the tests needing it will skip" >&2
done
