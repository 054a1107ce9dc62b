"""`kto-jax eval --model PATH --data FILE [--judge SPEC] [--config=configs/X.py ...]`.

Evaluates a policy on held-out feedback (any format `kto-jax train` reads):
  - reward metrics: loss, implied-reward margins and reward accuracy against the
    frozen reference (the run's config.model.path, or --reference);
  - winrate of the policy's generations against the file's reference (desirable /
    chosen) completions, judged by --judge, with a 90% Wilson interval:
      module:function      a Python rule (2 args: score; 3 args: pairwise verdict)
      reward-model:PATH    an HF sequence-classification dir, or a causal LM's log-probs
      http[:MODEL]         an OpenAI-compatible endpoint (KTO_JAX_JUDGE_BASE_URL,
                           KTO_JAX_JUDGE_MODEL, OPENAI_API_KEY / KTO_JAX_JUDGE_API_KEY)
PATH is a `kto-jax train` workdir (its config is then the default --config and
its model.path the reference), an HF directory or a .gguf file. Generation flags
are those of `kto-jax sample`. --out writes everything, per item, as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

from kto_jax.commands.preamble import command_parser, parse_config_command
from kto_jax.errors import UserError


def _config(args: argparse.Namespace, config_argv: list[str]):
    from kto_jax.eval.loading import is_workdir, workdir_config
    from kto_jax.eval.report import config_from_dict
    if config_argv:
        return parse_config_command(config_argv, prog="kto-jax eval", doc=__doc__)[0]
    if is_workdir(args.model):
        return config_from_dict(workdir_config(args.model))
    raise UserError("pass --config=configs/X.py (the run's config: loss, beta, lengths, mesh) "
                    "or a `kto-jax train` workdir as --model")


def main(argv: list[str]) -> int:
    from kto_jax.commands.sample import add_sampling_flags, sampling_settings
    parser = command_parser("kto-jax eval", __doc__, config_overrides=True)
    parser.add_argument("--model", required=True, help="policy: train workdir, HF directory or .gguf file")
    parser.add_argument("--data", default=None, help="held-out feedback file (default: config.data.eval_path)")
    parser.add_argument("--reference", default=None, help="reference model (default: config.model.path)")
    parser.add_argument("--judge", default=None, help="module:function | reward-model:PATH | http[:MODEL]")
    parser.add_argument("--no_rewards", action="store_true", help="skip the reward metrics")
    parser.add_argument("--limit", type=int, default=None, help="judge at most this many prompts")
    parser.add_argument("--out", default=None, help="write the full result as JSON here")
    add_sampling_flags(parser)
    args, rest = parser.parse_known_args(argv)
    config_argv = [a for a in rest if a.startswith("--config")]
    unknown = [a for a in rest if not a.startswith("--config")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    config = _config(args, config_argv)
    data = args.data or config.data.eval_path
    if not data:
        raise UserError("no held-out data: pass --data FILE (or set config.data.eval_path)")
    reference = None if args.no_rewards else (args.reference or config.model.path or None)
    if not reference and not args.judge:
        raise UserError("nothing to evaluate: give a reference (--reference or config.model.path) "
                        "for reward metrics and/or --judge for a winrate")
    from kto_jax.eval.judges import make_judge
    from kto_jax.eval.report import evaluate, format_report
    judge = make_judge(args.judge) if args.judge else None
    result = evaluate(config, policy_path=args.model, reference_path=reference, data_path=data,
                      judge=judge, settings=sampling_settings(args), seed=args.seed,
                      batch_size=args.batch_size, limit=args.limit,
                      log=lambda m: print(m, file=sys.stderr))
    print(format_report(result))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, default=str)
    return 0
