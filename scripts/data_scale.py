"""Start-up time, peak RSS and rows read per process, from a JSONL file vs a prepared directory.

  python scripts/data_scale.py --rows=100000,1000000 --out=/tmp/data_scale [--jsonl-rows=100000]

For each row count: writes a synthetic unpaired feedback file and a tiny byte-level BPE
tokenizer, runs `kto_jax.data.prepare.prepare` once (timed, in this process), then
starts 1 and 2 worker processes (jax.distributed on localhost, gloo, as
tests/train/test_multiprocess.py does) that each build the datasets from the prepared
directory and take batches. Each worker reports: seconds from its start to its first
batch (and the part of it spent in build_datasets and the first batch), its peak RSS at
that point (VmHWM: the peak before the first step) and its RSS before the data, and
the records it read for its first `--batches` batches against the rows those batches
hold. `--jsonl-rows` also measures training straight from the JSONL file (today's
path: every process reads and normalises the whole file) for comparison.
Prints one JSON line per worker; docs/data.md reports the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import time

T0 = time.time()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the cat dog sat ran on a mat log red blue big small happy sad tree house car road sun "
         "moon star sky good bad fast slow yes no what why how when where who").split()


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def write_inputs(out: str, rows: int) -> tuple[str, str]:
    """(feedback.jsonl of `rows` rows, tokenizer directory) under `out`."""
    from tokenizers import ByteLevelBPETokenizer  # pylint: disable=import-outside-toplevel
    from transformers import PreTrainedTokenizerFast  # pylint: disable=import-outside-toplevel
    os.makedirs(out, exist_ok=True)
    tok_dir = os.path.join(out, "tokenizer")
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        rng = random.Random(0)
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator([_sentence(rng, 3, 12) for _ in range(400)], vocab_size=320,
                                min_frequency=1, special_tokens=["<pad>", "<s>", "</s>"])
        PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>",  # pylint: disable=protected-access
                                eos_token="</s>", pad_token="<pad>").save_pretrained(tok_dir)
    data = os.path.join(out, f"feedback_{rows}.jsonl")
    if not os.path.exists(data):
        rng = random.Random(rows)
        with open(data + ".tmp", "w", encoding="utf-8") as f:
            for i in range(rows):
                f.write(json.dumps({"prompt": _sentence(rng, 2, 10) + " ?",
                                    "completion": _sentence(rng, 2, 12),
                                    "label": bool(i % 3)}) + "\n")
        os.replace(data + ".tmp", data)
    return data, tok_dir


def config_for(train_path: str):
    sys.path.insert(0, REPO)
    from kto_jax.config import config_file  # pylint: disable=import-outside-toplevel
    c = config_file("tiny_cpu")
    c.data.train_path = train_path
    c.data.eval_fraction = 0.0
    c.data.max_length, c.data.max_prompt_length, c.data.bucket_lengths = 48, 24, (16, 48)
    c.train.global_batch_size, c.train.micro_batch_size = 32, 8
    return c


def worker(args) -> None:
    """One training process's data start-up: build_datasets, then `--batches` batches."""
    from kto_jax.train import distributed  # pylint: disable=import-outside-toplevel
    distributed.initialize()
    import jax  # pylint: disable=import-outside-toplevel
    from kto_jax.data import build_datasets  # pylint: disable=import-outside-toplevel
    from kto_jax.models import load_tokenizer  # pylint: disable=import-outside-toplevel
    from kto_jax.train.settings import read_data_settings  # pylint: disable=import-outside-toplevel
    tokenizer = load_tokenizer(args.tokenizer)
    before, data_start = rss_mib("VmRSS"), time.time()
    train, _, summary = build_datasets(read_data_settings(config_for(args.data)), tokenizer)
    it = train()
    next(it)
    startup, rss, data_s = time.time() - T0, rss_mib(), time.time() - data_start
    for _ in range(args.batches - 1):
        next(it)
    split = it._args["split"]  # pylint: disable=protected-access
    print(json.dumps({"data": os.path.basename(args.data), "processes": jax.process_count(),
                      "process": jax.process_index(), "examples": len(split),
                      "startup_s": round(startup, 2), "peak_rss_mib": round(rss),
                      "rss_before_data_mib": round(before), "data_s": round(data_s, 2),
                      "batches": args.batches,
                      "rows_read": getattr(split, "rows_read", summary.train.rows),  # JSONL: the whole file
                      "rows_in_batches": args.batches * summary.batch_shape[0]
                      * summary.batch_shape[2],
                      "token_bytes_read": getattr(split, "bytes_read", None)}), flush=True)


def rss_mib(field: str = "VmHWM") -> float:
    """This process's peak RSS (VmHWM), or its current RSS (VmRSS). Not ru_maxrss: Linux
    carries that across exec, so a worker started by a big parent would report the parent's peak."""
    with open("/proc/self/status", encoding="ascii") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(data: str, tok_dir: str, processes: int, batches: int) -> None:
    port, procs = _free_port(), []
    for rank in range(processes):
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
                   KTO_JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   KTO_JAX_NUM_PROCESSES=str(processes), KTO_JAX_PROCESS_ID=str(rank))
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", f"--data={data}",
                                       f"--tokenizer={tok_dir}", f"--batches={batches}"],
                                      env=env, cwd=REPO))
    for proc in procs:
        if proc.wait() != 0:
            raise SystemExit(f"worker failed ({proc.returncode})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="100000,1000000")
    parser.add_argument("--jsonl-rows", default="")
    parser.add_argument("--out", default="/tmp/kto_jax_data_scale")
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--data", default="")
    parser.add_argument("--tokenizer", default="")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    sys.path.insert(0, REPO)
    for rows in [int(r) for r in args.rows.split(",") if r]:
        data, tok_dir = write_inputs(args.out, rows)
        prepared = os.path.join(args.out, f"prepared_{rows}")
        if not os.path.exists(os.path.join(prepared, "prepared.json")):
            from kto_jax.data.prepare import prepare  # pylint: disable=import-outside-toplevel
            from kto_jax.models import load_tokenizer  # pylint: disable=import-outside-toplevel
            from kto_jax.train.settings import read_data_settings  # pylint: disable=import-outside-toplevel
            start = time.time()
            prepare(read_data_settings(config_for(data)), load_tokenizer(tok_dir), prepared)
            print(json.dumps({"prepare_rows": rows, "prepare_s": round(time.time() - start, 1),
                              "prepare_peak_rss_mib": round(rss_mib())}), flush=True)
        for processes in (1, 2):
            run_workers(prepared, tok_dir, processes, args.batches)
    for rows in [int(r) for r in args.jsonl_rows.split(",") if r]:
        data, tok_dir = write_inputs(args.out, rows)
        for processes in (1, 2):
            run_workers(data, tok_dir, processes, args.batches)


if __name__ == "__main__":
    main()
