#!/usr/bin/env bash
# Vagrant provisioning: the same idempotent setup as `make setup` on a lab
# machine, with the VM's own kernel headers.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq make git "linux-headers-$(uname -r)" >/dev/null
make -C /kvroute setup
