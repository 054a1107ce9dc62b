"""`kto-jax compile --config=configs/X.py --topology=v5p-32 [--model=PRESET] [--config.a.b=v ...]`.

Compiles the run's real train step (kto_jax/step/train_step.py) ahead of time for a Cloud
TPU slice, on this machine, without TPUs or weights (libtpu, the `tpu` extra), and
prints each chip's memory and whether the program fits its HBM. Exit code 0: fits;
1: does not fit; 2: bad input.

The architecture comes from --model (a preset: llama3_8b, llama3_70b, mistral_7b,
qwen25_3b, ...), else config.json in config.model.path, else config.model.preset
(the paper's recipes in configs/ set it). The batch is the largest
the data pipeline can emit: prompts padded to data.max_prompt_length and completions
to data.max_completion_length (or data.max_length), unless --prompt_len /
--completion_len say otherwise. --find_microbatch searches the largest per-chip
microbatch that fits, keeping the config's number of accumulation microbatches.
"""

from __future__ import annotations

from absl import flags

from kto_jax.commands.preamble import parse_config_command
from kto_jax.errors import UserError
from kto_jax.models import PRESETS


def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("topology", None, "TPU slice: v5p-32, v5e-16 (v5litepod-16), v4-8, v6e-8, 2xv5p-32.",
                        flag_values=fv)
    flags.DEFINE_string("model", None, f"Architecture preset ({', '.join(PRESETS)}); default: "
                        "config.json in config.model.path, else config.model.preset.", flag_values=fv)
    flags.DEFINE_integer("prompt_len", None, "Padded prompt length P (default: data.max_prompt_length).",
                         flag_values=fv)
    flags.DEFINE_integer("completion_len", None, "Padded completion length C (default: "
                         "data.max_completion_length or data.max_length).", flag_values=fv)
    flags.DEFINE_bool("find_microbatch", False, "Search the largest per-chip microbatch that fits "
                      "(powers of two) instead of compiling the config's.", flag_values=fv)
    flags.DEFINE_integer("max_microbatch", 64, "Largest per-chip microbatch --find_microbatch tries.",
                         flag_values=fv)


def main(argv: list[str]) -> int:
    config, fv = parse_config_command(argv, prog="kto-jax compile", doc=__doc__,
                                      define_flags=_define_flags)
    if not fv["topology"].value:
        raise UserError("missing --topology=SLICE, e.g. --topology=v5p-32 (docs/tpu.md).")
    from kto_jax.perf import aot  # pylint: disable=import-outside-toplevel  # jax and libtpu: after the flags
    fits = aot.compile_run_config(
        config, fv["topology"].value, model=fv["model"].value, prompt_len=fv["prompt_len"].value,
        completion_len=fv["completion_len"].value, find_microbatch=fv["find_microbatch"].value,
        max_microbatch=fv["max_microbatch"].value)
    return 0 if fits else 1
