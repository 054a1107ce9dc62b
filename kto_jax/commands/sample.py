"""`kto-jax sample --model PATH --prompts FILE [--out FILE]`: completions for a prompt file.

PATH is a Hugging Face directory, a llama.cpp .gguf file or a `kto-jax train`
workdir (its exported policy). FILE is JSONL with a "prompt" field per line: a
string or a list of {"role", "content"} messages. Messages are rendered with the
tokenizer's chat template; so is a plain string, as one user message, when the
tokenizer has a template (a chat model given bare text often ends at once): --raw
sends strings as they are (as training does with plain-text data). Without a template
strings go as they are, with a warning. Empty completions are reported. Each
output line is the input row plus "completion", "finished" (an end-of-sequence
token was produced) and "num_tokens". Batches are split over all local devices.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from kto_jax.commands.preamble import command_parser
from kto_jax.errors import UserError


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """--max_new_tokens, --temperature, --top_p, --top_k, --seed, --batch_size (shared with eval)."""
    parser.add_argument("--max_new_tokens", type=int, default=256, help="tokens generated per prompt at most")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (with temperature > 0)")
    parser.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--batch_size", type=int, default=16, help="prompts per generation batch")
    parser.add_argument("--chat", action="store_true", help="wrap plain-string prompts in a user message")
    parser.add_argument("--tensor", type=int, default=1, help="devices that split each layer (heads/mlp)")


def sampling_settings(args: argparse.Namespace):
    from kto_jax.eval.sampling import SamplingSettings
    return SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p)


def make_sampler(model_path: str, args: argparse.Namespace):
    """(Sampler over all local devices, resolved model path) for --model."""
    from kto_jax.eval import sampling
    from kto_jax.eval.loading import load_model
    from kto_jax.sharding import make_mesh
    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": args.tensor})
    model, tokenizer, resolved = load_model(model_path, mesh=mesh, rules=sampling.DEFAULT_RULES)
    sampler = sampling.Sampler(model, tokenizer, mesh=mesh, rules=sampling.DEFAULT_RULES,
                               batch_size=args.batch_size, chat=args.chat)
    return sampler, resolved


def read_prompt_rows(path: str) -> list[dict]:
    """The JSONL rows of a prompt file; each must have a "prompt" (string or message list)."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("prompt"), (str, list)):
                    raise UserError(f"{path}:{number}: expected an object with a \"prompt\" string "
                                    "or message list")
                rows.append(row)
    except OSError as e:
        raise UserError(f"cannot read --prompts {path!r}: {e}") from e
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON on line {e.lineno}: {e.msg}") from e
    if not rows:
        raise UserError(f"--prompts {path!r} holds no prompts")
    return rows


def choose_chat(sampler, prompts: list, *, raw: bool) -> str | None:
    """Turns the chat template on for plain-string prompts when the tokenizer has one
    (unless `raw`); returns the line to tell the user, or None."""
    if raw or sampler.chat or not any(isinstance(p, str) for p in prompts):
        return None
    if getattr(sampler.tokenizer, "chat_template", None):
        sampler.chat = True
        return ("applying the tokenizer's chat template to plain-text prompts (each one user "
                "message); pass --raw to send them as they are")
    return ("warning: the tokenizer has no chat template, so plain-text prompts go to the model as "
            "they are; an instruction-tuned model may answer nothing")


def main(argv: list[str]) -> int:
    parser = command_parser("kto-jax sample", __doc__)
    parser.add_argument("--model", required=True, help="HF directory, .gguf file or train workdir")
    parser.add_argument("--prompts", required=True, help="JSONL file with a \"prompt\" field per line")
    parser.add_argument("--out", default="-", help="output JSONL file (default: stdout)")
    parser.add_argument("--raw", action="store_true",
                        help="send plain-string prompts as they are, without the chat template")
    add_sampling_flags(parser)
    args = parser.parse_args(argv)
    rows = read_prompt_rows(args.prompts)
    sampler, resolved = make_sampler(args.model, args)
    note = choose_chat(sampler, [r["prompt"] for r in rows], raw=args.raw)
    if note:
        sys.stderr.write(note + "\n")
    start = time.perf_counter()
    generations = sampler.generate([r["prompt"] for r in rows], sampling_settings(args), seed=args.seed)
    elapsed = time.perf_counter() - start
    out = sys.stdout if args.out == "-" else open(args.out, "w", encoding="utf-8")
    try:
        for row, g in zip(rows, generations):
            out.write(json.dumps(dict(row, completion=g.text, finished=g.finished,
                                      num_tokens=len(g.token_ids))) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    empty = [i for i, g in enumerate(generations) if not g.text.strip()]
    if empty:
        sys.stderr.write(f"warning: {len(empty)} of {len(rows)} completions are empty (rows "
                         f"{', '.join(str(i + 1) for i in empty[:10])}{'...' if len(empty) > 10 else ''}): "
                         "the model ended them at once. "
                         + ("A chat model needs its chat template (drop --raw)." if args.raw else
                            "Check the prompt format the model was trained on.") + "\n")
    tokens = sum(len(g.token_ids) for g in generations)
    sys.stderr.write(f"sampled {len(rows)} completions ({tokens} tokens) from {resolved} "
                     f"in {elapsed:.1f}s\n")
    return 0
