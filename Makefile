SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# kubectl and vagrant for the manifest and Vagrantfile tests (deploy/dev-tools.sh); the
# lab's VMs set it to 0: they run the kernel suite only.
DEV_TOOLS ?= 1

UAPI := dataplane/_uapi/MANIFEST

.PHONY: setup demo test test-unit test-kernels lint bench bench-quick bench-report vllm proto clean vagrant-test

setup: $(VENV)/.installed $(UAPI)
	@bash deploy/node-setup.sh
	@[ "$(DEV_TOOLS)" = 0 ] || bash deploy/dev-tools.sh

# The UAPI header set shipped for nodes without kernel headers (dataplane/uapi.py),
# from Debian's linux-libc-dev; made again when the programs' includes may have changed.
$(UAPI): $(VENV)/.installed dataplane/uapigen.py dataplane/uapi.py $(wildcard bpf/*.c bpf/lib/*.h) $(wildcard bpf/uapi-stubs/*/*/*.h bpf/uapi-stubs/*/*/*/*/*.h)
	@dpkg-query -W -f='$${Status}' linux-libc-dev 2>/dev/null | grep -q "install ok installed" || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-libc-dev >/dev/null; }
	@$(PY) -m dataplane.uapigen

# The venv comes from Debian's python3 with the system site packages, so that
# Debian's bcc (python3-bpfcc) imports; everything else comes from PyPI.
$(VENV)/.installed: pyproject.toml
	@[ $$(id -u) -eq 0 ] || { echo "make setup needs root (apt, bpffs, cgroups)"; exit 1; }
	@bash deploy/node-setup.sh
	@[ -x $(PY) ] || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -e '.[dev]'
	@touch $@

# ENGINE=vllm runs the demo on real vLLM CPU engines (after `make vllm`).
ENGINE ?= sim
demo: setup
	$(VENV)/bin/kvroute lab demo --engine $(ENGINE)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

# The kernel_matrix tests inside every kernel of lab/kernels/kernels.toml, booted with
# virtme-ng (no KVM needed); KERNELS=name,name picks some, KERNEL_TIMEOUT=s the time one
# kernel may take (default 600). See README "Supported kernels and nodes".
test-kernels: setup
	$(PY) -m lab.kernels $(if $(KERNELS),--only $(KERNELS)) $(if $(KERNEL_TIMEOUT),--timeout $(KERNEL_TIMEOUT))

lint: setup
	$(VENV)/bin/ruff check dataplane controller lab tests
	$(VENV)/bin/mypy dataplane controller lab
	$(VENV)/bin/lint-imports

# Every benchmark (under 15 minutes on 2 cores), then README's section and the plots
# rendered from the results files. HAProxy is the LLM bench's reference L7 router
# (Debian's package).
bench: setup
	@command -v haproxy >/dev/null || apt-get install -y -qq haproxy >/dev/null
	$(PY) -m lab.bench
	$(PY) -m lab.benchreport

# The smoke run behind README's first benchmark table (under 3 minutes).
bench-quick: setup
	$(PY) -m lab.bench --quick
	$(PY) -m lab.benchreport

# README's benchmark section and plots from the committed results, no benchmark run.
bench-report: setup
	$(PY) -m lab.benchreport

# A real vLLM CPU engine in its own venv (3.4 GB), for the lab and the
# conformance tests that compare the simulator with the real thing.
vllm: setup
	bash lab/vllm_setup.sh $(CURDIR)/.venv-vllm

# Regenerate the gRPC code from proto/ (tests fail when it is stale).
proto: setup
	$(PY) -m dataplane.api.pb.generate

# The multi-node VM lab (vagrant/): the kernel suite on every VM, then the fleet
# scenario across them. Needs vagrant and VirtualBox or libvirt (KVROUTE_BOX=debian12|ubuntu2404).
vagrant-test:
	bash vagrant/test.sh

clean:
	rm -rf $(VENV) build dist *.egg-info
