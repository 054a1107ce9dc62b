"""`kto-jax bench [--model llama-1b] [--reference on_the_fly|precomputed] [...]`.

Times the KTO train step on the benchmark's workload (kto_jax/perf/bench.py: random-init model of
a named shape, 512 + 511 tokens padded to multiples of 128, 8 x 4 accumulation,
bf16 compute) and prints ONE JSON line: device, median s/step, matched tokens/s,
model TFLOP/s, MFU, peak memory and the options used. With --lengths=hh-rlhf (or a
file) the examples get real lengths, and --layout=padded|packed|packed_shared picks how
the step lays them out; the line adds real_tokens_per_s and token_efficiency. The same command runs on
CPU, GPU and TPU; with --topology=v5p-8 it AOT-compiles for a TPU slice
instead (per-chip memory, no timing). See docs/performance.md for the definitions and recorded figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from kto_jax.errors import UserError


def _parser() -> argparse.ArgumentParser:
    from kto_jax.perf.bench import MODEL_SHAPES, REFERENCE_MODES, BenchOptions  # pylint: disable=import-outside-toplevel
    d = BenchOptions()
    p = argparse.ArgumentParser(prog="kto-jax bench", description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=d.model, choices=sorted(MODEL_SHAPES))
    p.add_argument("--prompt-len", type=int, default=d.prompt_len, help="real prompt tokens")
    p.add_argument("--completion-len", type=int, default=d.completion_len, help="real completion tokens")
    p.add_argument("--bucket", type=int, default=d.bucket, help="padded lengths are multiples of this")
    p.add_argument("--micro-batch", type=int, default=d.micro_batch)
    p.add_argument("--accum", type=int, default=d.accum, help="microbatches per step")
    p.add_argument("--steps", type=int, default=d.steps, help="timed steps")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps first")
    p.add_argument("--reference", default=d.reference, choices=sorted(REFERENCE_MODES))
    p.add_argument("--attention", default=d.attention, choices=("auto", "xla", "cudnn", "splash"))
    p.add_argument("--remat", default=d.remat, choices=("none", "full", "dots", "dots_no_batch"))
    p.add_argument("--loss", default=d.loss)
    p.add_argument("--dtype", default=d.dtype, choices=("bfloat16", "float32", "float16"))
    p.add_argument("--reference-dtype", default=d.reference_dtype, choices=("bfloat16", "float32"))
    p.add_argument("--vocab-chunk", type=int, default=d.vocab_chunk)
    p.add_argument("--fsdp", type=int, default=d.fsdp, help="mesh fsdp size (data takes the rest)")
    p.add_argument("--tensor", type=int, default=d.tensor, help="mesh tensor size")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--lora-rank", type=int, default=d.lora_rank,
                   help="> 0: train LoRA adapters of this rank on the frozen base (docs/lora.md)")
    p.add_argument("--lengths", default=d.lengths, metavar="NAME|FILE",
                   help="draw each example's prompt and completion lengths from a named "
                        "distribution (hh-rlhf: token lengths of Anthropic's HH-RLHF) or a file "
                        "(.csv with header prompt_len,completion_len[,count]; .jsonl of "
                        "{\"prompt_len\", \"completion_len\"}; .json histogram); --prompt-len "
                        "and --completion-len then cap them (truncation). Empty: fixed lengths")
    p.add_argument("--layout", default=d.layout, choices=("padded", "packed", "packed_shared"),
                   help="padded rows (x twice per model: (x, y) and (x, y_kl)); packed rows of "
                        "[x | y] and [x | y_kl] segments; packed_shared: the packed layout "
                        "data.packing=True trains for the loss (x once: [x | y] rows beside kl "
                        "rows of y_kl for a loss with z0, [x | y] rows without z0)")
    p.add_argument("--pack-length", type=int, default=d.pack_length,
                   help="tokens per packed row; 0: the longest example tree, rounded up to --bucket")
    p.add_argument("--topology", default=None,
                   help="AOT-compile for this TPU slice (e.g. v5p-8, v5e-8) instead of running: "
                        "per-chip memory and fit (needs libtpu, the tpu extra)")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from kto_jax.perf import bench  # pylint: disable=import-outside-toplevel
    fields = {f.name for f in dataclasses.fields(bench.BenchOptions)}
    opts = bench.BenchOptions(**{k: v for k, v in vars(args).items() if k in fields})
    try:
        result = bench.compile_for_tpu(opts, args.topology) if args.topology else bench.run_bench(opts)
    except ValueError as err:  # e.g. cuDNN refusing a shape: name the option to change
        raise UserError(f"the step did not build with {opts}: {err}") from err
    sys.stdout.write(bench.to_json(result) + "\n")
    sys.stdout.flush()
    return 0
