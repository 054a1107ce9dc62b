"""build_datasets end to end: formats, determinism across processes, resume, errors."""

import json
import random
import re
import threading

import numpy as np
import pytest

from kto_jax.batch import PAIRED_KEYS, UNPAIRED_KEYS
from kto_jax.data import build_datasets, tokenize
from kto_jax.train.settings import read_data_settings
from kto_jax.errors import UserError

from conftest import base_config, conversation, paired_rows, unpaired_rows, write_jsonl


def build(tokenizer, path, count=1, index=0, **overrides):
    config = base_config(**{"data.train_path": path, **overrides})
    return build_datasets(read_data_settings(config), tokenizer, process_index=index, process_count=count)


class SimulatedProcesses:
    """`count` data processes as threads of this one; their all-gather meets at a barrier.

    `run(fn)` calls fn(index, allgather) in one thread per process and returns the
    results in process order (an exception raised by fn is returned, not raised).
    `encoded[(index, phase)]` lists the texts each process's tokenizer encoded while
    `phase(name)` was set in its thread.
    """

    def __init__(self, count: int, monkeypatch):
        self.count = count
        self.barrier = threading.Barrier(count, timeout=120)
        self.slots = [None] * count
        self.local = threading.local()
        self.encoded: dict = {}
        real_encode = tokenize._encode

        def counting_encode(tokenizer, texts):
            key = (getattr(self.local, "index", None), getattr(self.local, "phase", None))
            self.encoded.setdefault(key, []).extend(texts)
            return real_encode(tokenizer, texts)
        monkeypatch.setattr(tokenize, "_encode", counting_encode)

    def phase(self, name: str) -> None:
        self.local.phase = name

    def _allgather(self, index):
        def allgather(x):
            self.slots[index] = np.array(x)
            self.barrier.wait()
            out = np.stack(self.slots)
            self.barrier.wait()                  # everyone has read before the next gather
            return out
        return allgather

    def run(self, fn):
        results = [None] * self.count

        def target(index):
            self.local.index = index
            try:
                results[index] = fn(index, self._allgather(index))
            except Exception as e:  # pylint: disable=broad-except
                results[index] = e
        threads = [threading.Thread(target=target, args=(i,)) for i in range(self.count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results


def collect(iterator):
    return [{k: v.copy() for k, v in b.items()} for b in iterator]


def prompts(batches):
    return {tuple(b["prompt_ids"][a, m][b["prompt_mask"][a, m] == 1])
            for b in batches for a, m in zip(*np.nonzero(b["valid"]))}


def assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.fixture(scope="module")
def unpaired_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("d") / "u.jsonl", unpaired_rows(45, seed=1))


def test_unpaired_text_end_to_end(tokenizer, unpaired_file):
    train, evaluation, summary = build(tokenizer, unpaired_file, **{"data.num_epochs": 2})
    batches = collect(train())
    assert len(batches) == 2 * 6 and evaluation is None
    for b in batches:
        assert tuple(b) == UNPAIRED_KEYS
        assert b["prompt_ids"].shape[:2] == (2, 4) and b["prompt_ids"].shape[2] in (16, 32)
        assert b["completion_ids"].shape[2] in (16, 32, 64)
    assert sum(int(b["valid"].sum()) for b in batches) == 2 * 45
    assert summary.n_desirable == 23 and summary.n_undesirable == 22
    for epoch in (batches[:6], batches[6:]):             # both classes mixed into the batches
        assert sum(int(b["desirable"][b["valid"]].any() and (~b["desirable"][b["valid"]]).any())
                   for b in epoch) >= 4


def test_same_seed_same_global_batches_on_one_and_two_processes(tokenizer, unpaired_file,
                                                                monkeypatch):
    overrides = {"data.num_epochs": 2, "data.bucket_window": 2}
    rows = [json.loads(line) for line in open(unpaired_file, encoding="utf-8")]
    one = SimulatedProcesses(1, monkeypatch)

    def process(index, allgather, count):
        sim = one if count == 1 else two
        sim.phase("start-up")
        config = base_config(**{"data.train_path": unpaired_file, **overrides})
        data = build_datasets(read_data_settings(config), tokenizer, process_index=index, process_count=count,
                              allgather=allgather)
        sim.phase("batches")
        return data.summary, collect(data.train_iter_factory())
    (summary, single), = one.run(lambda i, g: process(i, g, 1))
    assert len(one.encoded[0, "start-up"]) == 2 * 45     # each prompt and completion once
    assert (0, "batches") not in one.encoded             # one process: every batch row cached
    assert_batches_equal(single, collect(build(tokenizer, unpaired_file, **overrides)[0]()))
    two = SimulatedProcesses(2, monkeypatch)
    results = two.run(lambda i, g: process(i, g, 2))
    for index, result in enumerate(results):
        assert not isinstance(result, Exception), result
        per_process = "rows of each microbatch per process"   # the one line that differs
        assert ([line for line in result[0].lines() if per_process not in line]
                == [line for line in summary.lines() if per_process not in line])
        assert result[0].fingerprint == summary.fingerprint
        lo, hi = 45 * index // 2, 45 * (index + 1) // 2
        start_up = two.encoded[index, "start-up"]        # phase 1: prompts, then completions
        assert start_up == ([r["prompt"] for r in rows[lo:hi]]
                            + [r["completion"] for r in rows[lo:hi]])
        own_prompts = {tokenizer.decode(b["prompt_ids"][a, m][b["prompt_mask"][a, m] == 1],
                                        skip_special_tokens=True)
                       for b in result[1] for a, m in np.ndindex(b["valid"].shape)}
        later = set(two.encoded.get((index, "batches"), []))   # phase 2: prompts + completions
        later_prompts = later & {r["prompt"] for r in rows}
        assert later_prompts and later_prompts <= own_prompts  # only its own batch rows ...
        assert not later_prompts & {r["prompt"] for r in rows[lo:hi]}  # ... outside its slice
        assert len(later) <= 2 * sum(b["valid"].size for b in result[1])
    joined = [{k: np.concatenate([s0[k], s1[k]], axis=1) for k in s0}
              for s0, s1 in zip(results[0][1], results[1][1])]
    assert_batches_equal(single, joined)
    other = collect(build(tokenizer, unpaired_file, **{**overrides, "data.seed": 1})[0]())
    assert not all(np.array_equal(a["prompt_ids"], b["prompt_ids"]) if a["prompt_ids"].shape ==
                   b["prompt_ids"].shape else False for a, b in zip(single, other))


def test_iterator_state_resumes_at_the_next_batch(tokenizer, unpaired_file):
    train, _, _ = build(tokenizer, unpaired_file, **{"data.num_epochs": 3, "data.prefetch": 2})
    reference = collect(train())
    it = train()
    head = collect(next(it) for _ in range(7))
    state = json.loads(json.dumps(it.get_state()))          # what the checkpoint stores
    assert state["next_batch"] == 7 and it.epoch == 1
    resumed = train()
    resumed.set_state(state)
    assert_batches_equal(head + collect(resumed), reference)
    it.set_state({**state, "next_batch": 2})                # rewinding a live iterator works too
    assert_batches_equal(collect(it), reference[2:])


@pytest.mark.slow
def test_worker_processes_yield_the_same_batches_and_state(tokenizer, unpaired_file):
    overrides = {"data.num_epochs": 2}
    reference = collect(build(tokenizer, unpaired_file, **overrides)[0]())
    train, _, _ = build(tokenizer, unpaired_file, **{**overrides, "data.worker_count": 1,
                                                       "data.prefetch": 2})
    it = train()
    head = collect(next(it) for _ in range(5))
    state = it.get_state()
    it.close()
    resumed = train()
    resumed.set_state(state)
    assert_batches_equal(head + collect(resumed), reference)


def test_state_from_other_data_is_refused(tokenizer, unpaired_file, tmp_path):
    it = build(tokenizer, unpaired_file)[0]()
    next(it)
    other = write_jsonl(tmp_path / "o.jsonl", unpaired_rows(45, seed=2))
    with pytest.raises(UserError, match="recorded on other data or batching settings"):
        build(tokenizer, other)[0]().set_state(it.get_state())
    with pytest.raises(UserError, match="recorded on other data"):
        build(tokenizer, unpaired_file, **{"data.bucket_lengths": (32, 64)})[0]().set_state(
            it.get_state())


def test_forever_keeps_reshuffling(tokenizer, unpaired_file):
    train, _, _ = build(tokenizer, unpaired_file)
    it = train(forever=True)
    batches = collect(next(it) for _ in range(6 * 3 + 1))
    assert it.epoch == 3
    assert sum(int(b["valid"].sum()) for b in batches[:18]) == 3 * 45


def test_paired_data_for_unpaired_and_paired_losses(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", paired_rows(20))
    _, _, summary = build(tokenizer, path)
    assert (summary.n_desirable, summary.n_undesirable) == (20, 20) and summary.train.kept == 40
    _, _, one = build(tokenizer, path, **{"data.one_y_per_x": True})
    assert one.train.kept == 20 and 0 < one.n_desirable < 20
    train, _, paired = build(tokenizer, path, **{"loss.name": "dpo"})
    assert paired.paired and paired.train.kept == 20
    batches = collect(train())
    assert tuple(batches[0]) == PAIRED_KEYS
    assert sum(int(b["valid"].sum()) for b in batches) == 20


def test_scored_and_conversational_formats(tokenizer, tmp_path):
    rng = random.Random(0)
    rows = []
    for i in range(16):
        prompt, answer = conversation(rng)
        rows.append({"prompt": prompt, "completion": answer, "score": float(i)})
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    over = {"data.max_length": 128, "data.max_prompt_length": 64, "data.score_threshold": 9.5,
            "data.score_weighting": True}
    train, _, summary = build(tokenizer, path, **over)
    assert summary.format == "scored" and summary.conversational
    assert (summary.n_desirable, summary.n_undesirable) == (6, 10)
    weights = np.concatenate([b["weight"][b["valid"]] for b in train()])
    assert sorted(weights.tolist()) == sorted(abs(i - 9.5) for i in range(16))
    pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": conversation(rng)[1]}
             for r in rows]
    _, _, paired = build(tokenizer, write_jsonl(tmp_path / "cp.jsonl", pairs), **over)
    assert paired.format == "paired" and paired.conversational and paired.train.kept == 32


def test_fractions_and_auto_weights(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "b.jsonl", unpaired_rows(100, desirable_every=2))
    _, _, summary = build(tokenizer, path, **{"data.desirable_fraction": 0.1})
    assert (summary.n_desirable, summary.n_undesirable) == (5, 50)
    assert summary.train.subsampled == {"desirable": 45, "undesirable": 0}
    assert summary.recommended_weights == pytest.approx((4 / 3 * 10, 1.0))
    assert (summary.desirable_weight, summary.undesirable_weight) == (1.0, 1.0)
    assert any("outside" in w and "[1, 4/3]" in w for w in summary.warnings)
    _, _, auto = build(tokenizer, path, **{"data.desirable_fraction": 0.1,
                                            "loss.auto_weights": True})
    assert auto.desirable_weight == pytest.approx(40 / 3) and auto.undesirable_weight == 1.0
    assert auto.weight_ratio == pytest.approx(4 / 3) and not auto.warnings


def test_auto_weights_lines_agree_with_what_is_applied(tokenizer, tmp_path):
    """A lambda loss with auto_weights says the eq. 9 weights are applied (not "set
    auto_weights=True to apply"); a loss without lambda weights claims no lambda at all."""
    path = write_jsonl(tmp_path / "b.jsonl", unpaired_rows(100, desirable_every=2))
    over = {"data.desirable_fraction": 0.1, "loss.auto_weights": True}
    _, _, auto = build(tokenizer, path, **over)
    text = str(auto)
    assert "lambda_D=13.33, lambda_U=1 (eq. 9, applied by loss.auto_weights)" in text
    assert "auto_weights=True applies it" not in text and not auto.warnings
    _, _, manual = build(tokenizer, path, **{"data.desirable_fraction": 0.1})
    assert "loss.auto_weights=True applies it" in str(manual)     # advice only when not applied
    _, _, sft = build(tokenizer, path, **dict(over, **{"loss.name": "sft"}))
    assert (sft.desirable_weight, sft.undesirable_weight) == (1.0, 1.0)  # nothing applied
    assert "lambda: loss sft does not weigh the classes" in str(sft)
    assert "training with lambda_D" not in str(sft)
    assert sft.warnings == ["loss.auto_weights has no effect on loss sft, which does not use "
                            "lambda_D / lambda_U."]


def test_eval_split_by_fraction_and_by_file(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", paired_rows(40, seed=3))
    train, evaluation, summary = build(tokenizer, path, **{"data.eval_fraction": 0.25})
    assert (summary.train.rows, summary.eval.rows) == (30, 10)
    assert summary.eval.kept == 20                             # both sides of each eval pair
    first, second = collect(evaluation()), collect(evaluation())
    assert_batches_equal(first, second)
    assert sum(int(b["valid"].sum()) for b in first) == 20
    assert not prompts(collect(train())) & prompts(first)      # rows go to one split only
    eval_file = write_jsonl(tmp_path / "e.jsonl", paired_rows(6, seed=4))
    _, evaluation, summary = build(tokenizer, path, **{"data.eval_path": eval_file})
    assert summary.train.rows == 40 and summary.eval.rows == 6 and summary.eval.source == eval_file


def test_overlong_drop_is_reported_or_raised(tokenizer, tmp_path):
    rows = unpaired_rows(20)
    rows[3]["prompt"] = " ".join(["star"] * 200)
    path = write_jsonl(tmp_path / "o.jsonl", rows)
    _, _, summary = build(tokenizer, path)
    assert summary.train.kept == 19
    text = str(summary)
    assert f"dropped 1: prompt longer than data.max_length, e.g.\n    {path}:4: " in text
    with pytest.raises(UserError, match=rf"prompt longer than data.max_length=64 tokens \(e.g. {path}:4"):
        build(tokenizer, path, **{"data.on_overlong": "error"})


def test_empty_after_filtering(tokenizer, tmp_path):
    rows = [{"prompt": " ".join(["star"] * 200), "completion": "x", "label": True}] * 3
    with pytest.raises(UserError, match="train split is empty after filtering: 3 rows -> 3 "
                                        "examples; 3 dropped: prompt longer"):
        build(tokenizer, write_jsonl(tmp_path / "x.jsonl", rows))
    with pytest.raises(UserError, match="removed by data.desirable_fraction"):
        build(tokenizer, write_jsonl(tmp_path / "y.jsonl", unpaired_rows(4, desirable_every=1)),
              **{"data.desirable_fraction": 0.0})


@pytest.mark.parametrize("overrides, message", [
    ({"loss.name": "dpo"}, "loss.name=dpo needs paired data"),
    ({"train.micro_batch_size": 3, "train.global_batch_size": 9}, "must be a multiple of the "
                                                                  "number of processes"),
    ({"train.global_batch_size": 6}, "must be a multiple of train.micro_batch_size"),
    ({"data.max_prompt_length": 64}, "need 0 < data.max_prompt_length"),
    ({"data.on_overlong": "skip"}, "data.on_overlong='skip' must be"),
    ({"data.desirable_fraction": 1.5}, "data.desirable_fraction=1.5 must lie in"),
    ({"data.drop_remainder": True, "train.global_batch_size": 64}, "fewer than one global batch"),
])
def test_config_errors(tokenizer, unpaired_file, overrides, message, monkeypatch):
    config = base_config(**{"data.train_path": unpaired_file, **overrides})
    results = SimulatedProcesses(2, monkeypatch).run(
        lambda i, g: build_datasets(read_data_settings(config), tokenizer, process_index=i, process_count=2,
                                    allgather=g))
    for result in results:                                   # raised on every process alike
        assert isinstance(result, UserError) and re.search(message, str(result)), result


def test_every_source_kind_gives_the_same_batches(tokenizer, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = random.Random(5)
    rows = []
    for i in range(12):
        prompt, answer = conversation(rng)
        rows.append({"prompt": prompt, "completion": answer, "label": i % 2 == 0})
    paths = {"jsonl": write_jsonl(tmp_path / "c.jsonl", rows), "json": str(tmp_path / "c.json"),
             "parquet": str(tmp_path / "c.parquet"), "datasets": str(tmp_path / "c_dir")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(rows, f)
    pq.write_table(pa.Table.from_pylist(rows), paths["parquet"])
    datasets.Dataset.from_list(rows).save_to_disk(paths["datasets"])
    over = {"data.max_length": 128, "data.max_prompt_length": 64}
    results = {kind: build(tokenizer, path, **over) for kind, path in paths.items()}
    reference = collect(results["jsonl"].train_iter_factory())
    assert results["jsonl"].summary.conversational and results["jsonl"].summary.format == "unpaired"
    for kind in ("json", "parquet", "datasets"):
        assert_batches_equal(collect(results[kind].train_iter_factory()), reference)
    plain = write_jsonl(tmp_path / "plain.jsonl", unpaired_rows(4))
    with pytest.raises(UserError, match="eval rows are text but the train rows of .* are not"):
        build(tokenizer, paths["jsonl"], **{**over, "data.eval_path": plain})
