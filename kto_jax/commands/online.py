"""`kto-jax online --config=configs/X.py --workdir=DIR [--config.a.b=v ...]`.

Online KTO: rounds of sampling from the current policy (on the training mesh, no
export), judging every sample in this process (config.online.judge: module:function,
reward-model:PATH or http[:MODEL]), turning the verdicts into training examples and
training config.online.steps_per_round steps with config.loss, then evaluating on
held-out prompts (pass rate with a 90% interval, KL to the reference, reward margins).
Each round's prompts, samples, verdicts and labels are written to DIR/rounds/ as JSONL.
Re-running the same command on the same workdir resumes after the last finished round.
docs/online.md explains the options and files.
"""

from __future__ import annotations

from absl import flags

from kto_jax.commands.preamble import parse_config_command
from kto_jax.errors import UserError


def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "Run directory: rounds/, checkpoints, metrics.jsonl, "
                        "online.png, hf/.", flag_values=fv)


def main(argv: list[str]) -> int:
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
