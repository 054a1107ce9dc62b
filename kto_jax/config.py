"""Load a run's config: `--config=configs/X.py` plus `--config.a.b=value` overrides.

Configs are Python files with `get_config() -> ConfigDict` (configs as code), read
through ml_collections' `config_flags` with the config locked, so an unknown key or
a value of the wrong type is an error that names the key, not a silent new field.
"""

from __future__ import annotations

import importlib.util
import json
import os

import ml_collections
from absl import flags
from ml_collections import config_flags

from kto_jax.errors import UserError


def load_config(argv: list[str], *, extra_flags=None
                ) -> tuple[ml_collections.ConfigDict, list[str], flags.FlagValues]:
    """Parses `--config` and its overrides out of argv.

    Args:
      argv: command-line arguments after the subcommand name.
      extra_flags: optional callable(flag_values) that defines the subcommand's own
        absl flags on the given FlagValues (e.g. `--workdir`).

    Returns:
      (config, rest, flag_values): the locked, resolved config; the positional
      arguments left over; the parsed FlagValues, for the subcommand's own flags.
    """
    argv = ["kto-jax"] + list(argv)
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", default=None, flag_values=fv, lock_config=True,
                                    sys_argv=argv,
                                    help_string="Path to a config file with get_config().")
    if extra_flags is not None:
        extra_flags(fv)
    _check_config_path(argv)
    try:
        rest = fv(argv, known_only=False)
    except flags.Error as err:
        raise UserError(_flag_error_message(err, argv)) from None
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise UserError(_unknown_key_message(err, argv)) from None
    if fv["config"].value is None:
        raise UserError("missing --config=PATH: pass a config file such as configs/tiny_cpu.py.")
    config = fv["config"].value
    return config, rest[1:], fv


def _check_config_path(argv: list[str]) -> None:
    for arg in argv:
        if arg.startswith("--config=") and not arg.startswith("--config."):
            path = arg.split("=", 1)[1].split(":", 1)[0]
            if not os.path.isfile(path):
                raise UserError(f"config file {path!r} not found: pass --config=PATH to an existing "
                                "configs/*.py file.")


def _overrides(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0].removeprefix("--config.") for a in argv if a.startswith("--config.")]


def _unknown_key_message(err: Exception, argv: list[str]) -> str:
    while err.args and isinstance(err.args[0], Exception):  # config_flags nests the KeyError
        err = err.args[0]
    detail = str(err.args[0] if err.args else err).strip("'\"")
    missing = detail.split("\n")[0].strip("'\"")
    keys = (_unresolved_overrides(argv) or [k for k in _overrides(argv) if missing in k.split(".")]
            or _overrides(argv))
    hint = detail.split("\n", 1)[1].strip() if "\n" in detail else ""
    return (f"unknown config key {', '.join(keys)!s}. {hint} "
            "See configs/base.py for every field.").replace("  ", " ")


def _unresolved_overrides(argv: list[str]) -> list[str]:
    """The overrides whose dotted key is not a field of the config file (none if it cannot be read)."""
    path = next((a.split("=", 1)[1].split(":", 1)[0] for a in argv if a.startswith("--config=")), "")
    try:
        config = config_file(path)
    except Exception:  # noqa: BLE001 - the message then falls back to matching key names
        return []

    def resolves(key: str) -> bool:
        node = config
        for part in key.split("."):
            part = part.split("[", 1)[0]
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                return False
            node = node[part]
        return True

    return [k for k in _overrides(argv) if not resolves(k)]


def _flag_error_message(err: Exception, argv: list[str]) -> str:
    text = str(err).strip()
    if text.startswith("Unknown command line flag 'config.") or "before a value for --config" in text:
        return (f"{text}: put --config=PATH before any --config.KEY=VALUE override.")
    if text.startswith("flag --config."):
        key = text.split("=", 1)[0].removeprefix("flag --config.")
        return f"bad value for config key {key}: {text.split(': ', 1)[-1]}"
    return f"bad flag: {text}"


def config_to_json(config: ml_collections.ConfigDict, **sections: ml_collections.ConfigDict) -> str:
    """The resolved config as stable JSON, stored with checkpoints and in the workdir.

    `sections` replace whole top-level sections, e.g. `loss=settings.hparams`: the loss
    settings the run trains with (its resolved lambda weights), not the config's.
    """
    record = config.to_dict()
    record.update({name: section.to_dict() for name, section in sections.items()})
    return json.dumps(record, indent=2, sort_keys=True, default=str)


CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def config_file(name_or_path: str) -> ml_collections.ConfigDict:
    """`get_config()` of a config file, by path or by name in this checkout's configs/.

    Configs are files, not an importable package; recipes build on each other with
    `config_file("base")`, and library code that needs the documented defaults
    (benchmarks, tests) starts from the same file.
    """
    path = name_or_path if name_or_path.endswith(".py") else os.path.join(CONFIGS_DIR, f"{name_or_path}.py")
    if not os.path.isfile(path):
        raise UserError(f"config file {path!r} not found: kto-jax reads configs/ from its source "
                        "checkout (install it with `pip install -e .`).")
    stem = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"kto_jax_configs_{stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
