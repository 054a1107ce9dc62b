"""`kto-jax train --config=configs/X.py --workdir=DIR [--config.a.b=v ...]`.

Parses the config (an unknown key or a wrong type is an error naming the key),
starts the multi-process runtime when the run spans processes, and hands over to
`kto_jax.train.trainer.train`. Re-running the same command on the same workdir
resumes from its latest checkpoint; SIGTERM saves a checkpoint and exits 0.
"""

from __future__ import annotations

from absl import flags

from kto_jax.commands.preamble import parse_config_command
from kto_jax.errors import UserError


def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, tb/, hf/.",
                        flag_values=fv)
    flags.DEFINE_string("coordinator_address", None,
                        "host:port of process 0 for a multi-process run "
                        "(default: $KTO_JAX_COORDINATOR_ADDRESS).", flag_values=fv)
    flags.DEFINE_integer("num_processes", None,
                         "Processes in the run (default: $KTO_JAX_NUM_PROCESSES).", flag_values=fv)
    flags.DEFINE_integer("process_id", None,
                         "This process's rank (default: $KTO_JAX_PROCESS_ID).", flag_values=fv)


def main(argv: list[str]) -> int:
    config, fv = parse_config_command(argv, prog="kto-jax train", doc=__doc__,
                                      define_flags=_define_flags)
    workdir = fv["workdir"].value
    if not workdir:
        raise UserError("missing --workdir=DIR: the directory for checkpoints and metrics "
                        "(re-use it to resume).")
    from kto_jax.train import distributed
    distributed.initialize(fv["coordinator_address"].value, fv["num_processes"].value,
                           fv["process_id"].value)
    from kto_jax.train.trainer import train  # heavy imports only once the flags are good
    return train(config, workdir)
