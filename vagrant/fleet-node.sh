#!/usr/bin/env bash
# Run this VM's part of the fleet (topology.yaml) as a systemd unit, restarted on each
# `vagrant up`/`vagrant provision`: `kvroute lab node` starts the controller, engines
# and agent the topology puts here (lab/multinode.py).
set -euo pipefail
node=$1
systemctl stop kvroute-fleet.service 2>/dev/null || true
systemctl reset-failed kvroute-fleet.service 2>/dev/null || true
systemd-run --unit kvroute-fleet --working-directory /kvroute \
  /kvroute/.venv/bin/kvroute lab node --topology /kvroute/vagrant/topology.yaml --node "$node"
echo "fleet: $node runs its part (journalctl -u kvroute-fleet; logs in /run/kvroute-lab-node)"
