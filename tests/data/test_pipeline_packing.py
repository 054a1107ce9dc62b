"""data.packing=True in build_datasets: the same planned examples as the padded batches,
packed per batch shard ([x | y | y_kl] with y_kl rolled within the GLOBAL microbatch, or
[x | y_w | y_l]); one and two processes agree; resume; errors."""

import sys
import os

import numpy as np
import pytest

from kto_jax.batch import batch_fields
from kto_jax.data import build_datasets, packing
from kto_jax.train.settings import read_data_settings
from kto_jax.errors import UserError

from conftest import base_config, paired_rows, unpaired_rows, write_jsonl
from test_pipeline import SimulatedProcesses, assert_batches_equal, collect

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from step_testlib import packed_like  # noqa: E402  pylint: disable=wrong-import-position

PACKING = {"data.packing": True, "data.pack_length": 128, "data.num_epochs": 2,
           "data.bucket_window": 2}


def _config(path, loss="kto", **overrides):
    config = base_config(**{"data.train_path": path, "loss.name": loss, **overrides})
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 1, 4  # 2 batch shards (groups)
    return config


def _batches(config, tokenizer, index=0, count=1, allgather=None):
    data = build_datasets(read_data_settings(config), tokenizer, process_index=index, process_count=count,
                          allgather=allgather)
    return data, collect(data.train_iter_factory())


def _tree_lengths(batch, paired, second=True, kl_share=0.0):
    """[A, M] tokens of each example's [x | y | y2] tree ([x | y] without `second`; with
    `kl_share`, its share of a row beside a kl row, `packing.stream_lengths`), from a
    padded batch."""
    prompt = batch["prompt_mask"].sum(-1)
    if paired:
        return prompt + batch["chosen_mask"].sum(-1) + batch["rejected_mask"].sum(-1)
    y = batch["completion_mask"].sum(-1)
    if not second:
        return prompt + y
    kl = np.take_along_axis(y, packing.kl_partners(batch["valid"]), axis=1)
    if kl_share:
        return packing.stream_lengths(prompt + y, kl, kl_share)
    return prompt + y + kl


def _kl_share(padded):
    """The kl rows' share the pipeline chooses for the examples of these padded batches (a loss
    with z0: `packing.kl_share_for` of the train split's lengths)."""
    valid = [b["valid"].astype(bool) for b in padded]
    main = sum((b["prompt_mask"].sum(-1) + b["completion_mask"].sum(-1))[v].sum()
               for b, v in zip(padded, valid))
    return packing.kl_share_for(main, sum(b["completion_mask"].sum(-1)[v].sum()
                                          for b, v in zip(padded, valid)))


@pytest.mark.parametrize("loss", ["kto", "dpo", "kto_no_z0"])
def test_packed_batches_hold_the_padded_batches_examples(tokenizer, tmp_path, loss):
    paired = loss == "dpo"
    rows = paired_rows(30, seed=3) if paired else unpaired_rows(45, seed=1)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    _, padded = _batches(_config(path, loss, **{**PACKING, "data.packing": False}), tokenizer)
    data, packed = _batches(_config(path, loss, **PACKING), tokenizer)
    assert len(packed) == len(padded) > 2
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    share = _kl_share(padded) if loss == "kto" else 0.0   # z0: y_kl in kl rows
    for p, b in zip(packed, padded):
        assert tuple(p) == tuple(f.name for f in batch_fields(paired, packed=True,
                                                              kl_stream=share > 0))
        rows = p["packed_ids"].shape[1]   # bucketed (data/shapes.py): at least the fewest rows
        assert rows >= packing.microbatch_rows(_tree_lengths(b, paired, loss != "kto_no_z0", share),
                                               128, 2)
        want = packed_like(b, paired, pack_length=128, groups=2, pad_id=pad_id,
                           num_rows=0 if loss == "kto_no_z0" else rows, kl_share=share)
        if loss == "kto_no_z0":  # no z0: the trees carry no y_kl, so other places in the rows
            assert not p["kl_mask"].any()
            assert (p["packed_segment_ids"] > 0).sum() == (b["prompt_mask"].sum()
                                                          + b["completion_mask"].sum())
            keep = ("completion_ids", "completion_mask", "prompt_length", "desirable", "weight",
                    "valid")
            p, want = ({k: x[k] for k in keep} for x in (p, want))
        assert_batches_equal([p], [want])
        assert p[next(iter(p))].shape[1] % 2 == 0  # rows: a multiple of the 2 groups
    assert data.summary.fingerprint != build_datasets(
        read_data_settings(_config(path, loss, **{**PACKING, "data.packing": False})), tokenizer,
        process_index=0, process_count=1).summary.fingerprint


def test_two_processes_pack_the_single_process_batches(tokenizer, tmp_path, monkeypatch):
    """Process p packs its own rows (one group each); its last example's y_kl is the first
    example of process p + 1 (the global roll). Joined in process order: the one-process batch."""
    path = write_jsonl(tmp_path / "u.jsonl", unpaired_rows(45, seed=1))
    _, single = _batches(_config(path, **PACKING), tokenizer)
    two = SimulatedProcesses(2, monkeypatch)
    results = two.run(lambda i, g: _batches(_config(path, **PACKING), tokenizer, i, 2, g)[1])
    for result in results:
        assert not isinstance(result, Exception), result
    joined = [{k: np.concatenate([s0[k], s1[k]], axis=1) for k in s0}
              for s0, s1 in zip(*results)]
    assert_batches_equal(single, joined)


def test_packed_iterator_resumes_at_the_next_batch(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", unpaired_rows(45, seed=1))
    data, reference = _batches(_config(path, **PACKING), tokenizer)
    it = data.train_iter_factory()
    for _ in range(3):
        next(it)
    state = it.get_state()
    resumed = data.train_iter_factory()
    resumed.set_state(state)
    assert_batches_equal(collect(resumed), reference[3:])


def test_packed_batches_from_a_prepared_directory_in_worker_processes(tokenizer, tmp_path):
    """A directory prepared once (`kto-jax data prepare`, packing or not) gives the file's
    packed batches, also from grain worker processes (the split pickled to them)."""
    from kto_jax.data.prepare import prepare  # pylint: disable=import-outside-toplevel
    path = write_jsonl(tmp_path / "u.jsonl", unpaired_rows(45, seed=1))
    out = str(tmp_path / "prepared")
    prepare(read_data_settings(_config(path, **{**PACKING, "data.packing": False})), tokenizer, out)
    _, want = _batches(_config(path, **PACKING), tokenizer)
    workers = {"data.worker_count": 1, "data.prefetch": 2}
    _, got = _batches(_config(out, **PACKING, **workers), tokenizer)
    assert_batches_equal(got, want)


def test_packing_groups_must_divide_the_micro_batch(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", unpaired_rows(12, seed=1))
    config = _config(path, **PACKING)
    config.mesh.data, config.mesh.tensor = 8, 1   # 8 batch shards, micro batch of 4
    with pytest.raises(UserError, match="micro_batch_size=4 must be a multiple of 8"):
        build_datasets(read_data_settings(config), tokenizer, process_index=0, process_count=1)


@pytest.mark.parametrize("loss", ["kto", "dpo"])
def test_summary_reports_what_the_packed_batches_compute(tokenizer, tmp_path, loss):
    """`data inspect`'s packed line against the batches themselves: every (C, T, R) shape,
    fill, token efficiency (real tokens: valid examples' own, no y_kl copies) and its ceiling."""
    paired = loss == "dpo"
    rows = paired_rows(30, seed=3) if paired else unpaired_rows(45, seed=1)
    data, batches = _batches(_config(write_jsonl(tmp_path / "d.jsonl", rows), loss, **PACKING), tokenizer)
    train = data.summary.train
    epoch = batches[:train.batches_per_epoch]
    sides = ("chosen", "rejected") if paired else ("completion",)
    shapes, positions, placed, real, padded = {}, 0, 0, 0, 0
    for b, p in zip(epoch, _batches(_config(write_jsonl(tmp_path / "d.jsonl", rows), loss,
                                            **{**PACKING, "data.packing": False}), tokenizer)[1]):
        padded += 2 * int(np.prod(p["prompt_ids"].shape[:2])) * (p["prompt_ids"].shape[-1]
                                                                 + p[f"{sides[0]}_ids"].shape[-1])
        a, r, t = b["packed_ids"].shape
        key = (b[f"{sides[0]}_ids"].shape[-1], t, r)
        shapes[key] = shapes.get(key, 0) + 1
        positions += a * r * t
        placed += int((b["packed_segment_ids"] > 0).sum())
        if "kl_row_ids" in b:   # z0: the KL completions in kl rows beside the main rows
            positions += int(np.prod(b["kl_row_ids"].shape))
            placed += int((b["kl_row_segment_ids"] > 0).sum())
        valid = b["valid"].astype(bool)
        real += int(b["prompt_length"][valid].sum()) + sum(int(b[f"{s}_mask"][valid].sum()) for s in sides)
    packed = train.plan["packed"]
    assert packed["rows"] == shapes and packed["positions"] == positions
    assert packed["fill"] == pytest.approx(placed / positions)
    assert packed["token_efficiency"] == pytest.approx(real / positions)
    assert packed["ceiling"] == pytest.approx(real / placed)
    assert train.plan["token_efficiency"] == pytest.approx(real / padded)  # one figure for both
    assert packed["ceiling"] < 1  # y_kl copies (unpaired) and the last batch's filler rows are not real
    text = "\n".join(data.summary.lines())
    assert "packed, shapes CxTxR" in text and f"token efficiency {100 * real / positions:.1f}%" in text
