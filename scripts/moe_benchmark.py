"""Step time of a tiny mixture of experts: grouped expert matmuls against every expert on every token.

Usage:
  PYTHONPATH=. python scripts/moe_benchmark.py [--repeats 7] [--tokens 1024]

Builds a Qwen3-MoE-shaped model (2 layers, hidden 256, 8 experts of width 512, top 2) and
times one training step (forward and backward of a next-token loss, jitted) with
`moe_impl="ragged"` (assignments sorted by expert, `jax.lax.ragged_dot`), `"blocks"` (the
same sorted rows, padded per expert to blocks of 128, one batched matmul) and `"dense"`
(every expert on every token), the three programs interleaved in one
process so that a shared machine's load hits both alike. Prints the medians of wall
and CPU seconds per step, their ratio, and whether the two steps' losses agree; the
figures in docs/models.md ("Mixtures of experts") come from this script.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kto_jax.models import moe
from kto_jax.models.config import ModelConfig
from kto_jax.models.transformer import Transformer

MODEL = ModelConfig(architecture="Qwen3MoeForCausalLM", vocab_size=512, hidden_size=256, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=64, qk_norm=True, num_experts=8,
                    num_experts_per_tok=2, moe_intermediate_size=512, norm_topk_prob=True)


def make_step(impl: str):
    """(jitted value-and-grad step, params) of the model computing its experts with `impl`."""
    graphdef, params = nnx.split(Transformer(MODEL.replace(moe_impl=impl), rngs=nnx.Rngs(0)), nnx.Param)

    def loss(params, ids):
        logps = jax.nn.log_softmax(nnx.merge(graphdef, params)(ids)[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logps, ids[:, 1:, None], -1))

    return jax.jit(jax.value_and_grad(loss)), params


def expert_flops(tokens: int, impl: str) -> float:
    """Forward matmul FLOPs of the experts of one layer as the formulation states them."""
    rows = tokens * (MODEL.num_experts if impl == "dense" else MODEL.num_experts_per_tok)
    if impl == "blocks":  # at most block - 1 padded rows per expert
        rows += MODEL.num_experts * (moe.BLOCK_ROWS - 1)
    return 2.0 * 3 * rows * MODEL.hidden_size * MODEL.moe_intermediate_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per step (rows of 128)")
    args = parser.parse_args()
    ids = jnp.asarray(np.random.default_rng(0).integers(0, MODEL.vocab_size, (args.tokens // 128, 128)),
                      jnp.int32)
    steps = {impl: make_step(impl) for impl in ("ragged", "blocks", "dense")}
    losses = {impl: float(step(params, ids)[0]) for impl, (step, params) in steps.items()}  # compile
    wall = {impl: [] for impl in steps}
    cpu = {impl: [] for impl in steps}
    for _ in range(args.repeats):
        for impl, (step, params) in steps.items():   # interleaved: A, B, A, B, ...
            w0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(step(params, ids))
            wall[impl].append(time.perf_counter() - w0)
            cpu[impl].append(time.process_time() - c0)
    print(f"backend {jax.default_backend()}, {args.tokens} tokens per step, {MODEL.num_experts} experts, "
          f"top {MODEL.num_experts_per_tok}, {args.repeats} interleaved repeats (medians)")
    for impl in steps:
        print(f"  {impl:6s}: wall {statistics.median(wall[impl]) * 1e3:8.1f} ms, cpu "
              f"{statistics.median(cpu[impl]) * 1e3:8.1f} ms, expert FLOPs per layer (forward) "
              f"{expert_flops(args.tokens, impl) / 1e9:.2f} G, loss {losses[impl]:.6f}")
    for impl in ("ragged", "blocks"):
        ratio = statistics.median(wall[impl]) / statistics.median(wall["dense"])
        cpu_ratio = statistics.median(cpu[impl]) / statistics.median(cpu["dense"])
        print(f"  {impl} / dense: wall {ratio:.2f}, cpu {cpu_ratio:.2f}; "
              f"losses agree to {abs(losses[impl] - losses['dense']):.1e}")


if __name__ == "__main__":
    main()
