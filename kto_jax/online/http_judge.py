"""The HTTP judge of online rounds: one pointwise verdict per sample, under load.

Each sample is one request to an OpenAI-compatible /chat/completions endpoint asking
whether the response is good ("YES" or "NO"; a bare number in [0, 1] is taken as a
score). The requests go through the client `kto-jax eval --judge http` uses too
(kto_jax/eval/http_client.py): a bounded pool, request ids, retries with back-off,
timeouts, no verdict lost or counted twice, and `JudgeFailed` carrying the verdicts
received when a request runs out of retries (the runner saves them before stopping).
An answer that is neither YES, NO nor a score is malformed, and retried.

Base URL, model and key come from the environment as for `kto-jax eval --judge http`
(KTO_JAX_JUDGE_BASE_URL, KTO_JAX_JUDGE_MODEL, KTO_JAX_JUDGE_API_KEY / OPENAI_API_KEY).
"""

from __future__ import annotations

import re
from typing import Sequence

from kto_jax.eval.http_client import ChatJudgeClient, JudgeFailed, MalformedAnswer, chat

__all__ = ["HTTPPointwiseJudge", "JudgeFailed", "MalformedAnswer", "parse_verdict"]

POINTWISE_SYSTEM = ("You are a careful evaluator of AI assistant responses. Decide whether the "
                    "response is helpful, harmless and concise for the user's request.")
POINTWISE_TEMPLATE = """[User request]
{prompt}

[Response]
{completion}

Is this a good response? Answer with exactly one word: YES or NO."""


def parse_verdict(text: str) -> float:
    """1.0 for YES, 0.0 for NO, a bare number in [0, 1] as it is; MalformedAnswer otherwise."""
    word = text.strip().strip(".*\"'` ").split()
    if not word:
        raise MalformedAnswer("empty answer")
    head = word[0].strip(".,:;!*\"'`").upper()
    if head in ("YES", "GOOD", "PASS"):
        return 1.0
    if head in ("NO", "BAD", "FAIL"):
        return 0.0
    if re.fullmatch(r"[01](\.\d+)?", head) and 0.0 <= float(head) <= 1.0:
        return float(head)
    raise MalformedAnswer(f"answer {text[:80]!r} is neither YES nor NO")


class HTTPPointwiseJudge(ChatJudgeClient):
    """Pointwise verdicts from a chat-completions endpoint; see the module docstring."""

    MODEL_HINT = "use --config.online.judge=http:MODEL"

    def scores(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """One verdict per (prompt, completion), in order; JudgeFailed when one request
        exhausts its retries (the verdicts received by then ride on the exception)."""
        return self.ask([chat(POINTWISE_SYSTEM, POINTWISE_TEMPLATE.format(prompt=p, completion=c))
                         for p, c in zip(prompts, completions)], parse_verdict)
