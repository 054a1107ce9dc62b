"""The `kto-jax` console script: a thin dispatcher to subcommand modules.

Each subcommand is `module:function` in kto_jax/commands/ taking the remaining argv
and returning an exit code; modules load lazily so `kto-jax --help` stays fast. A
`UserError` becomes a clear message and exit code 2, never a traceback; a SystemExit
(a command's --help, an argparse error) becomes its code, so `main` always returns one.
Other packages' start-up noise is stopped before any of them loads (kto_jax/console.py);
`kto-jax --verbose <command>` (or KTO_JAX_VERBOSE=1) lets it through.
"""

from __future__ import annotations

import importlib
import sys

from kto_jax import console
from kto_jax.errors import UserError

SUBCOMMANDS = {
    # name: (module:function, one-line help)
    "train": ("kto_jax.commands.train:main", "train a model: --config=configs/X.py --workdir=DIR"),
    "online": ("kto_jax.commands.online:main", "online KTO: rounds of sample -> judge -> train from the live policy: --config=configs/X.py --workdir=DIR"),
    "export": ("kto_jax.commands.export:main", "write a run's checkpoint as a Hugging Face model"),
    "data": ("kto_jax.commands.data:main", "inspect a run's dataset: --config=configs/X.py (rows, drops, lengths, lambda)"),
    "compile": ("kto_jax.commands.compile:main", "compile the train step for a TPU slice on this machine; per-chip memory and fit: --config=... --topology=v5p-32"),
    "bench": ("kto_jax.commands.bench:main", "time the KTO step on a named model shape; prints one JSON line"),
    "precompute-ref": ("kto_jax.commands.precompute_ref:main", "store the reference log-probs of a run's batches: --config=... --out=DIR"),
    "demo": ("kto_jax.commands.demo:main", "the README's first command: KTO-align SmolLM2-135M on rule-judged feedback, before/after table (about 6 min on an idle 2-core CPU)"),
    "sample": ("kto_jax.commands.sample:main", "generate completions: --model HF_DIR|WORKDIR|GGUF --prompts FILE [--out FILE]"),
    "eval": ("kto_jax.commands.eval:main", "reward margins/accuracy and judged winrate (90% CI) on held-out feedback: --model ... --data FILE --judge SPEC"),
}

USAGE = "usage: kto-jax [--verbose] <command> [options]\n\ncommands:\n"


def _usage() -> str:
    width = max((len(n) for n in SUBCOMMANDS), default=0)
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return (USAGE + "\n".join(lines) + "\n\nRun 'kto-jax <command> --help' for a command's options.\n"
            "--verbose (or KTO_JAX_VERBOSE=1): also show other packages' start-up notices "
            "(libtpu, transformers, Orbax).\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--verbose":
        console.set_verbose()
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        sys.stderr.write(f"kto-jax: unknown command {name!r}.\n\n{_usage()}")
        return 2
    target, _ = SUBCOMMANDS[name]
    console.quiet_third_party()
    module_name, func_name = target.split(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        return int(func(rest) or 0)
    except UserError as err:
        sys.stderr.write(f"kto-jax {name}: error: {err}\n")
        return 2
    except SystemExit as done:
        if done.code is None or isinstance(done.code, int):
            return done.code or 0
        sys.stderr.write(f"{done.code}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"kto-jax {name}: interrupted.\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
