#!/usr/bin/env bash
# `make vagrant-test`: bring the lab up, run the kernel test suite on every VM, then
# the fleet scenario from the client node across the VMs. Exits non-zero on the first
# failure; `vagrant destroy -f` removes the VMs.
set -euo pipefail
cd "$(dirname "$0")"
command -v vagrant >/dev/null || { echo "vagrant is not installed (apt-get install vagrant)"; exit 1; }
vagrant up
mapfile -t nodes < <(ruby -ryaml -e 'puts YAML.load_file("topology.yaml")["nodes"].keys')
client=$(ruby -ryaml -e 'puts YAML.load_file("topology.yaml")["client"]')
for node in "${nodes[@]}"; do
  echo "== kernel suite on $node ($(vagrant ssh "$node" -c 'uname -r' 2>/dev/null | tr -d '\r'))"
  # The fleet's agent routes on the VM's root cgroup, above the tests' own cgroups:
  # stop it and detach it (kvroute uninstall) so the suite sees only its programs.
  vagrant ssh "$node" -c "sudo systemctl stop kvroute-fleet; sudo /kvroute/.venv/bin/kvroute uninstall"
  vagrant ssh "$node" -c "sudo make -C /kvroute test DEV_TOOLS=0 PYTEST_ARGS='-m bpf -q'"
done
vagrant provision --provision-with fleet
echo "== fleet scenario from $client"
vagrant ssh "$client" -c \
  "sudo /kvroute/.venv/bin/kvroute lab scenario --topology /kvroute/vagrant/topology.yaml"
