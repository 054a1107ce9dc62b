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
from kto_jax.data import batching, build_datasets, prepared
from kto_jax.data.prepare import prepare
from kto_jax.data.prepared import is_prepared
from kto_jax.data.tokenize import Ragged
from kto_jax.train.settings import read_data_settings
from kto_jax.errors import UserError

from conftest import ROOT, base_config, paired_rows, unpaired_rows, write_jsonl
from test_pipeline import assert_batches_equal, collect


def _config(path, **overrides):
    return base_config(**{"data.train_path": path, **overrides})


def _batches(config, tokenizer, count=1, index=0):
    train, evaluation, summary = build_datasets(read_data_settings(config), tokenizer, process_index=index,
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
    meta = prepare(read_data_settings(_config(source, **overrides)), tokenizer, out)
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
    prepare(read_data_settings(_config(write_jsonl(tmp_path / "d.jsonl", unpaired_rows(40, 4)))),
            tokenizer, out)
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
        prepare(read_data_settings(_config(str(bad))), tokenizer, str(tmp_path / "never"))
    with pytest.raises(UserError) as from_training:
        _batches(_config(str(bad)), tokenizer)
    assert str(from_prepare.value) == str(from_training.value)
    assert f"{bad}:2" in str(from_prepare.value)

    out = str(tmp_path / "prepared")
    prepare(read_data_settings(_config(write_jsonl(tmp_path / "d.jsonl", unpaired_rows(20, 1)))),
            tokenizer, out)
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


def _ragged(rng, n, hi):
    return Ragged.from_lists([rng.integers(0, 300, rng.integers(0 if hi < 9 else 1, hi)).tolist()
                              for _ in range(n)])


@pytest.mark.parametrize("sides", [1, 2])
def test_split_written_in_chunks_equals_one_write_and_reads_back_every_row(tmp_path, sides):
    """More than BLOCK examples, chunks not aligned with BLOCK: same bytes as one write, and
    each example's tokens come back from its block offset plus the lengths before it."""
    rng = np.random.default_rng(0)
    n = 2 * prepared.BLOCK + 517
    prompts, completions = _ragged(rng, n, 20), tuple(_ragged(rng, n, 7 + s) for s in range(sides))
    label, weight = rng.random(n) < 0.5, rng.random(n).astype(np.float32)
    token_hash = rng.integers(0, 2 ** 32, n).astype(np.int64)
    layouts = {}
    for name, chunk in (("whole", n), ("chunked", 700)):
        writer = prepared.SplitWriter(str(tmp_path / name), max_length=64, vocab_size=300,
                                      sides=sides)
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            writer.add(prompts.slice(lo, hi), tuple(c.slice(lo, hi) for c in completions),
                       label[lo:hi], weight[lo:hi], token_hash[lo:hi])
        layouts[name] = writer.close()
    assert layouts["whole"] == layouts["chunked"]
    for f in sorted(p.name for p in (tmp_path / "whole").iterdir()):
        assert (tmp_path / "whole" / f).read_bytes() == (tmp_path / "chunked" / f).read_bytes(), f
    layout = layouts["whole"]
    assert layout["token_dtype"] == "uint16" and layout["constant_weight"] is None
    total = len(prompts.flat) + sum(len(c.flat) for c in completions)
    assert layout["tokens"] == total == (tmp_path / "whole" / "tokens.bin").stat().st_size // 2

    split = prepared.PreparedSplit(str(tmp_path / "chunked"), layout)
    assert split.prompt_lengths.dtype == np.uint16 and split.paired == (sides == 2)
    np.testing.assert_array_equal(split.desirable, label)
    ids = np.array([0, 1, prepared.BLOCK - 1, prepared.BLOCK, prepared.BLOCK + 1, n - 1,
                    *rng.integers(0, n, 50)])
    tokens = split.row_tokens(ids.reshape(2, -1))
    for i in ids:
        np.testing.assert_array_equal(tokens.prompts[int(i)], prompts[int(i)])
        for s in range(sides):
            np.testing.assert_array_equal(tokens.completions[s][int(i)], completions[s][int(i)])
    assert split.rows_read == len(np.unique(ids))
    hashed = np.concatenate(list(split.token_hash.chunks(1000)))
    np.testing.assert_array_equal(hashed, token_hash.astype(np.uint32))


def test_a_directory_of_an_earlier_format_is_refused_with_the_fix(tokenizer, tmp_path):
    out = tmp_path / "prepared"
    prepare(read_data_settings(_config(write_jsonl(tmp_path / "d.jsonl", unpaired_rows(20, 1)))),
            tokenizer, str(out))
    meta = json.loads((out / "prepared.json").read_text())
    meta["version"] = 1
    (out / "prepared.json").write_text(json.dumps(meta))
    with pytest.raises(UserError) as err:
        _batches(_config(str(out)), tokenizer)
    assert "format version 1 (ArrayRecord" in str(err.value)
    assert f"reads version {prepared.VERSION}" in str(err.value)
    assert f"Re-run `kto-jax data prepare --out={out}`" in str(err.value)


def test_prepare_in_chunks_writes_the_same_bytes_as_in_one_piece(tokenizer, tmp_path, monkeypatch):
    """Streaming tokenisation: chunks of 7 examples (not dividing any split) give the files of
    one chunk; and an error found only after all chunks leaves no directory behind."""
    from kto_jax.data import prepare as prepare_module
    source = write_jsonl(tmp_path / "d.jsonl", paired_rows(45, seed=5))
    config = _config(source, **{"data.eval_fraction": 0.2})
    outs = {}
    for chunk in (10 ** 6, 7):
        monkeypatch.setattr(prepare_module, "_CHUNK", chunk)
        outs[chunk] = tmp_path / f"out_{chunk}"
        prepare(read_data_settings(config), tokenizer, str(outs[chunk]))
    files = sorted(str(p.relative_to(outs[7])) for p in outs[7].rglob("*") if p.is_file())
    assert "train/tokens.bin" in files and "eval/tokens.bin" in files
    assert files == sorted(str(p.relative_to(outs[10 ** 6])) for p in outs[10 ** 6].rglob("*")
                           if p.is_file())
    for name in files:
        assert (outs[7] / name).read_bytes() == (outs[10 ** 6] / name).read_bytes(), name

    rows = unpaired_rows(30, 3)
    rows[20]["prompt"] = " ".join(["moon"] * 300)                 # overlong, in the third chunk
    with pytest.raises(UserError, match="longer than data.max_length"):
        prepare(read_data_settings(_config(write_jsonl(tmp_path / "long.jsonl", rows),
                        **{"data.on_overlong": "error"})), tokenizer, str(tmp_path / "failed"))
    assert not (tmp_path / "failed" / "train").exists()


def test_grain_worker_processes_read_a_prepared_directory(tokenizer, tmp_path):
    """The split is pickled to the worker (zero-stride columns, no open file) and reads there."""
    scored = [{"prompt": r["prompt"], "completion": r["completion"], "score": float(i % 9)}
              for i, r in enumerate(unpaired_rows(40, 4))]
    overrides = {"data.score_weighting": True, "data.score_threshold": 4.5}
    source = write_jsonl(tmp_path / "d.jsonl", scored)
    out = str(tmp_path / "prepared")
    meta = prepare(read_data_settings(_config(source, **overrides)), tokenizer, out)
    assert meta["splits"]["train"]["layout"]["constant_weight"] is None    # scored weights
    reference = collect(_batches(_config(source, **overrides), tokenizer)[0]())
    train = _batches(_config(out, **overrides, **{"data.worker_count": 1, "data.prefetch": 2}),
                     tokenizer)[0]
    assert_batches_equal(collect(train()), reference)
