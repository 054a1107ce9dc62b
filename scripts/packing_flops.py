"""XLA cost-analysis FLOPs of the padded vs the packed-shared forwards on the same examples.

Usage: PYTHONPATH=. python scripts/packing_flops.py [--preset tiny] [--examples 16] [--pack-length 512]

Padded (today's step): the policy forward on (x, y) and the KL forward on (x, y_kl),
each M rows of P + C tokens (prompt and completion buckets of the microbatch).
Packed-shared: one forward of the [x | y | y_kl] rows (kto_jax/data/packing.py),
with both completions' log-probs gathered from it (kto_jax/models/packed_logprobs.py).
Lengths are drawn from a skewed (log-normal) distribution; the figures are the
compiled programs' `cost_analysis()['flops']` (forward only, log-probs included).
"""

import argparse
import json

import jax
import numpy as np
from flax import nnx

from kto_jax.data import packing
from kto_jax.models.logprobs import completion_logps
from kto_jax.models.config import preset
from kto_jax.models.transformer import Transformer
from kto_jax.models.packed_logprobs import packed_completion_logps


def _bucket(n: int, step: int = 64) -> int:
    return -(-n // step) * step


def _flops(fn, *args) -> float:
    return float(jax.jit(fn).lower(*args).compile().cost_analysis()["flops"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--pack-length", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    cfg = preset(a.preset, attention_impl="xla")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    m, cap = a.examples, a.pack_length // 4
    def lengths():
        return np.clip(rng.lognormal(np.log(cap / 4), 0.8, m).astype(int), 1, cap)
    prompts = [rng.integers(3, cfg.vocab_size, n).astype(np.int32) for n in lengths()]
    ys = [rng.integers(3, cfg.vocab_size, n).astype(np.int32) for n in lengths()]
    p, c = _bucket(max(map(len, prompts))), _bucket(max(map(len, ys)))
    x, xm = np.zeros((m, p), np.int32), np.zeros((m, p), np.int32)
    y, ym = np.zeros((m, c), np.int32), np.zeros((m, c), np.int32)
    for i, (pi, yi) in enumerate(zip(prompts, ys)):
        x[i, p - len(pi):], xm[i, p - len(pi):] = pi, 1
        y[i, :len(yi)], ym[i, :len(yi)] = yi, 1
    y_kl, ym_kl = np.roll(y, -1, 0), np.roll(ym, -1, 0)

    def padded(x, xm, y, ym, y_kl, ym_kl):
        return (completion_logps(model, x, xm, y, ym).logps,
                completion_logps(model, x, xm, y_kl, ym_kl).logps)

    tree = np.array([len(pi) + len(yi) + len(yk) for pi, yi, yk in
                     zip(prompts, ys, packing.kl_completions(ys))])
    rows = packing.rows_needed(tree, a.pack_length)
    batch = packing.pack_unpaired(prompts, ys, pack_length=a.pack_length, num_rows=rows,
                                  completion_length=c, pad_id=0)

    def packed(batch):
        return tuple(o.logps for o in packed_completion_logps(model, batch, packing.UNPAIRED_NAMES))

    f_pad, f_pack = _flops(padded, x, xm, y, ym, y_kl, ym_kl), _flops(packed, batch)
    print(json.dumps({"preset": a.preset, "examples": m, "padded_shape": [2 * m, p + c],
                      "packed_shape": [rows, a.pack_length], "real_tokens": int(tree.sum()),
                      "padded_flops": f_pad, "packed_shared_flops": f_pack,
                      "ratio": round(f_pack / f_pad, 3)}))


if __name__ == "__main__":
    main()
