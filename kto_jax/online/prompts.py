"""The prompts of an online run: the files, the held-out split and each round's draw.

A prompt file is JSONL with a "prompt" per line: a string (plain text) or a list of
{"role", "content"} messages (conversational; rendered with the chat template, as
`kto-jax sample` and the data pipeline do). Every choice here is seeded, so a
resumed run draws the same prompts.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from kto_jax.errors import UserError
from kto_jax import fs as paths

Prompt = str | list


@dataclasses.dataclass(frozen=True)
class PromptSets:
    """Training prompts (sampled and trained on) and held-out prompts (evaluation only)."""
    train: list[Prompt]
    heldout: list[Prompt]
    note: str  # where the held-out prompts come from, for the log


def read_prompts(path: str, what: str = "online.prompts_path") -> list[Prompt]:
    """The "prompt" of every JSONL line of `path`; UserError naming the line of a bad one."""
    if not paths.exists(path):
        raise UserError(f"{what}={path!r} does not exist")
    prompts = []
    for number, line in enumerate(paths.read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: invalid JSON ({e.msg})") from None
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not (isinstance(prompt, str) and prompt) and not (isinstance(prompt, list) and prompt):
            raise UserError(f"{path}:{number}: expected an object with a non-empty \"prompt\" "
                            "string or message list")
        prompts.append(prompt)
    if not prompts:
        raise UserError(f"{what}={path!r} holds no prompts")
    return prompts


def prompt_sets(prompts_path: str, heldout_path: str, heldout_fraction: float,
                seed: int) -> PromptSets:
    """The training and held-out prompts: heldout_path's, or a seeded fraction of prompts_path."""
    prompts = read_prompts(prompts_path)
    if heldout_path:
        return PromptSets(prompts, read_prompts(heldout_path, "online.heldout_prompts_path"),
                          f"held-out prompts from {heldout_path}")
    n_heldout = max(1, int(round(len(prompts) * heldout_fraction)))
    if n_heldout >= len(prompts):
        raise UserError(f"online.heldout_fraction={heldout_fraction} of {len(prompts)} prompts "
                        "leaves none to train on: add prompts or lower the fraction")
    order = np.random.default_rng([seed, 7]).permutation(len(prompts))
    held = set(order[:n_heldout].tolist())
    return PromptSets([p for i, p in enumerate(prompts) if i not in held],
                      [p for i, p in enumerate(prompts) if i in held],
                      f"{n_heldout} of {len(prompts)} prompts held out (online.heldout_fraction="
                      f"{heldout_fraction}, seed {seed})")


def round_prompt_ids(num_prompts: int, per_round: int, seed: int, round_index: int) -> list[int]:
    """Indices of the training prompts round `round_index` samples: all of them when
    per_round is 0 (or too large), else a draw without replacement seeded by (seed, round)."""
    if per_round <= 0 or per_round >= num_prompts:
        return list(range(num_prompts))
    rng = np.random.default_rng([seed, round_index])
    return sorted(rng.choice(num_prompts, size=per_round, replace=False).tolist())
