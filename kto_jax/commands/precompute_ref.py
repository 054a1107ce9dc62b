"""`kto-jax precompute-ref --config=configs/X.py [--config.a.b=v ...] [--out=DIR]`.

Runs the frozen reference model (the initial policy, config.model.path, in
config.reference.param_dtype) once over every batch the run will train on, and
over the eval batches, and stores log pi_ref(y|x) and the KL pairs'
log pi_ref(y_{i+1}|x_i) per batch slot in DIR (default:
config.data.reference_logps_path). Train with the same config plus
  --config.reference.source=precomputed --config.data.reference_logps_path=DIR
and the step skips both reference forwards. The batches are those of the run:
same data, seed, batch sizes, bucketing and step count (see
kto_jax/reference_store.py for why the KL pairs tie the store to that schedule).
"""

from __future__ import annotations

import sys

from absl import flags

from kto_jax.config import load_config
from kto_jax.errors import UserError


def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("out", None, "Directory for the store (default: "
                        "config.data.reference_logps_path).", flag_values=fv)


def _log(message: str) -> None:
    sys.stderr.write(f"precompute-ref: {message}\n")
    sys.stderr.flush()


def precompute(config, out_dir: str) -> dict:
    """Computes and writes the store for `config`'s run; returns its meta."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    from kto_jax import reference_store as rs  # pylint: disable=import-outside-toplevel
    from kto_jax import sharding as shd  # pylint: disable=import-outside-toplevel
    from kto_jax.losses.registry import get_loss  # pylint: disable=import-outside-toplevel
    from kto_jax.models import load_tokenizer  # pylint: disable=import-outside-toplevel
    from kto_jax.train import run as run_lib  # pylint: disable=import-outside-toplevel
    from kto_jax.train import step as step_lib  # pylint: disable=import-outside-toplevel

    loss = get_loss(config.loss.name)
    if not loss.uses_reference or loss.uses_token_logps:
        raise UserError(f"loss {loss.name!r} has no sequence-level reference log-probs to precompute.")
    run_lib.check_paths(config)
    # The run's own config may already say "precomputed": the batches are the same either way,
    # and the store does not exist yet.
    config.reference.source = "model"
    data, num_steps = run_lib.prepare_data(config, load_tokenizer(config.model.path))
    mesh = shd.make_mesh(config.mesh)
    model, _ = run_lib.load_policy(config, mesh)
    graphdef, params = step_lib.split_model(model)
    del model
    dtype = jnp.dtype(config.reference.param_dtype)
    reference = jax.tree.map(lambda x: x.astype(dtype), params)  # the step's frozen copy
    del params
    sharding = step_lib.batch_sharding(mesh, config.mesh.rules)
    fn = rs.make_reference_fn(loss, graphdef, int(config.train.logprob_vocab_chunk), mesh,
                              shd.named_shardings(reference, mesh, config.mesh.rules), sharding,
                              config.mesh.rules)
    keys = rs.reference_keys(loss)
    splits = {}
    with jax.set_mesh(mesh):
        train = data.train_iter_factory(forever=int(config.train.num_steps) > 0)
        splits["train"] = rs.compute_split(iter(train), num_steps, fn, reference, sharding, keys,
                                           _log, "train")
        if data.eval_batches is not None:
            evaluation = data.eval_batches()
            splits["eval"] = rs.compute_split(iter(evaluation), evaluation.num_batches, fn,
                                              reference, sharding, keys, _log, "eval")
    meta = {"loss": loss.name, "keys": list(keys), "fingerprint": data.summary.fingerprint,
            "batch": [int(config.train.global_batch_size), int(config.train.micro_batch_size)],
            "model_path": config.model.path, "reference_param_dtype": config.reference.param_dtype,
            "data_seed": int(config.data.seed), "num_steps": num_steps}
    if jax.process_index() == 0:
        rs.write_store(out_dir, meta, splits)
    return meta


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help", "--helpfull") for a in argv):
        print(__doc__.strip())
        return 0
    config, rest, fv = load_config(argv, extra_flags=_define_flags)
    if rest:
        raise UserError(f"unexpected arguments {rest}: kto-jax precompute-ref takes only flags.")
    out_dir = fv["out"].value or config.data.reference_logps_path
    if not out_dir:
        raise UserError("missing --out=DIR (or config.data.reference_logps_path): where to write "
                        "the precomputed reference log-probs.")
    from kto_jax.train import distributed  # pylint: disable=import-outside-toplevel
    distributed.initialize()
    meta = precompute(config, out_dir)
    _log(f"wrote {out_dir}: {meta['num_steps']} train batches, keys {meta['keys']}; train with "
         f"--config.reference.source=precomputed --config.data.reference_logps_path={out_dir}")
    return 0
