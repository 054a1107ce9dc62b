"""The demo's transparent judge: does the answer open with a crisp sentence?

Rule: the completion's first sentence ends (., ! or ? followed by a space or the
end, or a line break) within the generated text and has between MIN_WORDS and
MAX_WORDS words. Thumbs up if so, thumbs down otherwise.

Why this property:
  - SmolLM2-135M-Instruct often misses it: sampled at temperature 1 it opens with
    a long, winding sentence ("The answer to that question lies within the science
    at the source of the product.") about 60% of the time;
  - it is decided by the first few dozen tokens, so the demo can generate and
    train on short completions and still judge them exactly, which is what makes a
    real 135M-parameter KTO run fit in minutes on two CPU cores;
  - those early tokens are where a sequence-level objective like KTO's moves the
    distribution fastest, so a few dozen steps can teach it;
  - anyone can check a verdict by counting words: no model-based judge to trust.
The lower bound keeps one- or two-word exclamations ("Ah, gravity.") from
counting as an answer's opening sentence.
"""

from __future__ import annotations

import re

MIN_WORDS = 3
MAX_WORDS = 12
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")

DESCRIPTION = (f"the answer opens with a complete sentence of {MIN_WORDS} to {MAX_WORDS} words "
               "(a crisp first sentence)")


def first_sentence(text: str) -> tuple[str, bool]:
    """(the first sentence of `text`, whether it ended within the text)."""
    stripped = text.strip()
    match = _SENTENCE_END.search(stripped)
    if match is None:
        return stripped, False
    return stripped[:match.end()].strip(), True


def passes(text: str) -> bool:
    """Thumbs up: the opening sentence ends and has MIN_WORDS..MAX_WORDS words."""
    sentence, ended = first_sentence(text)
    return ended and MIN_WORDS <= len(sentence.split()) <= MAX_WORDS


def score(prompt: str, completion: str) -> float:
    """The rule as a pointwise judge for `kto-jax eval --judge kto_jax.demo.rule:score`."""
    return float(passes(completion))
