"""What the demo prints and writes: the before/after table, examples, caveats, a plot.

Numbers in the table:
  pass rate      share of held-out completions the rule accepts, with its 90%
                 Wilson interval (kto_jax.eval.stats); n = held-out completions.
  KL to ref      Monte-Carlo estimate of KL(pi_theta || pi_ref) over the generated
                 completions (at most max_new_tokens tokens): the mean over the
                 after-samples of log pi_theta(y|x) - log pi_ref(y|x), in nats; the
                 samples are plain temperature-1 draws from pi_theta, so the estimate
                 is unbiased. Before training the policy IS the reference: 0.
  reward margin  the trainer's held-out evaluation on the before-samples of the
                 held-out prompts labelled by the rule: mean implied reward
                 beta log pi_theta/pi_ref of thumbs-up minus thumbs-down
                 completions, and its reward accuracy. 0 before training.
"""

from __future__ import annotations

import json
import os
import textwrap
from typing import Any

from kto_jax.demo import rule
from kto_jax.eval.stats import Rate

PLOT_FILE = "training_curves.png"


def _opening_words(texts: list[str]) -> float:
    counts = [len(rule.first_sentence(t)[0].split()) for t in texts]
    return sum(counts) / max(len(counts), 1)


def table(before: Rate, after: Rate, kl: float, eval_metrics: dict, before_texts: list[str],
          after_texts: list[str], steps: int) -> str:
    """The before/after table (plain text, also valid Markdown)."""
    margin = eval_metrics.get("rewards/margins")
    accuracy = eval_metrics.get("rewards/accuracies")
    rows = [
        ("", "before (reference)", f"after KTO ({steps} steps)"),
        ("---", "---", "---"),
        ("judge pass rate, held-out (90% CI)", _rate(before), _rate(after)),
        ("KL(policy || reference), nats", "0 (same model)", f"{kl:.2f}"),
        ("reward margin, held-out feedback", "0 (same model)", "n/a" if margin is None else f"{margin:+.3f}"),
        ("reward accuracy, held-out feedback", "-", "n/a" if accuracy is None else f"{100 * accuracy:.0f}%"),
        ("mean words in opening sentence", f"{_opening_words(before_texts):.1f}",
         f"{_opening_words(after_texts):.1f}"),
    ]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("| " + " | ".join(c.ljust(w) if c != "---" else "-" * w for c, w in zip(r, width)) + " |"
                     for r in rows)


def _rate(r: Rate) -> str:
    return f"{100 * r.rate:.1f}% [{100 * r.low:.1f}, {100 * r.high:.1f}] (n={r.n})"


def examples(prompts: list[Any], before: list[str], after: list[str], count: int = 3,
             stride: int = 1) -> str:
    """The first sample of the first `count` held-out prompts (samples come `stride` per
    prompt), before and after, with the rule's verdicts: a fixed choice, not a selection."""
    lines = []
    for prompt, b, a in list(zip(prompts, before, after))[::stride][:count]:
        text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        lines.append(f"prompt: {text}")
        lines.append(f"  before [{'up' if rule.passes(b) else 'down'}]: {_one_line(b)}")
        lines.append(f"  after  [{'up' if rule.passes(a) else 'down'}]: {_one_line(a)}")
    return "\n".join(lines)


def _one_line(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."


def _fill(text: str) -> str:
    return textwrap.fill(text, 88, break_on_hyphens=False)


def verdict(before: Rate, after: Rate) -> str:
    """One sentence on whether the change is outside the noise of the two intervals."""
    if after.low > before.high:
        return _fill("The held-out pass rate rose and the two 90% intervals do not overlap: the "
                "change is larger than the sampling noise of this evaluation.")
    if after.rate > before.rate:
        return _fill("The held-out pass rate rose, but the 90% intervals overlap: on this many "
                "held-out samples the change is not clearly outside the noise.")
    return "The held-out pass rate did not rise on this run."


def caveats(model_name: str, size_name: str, n_heldout: int, n_feedback: int, steps: int) -> str:
    does = (f"What this demo does: {model_name} labelled {n_feedback} of its own samples thumbs "
            f"up/down with the rule \"{rule.DESCRIPTION}\", took {steps} KTO steps of the real "
            f"trainer on them, and was sampled again on {n_heldout} completions of prompts it never "
            "trained on, with the same seed as before training. The pass-rate row and its 90% "
            "intervals are the evidence of what changed; the line above the examples says whether "
            "the change is outside the noise; the KL row says how far the policy moved from the "
            "reference to get there.")
    does_not = ("What it does not show: that the answers became better in general (the judge is "
                "a word-counting rule, which a model can satisfy with a bland or odd opener: read "
                "the examples); anything about larger models, human feedback or the paper's "
                "benchmarks (docs/reproduction.md has the larger comparison); robustness across "
                f"seeds (one seed: rerun with --seed to see the spread). Size '{size_name}'; the "
                "numbers vary a little across CPU types and library versions.")
    return _fill(does) + "\n" + _fill(does_not)


def write_plot(run_dir: str, out_path: str, model_name: str) -> str | None:
    """Training curves from the run's metrics.jsonl as a PNG; None when matplotlib is absent."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from kto_jax.train.metrics import read_jsonl
    from kto_jax.train.workdir import EVAL_METRICS_FILE, METRICS_FILE
    train = read_jsonl(os.path.join(run_dir, METRICS_FILE))
    evals = read_jsonl(os.path.join(run_dir, EVAL_METRICS_FILE))
    steps = [r["step"] for r in train]
    panels = [("loss", ["loss"]), ("implied rewards (beta log pi/pi_ref)",
                                   ["rewards/desirable", "rewards/undesirable"]),
              ("reward margin", ["rewards/margins"]), ("KL estimate z0", ["kl"])]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            ax.plot(steps, [r.get(key) for r in train], marker=".", label=f"train {key}")
            ev = [(r["step"], r[key]) for r in evals if r.get(key) is not None]
            if ev:
                ax.plot(*zip(*ev), "s", label=f"held-out {key}")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.suptitle(f"kto-jax demo: KTO on {model_name}, rule-judged feedback")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def write_results(path: str, results: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, default=str)
