"""Pointwise judges for online rounds: a spec string -> `scores(prompts, completions)`.

The specs are `kto-jax eval --judge`'s (kto_jax/eval/judges.py), read pointwise, since
an online sample is judged on its own:
  module:function    a function (prompt, completion) -> score (a 3-parameter pairwise
                     function has nothing to compare a lone sample with: refused)
  reward-model:PATH  a reward model's score (kto_jax/eval/judges.py loads it, in this
                     process; a causal LM kto-jax loads goes on the policy's mesh)
  http[:MODEL]       an OpenAI-compatible endpoint asked YES/NO per sample
                     (kto_jax/online/http_judge.py)
Prompts reach judges as text: message lists flattened to "role: content" lines.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

from kto_jax.errors import UserError
from kto_jax.eval import judges as eval_judges
from kto_jax.online.http_judge import HTTPPointwiseJudge
from kto_jax.online.settings import OnlineSettings

prompt_text = eval_judges.prompt_text


class PointwiseJudge(Protocol):
    name: str

    def scores(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]: ...


def make_pointwise_judge(spec: str, settings: OnlineSettings, *, mesh: Any = None,
                         rules: Any = None) -> PointwiseJudge:
    """The judge of `spec` (see the module docstring); UserError for a pairwise-only one.
    `mesh` and `rules` (the training run's) place a kto-jax-loaded reward model."""
    if spec == "http" or spec.startswith("http:") and not spec.startswith("http://"):
        return HTTPPointwiseJudge.from_env(spec.partition(":")[2] or None,
                                           workers=settings.judge_workers,
                                           timeout=settings.judge_timeout,
                                           retries=settings.judge_retries)
    if spec.startswith("reward-model:"):
        return eval_judges.reward_model_judge(spec.partition(":")[2], mesh=mesh, rules=rules)
    judge = eval_judges.make_judge(spec)
    if not hasattr(judge, "scores"):
        raise UserError(f"online.judge={spec!r} compares two answers; online rounds judge each "
                        "sample alone: give a function (prompt, completion) -> score, "
                        "reward-model:PATH or http[:MODEL]")
    return judge
