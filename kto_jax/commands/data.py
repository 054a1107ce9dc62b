"""`kto-jax data inspect|prepare --config=configs/X.py [--config.data.x=y ...] [--tokenizer=PATH]`.

inspect: runs the data preparation of a training run without a model and prints the
resolved summary: rows read and examples per class, what was dropped and why,
length percentiles, the buckets' padding efficiency and the eq. 9 λ advice.
prepare (with --out=DIR): validates and tokenises config.data once into DIR; train with
--config.data.train_path=DIR and each process reads only its rows (docs/data.md).
The tokenizer comes from config.model.path unless --tokenizer is given.
"""

from __future__ import annotations

import sys

from absl import flags

from kto_jax.commands.preamble import HELP_FLAGS, config_command_help, parse_config_command
from kto_jax.errors import UserError



def _define_flags(flag_values: flags.FlagValues) -> None:
    flags.DEFINE_string("tokenizer", None, "Tokenizer directory (default: config.model.path).",
                        flag_values=flag_values)
    flags.DEFINE_string("out", None, "data prepare: the directory to write.", flag_values=flag_values)


def main(argv: list[str]) -> int:
    """Entry point of `kto-jax data`; returns the exit code."""
    if not argv or argv[0] in HELP_FLAGS + ("help",):
        sys.stdout.write(config_command_help(__doc__, _define_flags))
        return 0
    if argv[0] not in ("inspect", "prepare"):
        raise UserError(f"unknown data command {argv[0]!r}; use 'inspect' or 'prepare' "
                        "(see 'kto-jax data --help').")
    config, flag_values = parse_config_command(argv[1:], prog=f"kto-jax data {argv[0]}", doc=__doc__,
                                               define_flags=_define_flags)
    tokenizer = load_tokenizer(flag_values["tokenizer"].value or config.model.path)
    from kto_jax.train.settings import read_data_settings  # pylint: disable=import-outside-toplevel
    data = read_data_settings(config)
    if argv[0] == "prepare":
        from kto_jax.data.prepare import prepare  # pylint: disable=import-outside-toplevel
        if not flag_values["out"].value:
            raise UserError("data prepare needs --out=DIR, the directory to write.")
        meta = prepare(data, tokenizer, flag_values["out"].value)
        kept = ", ".join(f"{n} {s['kept']} examples" for n, s in meta["splits"].items())
        sys.stdout.write(f"prepared {kept} in {flag_values['out'].value}\n")
        return 0
    from kto_jax.data.pipeline import build_datasets  # pylint: disable=import-outside-toplevel
    # The global view: one process holding whole microbatches (no accelerator needed).
    _, _, summary = build_datasets(data, tokenizer, process_index=0, process_count=1)
    sys.stdout.write(str(summary) + "\n")
    return 0


def load_tokenizer(path: str):
    """The run's tokenizer (`kto_jax.models.load_tokenizer`: HF directory or .gguf file)."""
    if not path:
        raise UserError("config.model.path is empty: data inspect needs the model's tokenizer; "
                        "pass --config.model.path=DIR or --tokenizer=DIR.")
    from kto_jax.models import load_tokenizer as models_loader  # pylint: disable=import-outside-toplevel
    return models_loader(path)
