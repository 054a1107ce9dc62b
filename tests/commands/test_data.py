"""`kto-jax data inspect`: the printed summary, and errors without tracebacks."""

import os

from kto_jax import cli

from conftest import ROOT, unpaired_rows, write_jsonl

BASE = os.path.join(ROOT, "configs", "base.py")


def run(capsys, *args):
    code = cli.main(["data", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_inspect_prints_the_summary(capsys, tmp_path, tokenizer_dir):
    rows = unpaired_rows(60, desirable_every=4)
    rows[5]["prompt"] = " ".join(["moon"] * 300)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    code, out, err = run(capsys, "inspect", f"--config={BASE}", f"--config.data.train_path={path}",
                         "--config.data.max_length=64", "--config.data.max_prompt_length=32",
                         "--config.data.bucket_lengths=(16,32,64)", "--config.data.eval_fraction=0.1",
                         f"--tokenizer={tokenizer_dir}")
    assert code == 0, err
    assert "format: unpaired (text)" in out
    assert "train: " in out and "54 rows -> 54 examples -> 53 kept" in out
    assert "n_D = " in out and "undesirable" in out
    assert "dropped 1: prompt longer than data.max_length, e.g." in out
    assert f"    {path}:6: " in out and " prompt tokens" in out
    assert "p50" in out and "padding efficiency" in out
    assert "eq. 9 recommends lambda_D=" in out
    assert "eval: " in out and "6 rows" in out


def test_inspect_renders_gemma_conversations_as_its_template_does(capsys, tmp_path):
    """Gemma 3's template folds a system message into the first user turn: every row is kept;
    Gemma 2's refuses system messages: those rows are dropped, with the template's words."""
    from tiny_models import tokenizer, write_gemma_feedback
    path = tmp_path / "gemma.jsonl"
    write_gemma_feedback(str(path), 40)
    for name, kept in (("gemma3", "40 rows -> 40 examples -> 40 kept"), ("gemma2", "-> 20 kept")):
        tok_dir = tmp_path / name
        tokenizer(name).save_pretrained(str(tok_dir))
        code, out, err = run(capsys, "inspect", f"--config={BASE}", f"--config.data.train_path={path}",
                             "--config.data.eval_fraction=0.0", f"--tokenizer={tok_dir}")
        assert code == 0, err
        assert "format: unpaired (conversational)" in out and kept in out
        assert ("System role not supported" in out) == (name == "gemma2")


def test_inspect_errors_are_messages_not_tracebacks(capsys, tmp_path, tokenizer_dir):
    code, _, err = run(capsys, "inspect", f"--config={BASE}",
                       f"--config.data.train_path={tmp_path / 'missing.jsonl'}",
                       f"--tokenizer={tokenizer_dir}")
    assert code == 2 and "no such file or directory" in err and "Traceback" not in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b", "label": "yes"}\n')
    code, _, err = run(capsys, "inspect", f"--config={BASE}", f"--config.data.train_path={bad}",
                       f"--tokenizer={tokenizer_dir}")
    assert code == 2 and f"{bad}:1: field 'label' must be a bool" in err
    code, _, err = run(capsys, "inspect", f"--config={BASE}", f"--config.data.train_path={bad}")
    assert code == 2 and "config.model.path is empty" in err


def test_help_and_unknown_subcommand(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "kto-jax data inspect" in out
    code, _, err = run(capsys, "summarize")
    assert code == 2 and "unknown data command 'summarize'" in err
