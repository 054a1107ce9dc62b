"""The LoRA library evaluation of docs/lora.md: run `PYTHONPATH=. python scripts/lora_eval.py`.

For each model shape (tiny, Qwen2.5-0.5B) it measures, on the host CPU, one jitted
forward+backward of a token-level log-likelihood: full-parameter gradients vs
gradients of kto_jax.models.lora adapters (the plain delta on the stacked weights),
each with its compile time, median step time and XLA's temp-buffer estimate. It
then applies qwix's LoraProvider to the same scanned Transformer and counts which
projections received adapters. Prints one JSON line per measurement.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from kto_jax.models import ModelConfig, Transformer, positions_from_mask
from kto_jax.models import lora
from kto_jax.models.config import qwen25_0_5b

SHAPES = {"tiny": (ModelConfig(), 4, 64), "qwen2.5-0.5b": (qwen25_0_5b(), 1, 128)}  # (config, batch, length)


def _nll(logits, ids):
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))


def _time(fn, args, repeats):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    mem = compiled.memory_analysis()
    return dict(compile_s=round(compile_s, 2), step_s=round(statistics.median(times), 4),
                temp_mib=round(mem.temp_size_in_bytes / 2**20, 1) if mem else None)


def measure(name: str, config: ModelConfig, batch: int, length: int, rank: int, repeats: int) -> None:
    model = Transformer(config, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (batch, length), 0, config.vocab_size)
    mask = jnp.ones_like(ids)
    pos = positions_from_mask(mask)
    graphdef, params = nnx.split(model)

    def full(p):
        return jax.grad(lambda p: _nll(nnx.merge(graphdef, p)(ids, pos, mask), ids))(p)

    adapters = lora.LoraAdapters(config, lora.LoraConfig(rank=rank), rngs=nnx.Rngs(1))
    agraph, astate = nnx.split(adapters)

    def adapted(a, p):
        def loss(a):
            return _nll(lora.attach(nnx.merge(graphdef, p), nnx.merge(agraph, a))(ids, pos, mask), ids)
        return jax.grad(loss)(a)

    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
    print(json.dumps(dict(shape=name, variant="full", trainable=count(params), **_time(full, (params,), repeats))))
    print(json.dumps(dict(shape=name, variant=f"plain_delta_r{rank}", trainable=count(astate),
                          **_time(adapted, (astate, params), repeats))), flush=True)


def qwix_coverage(config: ModelConfig) -> None:
    import qwix
    model = Transformer(config, rngs=nnx.Rngs(0))
    ids = jnp.ones((1, 8), jnp.int32)
    mask = jnp.ones_like(ids)
    adapted = qwix.apply_lora_to_model(model, qwix.LoraProvider(module_path=".*", rank=4, alpha=8.0),
                                       ids, positions_from_mask(mask), mask, rngs=nnx.Rngs(1))
    names = sorted({"/".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(adapted, nnx.LoRAParam))})
    print(json.dumps(dict(variant="qwix", lora_params_created=names,
                          layer_projections_adapted=sum(n.startswith("layers") for n in names))))


if __name__ == "__main__":
    shapes = sys.argv[1:] or list(SHAPES)
    qwix_coverage(ModelConfig())
    for shape in shapes:
        config, batch, length = SHAPES[shape]
        measure(shape, config, batch, length, rank=16, repeats=5 if shape == "tiny" else 3)
