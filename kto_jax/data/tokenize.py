"""Examples -> token ids: chat-template rendering, truncation, the prefix guarantee.

Prompt and completion are tokenized separately, so the prompt tokens are a prefix
of prompt+completion by construction and the completion tokens are exactly what
follows the prompt tokens at generation time. Conversational examples are rendered
with the tokenizer's chat template: the prompt with `add_generation_prompt=True`,
the completion as the text the full conversation adds after it. When the template
renders the prompt differently once the completion follows (so no such split
exists), the example is reported with the reason and dropped, or raised with
`data.on_prefix_mismatch="error"`.

Lengths: a prompt longer than `max_length` tokens is overlong (dropped and counted,
or an error with `data.on_overlong="error"`); other prompts lose their LEFT end
down to `max_prompt_length`; completions lose their right end down to what remains
of `max_length` (and to `max_completion_length` when set). Every drop and truncation is counted in a `TokenReport`.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from kto_jax.data.formats import Pair
from kto_jax.errors import UserError

_CHUNK = 1024
_LISTED = 5


class Ragged:
    """Variable-length int32 token lists stored flat (cheap to pickle to grain workers)."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        self.flat, self.offsets = flat, offsets

    @classmethod
    def from_lists(cls, seqs) -> "Ragged":
        lengths = np.fromiter((len(s) for s in seqs), np.int64, len(seqs))
        offsets = np.zeros(len(seqs) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter(itertools.chain.from_iterable(seqs), np.int32, int(offsets[-1]))
        return cls(flat, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.flat[self.offsets[i]:self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


@dataclasses.dataclass
class TokenizedSplit:
    """Token ids of one split, ready for batching.

    Attributes:
      prompts: N prompt id lists (already left-truncated).
      completions: (completions,) for unpaired data, (chosen, rejected) for pairs.
      label: bool [N], desirable (all True for pairs, unused there).
      weight: f32 [N], per-example weight.
      where: N source locations.
    """
    prompts: Ragged
    completions: tuple[Ragged, ...]
    label: np.ndarray
    weight: np.ndarray
    where: list[str]

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def paired(self) -> bool:
        return len(self.completions) == 2

    @property
    def prompt_lengths(self) -> np.ndarray:
        return self.prompts.lengths

    @property
    def completion_lengths(self) -> np.ndarray:
        """Per example, the longest completion (chosen or rejected for pairs)."""
        return np.max(np.stack([c.lengths for c in self.completions]), axis=0)


@dataclasses.dataclass
class TokenReport:
    """What tokenization dropped, truncated or noticed.

    `dropped[reason]` lists the first few dropped examples as "location: why".
    """
    dropped: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    dropped_count: dict[str, int] = dataclasses.field(default_factory=dict)
    prompts_truncated: int = 0
    completions_truncated: int = 0
    boundary_retokenized: int = 0   # full rendering tokenizes across the prompt/completion seam

    def drop(self, reason: str, where: str) -> None:
        self.dropped_count[reason] = self.dropped_count.get(reason, 0) + 1
        listed = self.dropped.setdefault(reason, [])
        if len(listed) < _LISTED:
            listed.append(where)


def tokenize_split(items: list, tokenizer, *, conversational: bool, max_length: int,
                   max_prompt_length: int, max_completion_length: int = 0,
                   on_overlong: str = "drop", on_prefix_mismatch: str = "drop"
                   ) -> tuple[TokenizedSplit, TokenReport]:
    """Tokenizes `Example`s or `Pair`s, applying the truncation and drop rules above.

    `max_completion_length` > 0 caps completions further (0: only max_length).

    Returns:
      (split, report): the kept examples as token ids, and what was dropped/truncated.

    Raises:
      UserError: overlong prompts with on_overlong="error"; template prefix
        mismatches with on_prefix_mismatch="error"; conversational data with a
        tokenizer that has no chat template.
    """
    report = TokenReport()
    paired = bool(items) and isinstance(items[0], Pair)
    texts, kept = _render_all(items, tokenizer, conversational, paired, report,
                              on_prefix_mismatch)
    prompt_ids = _encode(tokenizer, [t[0] for t in texts])
    if not conversational:
        prefix = _prefix_ids(tokenizer)
        prompt_ids = [prefix + ids for ids in prompt_ids]
    completion_ids = [_encode(tokenizer, [t[k] for t in texts]) for k in range(1, 2 + paired)]
    if not conversational and tokenizer.eos_token_id is not None:
        eos = tokenizer.eos_token_id
        completion_ids = [[ids if ids[-1:] == [eos] else ids + [eos] for ids in side]
                          for side in completion_ids]
    if conversational:
        _note_boundary(tokenizer, texts, prompt_ids, completion_ids, report)
    limits = (max_length, max_prompt_length, max_completion_length or max_length)
    rows = _truncate_all(items, kept, prompt_ids, completion_ids, limits, report)
    if on_overlong == "error" and report.dropped_count.get(OVERLONG):
        raise UserError(_overlong_message(report, max_length))
    return _build_split(items, rows, paired), report


OVERLONG = "prompt longer than data.max_length"
PREFIX_MISMATCH = "chat template renders the prompt differently once the completion follows"


def _render_all(items, tokenizer, conversational, paired, report, on_prefix_mismatch):
    """Per item: (prompt_text, completion_text[, rejected_text]); drops template mismatches."""
    if conversational and not getattr(tokenizer, "chat_template", None):
        raise UserError("the data is conversational (message lists) but the tokenizer has no "
                        "chat template; use a model whose tokenizer_config.json defines one, "
                        "or convert the data to plain prompt/completion text.")
    texts, kept, problems = [], [], []
    for i, item in enumerate(items):
        sides = (item.chosen, item.rejected) if paired else (item.completion,)
        if not conversational:
            texts.append((item.prompt, *sides))
            kept.append(i)
            continue
        rendered, reason = _render_conversation(tokenizer, item.prompt, sides)
        if reason is None:
            texts.append(rendered)
            kept.append(i)
        else:
            report.drop(PREFIX_MISMATCH, f"{item.where}: {reason}")
            problems.append(f"  {item.where}: {reason}")
    if problems and on_prefix_mismatch == "error":
        raise UserError(f"{len(problems)} conversational examples have no prompt/completion "
                        "split (data.on_prefix_mismatch=\"error\"):\n" + "\n".join(problems[:20]))
    return texts, kept


def _render_conversation(tokenizer, prompt: list, sides: tuple) -> tuple[tuple | None, str | None]:
    """Chat-template texts (prompt, *completions), or None and the reason there is no split."""
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False,
                                                add_generation_prompt=True)
    out = [prompt_text]
    for side in sides:
        full = tokenizer.apply_chat_template(prompt + side, tokenize=False)
        if not full.startswith(prompt_text):
            k = next((j for j, (a, b) in enumerate(zip(prompt_text, full)) if a != b),
                     min(len(prompt_text), len(full)))
            return None, (f"the rendered prompt is not a prefix of the rendered conversation "
                          f"(they differ at character {k}: prompt has "
                          f"{prompt_text[k:k + 20]!r}, conversation has {full[k:k + 20]!r}); "
                          "the template may rewrite earlier turns or expect another role order")
        completion_text = full[len(prompt_text):]
        if not completion_text.strip():
            return None, "the completion renders to no text"
        out.append(completion_text)
    return tuple(out), None


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids without special tokens, in chunks; the Rust backend directly when there is one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    out: list[list[int]] = []
    for start in range(0, len(texts), _CHUNK):
        chunk = texts[start:start + _CHUNK]
        if backend is not None:
            out.extend(e.ids for e in backend.encode_batch(chunk, add_special_tokens=False))
        else:
            out.extend(list(ids) for ids in
                       tokenizer(chunk, add_special_tokens=False)["input_ids"])
    return out


def _prefix_ids(tokenizer) -> list[int]:
    """Special tokens the tokenizer itself puts before plain text (e.g. Llama's BOS)."""
    with_special = list(tokenizer("a")["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for k in range(len(with_special) - len(plain) + 1):
        if with_special[k:k + len(plain)] == plain:
            return with_special[:k]
    return []


def _note_boundary(tokenizer, texts, prompt_ids, completion_ids, report) -> None:
    """Counts examples whose full rendering tokenizes across the prompt/completion seam."""
    full = _encode(tokenizer, [t[0] + t[1] for t in texts])
    for ids, p, c in zip(full, prompt_ids, completion_ids[0]):
        if ids != p + c:
            report.boundary_retokenized += 1


def _truncate_all(items, kept, prompt_ids, completion_ids, limits, report):
    """Applies the length rules; returns (item index, prompt ids, completion id lists)."""
    max_length, max_prompt_length, max_completion_length = limits
    rows = []
    for j, i in enumerate(kept):
        prompt = prompt_ids[j]
        if len(prompt) > max_length:
            report.drop(OVERLONG, f"{items[i].where}: {len(prompt)} prompt tokens")
            continue
        if len(prompt) > max_prompt_length:
            prompt = prompt[len(prompt) - max_prompt_length:]  # keep the end, nearest the answer
            report.prompts_truncated += 1
        budget = min(max_length - len(prompt), max_completion_length)
        sides = []
        for side in completion_ids:
            ids = side[j]
            if len(ids) > budget:
                ids = ids[:budget]
                report.completions_truncated += 1
            sides.append(ids)
        rows.append((i, prompt, sides))
    return rows


def _overlong_message(report: TokenReport, max_length: int) -> str:
    n = report.dropped_count[OVERLONG]
    return (f"{n} example(s) have a prompt longer than data.max_length={max_length} tokens "
            f"(e.g. {', '.join(report.dropped[OVERLONG])}). Raise data.max_length, shorten "
            "those prompts, or set data.on_overlong=\"drop\" to drop and count them.")


def _build_split(items, rows, paired: bool) -> TokenizedSplit:
    index = [r[0] for r in rows]
    sides = 2 if paired else 1
    completions = tuple(Ragged.from_lists([r[2][k] for r in rows]) for k in range(sides))
    if paired:
        label = np.ones(len(rows), bool)
        weight = np.ones(len(rows), np.float32)
    else:
        label = np.array([items[i].label for i in index], bool)
        weight = np.array([items[i].weight for i in index], np.float32)
    return TokenizedSplit(Ragged.from_lists([r[1] for r in rows]), completions, label, weight,
                          [items[i].where for i in index])
