"""Shared pieces of the train-step tests (tests/step/, and the reference store's in
tests/train/): a tiny model config, batches, a sharper reference, naive log-probs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs.base import get_config
from kto_jax.batch import as_batch
from kto_jax.models.config import tiny
from kto_jax.models.transformer import positions_from_mask

MODEL = tiny(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
             num_kv_heads=1, head_dim=16)
A, M, P, C = 2, 8, 5, 6


def make_config(loss="kto", micro=M, accum=A, **loss_kw):
    cfg = get_config()
    cfg.loss.name = loss
    for k, v in loss_kw.items():
        cfg.loss[k] = v
    cfg.train.micro_batch_size, cfg.train.global_batch_size = micro, micro * accum
    cfg.train.logprob_vocab_chunk = 48  # 128 = 48 + 48 + 32: exercises the overlapping last chunk
    cfg.reference.param_dtype = "float32"
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-2, 0
    cfg.optim.eps = 1e-3  # keeps Adam's first update linear in tiny gradients (exact comparisons)
    return cfg


def make_batch(seed, paired=False, accum=A, micro=M, prompt_len=P, completion_len=C,
               vocab_size=MODEL.vocab_size, desirable=None):
    """A batch of kto_jax/batch.py with random tokens and lengths; `desirable` (bool [accum,
    micro]) defaults to random labels with both classes in every microbatch."""
    rng = np.random.default_rng(seed)
    shape = (accum, micro)

    def padded(length, right):
        n = rng.integers(1, length + 1, shape)[..., None]
        pos = np.arange(length)[None, None]
        mask = (pos < n) if right else (pos >= length - n)
        return (rng.integers(1, vocab_size, shape + (length,)) * mask).astype(np.int32), \
            mask.astype(np.int32)

    x, xm = padded(prompt_len, right=False)
    batch = dict(prompt_ids=x, prompt_mask=xm, valid=np.ones(shape, bool))
    if paired:
        (yw, ywm), (yl, ylm) = padded(completion_len, True), padded(completion_len, True)
        return as_batch(dict(batch, chosen_ids=yw, chosen_mask=ywm, rejected_ids=yl,
                             rejected_mask=ylm), paired=True)
    y, ym = padded(completion_len, True)
    if desirable is None:
        desirable = rng.random(shape) < 0.5
        desirable[:, :2] = [True, False]  # both classes in every microbatch
    return as_batch(dict(batch, completion_ids=y, completion_mask=ym, desirable=desirable,
                         weight=np.ones(shape, np.float32)), paired=False)


def sharper_reference(params):
    """pi_ref = the policy with a 3x sharper head: log-ratios on random text are then positive
    on average, so z0 > 0 and the KL pairs matter for the loss."""
    ref = jax.tree.map(jnp.copy, params)
    ref["lm_head"] = ref["lm_head"].replace(ref["lm_head"][...] * 3.0)
    return ref


@functools.partial(jax.jit, static_argnums=0)
def naive_logps(graphdef, params, x, xm, y, ym):
    """log pi(y|x) [B] from the model's full float32 logits: the definition, no chunking."""
    model = nnx.merge(graphdef, params)
    ids, mask = jnp.concatenate([x, y], 1), jnp.concatenate([xm, ym], 1)
    logits = model(ids, positions_from_mask(mask), mask)[:, P - 1:P + C - 1]
    tok = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), y[..., None], -1)[..., 0]
    return jnp.sum(tok * ym, -1)


def fresh(state):
    """A copy of the state: the step donates (invalidates) the one it is given."""
    return jax.tree.map(lambda x: x.copy(), state)


def unpad(ids, mask):
    """The real tokens of each row of [..., L] padded arrays, as nested lists [...][array]."""
    ids, mask = np.asarray(ids), np.asarray(mask).astype(bool)
    if ids.ndim == 1:
        return ids[mask]
    return [unpad(i, m) for i, m in zip(ids, mask)]


def packed_like(batch, paired=False, pack_length=32, groups=1, pad_id=0, num_rows=0,
                kl_share=0.0):
    """The packed batch (kto_jax/data/packing.py) of the same examples as the padded `batch`:
    rows of `pack_length` tokens, the KL completions rolled within each microbatch (around
    its real rows: `packing.kl_completions` with `valid`, the step's rule), the
    per-example arrays (labels, weights, validity, precomputed reference) unchanged;
    `num_rows` rows per microbatch (0: the fewest that hold every microbatch). With
    `kl_share` > 0 (unpaired) the KL completions go to kl rows (`packing.pack_streams`)."""
    from kto_jax.data import packing  # pylint: disable=import-outside-toplevel
    names = packing.PAIRED_NAMES if paired else packing.UNPAIRED_NAMES
    prompts = unpad(batch["prompt_ids"], batch["prompt_mask"])
    if paired:
        firsts, seconds = (unpad(batch[f"{n}_ids"], batch[f"{n}_mask"]) for n in names)
    else:
        firsts = unpad(batch["completion_ids"], batch["completion_mask"])
        seconds = [packing.kl_completions(f, v) for f, v in zip(firsts, batch["valid"])]
    lengths = np.array([[len(a) + len(b) + len(c) for a, b, c in zip(*mb)]
                        for mb in zip(prompts, firsts, seconds)])
    if kl_share:
        lengths = np.array([[packing.stream_lengths(len(a) + len(b), len(c), kl_share)
                             for a, b, c in zip(*mb)] for mb in zip(prompts, firsts, seconds)])
    c = batch[f"{names[0]}_ids"].shape[-1]
    out = packing.pack_batch(prompts, firsts, seconds, names=names, pack_length=pack_length,
                             num_rows=num_rows or packing.microbatch_rows(lengths, pack_length,
                                                                          groups),
                             completion_length=c, pad_id=pad_id, groups=groups,
                             kl_share=kl_share)
    per_example = {k: v for k, v in batch.items() if k not in ("prompt_ids", "prompt_mask")
                   and not k.startswith(names)}
    return as_batch(dict(out, **per_example), paired)


def assert_mesh_steps_equal_one_device(build, cfg, mesh_axes: dict, batch, steps: int = 2):
    """`steps` train steps on one CPU device and on a mesh of `mesh_axes` (the first 8 devices)
    give the same gradient norms and parameters (float32 rounding: rtol 1e-4, atol 1e-6).
    build(mesh) -> (graphdef, state, shardings, tx, schedule) of the run on that mesh."""
    from kto_jax import step as S
    from kto_jax.sharding import make_mesh
    from kto_jax.train.settings import step_settings

    out = {}
    for name, mesh in (("one", make_mesh({axis: 1 for axis in mesh_axes}, jax.devices()[:1])),
                       ("mesh", make_mesh(mesh_axes, jax.devices()[:8]))):
        graphdef, state, shardings, tx, schedule = build(mesh)
        step = S.make_train_step(step_settings(cfg), graphdef, tx, schedule, mesh, shardings)
        with jax.set_mesh(mesh):
            for _ in range(steps):
                state, metrics = step(state, batch)
        out[name] = (jax.device_get(state.params), jax.device_get(metrics))
    (p1, m1), (p8, m8) = out["one"], out["mesh"]
    np.testing.assert_allclose(m1["grad_norm"], m8["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
