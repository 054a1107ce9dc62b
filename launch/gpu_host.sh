#!/usr/bin/env bash
# Train kto-jax on one machine with all its local NVIDIA GPUs: one process, one JAX
# device per GPU, the mesh from the config spans them all. Optionally installs this
# checkout into a virtual environment first, with jax's CUDA wheels.
#
# setup.py has no CUDA extra on purpose: the CUDA plugin must match the installed jax
# exactly, so this script installs the package (which pins jax), reads the jax version
# it got and then installs "jax[JAX_CUDA_EXTRA]==<that version>".
#
# Usage: [VAR=value ...] launch/gpu_host.sh [--config.KEY=VALUE ...]
#   Arguments are config overrides passed to `kto-jax train`, e.g.
#   CONFIG=configs/llama3_8b_kto.py WORKDIR=runs/kto-8b launch/gpu_host.sh \
#     --config.model.path=/models/Meta-Llama-3-8B --config.data.train_path=feedback.jsonl
#   Re-running the same command with the same WORKDIR resumes from its last checkpoint.
#
# Variables (environment; default in brackets):
#   CONFIG          [configs/llama3_8b_kto.py] config file, relative to this checkout or absolute.
#   WORKDIR         [runs/<config name>] run directory (checkpoints, metrics.jsonl, tb/, hf/).
#   VENV            [.venv-gpu] virtual environment (relative to this checkout) to create and use;
#                   empty: use PYTHON as it is.
#   PYTHON          [python3] interpreter that creates VENV (or runs everything when VENV is empty).
#   INSTALL         [1] 1: pip install this checkout and jax's CUDA wheels before training.
#   JAX_CUDA_EXTRA  [cuda12] jax extra with the GPU wheels: cuda12 or cuda13 (match your driver).
#   XLA_PYTHON_CLIENT_MEM_FRACTION  [0.95] share of each GPU's memory that JAX preallocates.
#   CUDA_VISIBLE_DEVICES            [all GPUs] restricts the GPUs used (read by CUDA, passed through).
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="${CONFIG:-configs/llama3_8b_kto.py}"
WORKDIR="${WORKDIR:-runs/$(basename "$CONFIG" .py)}"
VENV="${VENV-.venv-gpu}"
PYTHON="${PYTHON:-python3}"
INSTALL="${INSTALL:-1}"
JAX_CUDA_EXTRA="${JAX_CUDA_EXTRA:-cuda12}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"

cd "$REPO_DIR"
if [[ ! -f "$CONFIG" ]]; then
  echo "gpu_host.sh: CONFIG '$CONFIG' is not a file (relative paths start at $REPO_DIR)" >&2
  exit 2
fi

py="$PYTHON"
if [[ -n "$VENV" ]]; then
  if [[ ! -x "$VENV/bin/python" ]]; then
    echo "gpu_host.sh: creating virtual environment $VENV" >&2
    "$PYTHON" -m venv "$VENV"
  fi
  py="$VENV/bin/python"
fi

if [[ "$INSTALL" == 1 ]]; then
  "$py" -m pip install -q --upgrade pip
  "$py" -m pip install -q -e ".[gcs]"
  jax_version="$("$py" -c 'import importlib.metadata as m; print(m.version("jax"))')"
  echo "gpu_host.sh: installing jax[$JAX_CUDA_EXTRA]==$jax_version" >&2
  "$py" -m pip install -q "jax[$JAX_CUDA_EXTRA]==$jax_version"
fi

# Fail early, with a clear message, when JAX cannot see the GPUs (driver, wheels).
"$py" -c '
import sys, jax
devices = jax.devices()
if devices[0].platform != "gpu":
    sys.exit(f"gpu_host.sh: JAX sees no GPU, only {devices}; check the NVIDIA driver and JAX_CUDA_EXTRA")
print(f"gpu_host.sh: {len(devices)} x {devices[0].device_kind}", file=sys.stderr)
'

exec "$py" -m kto_jax.cli train --config="$CONFIG" --workdir="$WORKDIR" "$@"
