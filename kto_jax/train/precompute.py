"""`kto-jax precompute-ref`: the reference log-probs of every batch a run will read, stored.

The run's own data (kto_jax/train/run.py `prepare_data`: same files, seed, batch
sizes, bucketing and step count) goes batch by batch through the step's reference
forward (`kto_jax.step.train_step.make_reference_step`) on the frozen reference, a
`reference_copy` of the initial policy; kto_jax/train/reference_store.py writes the
results keyed by batch slot, with row checksums.
"""

from __future__ import annotations

import copy
import sys
from typing import Callable

import jax
import ml_collections

from kto_jax import sharding as shd
from kto_jax.errors import UserError
from kto_jax.losses.registry import get_loss
from kto_jax.models import load_tokenizer
from kto_jax.step import stats as step_stats
from kto_jax.step.state import batch_sharding, reference_copy, split_model
from kto_jax.step.train_step import make_reference_step
from kto_jax.train import reference_store as rs
from kto_jax.train import run as run_lib
from kto_jax.train.settings import read_settings


def _stderr(message: str) -> None:
    sys.stderr.write(f"{message}\n")


def precompute_reference(config: ml_collections.ConfigDict, out_dir: str,
                         log: Callable[[str], None] = _stderr) -> dict:
    """Computes and writes the store for `config`'s run to `out_dir`; returns its meta."""
    loss = get_loss(config.loss.name)
    if not loss.uses_reference or loss.uses_token_logps:
        raise UserError(f"loss {loss.name!r} has no sequence-level reference log-probs to precompute.")
    run_lib.check_paths(config)
    # The run's own config may already say "precomputed": the batches are the same either way,
    # and the store does not exist yet.
    config = copy.deepcopy(config)
    config.reference.source = "model"
    settings = read_settings(config)
    data, num_steps = run_lib.prepare_data(config, settings, load_tokenizer(settings.model.path))
    mesh = shd.make_mesh(config.mesh)
    model, _ = run_lib.load_policy(settings, mesh)
    graphdef, params = split_model(model)
    del model
    reference = reference_copy(params, settings.step.reference_dtype)  # the step's frozen copy
    del params
    sharding = batch_sharding(mesh, settings.rules)
    fn = make_reference_step(loss, graphdef, settings.step.vocab_chunk, mesh,
                             shd.named_shardings(reference, mesh, settings.rules), settings.rules)
    keys = step_stats.reference_keys(loss)
    splits = {}
    with jax.set_mesh(mesh):
        train = data.train_iter_factory(forever=settings.train.num_steps > 0)
        splits["train"] = rs.compute_split(iter(train), num_steps, fn, reference, sharding, keys,
                                           log, "train")
        if data.eval_batches is not None:
            evaluation = data.eval_batches()
            splits["eval"] = rs.compute_split(iter(evaluation), evaluation.num_batches, fn,
                                              reference, sharding, keys, log, "eval")
    meta = {"loss": loss.name, "keys": list(keys), "fingerprint": data.summary.fingerprint,
            "batch": [int(config.train.global_batch_size), int(config.train.micro_batch_size)],
            "model_path": config.model.path, "reference_param_dtype": config.reference.param_dtype,
            "data_seed": int(config.data.seed), "num_steps": num_steps}
    if jax.process_index() == 0:
        rs.write_store(out_dir, meta, splits)
    return meta
