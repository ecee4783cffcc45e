#!/usr/bin/env bash
# Vagrant provisioning: the VM's own kernel headers, then the same idempotent set-up
# as `make setup` on a lab machine (deploy/node-setup.sh and the venv).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq make git "linux-headers-$(uname -r)" >/dev/null
make -C /kvroute setup DEV_TOOLS=0
