"""`kto-jax <command> --help`: exit 0 and every option listed; config-driven commands say how
`--config.KEY=VALUE` overrides work and where the fields are documented. In-process, fast."""

import pytest

from kto_jax import cli

CONFIG_DRIVEN = ("--config=PATH", "--config.SECTION.KEY=VALUE", "configs/base.py", "docs/training.md")

OPTIONS = {
    "train": ("--workdir", "--coordinator_address", "--num_processes", "--process_id") + CONFIG_DRIVEN,
    "export": ("--workdir", "--out", "--step", "--dtype", "--format"),
    "data": ("kto-jax data inspect", "prepare", "--tokenizer", "--out") + CONFIG_DRIVEN,
    "data inspect": ("--tokenizer",) + CONFIG_DRIVEN,
    "data prepare": ("--tokenizer", "--out") + CONFIG_DRIVEN,
    "compile": ("--topology", "--model", "--prompt_len", "--completion_len", "find_microbatch",
                "--max_microbatch") + CONFIG_DRIVEN,
    "bench": ("--model", "--prompt-len", "--completion-len", "--micro-batch", "--accum", "--steps",
              "--reference", "--attention", "--remat", "--topology", "--lengths", "--layout",
              "--pack-length", "packed_shared"),
    "precompute-ref": ("--out",) + CONFIG_DRIVEN,
    "demo": ("--workdir", "--size", "--model", "--seed", "--smoke", "--lora", "--online"),
    "online": ("--workdir",) + CONFIG_DRIVEN,
    "sample": ("--model", "--prompts", "--out", "--max_new_tokens", "--temperature", "--top_p"),
    "eval": ("--model", "--data", "--reference", "--judge", "--limit", "--max_new_tokens")
            + CONFIG_DRIVEN,
}


def test_every_subcommand_has_a_row():
    assert set(cli.SUBCOMMANDS) <= set(OPTIONS)


@pytest.mark.parametrize("command", sorted(OPTIONS))
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_the_options(command, flag, capsys):
    assert cli.main(command.split() + [flag]) == 0
    out = capsys.readouterr().out
    missing = [option for option in OPTIONS[command] if option not in out]
    assert not missing, out


def test_help_flag_wins_over_other_arguments(capsys):
    """--help anywhere prints the help, even next to a bad override, and nothing runs."""
    assert cli.main(["train", "--config.nosuch.key=1", "--help"]) == 0
    assert "--workdir" in capsys.readouterr().out


def test_the_demo_takes_as_long_in_the_help_as_in_the_readme(capsys):
    import os
    import re
    readme = " ".join(open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md"),
                           encoding="utf-8").read().split())
    assert cli.main(["--help"]) == 0
    demo = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("demo"))
    minutes = re.search(r"about (\d+) min", demo)
    assert minutes, demo
    assert f"About {minutes.group(1)} minutes on an idle 2-core CPU" in readme
    from kto_jax.commands import demo as demo_command
    assert f"About {minutes.group(1)} minutes on an idle" in " ".join(demo_command.__doc__.split())
