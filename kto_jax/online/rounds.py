"""The round files of a `kto-jax online` workdir: what each round saw, judged and trained on.

  WORKDIR/rounds/NNNN/
    prompts.jsonl            {"prompt_id", "prompt"}: the round's training prompts
    samples.jsonl            {"round", "prompt_id", "sample", "prompt", "completion",
                              "finished", "num_tokens", "score", "label"} per sample
    examples.jsonl           the examples trained on (the data pipeline's format)
    heldout.jsonl            the held-out samples of the evaluation after the round
                             (round 0: the initial policy), with "score" and "pass"
    heldout_examples.jsonl   the held-out examples the eval loss and margins read
    heldout_unpaired.jsonl   every held-out sample as {prompt, completion, label=pass}:
                             what the KL to the reference is measured on
    verdicts.partial.jsonl   {"prompt_id", "sample", "score"} received before a judge
                             failure; a rerun asks the judge only for the others

Every file is written whole (a temporary file, then a rename), so a SIGKILL leaves
either the complete file or none; a resumed round reuses complete sample files and
never asks the judge twice for one sample.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

from kto_jax import fs as paths
from kto_jax.train import workdir as layout


def round_dir(workdir: str, round_index: int) -> str:
    return layout.path(workdir, layout.ROUNDS_DIR, f"{round_index:04d}")


def round_file(workdir: str, round_index: int, name: str) -> str:
    """WORKDIR/rounds/NNNN/name, `name` one of kto_jax/train/workdir.py's ROUND_* names."""
    return paths.join(round_dir(workdir, round_index), name)


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
    """All rows at once (atomic where the path is local)."""
    paths.makedirs(path.rsplit("/", 1)[0])
    paths.write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path: str) -> list[dict[str, Any]] | None:
    """The rows of a complete file, or None when there is none."""
    if not paths.exists(path):
        return None
    return [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()]


def sample_key(row: dict) -> tuple[int, int]:
    return int(row["prompt_id"]), int(row["sample"])
