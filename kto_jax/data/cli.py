"""`kto-jax data inspect --config=configs/X.py [--config.data.x=y ...] [--tokenizer=PATH]`.

Runs the data preparation of a training run without a model and prints the
resolved summary: rows read and examples per class, what was dropped and why,
length percentiles, the buckets' padding efficiency and the eq. 9 λ advice.
"""

from __future__ import annotations

import logging
import sys

from kto_jax.errors import UserError

USAGE = """usage: kto-jax data inspect --config=configs/X.py [--config.KEY=VALUE ...] [--tokenizer=PATH]
       kto-jax data prepare --config=configs/X.py --out=DIR [--config.KEY=VALUE ...]

Prints what the training run would read from config.data: rows, examples per class,
drops and their reasons, token-length percentiles, bucket shapes and padding
efficiency, and the lambda_D / lambda_U recommendation of eq. 9.
The tokenizer comes from config.model.path unless --tokenizer is given.
prepare validates and tokenises config.data once into DIR; train with
--config.data.train_path=DIR and each process reads only its rows (docs/data.md).
"""


def main(argv: list[str]) -> int:
    """Entry point of `kto-jax data`; returns the exit code."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0
    if argv[0] not in ("inspect", "prepare"):
        raise UserError(f"unknown data command {argv[0]!r}; use 'inspect' or 'prepare'.\n{USAGE}")
    from kto_jax.config import load_config  # pylint: disable=import-outside-toplevel
    config, rest, flag_values = load_config(argv[1:], extra_flags=_define_flags)
    if rest:
        raise UserError(f"unexpected arguments {rest}; see 'kto-jax data --help'.")
    tokenizer = load_tokenizer(flag_values["tokenizer"].value or config.model.path)
    if argv[0] == "prepare":
        from kto_jax.data.prepared import prepare  # pylint: disable=import-outside-toplevel
        if not flag_values["out"].value:
            raise UserError("data prepare needs --out=DIR, the directory to write.")
        meta = prepare(config, tokenizer, flag_values["out"].value)
        kept = ", ".join(f"{n} {s['kept']} examples" for n, s in meta["splits"].items())
        sys.stdout.write(f"prepared {kept} in {flag_values['out'].value}\n")
        return 0
    from kto_jax.data.pipeline import build_datasets  # pylint: disable=import-outside-toplevel
    logging.getLogger("kto_jax.data").setLevel(logging.ERROR)  # warnings are in the summary
    # The global view: one process holding whole microbatches (no accelerator needed).
    _, _, summary = build_datasets(config, tokenizer, process_index=0, process_count=1)
    sys.stdout.write(str(summary) + "\n")
    return 0


def _define_flags(flag_values) -> None:
    from absl import flags  # pylint: disable=import-outside-toplevel
    flags.DEFINE_string("tokenizer", None, "Tokenizer directory (default: config.model.path).",
                        flag_values=flag_values)
    flags.DEFINE_string("out", None, "data prepare: the directory to write.", flag_values=flag_values)


def load_tokenizer(path: str):
    """The run's tokenizer (`kto_jax.models.load_tokenizer`: HF directory or .gguf file)."""
    if not path:
        raise UserError("config.model.path is empty: data inspect needs the model's tokenizer; "
                        "pass --config.model.path=DIR or --tokenizer=DIR.")
    from kto_jax.models import load_tokenizer as models_loader  # pylint: disable=import-outside-toplevel
    return models_loader(path)
