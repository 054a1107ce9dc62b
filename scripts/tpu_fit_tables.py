"""docs/tpu.md's (and docs/lora.md's QLoRA) fit tables, regenerated from `kto-jax compile`, so they cannot drift.

Usage:
  PYTHONPATH=. python scripts/tpu_fit_tables.py              # compile every row, rewrite the tables
  PYTHONPATH=. python scripts/tpu_fit_tables.py --rows ID,..  # recompile these rows only
  PYTHONPATH=. python scripts/tpu_fit_tables.py --render      # rewrite the tables from the results file
  PYTHONPATH=. python scripts/tpu_fit_tables.py --list        # the row ids and their commands

Each row of `ROWS` is one `kto-jax compile` command line (libtpu compiles the run's real
train step for the slice on this CPU host: the `tpu` extra). The script runs it, reads the
per-chip memory and the verdict it prints, keeps them in docs/results/tpu_fit.json (with
the date and the jax and libtpu versions) and rewrites the Markdown between the
`<!-- fit-table:NAME -->` and `<!-- /fit-table:NAME -->` markers of docs/tpu.md: the table
and, under it, the commands that produced it. tests/perf/test_fit_tables.py recompiles
the small row and checks it, and the documents, against these results.

One compile at a time: an 8B row takes 2-10 CPU minutes and a few GiB of memory, a 70B row more.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "docs", "tpu.md")
LORA_DOC = os.path.join(REPO, "docs", "lora.md")
RESULTS = os.path.join(REPO, "docs", "results", "tpu_fit.json")
LORA = ("--config.lora.rank=16", "--config.model.param_dtype=bfloat16")
QLORA = (*LORA, "--config.lora.base_quantization=nf4", "--config.lora.double_quant=True")
TABLE_DOCS = {"qlora": LORA_DOC}   # the document of each table; every other table is docs/tpu.md's


@dataclasses.dataclass(frozen=True)
class Row:
    id: str
    table: str                 # which table of docs/tpu.md: "full" or "lora"
    model: str                 # the model column
    args: tuple[str, ...]      # after `kto-jax compile`


def _mb(micro: int, accumulation: int = 2) -> tuple[str, ...]:
    """Overrides for a microbatch of `micro` examples with the recipe's 2 accumulation steps."""
    return (f"--config.train.micro_batch_size={micro}",
            f"--config.train.global_batch_size={micro * accumulation}")


KTO_8B = "--config=configs/llama3_8b_kto.py"
GEMMA3_4B = "--config=configs/gemma3_4b_kto.py"     # full parameters, 1024 + 1024 tokens
GEMMA3_27B = "--config=configs/gemma3_27b_kto.py"   # LoRA r16 on a bf16 base, 1024 + 1024 tokens
QWEN3_MOE = "--config=configs/qwen3_30b_a3b_kto.py"  # LoRA r16 (attention) on a bf16 base, 1024 + 1024
ROWS = (
    Row("8b-v5p32-mb128", "full", "Llama-3 8B", (KTO_8B, "--topology=v5p-32", *_mb(128))),
    Row("8b-v5e32-mb32", "full", "Llama-3 8B", (KTO_8B, "--topology=v5e-32", *_mb(32))),
    Row("8b-v5e32-mb64", "full", "Llama-3 8B", (KTO_8B, "--topology=v5e-32", *_mb(64))),
    Row("70b-v5p128-mb256", "full", "Llama-3 70B",
        (KTO_8B, "--model=llama3_70b", "--topology=v5p-128", *_mb(256))),
    Row("tiny-v5e4", "full", "tiny (the tests' shape)",
        ("--config=configs/tiny_cpu.py", "--model=tiny", "--topology=v5e-4")),
    Row("8b-full-v5e8", "lora", "Llama-3 8B, full parameters", (KTO_8B, "--topology=v5e-8")),
    Row("8b-lora-v5e8", "lora", "Llama-3 8B, LoRA r16, bf16 base", (KTO_8B, "--topology=v5e-8", *LORA)),
    Row("8b-full-v5p8", "lora", "Llama-3 8B, full parameters", (KTO_8B, "--topology=v5p-8")),
    Row("8b-lora-v5p8", "lora", "Llama-3 8B, LoRA r16, bf16 base", (KTO_8B, "--topology=v5p-8", *LORA)),
    Row("70b-lora-v5p8", "lora", "Llama-3 70B, LoRA r16, bf16 base",
        (KTO_8B, "--model=llama3_70b", "--topology=v5p-8", *LORA)),
    Row("gemma3-4b-full-v5e8-mb8", "gemma", "Gemma 3 4B, full parameters",
        (GEMMA3_4B, "--topology=v5e-8", *_mb(8))),
    Row("gemma3-4b-full-v5e8-mb16", "gemma", "Gemma 3 4B, full parameters",
        (GEMMA3_4B, "--topology=v5e-8", *_mb(16))),
    Row("gemma3-27b-lora-v5e8-mb8", "gemma", "Gemma 3 27B, LoRA r16, bf16 base",
        (GEMMA3_27B, "--topology=v5e-8", *_mb(8))),
    Row("gemma3-27b-full-v5e8-mb8", "gemma", "Gemma 3 27B, full parameters",
        (GEMMA3_27B, "--topology=v5e-8", "--config.lora.rank=0", "--config.model.param_dtype=float32",
         *_mb(8))),
    # QLoRA (docs/lora.md): an NF4 base on ONE v5e chip (8B) and on a v5e-8 (70B), beside bf16
    # LoRA and full parameters for the same model, slice and microbatch
    Row("8b-qlora-v5e1-mb2", "qlora", "Llama-3 8B, QLoRA r16, NF4 + DQ base",
        (KTO_8B, "--topology=v5e-1", *QLORA, *_mb(2))),
    Row("8b-lora-v5e1-mb2", "qlora", "Llama-3 8B, LoRA r16, bf16 base", (KTO_8B, "--topology=v5e-1", *LORA, *_mb(2))),
    Row("8b-full-v5e1-mb2", "qlora", "Llama-3 8B, full parameters", (KTO_8B, "--topology=v5e-1", *_mb(2))),
    Row("70b-qlora-v5e8-mb8", "qlora", "Llama-3 70B, QLoRA r16, NF4 + DQ base",
        (KTO_8B, "--model=llama3_70b", "--topology=v5e-8", *QLORA, *_mb(8))),
    Row("70b-lora-v5e8-mb8", "qlora", "Llama-3 70B, LoRA r16, bf16 base",
        (KTO_8B, "--model=llama3_70b", "--topology=v5e-8", *LORA, *_mb(8))),
    Row("70b-full-v5e8-mb8", "qlora", "Llama-3 70B, full parameters",
        (KTO_8B, "--model=llama3_70b", "--topology=v5e-8", *_mb(8))),
    Row("qwen3moe-lora-v5e8-mb8", "moe", "Qwen3-30B-A3B, LoRA r16 (attention), bf16 base",
        (QWEN3_MOE, "--topology=v5e-8", *_mb(8))),
    Row("qwen3moe-full-v5p16-mb8", "moe", "Qwen3-30B-A3B, full parameters",
        (QWEN3_MOE, "--topology=v5p-16", "--config.lora.rank=0", "--config.model.param_dtype=float32",
         *_mb(8))),
    Row("qwen3moe-full-precomputed-v5p16-mb8", "moe", "Qwen3-30B-A3B, full parameters, precomputed reference",
        (QWEN3_MOE, "--topology=v5p-16", "--config.lora.rank=0", "--config.model.param_dtype=float32",
         "--config.reference.source=precomputed", *_mb(8))),
    # the same 16 examples per step in one microbatch: no accumulation scan, no float32 accumulator
    Row("qwen3moe-full-v5p16-mb16x1", "moe", "Qwen3-30B-A3B, full parameters, one microbatch",
        (QWEN3_MOE, "--topology=v5p-16", "--config.lora.rank=0", "--config.model.param_dtype=float32",
         *_mb(16, accumulation=1))),
)
BY_ID = {row.id: row for row in ROWS}

_SIZE = re.compile(r"^\s+(arguments|temporaries|total|peak \(XLA\))\s+(-?[\d.]+) (MiB|GiB)$", re.M)
_MESH = re.compile(r"^AOT compile for (\S+): .*, mesh (.+)$", re.M)
_MICRO = re.compile(r"^microbatch (\d+) = ([\d.]+) per chip over \d+ batch shards, (\d+) accumulation", re.M)
_VERDICT = re.compile(r"^verdict: (.+)$", re.M)
_TIMES = re.compile(r"^lower ([\d.]+) s, compile ([\d.]+) s$", re.M)


def command(row: Row) -> list[str]:
    return ["kto-jax", "compile", *row.args]


def parse_report(text: str) -> dict:
    """The figures `kto-jax compile` printed: sizes in GiB, the verdict, seconds."""
    out = {"sizes_gib": {}}
    for label, value, unit in _SIZE.findall(text):
        out["sizes_gib"][label] = float(value) / (1024 if unit == "MiB" else 1)
    for key, pattern in (("slice_mesh", _MESH), ("microbatch", _MICRO), ("verdict", _VERDICT),
                         ("seconds", _TIMES)):
        match = pattern.search(text)
        if match is None:
            raise ValueError(f"`kto-jax compile` printed no {key} line:\n{text}")
        out[key] = list(match.groups())
    out["fits"] = out["verdict"][0].startswith("fits")
    return out


def compile_row(row: Row, timeout: float = 3600) -> dict:
    """Runs the row's `kto-jax compile` in a subprocess (CPU only) and parses its report."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "kto_jax.cli", *command(row)[1:]], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode not in (0, 1):   # 1: does not fit, still a result
        raise RuntimeError(f"{' '.join(command(row))} failed ({proc.returncode}):\n{proc.stderr}")
    result = parse_report(proc.stdout)
    result["wall_seconds"] = round(time.time() - start, 1)
    return result


def _gib(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value * 1024:.2f} MiB" if value < 0.1 else f"{value:.2f} GiB"


def _verdict(result: dict) -> str:
    verdict = result["verdict"][0]
    if result["fits"]:
        return "**fits**: " + verdict.removeprefix("fits ").strip("()")
    if "ran out of HBM" in verdict:
        return "**does not fit**: XLA ran out of HBM while compiling"
    return "**does not fit**: " + verdict.removeprefix("does not fit ").strip("()")


def render_row(row: Row, result: dict) -> str:
    sizes = result["sizes_gib"]
    slice_name, mesh = result["slice_mesh"]
    micro, per_chip, accumulation = result["microbatch"]
    total = _gib(sizes.get("total"))
    if "peak (XLA)" in sizes:
        total += f" (XLA peak {_gib(sizes['peak (XLA)'])})"
    minutes = float(result["seconds"][1]) / 60
    return (f"| {row.model} | {slice_name} | {mesh} | {micro} = {per_chip} per chip x {accumulation} "
            f"| {_gib(sizes.get('arguments'))} | {_gib(sizes.get('temporaries'))} | {total} "
            f"| {_verdict(result)} | {minutes:.1f} min |")


HEADER = ("| model | slice | mesh | microbatch (x accumulation) | arguments | temporaries "
          "| total per chip | verdict | compile |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def render_table(table: str, results: dict) -> str:
    rows = [row for row in ROWS if row.table == table]
    lines = [HEADER] + [render_row(row, results["rows"][row.id]) for row in rows if row.id in results["rows"]]
    commands = "\n".join(" ".join(command(row)) for row in rows)
    measured = sorted({results["rows"][row.id]["measured"] for row in rows if row.id in results["rows"]})
    return (f"{chr(10).join(lines)}\n\nMeasured {'; '.join(measured)}, on a shared 2-core CPU host "
            "(compile times vary with its load). Regenerate with "
            f"`python scripts/tpu_fit_tables.py`; the commands:\n\n```bash\n{commands}\n```")


def rewrite_doc(results: dict, doc_path: str = DOC) -> str:
    """The document (docs/tpu.md, or docs/lora.md) with each of its fit tables (TABLE_DOCS)
    replaced by its rendering of `results`."""
    text = open(doc_path, encoding="utf-8").read()
    for table in sorted({row.table for row in ROWS if TABLE_DOCS.get(row.table, DOC) == doc_path}):
        begin, end = f"<!-- fit-table:{table} -->", f"<!-- /fit-table:{table} -->"
        if begin not in text or end not in text:
            raise ValueError(f"{doc_path} has no {begin} ... {end} markers")
        head, rest = text.split(begin, 1)
        text = f"{head}{begin}\n{render_table(table, results)}\n{end}{rest.split(end, 1)[1]}"
    return text


def load_results(path: str = RESULTS) -> dict:
    if not os.path.exists(path):
        return {"rows": {}}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def measured_line() -> str:
    versions = {name: importlib.metadata.version(name) for name in ("jax", "libtpu")}
    return f"{datetime.date.today().isoformat()} with jax {versions['jax']} and libtpu {versions['libtpu']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="", help="comma-separated row ids to recompile (default: all)")
    parser.add_argument("--render", action="store_true", help="only rewrite docs/tpu.md from the results")
    parser.add_argument("--list", action="store_true", help="print the row ids and commands")
    args = parser.parse_args()
    if args.list:
        for row in ROWS:
            print(f"{row.id:<18} {' '.join(command(row))}")
        return
    results = load_results()
    if not args.render:
        wanted = [BY_ID[name] for name in args.rows.split(",") if name] if args.rows else list(ROWS)
        for row in wanted:
            print(f"{row.id}: {' '.join(command(row))}", flush=True)
            results["rows"][row.id] = dict(compile_row(row), measured=measured_line())
            print(f"  {render_row(row, results['rows'][row.id])}", flush=True)
            with open(RESULTS, "w", encoding="utf-8") as f:   # after each row: a long run keeps its rows
                json.dump(results, f, indent=1, sort_keys=True)
                f.write("\n")
    for doc in sorted({DOC, *TABLE_DOCS.values()}):
        text = rewrite_doc(results, doc)   # read whole before the file is opened for writing
        with open(doc, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
