"""What every subcommand does before its work: help, flags, the config and its overrides.

Config-driven commands (train, compile, precompute-ref, data inspect) call

    config, flag_values = parse_config_command(argv, prog="kto-jax train", doc=__doc__,
                                               define_flags=_define_flags)

which prints the command's help and exits 0 on -h/--help (its docstring, every option
with its default, and how `--config.KEY=VALUE` overrides work), loads `--config` with
its overrides (kto_jax/config.py: an unknown key or a wrong type is a UserError naming
the key) and refuses positional arguments. argparse commands build their parser with
`command_parser`, which says the same about overrides where the command takes them.
Help ends in SystemExit(0), as argparse's does; `kto_jax.cli.main` turns either into
the exit code.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from typing import Callable

import ml_collections
from absl import flags

from kto_jax.config import load_config
from kto_jax.errors import UserError

HELP_FLAGS = ("-h", "--help", "--helpfull")

CONFIG_OVERRIDES_HELP = """\
config:
  --config=PATH                a config file with get_config(): configs/base.py (every field,
                               its default and meaning) or a recipe built on it (configs/*.py)
  --config.SECTION.KEY=VALUE   override one field, after --config; repeat for more, e.g.
                               --config.train.num_steps=100 --config.loss.beta=0.2
                               --config.data.train_path=feedback.jsonl. An unknown key or a
                               value of the wrong type is an error that names the key.
                               docs/training.md explains the fields and how they fit together.
"""

DefineFlags = Callable[[flags.FlagValues], None]


def parse_config_command(argv: list[str], *, prog: str, doc: str,
                         define_flags: DefineFlags | None = None
                         ) -> tuple[ml_collections.ConfigDict, flags.FlagValues]:
    """(config, flag values) of a config-driven command; help, or a stray argument, ends it.

    Args:
      argv: the arguments after the subcommand's name.
      prog: e.g. "kto-jax train", for messages.
      doc: the command's help text (its module docstring).
      define_flags: defines the command's own absl flags on a FlagValues (e.g. --workdir).

    Raises:
      SystemExit(0): after printing the help, when argv asks for it.
      UserError: a missing or bad --config, a bad override or flag, positional arguments.
    """
    if any(a in HELP_FLAGS for a in argv):
        sys.stdout.write(config_command_help(doc, define_flags))
        raise SystemExit(0)
    config, rest, flag_values = load_config(argv, extra_flags=define_flags)
    if rest:
        raise UserError(f"unexpected arguments {rest}: {prog} takes only flags "
                        "(--config=..., --config.KEY=VALUE and the options of --help).")
    return config, flag_values


def config_command_help(doc: str, define_flags: DefineFlags | None = None) -> str:
    """`doc`, then the command's options (flag, default, help), then `CONFIG_OVERRIDES_HELP`."""
    fv = flags.FlagValues()
    if define_flags is not None:
        define_flags(fv)
    rows = []
    for name in fv:
        flag = fv[name]
        if name != flag.name:  # a short name of a flag already listed
            continue
        if isinstance(flag, flags.BooleanFlag):
            usage = f"--[no]{name}"
        else:
            usage = f"--{name}={'N' if flag.flag_type() == 'int' else name.upper()}"
        default = "" if flag.default in (None, "") else f" (default: {flag.default})"
        rows.append((usage, flag.help + default))
    rows.append(("-h, --help", "show this help and exit"))
    width = min(max(len(usage) for usage, _ in rows), 24) + 2
    lines, indent = [], " " * (width + 2)
    for usage, text in rows:
        wrapped = textwrap.wrap(text, 92 - width) or [""]
        if len(usage) + 2 > width:  # a long flag: its help on the next lines
            lines += [f"  {usage}"] + [indent + line for line in wrapped]
        else:
            lines += [f"  {usage:<{width}}{wrapped[0]}"] + [indent + line for line in wrapped[1:]]
    return f"{doc.strip()}\n\noptions:\n" + "\n".join(lines) + "\n\n" + CONFIG_OVERRIDES_HELP


def command_parser(prog: str, doc: str, *, config_overrides: bool = False) -> argparse.ArgumentParser:
    """An argparse parser showing `doc` verbatim; `config_overrides` appends the config help."""
    return argparse.ArgumentParser(prog=prog, description=doc,
                                   epilog=CONFIG_OVERRIDES_HELP if config_overrides else None,
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   allow_abbrev=False)
