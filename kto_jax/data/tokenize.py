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

`tokenize_items` never raises on the data: it records one int64 statistics row per
example (drop code, lengths, truncations, a CRC of the ids), and
`report_from_stats` turns the rows into the report and applies the error
policies. Between the two the pipeline all-gathers the rows of every process's
slice (kto_jax/data/shards.py); `tokenize_split` is the two in one process.
"""

from __future__ import annotations

import dataclasses
import itertools
import zlib

import numpy as np

from kto_jax.data.formats import Examples, Pair
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

    def slice(self, lo: int, hi: int) -> "Ragged":
        """Entries [lo, hi), sharing this one's flat ids."""
        return Ragged(self.flat[self.offsets[lo]:self.offsets[hi]],
                      self.offsets[lo:hi + 1] - self.offsets[lo])


class SplitLengths:
    """What a split's `prompt_lengths` and `side_lengths` (int [N] each) tell about it."""
    prompt_lengths: np.ndarray
    side_lengths: tuple[np.ndarray, ...]

    @property
    def paired(self) -> bool:
        return len(self.side_lengths) == 2

    @property
    def completion_lengths(self) -> np.ndarray:
        """Per example, the longest completion (chosen or rejected for pairs; no copy otherwise)."""
        if len(self.side_lengths) == 1:
            return self.side_lengths[0]
        return np.maximum(*self.side_lengths)

    @property
    def total_lengths(self) -> np.ndarray:
        return self.prompt_lengths + sum(self.side_lengths)


@dataclasses.dataclass
class TokenizedSplit(SplitLengths):
    """Token ids of one split, ready for batching.

    Attributes:
      prompts: N prompt id lists (already left-truncated).
      completions: (completions,) for unpaired data, (chosen, rejected) for pairs.
      desirable: bool [N] (all True for pairs, unused there).
      weight: f32 [N], per-example weight.
      where: N source locations.
    """
    prompts: Ragged
    completions: tuple[Ragged, ...]
    desirable: np.ndarray
    weight: np.ndarray
    where: list[str]

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def prompt_lengths(self) -> np.ndarray:
        return self.prompts.lengths

    @property
    def side_lengths(self) -> tuple[np.ndarray, ...]:
        return tuple(c.lengths for c in self.completions)


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

    def drop(self, reason: str, where: str, count: int = 1) -> None:
        """Counts `count` examples dropped for `reason`; lists `where` among the first few."""
        self.dropped_count[reason] = self.dropped_count.get(reason, 0) + count
        listed = self.dropped.setdefault(reason, [])
        if len(listed) < _LISTED:
            listed.append(where)


def tokenize_split(items: list, tokenizer, *, conversational: bool, max_length: int,
                   max_prompt_length: int, max_completion_length: int = 0,
                   on_overlong: str = "drop", on_prefix_mismatch: str = "drop"
                   ) -> tuple[TokenizedSplit, TokenReport]:
    """Tokenizes `Example`s or `Pair`s, applying the truncation and drop rules above.

    `max_completion_length` > 0 caps completions further (0: only max_length).
    The single-process composition of `tokenize_items` and `report_from_stats`
    (the pipeline runs them per process with an all-gather in between).

    Returns:
      (split, report): the kept examples as token ids, and what was dropped/truncated.

    Raises:
      UserError: overlong prompts with on_overlong="error"; template prefix
        mismatches with on_prefix_mismatch="error"; conversational data with a
        tokenizer that has no chat template.
    """
    spec = TokenSpec(tokenizer, conversational, max_length, max_prompt_length,
                     max_completion_length)
    stats, tokens = tokenize_items(items, spec)
    report = report_from_stats(items, stats, spec, on_overlong=on_overlong,
                               on_prefix_mismatch=on_prefix_mismatch)
    kept = np.flatnonzero(stats[:, CODE] == KEPT)
    return build_split(Examples.of(items).subset(kept), [tokens[i] for i in kept]), report


OVERLONG = "prompt longer than data.max_length"
PREFIX_MISMATCH = "chat template renders the prompt differently once the completion follows"
TEMPLATE_REFUSED = "the model's chat template cannot render the conversation"

# Per-example statistics: one int64 row per example, columns below. Small enough to
# all-gather across processes, and all that the summary, the batch plans and the
# errors need, so processes that tokenized different examples agree on them.
KEPT, DROP_PREFIX, DROP_OVERLONG, DROP_TEMPLATE = 0, 1, 2, 3     # CODE values
CODE, RAW_PROMPT, PROMPT, SIDE0, SIDE1, PROMPT_CUT, SIDES_CUT, BOUNDARY, HASH = range(9)
N_STATS = 9


@dataclasses.dataclass(frozen=True)
class TokenSpec:
    """How to tokenize: the tokenizer, the data kind and the length limits (0: no cap)."""
    tokenizer: object
    conversational: bool
    max_length: int
    max_prompt_length: int
    max_completion_length: int = 0


def tokenize_items(items: list, spec: TokenSpec, *, note_boundary: bool = True
                   ) -> tuple[np.ndarray, list]:
    """Per item: a statistics row and its tokens; drops are recorded, never raised.

    Deterministic: the same item always gives the same row and tokens, which is what
    lets a process re-tokenize another process's example at batch time.

    Returns:
      (stats, tokens): int64 [len(items), N_STATS] (columns above; SIDE1 is 0 for
      unpaired items, HASH a CRC of the kept token ids), and per item
      (prompt ids, [completion ids per side]) or None when dropped.

    Raises:
      UserError: conversational data with a tokenizer that has no chat template.
    """
    tokenizer, conversational = spec.tokenizer, spec.conversational
    paired = bool(items) and isinstance(items[0], Pair)
    texts, codes = _render_all(items, tokenizer, conversational)
    kept = [i for i, code in enumerate(codes) if code == KEPT]
    prompt_ids = _encode(tokenizer, [texts[i][0] for i in kept])
    if not conversational:
        prefix = prefix_ids(tokenizer)
        prompt_ids = [prefix + ids for ids in prompt_ids]
    completion_ids = [_encode(tokenizer, [texts[i][k] for i in kept]) for k in range(1, 2 + paired)]
    if not conversational and tokenizer.eos_token_id is not None:
        eos = tokenizer.eos_token_id
        completion_ids = [[ids if ids[-1:] == [eos] else ids + [eos] for ids in side]
                          for side in completion_ids]
    boundary = np.zeros(len(kept), bool)
    if conversational and note_boundary:
        boundary = _boundary_retokenized(tokenizer, [texts[i] for i in kept], prompt_ids,
                                         completion_ids)
    stats = np.zeros((len(items), N_STATS), np.int64)
    stats[:, CODE] = codes   # the kept ones stay KEPT unless _truncate finds them overlong
    tokens: list = [None] * len(items)
    limits = (spec.max_length, spec.max_prompt_length,
              spec.max_completion_length or spec.max_length)
    for j, i in enumerate(kept):
        stats[i, BOUNDARY] = boundary[j]
        tokens[i] = _truncate(stats[i], prompt_ids[j], [side[j] for side in completion_ids], limits)
    return stats, tokens


def report_from_stats(items: list, stats: np.ndarray, spec: TokenSpec, *, on_overlong: str,
                      on_prefix_mismatch: str) -> TokenReport:
    """The `TokenReport` of `items` from their statistics rows; raises on error policies.

    The few listed prefix mismatches are rendered again for their reason (cheap:
    chat templates only), so the report does not depend on who tokenized what.
    """
    report = TokenReport()
    codes = stats[:, CODE]
    for i in np.flatnonzero(codes == DROP_TEMPLATE):   # rendered again for the template's words
        report.drop(TEMPLATE_REFUSED, f"{items[i].where}: {_render_reason(items[i], spec.tokenizer)}")
    mismatched = np.flatnonzero(codes == DROP_PREFIX)
    listed = mismatched[:20 if on_prefix_mismatch == "error" else _LISTED]
    reasons = {int(i): _render_reason(items[i], spec.tokenizer) for i in listed}
    for i in mismatched:
        report.drop(PREFIX_MISMATCH, f"{items[i].where}: {reasons.get(int(i), '')}")
    if len(mismatched) and on_prefix_mismatch == "error":
        raise UserError(f"{len(mismatched)} conversational examples have no prompt/completion "
                        "split (data.on_prefix_mismatch=\"error\"):\n" + "\n".join(
                            f"  {items[i].where}: {reasons[int(i)]}" for i in listed))
    for i in np.flatnonzero(codes == DROP_OVERLONG):
        report.drop(OVERLONG, f"{items[i].where}: {stats[i, RAW_PROMPT]} prompt tokens")
    if on_overlong == "error" and report.dropped_count.get(OVERLONG):
        raise UserError(_overlong_message(report, spec.max_length))
    kept = codes == KEPT
    report.prompts_truncated = int(stats[kept, PROMPT_CUT].sum())
    report.completions_truncated = int(stats[kept, SIDES_CUT].sum())
    report.boundary_retokenized = int(stats[kept, BOUNDARY].sum())
    return report


def _render_all(items, tokenizer, conversational):
    """Per item: (prompt_text, completion_text[, rejected_text]) and KEPT, or None and the
    drop code (DROP_PREFIX, DROP_TEMPLATE)."""
    if conversational and not getattr(tokenizer, "chat_template", None):
        raise UserError("the data is conversational (message lists) but the tokenizer has no "
                        "chat template; use a model whose tokenizer_config.json defines one, "
                        "or convert the data to plain prompt/completion text.")
    texts, codes = [], []
    for item in items:
        sides = _sides(item)
        if not conversational:
            texts.append((item.prompt, *sides))
            codes.append(KEPT)
            continue
        rendered, _, code = _render_conversation(tokenizer, item.prompt, sides)
        texts.append(rendered)
        codes.append(code)
    return texts, codes


def _sides(item) -> tuple:
    return (item.chosen, item.rejected) if isinstance(item, Pair) else (item.completion,)


def _render_reason(item, tokenizer) -> str:
    return _render_conversation(tokenizer, item.prompt, _sides(item))[1] or ""


def _apply_template(tokenizer, messages: list, **kwargs) -> tuple[str | None, str | None]:
    """(rendered text, None), or (None, what the template said) when it refuses the messages
    (e.g. "Conversation roles must alternate user/assistant/..." raised by the template)."""
    import jinja2  # pylint: disable=import-outside-toplevel  # transformers renders with it
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs), None
    except (jinja2.TemplateError, ValueError, TypeError, KeyError) as e:
        return None, f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"


def _render_conversation(tokenizer, prompt: list, sides: tuple) -> tuple[tuple | None, str | None, int]:
    """Chat-template texts (prompt, *completions), None and the reason there is no split, KEPT
    or the drop code: DROP_TEMPLATE when the template refuses, DROP_PREFIX when it renders
    the prompt differently once the completion follows."""
    prompt_text, refused = _apply_template(tokenizer, prompt, add_generation_prompt=True)
    if refused:
        return None, f"the prompt's messages: {refused}", DROP_TEMPLATE
    out = [prompt_text]
    for side in sides:
        full, refused = _apply_template(tokenizer, prompt + side)
        if refused:
            return None, f"the prompt and completion's messages: {refused}", DROP_TEMPLATE
        if not full.startswith(prompt_text):
            k = next((j for j, (a, b) in enumerate(zip(prompt_text, full)) if a != b),
                     min(len(prompt_text), len(full)))
            return None, (f"the rendered prompt is not a prefix of the rendered conversation "
                          f"(they differ at character {k}: prompt has "
                          f"{prompt_text[k:k + 20]!r}, conversation has {full[k:k + 20]!r}); "
                          "the template may rewrite earlier turns or expect another role order"
                          ), DROP_PREFIX
        completion_text = full[len(prompt_text):]
        if not completion_text.strip():
            return None, "the completion renders to no text", DROP_PREFIX
        out.append(completion_text)
    return tuple(out), None, KEPT


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


def prefix_ids(tokenizer) -> list[int]:
    """Special tokens the tokenizer itself puts before plain text (e.g. Llama's BOS)."""
    with_special = list(tokenizer("a")["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for k in range(len(with_special) - len(plain) + 1):
        if with_special[k:k + len(plain)] == plain:
            return with_special[:k]
    return []


def _boundary_retokenized(tokenizer, texts, prompt_ids, completion_ids) -> np.ndarray:
    """Per example: does its full rendering tokenize across the prompt/completion seam?"""
    full = _encode(tokenizer, [t[0] + t[1] for t in texts])
    return np.array([ids != p + c for ids, p, c in zip(full, prompt_ids, completion_ids[0])], bool)


def _truncate(row: np.ndarray, prompt: list, sides: list, limits) -> tuple:
    """Applies the length rules to one example, filling its statistics `row` in place.

    Returns (prompt ids, [completion ids]) as int32 arrays, or None when the prompt is overlong.
    """
    max_length, max_prompt_length, max_completion_length = limits
    row[RAW_PROMPT] = len(prompt)
    if len(prompt) > max_length:
        row[CODE] = DROP_OVERLONG
        return None
    if len(prompt) > max_prompt_length:
        prompt = prompt[len(prompt) - max_prompt_length:]  # keep the end, nearest the answer
        row[PROMPT_CUT] = 1
    budget = min(max_length - len(prompt), max_completion_length)
    out = []
    for k, ids in enumerate(sides):
        if len(ids) > budget:
            ids = ids[:budget]
            row[SIDES_CUT] += 1
        row[SIDE0 + k] = len(ids)
        out.append(np.asarray(ids, np.int32))
    row[CODE], row[PROMPT] = KEPT, len(prompt)
    prompt = np.asarray(prompt, np.int32)
    row[HASH] = _token_hash(prompt, out)
    return prompt, out


def _token_hash(prompt: np.ndarray, sides: list) -> int:
    """CRC-32 of an example's kept ids (feeds the data fingerprint without the tokens)."""
    h = zlib.crc32(prompt.tobytes())
    for ids in sides:
        h = zlib.crc32(b"|" + ids.tobytes(), h)
    return h


def _overlong_message(report: TokenReport, max_length: int) -> str:
    n = report.dropped_count[OVERLONG]
    return (f"{n} example(s) have a prompt longer than data.max_length={max_length} tokens "
            f"(e.g. {', '.join(report.dropped[OVERLONG])}). Raise data.max_length, shorten "
            "those prompts, or set data.on_overlong=\"drop\" to drop and count them.")


def build_split(examples: Examples, tokens: list) -> TokenizedSplit:
    """A `TokenizedSplit` of kept examples and their (prompt ids, [completion ids]) tokens."""
    completions = tuple(Ragged.from_lists([t[1][k] for t in tokens])
                        for k in range(1 + examples.paired))
    return TokenizedSplit(Ragged.from_lists([t[0] for t in tokens]), completions,
                          examples.desirable, examples.weight, [e.where for e in examples.items])
