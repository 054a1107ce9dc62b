"""`kto-jax precompute-ref --config=configs/X.py [--config.a.b=v ...] [--out=DIR]`.

Runs the frozen reference model (the initial policy, config.model.path, in
config.reference.param_dtype) once over every batch the run will train on, and
over the eval batches, and stores log pi_ref(y|x) and the KL pairs'
log pi_ref(y_{i+1}|x_i) per batch slot in DIR (default:
config.data.reference_logps_path). Train with the same config plus
  --config.reference.source=precomputed --config.data.reference_logps_path=DIR
and the step skips both reference forwards. The batches are those of the run:
same data, seed, batch sizes, bucketing and step count (see
kto_jax/train/reference_store.py for why the KL pairs tie the store to that schedule).
"""

from __future__ import annotations

import sys

from absl import flags

from kto_jax.commands.preamble import parse_config_command
from kto_jax.errors import UserError


def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("out", None, "Directory for the store (default: "
                        "config.data.reference_logps_path).", flag_values=fv)


def _log(message: str) -> None:
    sys.stderr.write(f"precompute-ref: {message}\n")
    sys.stderr.flush()


def main(argv: list[str]) -> int:
    config, fv = parse_config_command(argv, prog="kto-jax precompute-ref", doc=__doc__,
                                      define_flags=_define_flags)
    out_dir = fv["out"].value or config.data.reference_logps_path
    if not out_dir:
        raise UserError("missing --out=DIR (or config.data.reference_logps_path): where to write "
                        "the precomputed reference log-probs.")
    from kto_jax.train import distributed, precompute  # pylint: disable=import-outside-toplevel
    distributed.initialize()
    meta = precompute.precompute_reference(config, out_dir, log=_log)
    _log(f"wrote {out_dir}: {meta['num_steps']} train batches, keys {meta['keys']}; train with "
         f"--config.reference.source=precomputed --config.data.reference_logps_path={out_dir}")
    return 0
