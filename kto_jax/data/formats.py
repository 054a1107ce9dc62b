"""TRL's dataset formats: detect them, validate every row, normalise to examples.

Formats (TRL's names), each as plain text or as conversational message lists
(`[{"role": ..., "content": ...}, ...]`):
  unpaired  prompt, completion, label (bool)        -> one example (its `label` column is read
            into `Example.desirable`, the name every later stage and the loss use)
  paired    prompt, chosen, rejected                -> a `Pair`; for unpaired losses
            two examples (chosen desirable, rejected undesirable), or one of the
            two at random with `one_y_per_x`. Conversational pairs may omit the
            prompt: it is then the messages chosen and rejected share (TRL's
            "implicit prompt").
  scored    prompt, completion, score (number)      -> desirable iff score > threshold,
            weight |score - threshold| when score weighting is on.
Every problem in every row is collected and raised as one `UserError`. Rows that are
well formed but teach nothing (`NO_PREFERENCE`, `ZERO_WEIGHT`) are dropped by the
pipeline and counted with their file and line in the data summary.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import NamedTuple

import numpy as np

from kto_jax.data.readers import Problems, RowSet
from kto_jax.errors import UserError

FORMATS = {
    "unpaired": ("prompt", "completion", "label"),
    "paired": ("prompt", "chosen", "rejected"),
    "scored": ("prompt", "completion", "score"),
}
# Well-formed rows without a training signal (reasons of the summary's drop lines).
NO_PREFERENCE = "chosen and rejected are the same completion (no preference to learn)"
ZERO_WEIGHT = ("score equals data.score_threshold, so its weight under data.score_weighting "
               "is 0")
_EXPECTED = "; ".join(f"{name} ({', '.join(cols)})" for name, cols in FORMATS.items())

Text = str | list  # plain text, or a list of {role, content} messages


@dataclasses.dataclass(frozen=True)
class Example:
    """One normalised unpaired example: {prompt, completion, desirable, weight}."""
    prompt: Text
    completion: Text
    desirable: bool      # thumbs up (the file's `label`, or score > threshold) or down
    weight: float
    where: str           # source location, e.g. "train.jsonl:12"


@dataclasses.dataclass(frozen=True)
class Pair:
    """One preference pair, kept together for the paired losses (DPO, IPO, ...)."""
    prompt: Text
    chosen: Text
    rejected: Text
    where: str


class Examples(NamedTuple):
    """The normalised examples of one split and their per-example columns, built ONCE here
    (`of`) and only indexed after that: the batches carry them (kto_jax/batch.py) and the
    loss reads `desirable`.

    items: `Example`s or `Pair`s; desirable: bool [N] (True for pairs: the paired layout
    has no label); weight: f32 [N] (1.0 for pairs).
    """
    items: list
    desirable: np.ndarray
    weight: np.ndarray

    @classmethod
    def of(cls, items: list) -> "Examples":
        if items and isinstance(items[0], Pair):
            return cls(items, np.ones(len(items), bool), np.ones(len(items), np.float32))
        return cls(items, np.array([e.desirable for e in items], bool),
                   np.array([e.weight for e in items], np.float32))

    @property
    def paired(self) -> bool:
        return bool(self.items) and isinstance(self.items[0], Pair)

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, index) -> "Examples":
        """The examples at `index` (int array or slice), columns alike."""
        index = np.arange(len(self.items))[index] if isinstance(index, slice) else index
        return Examples([self.items[int(i)] for i in index], self.desirable[index],
                        self.weight[index])


def detect_format(rows: RowSet, configured: str = "auto") -> tuple[str, bool]:
    """Decides the format from the columns (or checks the configured one).

    Returns:
      (format, conversational): format in FORMATS; conversational is True when the
      prompt (or chosen) values are message lists.
    """
    columns = set(rows.columns)
    if not rows.records:
        raise UserError(f"{rows.source}: no records found; the dataset is empty.")
    if configured == "auto":
        fmt = _format_from_columns(columns, rows)
    elif configured in FORMATS:
        fmt = configured
        missing = [c for c in FORMATS[fmt] if c not in columns]
        if missing and not _implicit_prompt(fmt, columns, rows):
            raise UserError(f"{rows.source}: data.format={fmt} needs columns "
                            f"{', '.join(FORMATS[fmt])}; missing {', '.join(missing)} "
                            f"(columns found: {', '.join(sorted(columns))}).")
    else:
        raise UserError(f"data.format={configured!r} is not a format; use auto or one of "
                        f"{', '.join(FORMATS)} (conversational variants are detected).")
    probe = "prompt" if "prompt" in columns else "chosen"
    return fmt, _conversational(rows, probe)


def _conversational(rows: RowSet, field: str) -> bool:
    """Whether `field` holds message lists (decided by the first row that has it); UserError
    naming a row of each style when text and message lists are mixed."""
    styles: dict[bool, int] = {}
    for i, record in enumerate(rows.records):
        value = record.get(field)
        if isinstance(value, (str, list)):
            styles.setdefault(isinstance(value, list), i)
            if len(styles) == 2:
                raise UserError(
                    f"{rows.source}: rows mix plain text and conversational message lists in "
                    f"{field!r}: text at {rows.where(styles[False])}, messages at "
                    f"{rows.where(styles[True])}; use one style for every row.")
    return bool(styles) and next(iter(styles))


def _first_row_with(rows: RowSet, fmt: str) -> int | None:
    needed = set(FORMATS[fmt])
    return next((i for i, r in enumerate(rows.records) if needed <= set(r)), None)


def _format_from_columns(columns: set[str], rows: RowSet) -> str:
    source = rows.source
    matches = [name for name, cols in FORMATS.items() if set(cols) <= columns]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        firsts = {fmt: _first_row_with(rows, fmt) for fmt in matches}
        fits = [sum(set(FORMATS[fmt]) <= set(r) for fmt in matches) for r in rows.records]
        if max(fits) < 2 and None not in firsts.values():  # each row is one format: a mix
            raise UserError(f"{source}: rows mix data formats: " + "; ".join(
                f"{fmt} ({', '.join(FORMATS[fmt])}) at {rows.where(i)}" for fmt, i in firsts.items())
                + ". Put each format in its own file, or set data.format to the one to use.")
        example = f" (e.g. {rows.where(fits.index(max(fits)))})" if max(fits) > 1 else ""
        raise UserError(f"{source}: the columns {', '.join(sorted(columns))}{example} fit several "
                        f"formats ({', '.join(matches)}); set data.format to one of them.")
    if {"chosen", "rejected"} <= columns:
        return "paired"  # implicit prompt; checked to be conversational when normalising
    raise UserError(f"{source}: cannot tell the data format from the columns "
                    f"{', '.join(sorted(columns)) or '(none)'}. Expected one of: {_EXPECTED}; "
                    "each as text or as conversational lists of {role, content} messages. "
                    "Rename the columns or set data.format.")


def _implicit_prompt(fmt: str, columns: set[str], rows: RowSet) -> bool:
    return fmt == "paired" and {"chosen", "rejected"} <= columns and "prompt" not in columns


def normalise_unpaired(rows: RowSet, fmt: str, conversational: bool, *,
                       score_threshold: float = 0.0, score_weighting: bool = False,
                       empty_completions: bool = False) -> list[Example]:
    """Validates unpaired or scored rows and returns one `Example` per row.

    `empty_completions`: accept an empty completion (text "", or assistant messages with
    no content), which tokenizes to its end-of-sequence token alone, as TRL tokenizes
    completions: what a sampled policy may produce (online rounds). Off for user data."""
    problems, out = Problems(), []
    for i, record in enumerate(rows.records):
        where = rows.where(i)
        prompt = _text_field(record, "prompt", conversational, where, problems)
        completion = _text_field(record, "completion", conversational, where, problems,
                                 may_be_empty=empty_completions)
        if fmt == "unpaired":
            desirable, weight = _label_field(record, where, problems), 1.0
        else:
            score = _score_field(record, where, problems)
            desirable = None if score is None else score > score_threshold
            weight = abs(score - score_threshold) if (score_weighting and score is not None) else 1.0
        if prompt is not None and completion is not None and desirable is not None:
            out.append(Example(prompt, completion, bool(desirable), float(weight), where))
    problems.raise_if_any(f"{rows.source}: invalid {fmt} rows")
    return out


def normalise_pairs(rows: RowSet, conversational: bool, *, empty_completions: bool = False
                    ) -> list[Pair]:
    """Validates paired rows (prompt, chosen, rejected) and returns one `Pair` per row
    (`empty_completions` as in `normalise_unpaired`, for chosen and rejected)."""
    problems, out = Problems(), []
    implicit = "prompt" not in set(rows.columns)
    if implicit and not conversational:
        raise UserError(f"{rows.source}: paired rows without a prompt column are only "
                        "understood when chosen/rejected are message lists (the prompt is "
                        "their shared leading messages); add a prompt column.")
    for i, record in enumerate(rows.records):
        where = rows.where(i)
        chosen = _text_field(record, "chosen", conversational, where, problems,
                             may_be_empty=empty_completions)
        rejected = _text_field(record, "rejected", conversational, where, problems,
                               may_be_empty=empty_completions)
        if implicit:
            prompt, chosen, rejected = _split_implicit(chosen, rejected, where, problems)
        else:
            prompt = _text_field(record, "prompt", conversational, where, problems)
        if prompt is not None and chosen is not None and rejected is not None:
            out.append(Pair(prompt, chosen, rejected, where))
    problems.raise_if_any(f"{rows.source}: invalid paired rows")
    return out


def unpair(pairs: list[Pair], *, one_y_per_x: bool, seed: int) -> list[Example]:
    """Pairs -> unpaired examples: chosen desirable, rejected undesirable.

    With `one_y_per_x`, only one of the two is kept per prompt, each with
    probability 1/2 from a seeded generator (the paper's one-y-per-x setting, §4.3).
    """
    keep_chosen = np.random.default_rng([seed, 1]).random(len(pairs)) < 0.5
    out = []
    for pair, chosen_only in zip(pairs, keep_chosen):
        if not one_y_per_x or chosen_only:
            out.append(Example(pair.prompt, pair.chosen, True, 1.0, pair.where))
        if not one_y_per_x or not chosen_only:
            out.append(Example(pair.prompt, pair.rejected, False, 1.0, pair.where))
    return out


def _split_implicit(chosen, rejected, where: str, problems: Problems):
    """Shared leading messages of chosen and rejected become the prompt."""
    if chosen is None or rejected is None:
        return None, None, None
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0 or n == len(chosen) or n == len(rejected):
        problems.add(where, "chosen and rejected share no leading prompt messages (or one is a "
                            "prefix of the other); add an explicit prompt column")
        return None, None, None
    return chosen[:n], chosen[n:], rejected[n:]


def _text_field(record: dict, name: str, conversational: bool, where: str,
                problems: Problems, may_be_empty: bool = False) -> Text | None:
    value = record.get(name)
    if value is None:
        problems.add(where, f"missing field {name!r}")
        return None
    if conversational:
        return _messages_field(value, name, where, problems, may_be_empty)
    if isinstance(value, list):
        problems.add(where, f"field {name!r} is a message list but the first row's prompt is "
                            "text; use one style for every row and field")
        return None
    if not isinstance(value, str):
        problems.add(where, f"field {name!r} must be text, got {type(value).__name__} "
                            f"{_short(value)}")
        return None
    if not value.strip() and not may_be_empty:
        problems.add(where, f"empty field {name!r}")
        return None
    return value


def _messages_field(value, name: str, where: str, problems: Problems,
                    may_be_empty: bool = False) -> list | None:
    if not isinstance(value, list):
        problems.add(where, f"field {name!r} must be a list of {{role, content}} messages like "
                            f"the first row's, got {type(value).__name__}")
        return None
    if not value:
        problems.add(where, f"empty field {name!r} (no messages)")
        return None
    for k, msg in enumerate(value):
        if not (isinstance(msg, dict) and isinstance(msg.get("role"), str)
                and isinstance(msg.get("content"), str)):
            problems.add(where, f"field {name!r} message {k} must be {{'role': str, 'content': "
                                f"str}}, got {_short(msg)}")
            return None
    if not any(msg["content"].strip() for msg in value) and not may_be_empty:
        problems.add(where, f"empty field {name!r} (every message content is empty)")
        return None
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _label_field(record: dict, where: str, problems: Problems) -> bool | None:
    """The row's `label` column (TRL's name): desirable (true) or undesirable (false)."""
    value = record.get("label")
    if value is None:
        problems.add(where, "missing field 'label'")
        return None
    if not isinstance(value, (bool, np.bool_)):
        problems.add(where, f"field 'label' must be a bool (true/false), got "
                            f"{type(value).__name__} {_short(value)}")
        return None
    return bool(value)


def _score_field(record: dict, where: str, problems: Problems) -> float | None:
    value = record.get("score")
    if value is None:
        problems.add(where, "missing field 'score'")
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        problems.add(where, f"field 'score' must be a number, got {type(value).__name__} "
                            f"{_short(value)}")
        return None
    if not math.isfinite(float(value)):
        problems.add(where, f"field 'score' must be finite, got {value}")
        return None
    return float(value)


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
