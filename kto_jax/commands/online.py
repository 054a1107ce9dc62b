"""`kto-jax online --config=configs/X.py --workdir=DIR [--config.a.b=v ...]`.

Online KTO: rounds of sampling from the current policy (on the training mesh, no
export), judging every sample in this process (config.online.judge: module:function,
reward-model:PATH or http[:MODEL]), turning the verdicts into training examples and
training config.online.steps_per_round steps with config.loss, then evaluating on
held-out prompts (pass rate with a 90% interval, KL to the reference, reward margins).
Each round's prompts, samples, verdicts and labels are written to DIR/rounds/ as JSONL.
Re-running the same command on the same workdir resumes after the last finished round.
docs/online.md explains the options and files.

`kto-jax online --example=DIR` makes what configs/online_tiny_cpu.py needs in DIR (a tiny
random model, prompts; the judge ships with kto-jax) and prints the command that runs it.
"""

from __future__ import annotations

import os

from absl import flags

from kto_jax.commands.preamble import parse_config_command
from kto_jax.errors import UserError


def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "Run directory: rounds/, checkpoints, metrics.jsonl, "
                        "online.png, hf/.", flag_values=fv)
    flags.DEFINE_string("example", None, "Write a tiny model and prompts to this directory for "
                        "configs/online_tiny_cpu.py, print the command that runs them, and "
                        "stop (no --config needed).", flag_values=fv)


def _example(argv: list[str]) -> str | None:
    """DIR of `--example=DIR` (or `--example DIR`) in argv, else None."""
    for k, arg in enumerate(argv):
        if arg.startswith("--example="):
            return arg.partition("=")[2]
        if arg == "--example" and k + 1 < len(argv):
            return argv[k + 1]
    return None


def write_example(out_dir: str) -> int:
    from kto_jax.online.example import example_command, write_example as write  # pylint: disable=import-outside-toplevel
    overrides = write(out_dir)
    print(f"wrote a tiny random model and 16 prompts to {out_dir}; run configs/online_tiny_cpu.py "
          "on them with:\n\n"
          f"  {example_command(overrides, os.path.join(os.path.abspath(out_dir), 'run'))}\n")
    return 0


def main(argv: list[str]) -> int:
    example = _example(argv)
    if example and not any(a in ("-h", "--help", "--helpfull") for a in argv):
        return write_example(example)
    config, fv = parse_config_command(argv, prog="kto-jax online", doc=__doc__,
                                      define_flags=_define_flags)
    workdir = fv["workdir"].value
    if not workdir:
        raise UserError("missing --workdir=DIR: the directory for rounds, checkpoints and "
                        "metrics (re-use it to resume).")
    from kto_jax.online.settings import check_online_config
    check_online_config(config)  # a bad config.online fails before any heavy import
    from kto_jax.online.runner import online  # heavy imports only once the flags are good
    return online(config, workdir)
