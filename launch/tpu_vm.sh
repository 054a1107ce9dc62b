#!/usr/bin/env bash
# Train kto-jax on a Cloud TPU VM slice: create the slice (directly, or as a queued
# resource), install this checkout with the `tpu` and `gcs` extras on every worker, run
# `kto-jax train` on --worker=all with the logs streamed here, and delete the slice
# on exit (also on Ctrl-C or an error). A preempted slice is recreated and the run
# resumes from WORKDIR, up to MAX_RESTARTS times.
#
# Usage: [VAR=value ...] launch/tpu_vm.sh [--config.KEY=VALUE ...]
#   Arguments are config overrides passed to `kto-jax train`, e.g.
#   CONFIG=configs/llama3_8b_kto.py WORKDIR=gs://my-bucket/runs/kto-8b \
#     ACCELERATOR_TYPE=v5p-32 ZONE=us-east5-a launch/tpu_vm.sh --config.optim.lr=5e-6
#
# Variables (environment; default in brackets):
#   WORKDIR           [required] run directory. gs://bucket/path for multi-host slices and
#                     for resuming on a new slice; a local path only suits a single host.
#   CONFIG            [configs/llama3_8b_kto.py] config file, relative to this checkout.
#                     Its model.path and data paths must be readable on every worker (gs:// or hub id).
#   ACCELERATOR_TYPE  [v5p-32] Cloud TPU type: v4-8, v5p-32, v5litepod-16, v6e-8, ...
#   ZONE              [us-east5-a] zone that has that accelerator type.
#   PROJECT           [gcloud's configured project] Google Cloud project.
#   TPU_NAME          [kto-jax-$USER] name of the TPU VM; the queued resource is "$TPU_NAME-qr".
#   RUNTIME_VERSION   [from the generation: tpu-ubuntu2204-base (v4), v2-alpha-tpuv5 (v5p),
#                     v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv6e (v6e)] TPU software version.
#   QUEUED            [0] 1: request the slice as a queued resource and wait until it is ACTIVE.
#   SPOT              [0] 1: spot (preemptible) capacity.
#   MAX_RESTARTS      [0] how often to recreate the slice and resume after a preemption or failure.
#   KEEP              [0] 1: leave the slice running on exit (delete it yourself).
#   LOG_FILE          [tpu_vm_$TPU_NAME.log] local copy of the streamed logs (appended).
#   POLL_SECONDS      [30] seconds between state checks while a queued resource waits.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${WORKDIR:?set WORKDIR (gs://bucket/path, or a path on the workers for a single host)}"
CONFIG="${CONFIG:-configs/llama3_8b_kto.py}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5p-32}"
ZONE="${ZONE:-us-east5-a}"
PROJECT="${PROJECT:-}"
TPU_NAME="${TPU_NAME:-kto-jax-${USER:-user}}"
QUEUED="${QUEUED:-0}"
SPOT="${SPOT:-0}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
KEEP="${KEEP:-0}"
LOG_FILE="${LOG_FILE:-tpu_vm_${TPU_NAME}.log}"
POLL_SECONDS="${POLL_SECONDS:-30}"
QR_NAME="${TPU_NAME}-qr"

case "$ACCELERATOR_TYPE" in
  v4-*) default_runtime="tpu-ubuntu2204-base" ;;
  v5p-*) default_runtime="v2-alpha-tpuv5" ;;
  v5litepod-* | v5e-*) default_runtime="v2-alpha-tpuv5-lite" ;;
  v6e-*) default_runtime="v2-alpha-tpuv6e" ;;
  *) echo "tpu_vm.sh: unknown ACCELERATOR_TYPE '$ACCELERATOR_TYPE' (v4-8, v5p-32, v5litepod-16, v6e-8, ...)" >&2; exit 2 ;;
esac
RUNTIME_VERSION="${RUNTIME_VERSION:-$default_runtime}"

if [[ ! -f "$REPO_DIR/$CONFIG" ]]; then
  echo "tpu_vm.sh: CONFIG '$CONFIG' is not a file under $REPO_DIR" >&2
  exit 2
fi

gcloud_args=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then gcloud_args+=(--project="$PROJECT"); fi
spot_args=()
if [[ "$SPOT" == 1 ]]; then spot_args+=(--spot); fi
created=0

log() { echo "[tpu_vm.sh $(date +%H:%M:%S)] $*" | tee -a "$LOG_FILE" >&2; }

create_slice() {
  log "creating $ACCELERATOR_TYPE slice $TPU_NAME in $ZONE (runtime $RUNTIME_VERSION)"
  created=1
  if [[ "$QUEUED" == 1 ]]; then
    gcloud compute tpus queued-resources create "$QR_NAME" --node-id="$TPU_NAME" \
      --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" \
      "${spot_args[@]}" "${gcloud_args[@]}" || return 1
    local state=""
    while [[ "$state" != ACTIVE ]]; do
      state="$(gcloud compute tpus queued-resources describe "$QR_NAME" \
        --format='value(state.state)' "${gcloud_args[@]}")" || return 1
      case "$state" in
        FAILED | SUSPENDED) log "queued resource $QR_NAME is $state"; return 1 ;;
        ACTIVE) ;;
        *) log "queued resource $QR_NAME is ${state:-pending}; waiting"; sleep "$POLL_SECONDS" ;;
      esac
    done
  else
    gcloud compute tpus tpu-vm create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" \
      --version="$RUNTIME_VERSION" "${spot_args[@]}" "${gcloud_args[@]}" || return 1
  fi
}

delete_slice() {
  if [[ "$created" != 1 ]]; then return 0; fi
  log "deleting $TPU_NAME"
  if [[ "$QUEUED" == 1 ]]; then
    gcloud compute tpus queued-resources delete "$QR_NAME" --force --quiet "${gcloud_args[@]}" || true
  else
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --quiet "${gcloud_args[@]}" || true
  fi
  created=0
}

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${gcloud_args[@]}" --command="$1"
}

install_package() {
  local tarball
  tarball="$(mktemp -t kto-jax-src.XXXXXX.tar.gz)"
  tar -C "$REPO_DIR" --exclude=.git --exclude='*.egg-info' --exclude='__pycache__' \
    --exclude='.venv*' -czf "$tarball" . || return 1
  log "copying this checkout to every worker and installing it with the tpu and gcs extras"
  gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME":kto-jax-src.tar.gz --worker=all \
    "${gcloud_args[@]}" || return 1
  rm -f "$tarball"
  on_all_workers "rm -rf ~/kto-jax && mkdir -p ~/kto-jax && tar -xzf ~/kto-jax-src.tar.gz -C ~/kto-jax \
    && cd ~/kto-jax && python3 -m pip install -q '.[tpu,gcs]'" || return 1
}

run_training() {
  local train_cmd
  train_cmd="$(printf '%q ' python3 -m kto_jax.cli train --config="$CONFIG" --workdir="$WORKDIR" "$@")"
  log "training: $train_cmd"
  # Every worker runs the same command; jax.distributed.initialize() finds the slice's
  # workers itself. All workers' output is streamed here, interleaved.
  on_all_workers "cd ~/kto-jax && $train_cmd" 2>&1 | tee -a "$LOG_FILE"
}

slice_state() {
  gcloud compute tpus tpu-vm describe "$TPU_NAME" --format='value(state)' "${gcloud_args[@]}" 2>/dev/null || echo GONE
}

cleanup() {
  local status=$?
  if [[ "$KEEP" == 1 ]]; then
    log "KEEP=1: leaving $TPU_NAME running"
  else
    delete_slice
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

attempt=0
while true; do
  if create_slice && install_package && run_training "$@"; then
    # A preempted worker saves a checkpoint on SIGTERM and exits 0, so success alone
    # does not mean the run finished: a slice that is no longer READY was preempted.
    state="$(slice_state)"
    if [[ "$state" == READY ]]; then
      log "training finished; outputs in $WORKDIR"
      exit 0
    fi
    log "slice is $state after training exited: treating it as a preemption"
  else
    log "attempt $attempt failed (slice state: $(slice_state))"
  fi
  attempt=$((attempt + 1))
  if ((attempt > MAX_RESTARTS)); then
    log "giving up after $attempt attempt(s); re-run this script to resume from $WORKDIR"
    exit 1
  fi
  delete_slice
  log "restart $attempt of $MAX_RESTARTS: recreating the slice and resuming from $WORKDIR"
done
