"""Winrate of a policy's generations against a dataset's reference completions.

The paper's headline evaluation (section 3.3, Fig. 3): for each held-out prompt,
generate a completion and ask a judge whether it beats the completion that would
have been the SFT target. Here the target of a prompt is its first desirable
completion in the feedback file (unpaired: label true; scored: score above
data.score_threshold; paired: chosen). Prompts without one are skipped (counted).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from kto_jax.data import formats
from kto_jax.data.readers import read_rows
from kto_jax.eval import stats
from kto_jax.eval.judges import Judge, prompt_text
from kto_jax.eval.sampling import Generation, Sampler, SamplingSettings


@dataclasses.dataclass(frozen=True)
class Target:
    prompt: Any          # str or a message list, as in the file
    reference: str       # the SFT-target completion as text


def completion_text(completion: Any) -> str:
    """A completion's text: strings as they are, message lists as their assistant contents."""
    if isinstance(completion, str):
        return completion
    return "\n".join(m.get("content", "") for m in completion if m.get("role", "assistant") == "assistant")


def _key(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else repr(prompt)


def reference_targets(path: str, *, split: str = "test", score_threshold: float = 0.0,
                      limit: int | None = None) -> tuple[list[Target], int]:
    """(one Target per distinct prompt that has a desirable completion, prompts without one)."""
    rows = read_rows(path, split=split, config_key="--data")
    fmt, conversational = formats.detect_format(rows)
    if fmt == "paired":
        examples = formats.unpair(formats.normalise_pairs(rows, conversational), one_y_per_x=False, seed=0)
    else:
        examples = formats.normalise_unpaired(rows, fmt, conversational, score_threshold=score_threshold)
    order: dict[str, Any] = {}
    targets: dict[str, Target] = {}
    for ex in examples:
        order.setdefault(_key(ex.prompt), ex.prompt)
        if ex.desirable and _key(ex.prompt) not in targets:
            targets[_key(ex.prompt)] = Target(ex.prompt, completion_text(ex.completion))
    found = [targets[k] for k in order if k in targets]
    skipped = len(order) - len(found)
    return (found[:limit] if limit else found), skipped


@dataclasses.dataclass
class WinrateResult:
    winrate: stats.Rate
    outcomes: list[float]
    generations: list[Generation]
    targets: list[Target]
    judge: str

    def as_dict(self) -> dict:
        return {"judge": self.judge, "winrate": self.winrate.as_dict(), "items": [
            {"prompt": t.prompt, "reference": t.reference, "generation": g.text,
             "finished": g.finished, "outcome": o}
            for t, g, o in zip(self.targets, self.generations, self.outcomes)]}


def judge_winrate(judge: Judge, targets: Sequence[Target], generations: Sequence[Generation],
                  confidence: float = stats.DEFAULT_CONFIDENCE) -> WinrateResult:
    """Judges each generation against its target; winrate with its Wilson interval."""
    prompts = [prompt_text(t.prompt) for t in targets]
    outcomes = judge.compare(prompts, [g.text for g in generations], [t.reference for t in targets])
    return WinrateResult(stats.winrate(outcomes, confidence), list(outcomes), list(generations),
                         list(targets), judge.name)


def generate_and_judge(sampler: Sampler, judge: Judge, targets: Sequence[Target],
                       settings: SamplingSettings, seed: int = 0) -> WinrateResult:
    """One generation per target prompt, then `judge_winrate`."""
    generations = sampler.generate([t.prompt for t in targets], settings, seed=seed)
    return judge_winrate(judge, targets, generations)
