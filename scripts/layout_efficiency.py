"""Token efficiency and fill of each `kto-jax bench --layout` over many sampled global batches.

Usage: PYTHONPATH=. python scripts/layout_efficiency.py [--lengths hh-rlhf] [--batches 200]
           [--micro-batch 8 --accum 4] [--prompt-len 512 --completion-len 511 --bucket 128]
           [--pack-length 0]

No model runs: the examples are laid out exactly as the benchmark lays them out
(kto_jax/perf/workload.py) and counted. One JSON line per layout: the mean, 10th and
90th percentile of token_efficiency (real tokens / computed positions) and fill (non-padding
share), and the mean rows x row length per microbatch. `kto-jax bench` reports the same
figures for the one batch it times.
"""

import argparse
import json

import numpy as np

from kto_jax.perf import workload as bw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="hh-rlhf")
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--completion-len", type=int, default=511)
    ap.add_argument("--bucket", type=int, default=128)
    ap.add_argument("--pack-length", type=int, default=0)
    a = ap.parse_args()
    dist = bw.load_lengths(a.lengths)
    figures = {layout: [] for layout in bw.LAYOUTS}
    for seed in range(a.batches):
        ex = bw.sample_examples(dist, accum=a.accum, micro_batch=a.micro_batch,
                                max_prompt=a.prompt_len, max_completion=a.completion_len,
                                vocab_size=100, seed=seed)
        for layout in bw.LAYOUTS:
            _, count = bw.layout_batch(ex, layout, bucket=a.bucket,
                                       pack_length=0 if layout == "padded" else a.pack_length)
            figures[layout].append((count.token_efficiency, count.fill, count.rows, count.row_length))
    for layout, rows in figures.items():
        f = np.array(rows)
        stat = lambda x: {"mean": round(float(x.mean()), 4), "p10": round(float(np.percentile(x, 10)), 4),
                          "p90": round(float(np.percentile(x, 90)), 4)}
        print(json.dumps({"layout": layout, "lengths": a.lengths, "batches": a.batches,
                          "micro_batch": a.micro_batch, "accum": a.accum,
                          "token_efficiency": stat(f[:, 0]), "fill": stat(f[:, 1]),
                          "mean_rows": round(float(f[:, 2].mean()), 2),
                          "mean_row_length": round(float(f[:, 3].mean()), 1)}))


if __name__ == "__main__":
    main()
