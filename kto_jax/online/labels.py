"""Verdicts -> training examples, in the data pipeline's formats (kto_jax/data/formats.py).

A sample is {"prompt_id", "sample", "prompt", "completion", "score"}; the judge's
score is the verdict (a binary judge gives 1 or 0). Three rules (config.online.labeling):

  threshold     every sample is one unpaired example, desirable iff score > threshold:
                the paper's binary feedback (section 5), what KTO is for.
  top_bottom_k  per prompt, the k best samples are desirable and the k worst undesirable
                (ties broken by sample index); a prompt whose samples all score the same
                gives nothing: there is no signal in it.
  pairs         per prompt, (best, worst) as (chosen, rejected) for paired losses (DPO...);
                skipped when best and worst score the same.

A sample the judge gave no score (None, NaN, missing) is labelled None: not trained on,
not counted in pass rates, counted as unscored in the round's row (kto_jax/online/report.py).
An empty completion (the policy ended at once, or produced only special tokens) is kept:
the data pipeline reads it as its end-of-sequence token alone (`empty_completions`).

Pure functions: the same samples always give the same examples, so a resumed round
rebuilds exactly the data it trained on.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Sequence

Sample = dict[str, Any]


def passes(score: float, threshold: float) -> bool:
    """Whether a verdict counts as a pass (desirable; the pass rate's success)."""
    return score > threshold


def scored(sample: Sample) -> bool:
    """Whether the judge gave `sample` a verdict: a finite number."""
    score = sample.get("score")
    return (isinstance(score, (int, float)) and not isinstance(score, bool)
            and math.isfinite(float(score)))


def as_completion(prompt: Any, text: str) -> Any:
    """The completion in the prompt's format: a message list for a conversational prompt."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def by_prompt(samples: Sequence[Sample]) -> list[list[Sample]]:
    """The scored samples grouped per prompt_id (in prompt order), each group ranked best
    first (score descending, then sample index ascending)."""
    groups: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        if scored(s):
            groups[int(s["prompt_id"])].append(s)
    return [sorted(groups[p], key=lambda s: (-float(s["score"]), int(s["sample"])))
            for p in sorted(groups)]


def labels(samples: Sequence[Sample], labeling: str, threshold: float, k: int
           ) -> list[bool | None]:
    """Per sample: True (desirable), False (undesirable) or None (not trained on: no
    verdict, or not among a prompt's best and worst)."""
    if labeling == "threshold":
        return [passes(float(s["score"]), threshold) if scored(s) else None for s in samples]
    out: dict[tuple[int, int], bool] = {}
    top = k if labeling == "top_bottom_k" else 1
    for group in by_prompt(samples):
        if float(group[0]["score"]) == float(group[-1]["score"]):
            continue
        for s in group[:top]:
            out[(int(s["prompt_id"]), int(s["sample"]))] = True
        for s in group[-top:]:
            out[(int(s["prompt_id"]), int(s["sample"]))] = False
    return [out.get((int(s["prompt_id"]), int(s["sample"]))) for s in samples]


def examples(samples: Sequence[Sample], sample_labels: Sequence[bool | None], labeling: str
             ) -> list[dict]:
    """The rows the data pipeline trains on: unpaired {prompt, completion, label}, or for
    "pairs" {prompt, chosen, rejected} with the best and worst labelled sample of a prompt."""
    labelled = [(s, lab) for s, lab in zip(samples, sample_labels) if lab is not None]
    if labeling != "pairs":
        return [{"prompt": s["prompt"], "completion": as_completion(s["prompt"], s["completion"]),
                 "label": bool(lab)} for s, lab in labelled]
    chosen = {int(s["prompt_id"]): s for s, lab in labelled if lab}
    rejected = {int(s["prompt_id"]): s for s, lab in labelled if not lab}
    return [{"prompt": chosen[p]["prompt"],
             "chosen": as_completion(chosen[p]["prompt"], chosen[p]["completion"]),
             "rejected": as_completion(chosen[p]["prompt"], rejected[p]["completion"])}
            for p in sorted(chosen) if p in rejected]
