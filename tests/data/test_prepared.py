"""`kto-jax data prepare` and training from a prepared directory.

The prepared path must give the same batches, summary and fingerprint as the original
file (1 and 2 processes), read only each process's rows, resume exactly, raise the
same validation errors, and refuse a config it was not prepared with.
"""

import json
import re

import numpy as np
import pytest

from kto_jax import cli
from kto_jax.data import batching, build_datasets
from kto_jax.data.prepare import prepare
from kto_jax.data.prepared import is_prepared
from kto_jax.errors import UserError

from conftest import ROOT, base_config, paired_rows, unpaired_rows, write_jsonl
from test_pipeline import assert_batches_equal, collect

pytest.importorskip("array_record")


def _config(path, **overrides):
    return base_config(**{"data.train_path": path, **overrides})


def _batches(config, tokenizer, count=1, index=0):
    train, evaluation, summary = build_datasets(config, tokenizer, process_index=index,
                                                process_count=count)
    return train, evaluation, summary


@pytest.mark.parametrize("overrides", [
    {"data.eval_fraction": 0.2, "data.bucket_window": 2},                  # unpaired KTO, eval split
    {"loss.name": "dpo"},                                                  # pairs kept together
])
def test_prepared_directory_gives_the_files_batches_with_each_process_reading_its_rows(
        tokenizer, tmp_path, overrides):
    rows = paired_rows(40, seed=3) if overrides.get("loss.name") == "dpo" else unpaired_rows(50, 2)
    source = write_jsonl(tmp_path / "d.jsonl", rows)
    out = str(tmp_path / "prepared")
    meta = prepare(_config(source, **overrides), tokenizer, out)
    assert is_prepared(out) and not is_prepared(source)

    train, evaluation, summary = _batches(_config(source, **overrides), tokenizer)
    expected = collect(train(num_epochs=2))
    p_train, p_eval, p_summary = _batches(_config(out, **overrides), tokenizer)
    assert_batches_equal(collect(p_train(num_epochs=2)), expected)
    assert p_summary.fingerprint == summary.fingerprint
    assert str(p_summary) == str(summary)
    assert (p_eval is None) == (evaluation is None)
    if evaluation is not None:
        assert_batches_equal(collect(p_eval()), collect(evaluation()))
    assert meta["splits"]["train"]["kept"] == summary.train.kept

    # Two processes: each one's slices equal the file's, and it reads only its own rows.
    halves = []
    for index in range(2):
        it = _batches(_config(out, **overrides), tokenizer, count=2, index=index)[0]()
        halves.append(collect(it))
        split, layout = it._args["split"], it._args["plans"].layout
        plan = batching.plan_epoch(split.prompt_lengths, split.completion_lengths, layout,
                                   seed=0, epoch=0, stream=3)
        own = [np.unique(batching.local_rows(planned, layout)[0]) for planned in plan]
        assert split.rows_read == sum(len(rows) for rows in own)    # one read per own row
        assert abs(split.rows_read - len(split) / 2) <= layout.global_batch
    for x, y0, y1 in zip(collect(_batches(_config(out, **overrides), tokenizer)[0]()), *halves):
        for key in x:
            np.testing.assert_array_equal(x[key], np.concatenate([y0[key], y1[key]], axis=1))


def test_resume_from_a_prepared_directory_is_exact(tokenizer, tmp_path):
    out = str(tmp_path / "prepared")
    prepare(_config(write_jsonl(tmp_path / "d.jsonl", unpaired_rows(40, 4))), tokenizer, out)
    factory = _batches(_config(out), tokenizer)[0]
    full = collect(factory(num_epochs=2))
    it = factory(num_epochs=2)
    head = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(it.get_state()))
    resumed = _batches(_config(out), tokenizer)[0](num_epochs=2)
    resumed.set_state(state)
    assert_batches_equal(collect(head) + collect(resumed), full)


def test_prepare_raises_the_files_errors_and_training_refuses_other_settings(tokenizer, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b", "label": true}\n{"prompt": \n')
    with pytest.raises(UserError) as from_prepare:
        prepare(_config(str(bad)), tokenizer, str(tmp_path / "never"))
    with pytest.raises(UserError) as from_training:
        _batches(_config(str(bad)), tokenizer)
    assert str(from_prepare.value) == str(from_training.value)
    assert f"{bad}:2" in str(from_prepare.value)

    out = str(tmp_path / "prepared")
    prepare(_config(write_jsonl(tmp_path / "d.jsonl", unpaired_rows(20, 1))), tokenizer, out)
    with pytest.raises(UserError, match=re.escape("data.max_length: prepared 64, config 48")):
        _batches(_config(out, **{"data.max_length": 48}), tokenizer)
    with pytest.raises(UserError, match="paired loss"):
        _batches(_config(out, **{"loss.name": "dpo"}), tokenizer)


def test_data_prepare_command(capsys, tmp_path, tokenizer_dir):
    source = write_jsonl(tmp_path / "d.jsonl", unpaired_rows(30, 6))
    out = str(tmp_path / "prep")
    args = ["data", "prepare", f"--config={ROOT}/configs/tiny_cpu.py", f"--config.data.train_path={source}",
            f"--tokenizer={tokenizer_dir}", f"--out={out}"]
    assert cli.main(args) == 0
    assert f"in {out}" in capsys.readouterr().out and is_prepared(out)
    assert cli.main(args[:-1]) == 2
    assert "needs --out=DIR" in capsys.readouterr().err
