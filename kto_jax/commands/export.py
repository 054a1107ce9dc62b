"""`kto-jax export --workdir DIR --out HF_DIR [--step N]`: a run's checkpoint as an HF model.

Writes config.json, sharded safetensors with an index and the tokenizer, which
`transformers.AutoModelForCausalLM.from_pretrained(HF_DIR)` loads unchanged.
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
    args = parser.parse_args(argv)
    from kto_jax.train.export import export_checkpoint
    step = export_checkpoint(args.workdir, args.out, step=args.step, dtype=args.dtype)
    print(f"exported step {step} of {args.workdir} to {args.out}")
    return 0
