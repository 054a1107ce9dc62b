"""`kto-jax export --workdir DIR --out HF_DIR [--step N] [--format merged|peft]`: a run's checkpoint as an HF model.

Writes config.json, sharded safetensors with an index and the tokenizer, which
`transformers.AutoModelForCausalLM.from_pretrained(HF_DIR)` loads unchanged. For a LoRA
run, --format=merged (the default) merges the adapters into the base weights of the run's
config.model.path; --format=peft writes adapter_config.json + adapter_model.safetensors,
which `peft.AutoPeftModelForCausalLM.from_pretrained(HF_DIR)` loads in one line: the base
it names is the run's HF directory (its absolute path) or hub id; a .gguf base, which
transformers cannot take as a base, is written as an HF checkpoint to HF_DIR/base and named.
"""

from __future__ import annotations

import argparse


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kto-jax export", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="the run directory of `kto-jax train`")
    parser.add_argument("--out", required=True, help="output directory for the HF checkpoint")
    parser.add_argument("--step", type=int, default=None,
                        help="checkpoint step to export (default: the latest)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="dtype of the written weights (default: the run's "
                             "train.export_dtype, else model.param_dtype)")
    parser.add_argument("--format", default="merged", choices=("merged", "peft"),
                        help="merged: an HF checkpoint (LoRA adapters merged into the base); "
                             "peft: a LoRA run's adapter directory for the peft package")
    args = parser.parse_args(argv)
    from kto_jax.train.export import export_checkpoint
    step = export_checkpoint(args.workdir, args.out, step=args.step, dtype=args.dtype,
                             fmt=args.format)
    print(f"exported step {step} of {args.workdir} to {args.out}")
    return 0
