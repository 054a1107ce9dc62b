"""log pi(y|x) of given completions under a model, for judges and KL estimates.

Uses the training code's own log-prob function (`kto_jax.models.logprobs.sequence_logps`):
prompts left-padded to P, completions right-padded to C, both rounded up to a
multiple of `length_multiple`, batches of `batch_size` rows (filler rows score 0),
one jitted program per (P, C). The same scorer evaluates several weight sets of one
architecture (e.g. the policy and the reference) by passing `params`.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kto_jax.eval.sampling import Prompt, encode_prompts, left_pad
from kto_jax.models.logprobs import DEFAULT_VOCAB_CHUNK, sequence_logps
from kto_jax.models.transformer import Transformer


def right_pad(rows: Sequence[Sequence[int]], length: int, batch: int, pad_id: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """int32 [batch, length] ids and mask, each row RIGHT-padded (truncated at `length`)."""
    ids = np.full((batch, length), pad_id, np.int32)
    mask = np.zeros((batch, length), np.int32)
    for i, row in enumerate(rows):
        row = list(row)[:length]
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return ids, mask


def _round_up(n: int, multiple: int) -> int:
    return -(-max(n, 1) // multiple) * multiple


class SequenceScorer:
    """Sequence log-probs of (prompt, completion) pairs under a kto-jax Transformer."""

    def __init__(self, model: Transformer, tokenizer: Any, *, batch_size: int = 8,
                 length_multiple: int = 32, vocab_chunk: int = DEFAULT_VOCAB_CHUNK):
        self.graphdef, self.params = nnx.split(model, nnx.Param)
        self.tokenizer = tokenizer
        self.batch_size, self.length_multiple = batch_size, length_multiple
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else 0)

        def score(params, prompt_ids, prompt_mask, completion_ids, completion_mask):
            return sequence_logps(nnx.merge(self.graphdef, params), prompt_ids, prompt_mask,
                                  completion_ids, completion_mask, vocab_chunk=vocab_chunk)

        self._score = jax.jit(score)

    @classmethod
    def load(cls, path: str, *, mesh: Any = None, rules: Any = None, **kw) -> "SequenceScorer":
        """The scorer of the model at `path`, its weights on `mesh` by `rules` (default: one device)."""
        from kto_jax.models import from_pretrained, load_tokenizer
        model, _ = from_pretrained(path, mesh=mesh, rules=rules)
        return cls(model, load_tokenizer(path), **kw)

    @property
    def has_chat(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def logps_ids(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                  params: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """(float64 [N] log pi(y|x), [N] completion token counts) for token-id pairs."""
        params = self.params if params is None else params
        logps, counts = [], []
        for start in range(0, len(prompt_ids), self.batch_size):
            prompts = prompt_ids[start:start + self.batch_size]
            completions = completion_ids[start:start + self.batch_size]
            p = _round_up(max(len(r) for r in prompts), self.length_multiple)
            c = _round_up(max(len(r) for r in completions), self.length_multiple)
            pi, pm = left_pad(prompts, p, self.batch_size, self.pad_id)
            ci, cm = right_pad(completions, c, self.batch_size, self.pad_id)
            lp, n = jax.device_get(self._score(params, jnp.asarray(pi), jnp.asarray(pm),
                                               jnp.asarray(ci), jnp.asarray(cm)))
            logps.extend(np.asarray(lp, np.float64)[:len(prompts)])
            counts.extend(np.asarray(n)[:len(prompts)])
        return np.asarray(logps), np.asarray(counts)

    def logps(self, prompts: Sequence[Prompt], completions: Sequence[str], chat: bool = False,
              params: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Log-probs of completion texts after prompts rendered as the data pipeline does."""
        prompt_ids = encode_prompts(self.tokenizer, prompts, chat)
        completion_ids = [list(self.tokenizer(c, add_special_tokens=False)["input_ids"])
                          for c in completions]
        return self.logps_ids(prompt_ids, completion_ids, params)
