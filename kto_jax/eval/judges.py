"""Pluggable judges: is a generation better than the reference (SFT-target) completion?

Every judge answers `compare(prompts, candidates, references) -> [1 | 0.5 | 0]`
(candidate wins, tie, loses), the paper's "winrate vs SFT target" (section 3.3).
Four kinds, chosen by a spec string (`make_judge`, `kto-jax eval --judge SPEC`):

  module:function          a Python function, imported. Two parameters
                           (prompt, completion) -> number: a pointwise score, the
                           higher score wins, equal scores tie. Three parameters
                           (prompt, candidate, reference) -> 1 / 0.5 / 0: pairwise.
  reward-model:PATH        a reward model scores each completion; the higher wins.
                           PATH an HF *ForSequenceClassification directory (scored
                           with transformers + torch, logit 0), or any model kto-jax
                           loads (HF causal LM dir or .gguf): the mean per-token
                           log-prob of the completion given the prompt.
  http[:MODEL]             an OpenAI-compatible chat-completions endpoint asked "A, B
                           or TIE?" (kto_jax/eval/http_client.py: concurrent requests,
                           retries with back-off, timeouts); base URL, model and key
                           from the environment:
                           KTO_JAX_JUDGE_BASE_URL (default https://api.openai.com/v1),
                           KTO_JAX_JUDGE_MODEL (or :MODEL), KTO_JAX_JUDGE_API_KEY or
                           OPENAI_API_KEY. The two answers' order is shuffled per item
                           (seeded) against position bias.

Prompts reach judges as text: message lists are flattened to "role: content" lines.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import random
from typing import Any, Callable, Protocol, Sequence

from kto_jax.errors import UserError
from kto_jax.eval.http_client import ChatJudgeClient, chat

Outcome = float  # 1: candidate better, 0.5: tie, 0: reference better


class Judge(Protocol):
    name: str

    def compare(self, prompts: Sequence[str], candidates: Sequence[str],
                references: Sequence[str]) -> list[Outcome]: ...


def prompt_text(prompt: str | list) -> str:
    """A prompt as plain text: strings as they are, message lists as 'role: content' lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in prompt)


def outcome_of_scores(candidate: float, reference: float) -> Outcome:
    return 1.0 if candidate > reference else 0.0 if candidate < reference else 0.5


# ---------------------------------------------------------------- function judges

class ScoreJudge:
    """Pointwise scores -> pairwise outcomes (the higher score wins, equal ties)."""

    def __init__(self, score_fn: Callable[[Sequence[str], Sequence[str]], list[float]], name: str):
        self._score_fn, self.name = score_fn, name

    def scores(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """One float per completion; a judge's None (no verdict) is NaN."""
        return [self._verdict(s) for s in self._score_fn(list(prompts), list(completions))]

    def _verdict(self, value: Any) -> float:
        if value is None:
            return float("nan")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"judge {self.name} returned {value!r}; a score judge returns a "
                            "number (or None for no verdict)") from None

    def compare(self, prompts, candidates, references) -> list[Outcome]:
        cand = self.scores(prompts, candidates)
        ref = self.scores(prompts, references)
        missing = sum(1 for c, r in zip(cand, ref) if math.isnan(c) or math.isnan(r))
        if missing:
            raise UserError(f"judge {self.name} gave no score (None or NaN) in {missing} of "
                            f"{len(cand)} comparisons; a winrate needs every verdict")
        return [outcome_of_scores(c, r) for c, r in zip(cand, ref)]


class PairwiseFunctionJudge:
    """A function (prompt, candidate, reference) -> 1 / 0.5 / 0, called per item."""

    def __init__(self, fn: Callable[[str, str, str], float], name: str):
        self._fn, self.name = fn, name

    def compare(self, prompts, candidates, references) -> list[Outcome]:
        out = [float(self._fn(p, c, r)) for p, c, r in zip(prompts, candidates, references)]
        bad = [o for o in out if o not in (0.0, 0.5, 1.0)]
        if bad:
            raise UserError(f"judge {self.name} returned {bad[0]!r}; a pairwise judge function "
                            "must return 1 (candidate better), 0.5 (tie) or 0 (reference better)")
        return out


def import_function(spec: str) -> Callable:
    """The object `function` of `module:function` (module importable from sys.path)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"judge {spec!r}: expected 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"judge {spec!r}: cannot import module {module_name!r} ({e}); make it "
                        "importable (e.g. PYTHONPATH=.)") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"judge {spec!r}: {module_name} has no function {attr!r}")
    return fn


def function_judge(spec: str) -> Judge:
    """A ScoreJudge (2 parameters) or a PairwiseFunctionJudge (3 parameters) from module:function."""
    fn = import_function(spec)
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(params) == 2:
        return ScoreJudge(lambda ps, cs: [fn(p, c) for p, c in zip(ps, cs)], spec)
    if len(params) == 3:
        return PairwiseFunctionJudge(fn, spec)
    raise UserError(f"judge {spec!r} takes {len(params)} required parameters; expected "
                    "(prompt, completion) -> score or (prompt, candidate, reference) -> 1/0.5/0")


# ---------------------------------------------------------------- reward models

def reward_model_judge(path: str, batch_size: int = 8, *, mesh: Any = None, rules: Any = None) -> Judge:
    """A ScoreJudge from an HF sequence-classification dir or a kto-jax-loadable causal LM
    (the latter placed on `mesh` by `rules` when given, e.g. a training run's mesh)."""
    config_path = os.path.join(path, "config.json")
    archs: list[str] = []
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            archs = json.load(f).get("architectures") or []
    elif not str(path).endswith(".gguf"):
        raise UserError(f"reward model {path!r}: expected an HF directory with config.json or a .gguf file")
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return ScoreJudge(_sequence_classifier_scores(path, batch_size), f"reward-model:{path}")
    return ScoreJudge(_causal_lm_scores(path, batch_size, mesh, rules), f"reward-model:{path}")


def _judge_texts(tokenizer: Any, prompts: Sequence[str], completions: Sequence[str]) -> list[str]:
    """The conversation a reward model reads: its chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template([{"role": "user", "content": p},
                                               {"role": "assistant", "content": c}], tokenize=False)
                for p, c in zip(prompts, completions)]
    return [f"{p}\n{c}" for p, c in zip(prompts, completions)]


def _sequence_classifier_scores(path: str, batch_size: int):
    try:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
    except ImportError as e:
        raise UserError(f"reward model {path!r} is a sequence classifier, scored with PyTorch: "
                        f"pip install torch ({e})") from e
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def scores(prompts, completions):
        texts, out = _judge_texts(tokenizer, prompts, completions), []
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True)
            with torch.no_grad():
                out.extend(model(**enc).logits[:, 0].float().tolist())
        return out

    return scores


def _causal_lm_scores(path: str, batch_size: int, mesh: Any = None, rules: Any = None):
    """Mean per-token log p(completion | prompt) under a causal LM loaded by kto-jax."""
    from kto_jax.eval.logprob_scoring import SequenceScorer
    scorer = SequenceScorer.load(path, batch_size=batch_size, mesh=mesh, rules=rules)

    def scores(prompts, completions):
        logps, counts = scorer.logps([[{"role": "user", "content": p}] if scorer.has_chat else p
                                      for p in prompts], completions)
        return [lp / max(n, 1) for lp, n in zip(logps, counts)]

    return scores


# ---------------------------------------------------------------- HTTP (OpenAI-compatible)

JUDGE_SYSTEM = ("You are a careful evaluator of AI assistant responses. Judge which response "
                "is more helpful, harmless and concise for the user's request.")
JUDGE_TEMPLATE = """[User request]
{prompt}

[Response A]
{a}

[Response B]
{b}

Which response is better? Answer with exactly one word: A, B, or TIE."""


def parse_pairwise(text: str) -> str | None:
    """"A", "B" or "TIE" from a pairwise judge's answer; None when it is none of them."""
    verdict = text.strip().strip(".*\"' ").upper().split()[:1]
    return verdict[0] if verdict in (["A"], ["B"], ["TIE"]) else None


class HTTPJudge(ChatJudgeClient):
    """Pairwise judgments from an OpenAI-compatible /chat/completions endpoint, sent through
    the shared client (kto_jax/eval/http_client.py: bounded pool, retries with back-off,
    timeouts, every answer once). An answer other than A, B or TIE counts as a tie and in
    `invalid_answers`."""

    def __init__(self, base_url: str, model: str, api_key: str | None, *, seed: int = 0,
                 timeout: float = 60.0, max_retries: int = 3, workers: int = 4, **kw: Any):
        super().__init__(base_url, model, api_key, timeout=timeout, retries=max_retries,
                         workers=workers, **kw)
        self.seed = seed
        self.invalid_answers = 0

    def swapped(self, index: int) -> bool:
        """Whether item `index` shows the candidate as Response B (seeded, against position bias)."""
        return random.Random(self.seed * 1_000_003 + index).random() < 0.5

    def compare(self, prompts, candidates, references) -> list[Outcome]:
        swaps = [self.swapped(i) for i in range(len(prompts))]
        requests = [chat(JUDGE_SYSTEM, JUDGE_TEMPLATE.format(prompt=p, a=r if swap else c,
                                                             b=c if swap else r))
                    for p, c, r, swap in zip(prompts, candidates, references, swaps)]
        out = []
        for verdict, swap in zip(self.ask(requests, parse_pairwise), swaps):
            if verdict is None:
                self.invalid_answers += 1
            out.append(0.5 if verdict in (None, "TIE") else float((verdict == "A") != swap))
        return out


# ---------------------------------------------------------------- the spec

def make_judge(spec: str) -> Judge:
    """A judge from its spec string (see the module docstring)."""
    if spec == "http" or spec.startswith("http:") and not spec.startswith("http://"):
        return HTTPJudge.from_env(spec.partition(":")[2] or None)
    if spec.startswith("reward-model:"):
        return reward_model_judge(spec.partition(":")[2])
    if ":" in spec:
        return function_judge(spec)
    raise UserError(f"unknown judge {spec!r}: use module:function, reward-model:PATH or http[:MODEL]")
