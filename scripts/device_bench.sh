#!/usr/bin/env bash
# One-shot GPU benchmark for issue 7: kto-jax bench on the Llama-3.2-1B workload (reference
# on the fly and precomputed) and TRL's KTOTrainer anchor, in ONE device call, same GPU.
#
#   bash scripts/device_bench.sh prepare   # here, once: wheels + TRL's script into .whl/ (git-ignored)
#   bash scripts/device_bench.sh run       # on the device machine; JSON lines -> $OUT/bench.jsonl
#
# Device tool call (docs/performance.md, "Measuring on a GPU"):
#   run(command="bash scripts/device_bench.sh run", carry=[".whl"], timeout_s=600)
# STAGES (env) picks and orders what runs; default: the four figures the issue compares.
#   jax_fly jax_pre trl_fly trl_pre   kto-jax on the fly / precomputed, TRL on the fly / precomputed
#   jax_xla jax_remat                 kto-jax on the fly with XLA attention / with remat=dots
#   len_padded len_packed len_shared  issue 13: kto-jax on the fly on real lengths (--lengths hh-rlhf,
#                                     8 x 4) in each --layout: padded / packed / packed_shared. A
#                                     second call, after the four above (each ~1-2 min on an H200):
#   run(command="STAGES='len_padded len_shared len_packed' bash scripts/device_bench.sh run", ...)
set -uo pipefail

WHEELS=(flax==0.12.8 optax==0.2.8 ml-collections==1.1.0 trl==1.16.0 datasets==5.2.0 dill==0.4.1
        multiprocess==0.70.19)
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2

prepare() {
  mkdir -p .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "${WHEELS[@]}" || exit 1
  local trl_script="$REPO/../shared/bench/trl_kto_bench.py"
  if [[ -f "$trl_script" ]]; then cp "$trl_script" .whl/; else echo "no $trl_script: TRL stages will be skipped"; fi
  git check-ignore -q .whl || echo "warning: .whl is not git-ignored; add /.whl/ to .gitignore"
  du -sh .whl
}

stage() {  # stage NAME TIMEOUT COMMAND... : one JSON line appended to $OUT/bench.jsonl
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T)): $*"
  timeout "$limit" "$@" >"$OUT/$name.out" 2>"$OUT/$name.log"
  local rc=$?
  if [[ $rc -eq 0 ]]; then
    tail -n 1 "$OUT/$name.out" | tee -a "$OUT/bench.jsonl"
  else
    echo "{\"stage\": \"$name\", \"failed\": $rc}" | tee -a "$OUT/bench.jsonl"
    tail -n 15 "$OUT/$name.log"
  fi
}

run() {
  OUT=${OUT:-/tmp/device_bench}; mkdir -p "$OUT"
  export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
  if [[ -z ${SKIP_WHEELS:-} ]] && compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
  fi
  { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, jax.devices())"
  } 2>&1 | tee "$OUT/env.txt"
  # BENCH_MODEL / BENCH_ARGS / TRL_ARGS / SKIP_WHEELS: a smoke test elsewhere, e.g. on a CPU.
  local bench=(python3 -m kto_jax.cli bench --model "${BENCH_MODEL:-llama-1b}" --steps 8 --warmup 2)
  local trl=(python3 .whl/trl_kto_bench.py --batch 8 --accum 4 --steps 10 --warmup 3)
  read -r -a extra <<<"${BENCH_ARGS:-}"; bench+=("${extra[@]}")
  read -r -a extra <<<"${TRL_ARGS:---size 1b}"; trl+=("${extra[@]}")
  for s in ${STAGES:-jax_fly trl_fly jax_pre trl_pre}; do
    case $s in
      jax_fly) stage "$s" 240 "${bench[@]}" --reference on_the_fly ;;
      jax_pre) stage "$s" 240 "${bench[@]}" --reference precomputed ;;
      jax_xla) stage "$s" 240 "${bench[@]}" --reference on_the_fly --attention xla ;;
      jax_remat) stage "$s" 240 "${bench[@]}" --reference on_the_fly --remat dots ;;
      len_padded) stage "$s" 240 "${bench[@]}" --reference on_the_fly --lengths hh-rlhf --layout padded ;;
      len_packed) stage "$s" 240 "${bench[@]}" --reference on_the_fly --lengths hh-rlhf --layout packed ;;
      len_shared) stage "$s" 240 "${bench[@]}" --reference on_the_fly --lengths hh-rlhf --layout packed_shared ;;
      trl_fly|trl_pre)
        if [[ -f .whl/trl_kto_bench.py ]]; then
          if [[ $s == trl_pre ]]; then stage "$s" 200 "${trl[@]}" --precompute
          else stage "$s" 200 "${trl[@]}"; fi
        else echo "=== $s skipped: .whl/trl_kto_bench.py not carried"; fi ;;
      *) echo "unknown stage $s" ;;
    esac
  done
  echo "=== done ($(date +%T)); JSON lines in $OUT/bench.jsonl"
}

case ${1:-} in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
