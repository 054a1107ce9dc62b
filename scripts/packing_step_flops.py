"""XLA cost-analysis FLOPs of ONE train step (policy forward + backward, KL forward, reference),
padded vs packed (data.packing), on the same examples: the figures of docs/performance.md.

Usage: PYTHONPATH=. python scripts/packing_step_flops.py [--model llama-1b] [--lengths fixed|lognormal|hh-rlhf]

The program is the trainer's own jitted train step (kto_jax/perf/program.py) compiled
for this host's CPU on abstract inputs (nothing allocated), with the bench's model,
dtypes and batch (kto_jax/perf/bench.py: 8 examples per microbatch; one microbatch is
compiled: x accumulation steps for a step). XLA's cost analysis counts a loop body
once, so every `lax.scan` (the layers, the LM head's vocabulary chunks) is unrolled
here to count what runs. Examples:
  fixed      the bench workload: every prompt 512 tokens, every completion 511;
             padded to P = C = 512 (T = 1024), packed in rows of --pack-length tokens.
  lognormal  skewed lengths (median prompt 256, completion 128, capped at 1024 / 512),
             padded to the longest prompt / completion rounded up to 128, as the bucketed
             pipeline does; packed rows hold the real [x | y | y_kl] trees.
  hh-rlhf    lengths drawn from the shipped hh-rlhf histogram (kto_jax/perf/data/, as
             `kto-jax bench --lengths hh-rlhf`: caps 512 / 511), padded as lognormal;
             with --pack-length 0 the rows' T is chosen as the trainer chooses it
             (multiples of 128, `shapes.best_row_length`).
The attention backend is XLA's masked dense attention (CPU), so packed attention is
counted over whole rows.

With --topology (e.g. v5p-8; libtpu, `kto_jax/perf/aot.py`) the same two steps are
compiled ahead of time for that TPU slice instead (mesh fsdp over every chip, the
attention the trainer picks there: splash), and the per-chip memory of each is printed
(`kto-jax compile`'s figures), the rows packed per batch shard as the pipeline packs them.
"""

import argparse
import functools
import json

import jax
import numpy as np

from kto_jax.perf import aot, bench
from kto_jax.batch import batch_shapes
from kto_jax.data import packing, shapes
from kto_jax.perf import workload
from kto_jax.sharding import single_device_mesh
from kto_jax.perf import program
from kto_jax.step.state import batch_sharding


def lengths(kind: str, m: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(prompt lengths, completion lengths) of m examples."""
    if kind == "fixed":
        return np.full(m, 512), np.full(m, 511)
    if kind == "hh-rlhf":
        prompt, completion = workload.load_lengths("hh-rlhf").sample(m, rng)
        return np.minimum(prompt, 512), np.minimum(completion, 511)
    prompt = np.clip(rng.lognormal(np.log(256), 0.8, m).astype(int), 8, 1024)
    completion = np.clip(rng.lognormal(np.log(128), 0.8, m).astype(int), 4, 512)
    return prompt, completion


def _program(config, model_config, mesh, shapes):
    fn, (state, _) = program.train_step_program(config, model_config, mesh, 8, 8)
    sharding = batch_sharding(mesh, config.mesh.rules)
    batch = {k: jax.ShapeDtypeStruct(s, d, sharding=sharding) for k, (s, d) in shapes.items()}
    return fn, (state, batch)


def step_flops(config, model_config, mesh, shapes) -> float:
    fn, args = _program(config, model_config, mesh, shapes)
    return float(fn.lower(*args).compile().cost_analysis()["flops"])


def step_memory(config, model_config, topology: str, shapes) -> dict:
    """Per-chip GiB of the step AOT-compiled for a TPU slice (`kto-jax compile`'s report)."""
    tpu = aot.parse_topology(topology)
    mesh = aot.topology_mesh(aot.topology_devices(tpu), {"data": 1, "fsdp": -1})
    report = aot.compile_on_mesh(tpu, mesh, lambda m: _program(config, model_config, m, shapes))
    return {"total_gib": round(report.total_bytes / 2**30, 2),
            "temporaries_gib": round(report.temp_bytes / 2**30, 2),
            "peak_gib": round(report.peak_bytes / 2**30, 2), "verdict": report.verdict}


def main() -> None:
    scan = jax.lax.scan
    jax.lax.scan = functools.partial(jax.lax.scan, unroll=True)  # count every iteration
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--lengths", default="fixed", choices=("fixed", "lognormal", "hh-rlhf"))
    ap.add_argument("--pack-length", type=int, default=0, help="0: chosen from the trees")
    ap.add_argument("--layout", default="streams", choices=("streams", "trees"),
                    help="streams: main rows [x | y] + kl rows (the trainer's, losses with z0); "
                         "trees: [x | y | y_kl] rows (before the kl stream)")
    ap.add_argument("--kl-share", type=float, default=0.0, help="0: chosen from the lengths")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--topology", default="", help="a TPU slice (v5p-8): per-chip memory, not FLOPs")
    ap.add_argument("--accum", type=int, default=1, help="microbatches per step (--topology)")
    a = ap.parse_args()
    opts = bench.BenchOptions(model=a.model, micro_batch=a.micro_batch, accum=a.accum,
                              attention="auto" if a.topology else "xla")
    config, model_config = bench.run_config(opts), bench.model_config(opts)
    config.mesh.data = 1
    if a.topology:
        jax.lax.scan = scan     # memory: the program as the trainer runs it
        config.mesh.fsdp = aot.parse_topology(a.topology).num_chips * aot.parse_topology(
            a.topology).num_slices
    groups = config.mesh.fsdp if a.topology else 1
    mesh = single_device_mesh()
    m = a.micro_batch
    prompt, completion = lengths(a.lengths, m, np.random.default_rng(a.seed))
    p, c = (int(-(-int(x.max()) // 128) * 128) for x in (prompt, completion))
    kl = np.roll(completion, -1)
    if a.layout == "trees":      # [x | y | y_kl] rows, y_kl riding the policy's backward
        trees, share = prompt + completion + kl, 0.0
    else:                        # main rows [x | y] and kl rows of y_kl (packing.pack_streams)
        share = a.kl_share or packing.kl_share_for(prompt + completion, kl)
        trees = packing.stream_lengths(prompt + completion, kl, share)
    t = a.pack_length or shapes.best_row_length(trees[None], int(trees.max()), 128, groups)
    rows = packing.rows_needed(trees, t, groups)
    tk = packing.kl_row_length(t, share) if share else 0
    packed = batch_shapes(False, accumulation=a.accum, micro_batch=m, prompt_len=p,
                          completion_len=c, rows=rows, pack_length=t, kl_length=tk)
    padded = batch_shapes(False, accumulation=a.accum, micro_batch=m, prompt_len=p,
                          completion_len=c)
    real = int((prompt + completion).sum())
    if a.topology:
        print(json.dumps({"model": a.model, "lengths": a.lengths, "topology": a.topology,
                          "examples": m, "accum": a.accum, "padded_shape": [m, p + c],
                          "layout": a.layout, "packed_shape": [rows, t], "kl_rows": [rows, tk],
                          "padded": step_memory(config, model_config, a.topology, padded),
                          "packed": step_memory(config, model_config, a.topology, packed)}))
        return
    f_pad = step_flops(config, model_config, mesh, padded)
    f_pack = step_flops(config, model_config, mesh, packed)
    print(json.dumps({"model": a.model, "lengths": a.lengths, "examples": m,
                      "real_tokens": real, "padded_shape": [m, p + c],
                      "layout": a.layout, "packed_shape": [rows, t], "kl_rows": [rows, tk],
                      "padded_flops": f_pad, "packed_flops": f_pack,
                      "ratio": round(f_pack / f_pad, 3)}))


if __name__ == "__main__":
    main()
