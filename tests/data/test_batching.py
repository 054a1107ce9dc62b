"""Batch plans and assembly: buckets, padding sides, fillers, process shards."""

import dataclasses

import numpy as np
import pytest

from kto_jax.batch import PAIRED_KEYS, UNPAIRED_KEYS
from kto_jax.data import batching
from kto_jax.data.tokenize import Ragged, SplitLengths, TokenizedSplit


def make_split(n, seed=0, paired=False, max_p=30, max_c=60):
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(5, 100, rng.integers(1, max_p + 1))) for _ in range(n)]
    sides = [[list(rng.integers(5, 100, rng.integers(1, max_c + 1))) for _ in range(n)]
             for _ in range(2 if paired else 1)]
    return TokenizedSplit(Ragged.from_lists(prompts), tuple(Ragged.from_lists(s) for s in sides),
                          np.arange(n) % 3 == 0, np.linspace(0.5, 2.0, n).astype(np.float32),
                          [f"f:{i}" for i in range(n)])


def make_layout(a=2, m=4, index=0, count=1, **kw):
    return batching.BatchLayout(accumulation=a, micro_batch=m, process_index=index,
                                process_count=count, prompt_buckets=(16, 32),
                                completion_buckets=(16, 32, 64), pad_id=0, **kw)


def test_bucket_sizes_are_capped_by_the_limits():
    assert batching.bucket_sizes((16, 32, 64), 32, 64) == ((16, 32), (16, 32, 64))
    assert batching.bucket_sizes((48,), 24, 48) == ((24,), (48,))
    assert batching.bucket_sizes((128, 256), 100, 300) == ((100,), (128, 256, 300))


@pytest.mark.parametrize("window", [1, 3])
def test_plan_covers_each_example_once_with_the_smallest_fitting_shape(window):
    split, layout = make_split(53), make_layout(window=window)
    plan = batching.plan_epoch(split.prompt_lengths, split.completion_lengths, layout, seed=1,
                               epoch=0)
    assert len(plan) == batching.batches_per_epoch(53, layout) == 7
    assert sorted(np.concatenate([b.indices for b in plan])) == list(range(53))
    assert [len(b.indices) for b in plan] == [8] * 6 + [5]
    for b in plan:
        p, c = split.prompt_lengths[b.indices].max(), split.completion_lengths[b.indices].max()
        assert b.prompt_len == min(x for x in (16, 32) if x >= p)
        assert b.completion_len == min(x for x in (16, 32, 64) if x >= c)


def test_plan_is_seeded_and_reshuffled_each_epoch():
    split, layout = make_split(40), make_layout()
    def order(seed, epoch):
        plan = batching.plan_epoch(split.prompt_lengths, split.completion_lengths, layout,
                                   seed=seed, epoch=epoch)
        return np.concatenate([b.indices for b in plan])
    assert np.array_equal(order(0, 0), order(0, 0))
    assert not np.array_equal(order(0, 0), order(0, 1))
    assert not np.array_equal(order(0, 0), order(1, 0))


def test_length_grouping_reduces_padding():
    split = make_split(400, seed=2)
    effs = {}
    for window in (1, 8):
        layout = make_layout(window=window)
        plan = batching.plan_epoch(split.prompt_lengths, split.completion_lengths, layout, seed=0,
                                   epoch=0)
        effs[window] = batching.plan_stats(split, plan, layout)["efficiency"]
    assert effs[8] > effs[1] + 0.05


def test_drop_remainder():
    layout = make_layout(drop_remainder=True)
    split = make_split(21)
    plan = batching.plan_epoch(split.prompt_lengths, split.completion_lengths, layout, seed=0,
                               epoch=0)
    assert batching.batches_per_epoch(21, layout) == len(plan) == 2
    assert all(len(b.indices) == 8 for b in plan)


def test_padding_sides_masks_and_fields():
    split, layout = make_split(8), make_layout()
    planned = batching.PlannedBatch(np.arange(8)[::-1].copy(), 32, 64)
    batch = batching.assemble(split, planned, layout)
    assert tuple(batch) == UNPAIRED_KEYS
    assert batch["prompt_ids"].shape == (2, 4, 32) and batch["completion_ids"].shape == (2, 4, 64)
    for slot in range(8):
        a, m = divmod(slot, 4)
        ex = 7 - slot
        prompt, completion = list(split.prompts[ex]), list(split.completions[0][ex])
        assert list(batch["prompt_ids"][a, m, 32 - len(prompt):]) == prompt        # left-padded
        assert batch["prompt_mask"][a, m].tolist() == [0] * (32 - len(prompt)) + [1] * len(prompt)
        assert list(batch["completion_ids"][a, m, :len(completion)]) == completion  # right-padded
        assert batch["completion_mask"][a, m].sum() == len(completion)
        assert batch["completion_mask"][a, m, :len(completion)].all()
        assert batch["desirable"][a, m] == split.desirable[ex]
        assert batch["weight"][a, m] == split.weight[ex]
    assert batch["valid"].all()
    assert batch["prompt_ids"].dtype == np.int32 and batch["weight"].dtype == np.float32


def test_partial_batch_spreads_real_rows_and_fills_with_weightless_copies():
    split, layout = make_split(5), make_layout()
    batch = batching.assemble(split, batching.PlannedBatch(np.arange(5), 32, 64), layout)
    assert batch["valid"].tolist() == [[True, True, True, False], [True, True, False, False]]
    assert batch["weight"][~batch["valid"]].tolist() == [0.0] * 3
    # real example k sits in microbatch k % A at row k // A
    assert list(batch["prompt_ids"][1, 0][batch["prompt_mask"][1, 0] == 1]) == list(split.prompts[1])
    assert batch["prompt_mask"][~batch["valid"]].sum(axis=-1).min() > 0   # fillers copy real rows


def test_paired_batches_keep_chosen_and_rejected_together():
    split, layout = make_split(8, paired=True), make_layout()
    batch = batching.assemble(split, batching.PlannedBatch(np.arange(8), 32, 64), layout)
    assert tuple(batch) == PAIRED_KEYS
    assert list(batch["rejected_ids"][0, 1, :len(split.completions[1][1])]) == list(
        split.completions[1][1])


@pytest.mark.parametrize("n_real", [8, 5])
def test_process_shards_concatenate_to_the_global_batch(n_real):
    split = make_split(8)
    planned = batching.PlannedBatch(np.arange(n_real), 32, 64)
    whole = batching.assemble(split, planned, make_layout())
    parts = [batching.assemble(split, planned, make_layout(index=i, count=2)) for i in range(2)]
    for key in whole:
        assert parts[0][key].shape[1] == 2
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts], axis=1), whole[key])


def test_plan_stats_counts_padding_and_shapes():
    split, layout = make_split(8), make_layout()
    plan = batching.EpochPlan(np.arange(8), np.array([32]), np.array([64]), global_batch=8)
    stats = batching.plan_stats(split, plan, layout)
    real = split.prompt_lengths.sum() + split.completions[0].lengths.sum()
    assert stats["efficiency"] == pytest.approx(real / (8 * (32 + 64)))
    assert stats["shapes"] == {(32, 64): 1} and stats["filler_rows"] == 0
    layout4 = dataclasses.replace(layout, accumulation=1)
    single = batching.plan_stats(split, batching.EpochPlan(np.array([1, 2, 4, 5]), np.array([32]),
                                                           np.array([64]), global_batch=4),
                                 layout4)
    assert single["single_class_batches"] == 1                            # all undesirable


def test_balanced_microbatches_by_hand():
    """Longest first into the emptier microbatch with room (ties: the first), plan order
    within each. Tokens 9, 1, 1, 1, 8, 2, 2, 2 (ids 0..7), 2 microbatches of 4: 9 -> mb0,
    8 -> mb1, id 5 -> mb1 (10), id 6 -> mb0 (11), id 7 -> mb1 (12), id 1 -> mb0 (12),
    id 2 -> mb0 (tie, 13, full), id 3 -> mb1 (13): 13 tokens each, against 12 and 14 in
    plan order."""
    tokens = np.array([9, 1, 1, 1, 8, 2, 2, 2])
    got = batching.balance_microbatches(np.arange(8), tokens, 4)
    np.testing.assert_array_equal(got, [0, 1, 2, 6, 3, 4, 5, 7])
    # 9 -> mb0, 8 -> mb1, id 4 -> mb1 (10), id 5 -> mb0 (11), id 7 -> mb1 (12), id 2 -> mb0
    # (12), id 3 -> mb0 (tie, 13, full), id 6 -> mb1 (13)
    got = batching.balance_microbatches(np.arange(8) + 100, np.array([9, 8, 1, 1, 2, 2, 1, 2]), 4)
    np.testing.assert_array_equal(got, np.array([0, 2, 3, 5, 1, 4, 6, 7]) + 100)
    np.testing.assert_array_equal(batching.balance_microbatches(np.arange(8), tokens, 8),
                                  np.arange(8))   # one microbatch: nothing to balance


def test_plan_stats_reports_the_dropped_remainder():
    split, layout = make_split(21), make_layout(drop_remainder=True)
    plan = batching.plan_epoch(split.prompt_lengths, split.completion_lengths, layout, seed=0,
                               epoch=0)
    stats = batching.plan_stats(split, plan, layout)
    assert stats["remainder_dropped"] == 5 and stats["filler_rows"] == 0


# The planner as first written, one Python loop over windows and batches: the spec the
# vectorised `plan_epoch` / `plan_stats` must equal exactly (the plan decides batch order,
# so resume and reproducibility depend on it).
def reference_plan_epoch(prompt_lengths, completion_lengths, layout, *, seed, epoch, stream):
    n, g = len(prompt_lengths), layout.global_batch
    order = np.random.default_rng([seed, stream, epoch]).permutation(n)
    p_bucket = np.searchsorted(np.asarray(layout.prompt_buckets), prompt_lengths, side="left")
    c_bucket = np.searchsorted(np.asarray(layout.completion_buckets), completion_lengths,
                               side="left")
    key = c_bucket * len(layout.prompt_buckets) + p_bucket
    chunks = []
    span = max(1, layout.window) * g
    for start in range(0, n, span):
        window = order[start:start + span]
        if layout.window > 1:
            window = window[np.argsort(key[window], kind="stable")]
        cut = [window[k:k + g] for k in range(0, len(window), g)]
        full = [c for c in cut if len(c) == g]
        if layout.window > 1:
            perm = np.random.default_rng([seed, stream + 1, epoch, start]).permutation(len(full))
            full = [full[i] for i in perm]
        chunks.extend(full)
        chunks.extend(c for c in cut if len(c) < g and not layout.drop_remainder)
    tokens = np.asarray(prompt_lengths) + np.asarray(completion_lengths) * (1 + layout.pack_second)
    chunks = [reference_balance(c, tokens, layout.micro_batch) if len(c) == g else c
              for c in chunks]
    return [batching.PlannedBatch(c, layout.prompt_buckets[p_bucket[c].max()],
                                  layout.completion_buckets[c_bucket[c].max()]) for c in chunks]


def reference_balance(chunk, tokens, m):
    """Longest first (ties: plan order) into the emptiest microbatch with room (ties: the
    first); each microbatch's examples in plan order."""
    a = len(chunk) // m
    groups = [[] for _ in range(a)]
    for pos in sorted(range(len(chunk)), key=lambda k: (-int(tokens[chunk[k]]), k)):
        open_ = [j for j in range(a) if len(groups[j]) < m]
        j = min(open_, key=lambda j: (sum(int(tokens[chunk[k]]) for k in groups[j]), j))
        groups[j].append(pos)
    return np.array([chunk[k] for grp in groups for k in sorted(grp)], dtype=chunk.dtype)


def reference_plan_stats(split, plan, layout):
    lengths = split.total_lengths
    real = padded = computed = single_class = 0
    shapes = {}
    for b in plan:
        real += int(lengths[b.indices].sum())
        padded += layout.global_batch * (b.prompt_len + len(split.side_lengths) * b.completion_len)
        # what the padded step computes: (x, y) and (x, y2) when a second completion runs
        computed += layout.global_batch * (1 + layout.pack_second) * (b.prompt_len + b.completion_len)
        shapes[(b.prompt_len, b.completion_len)] = shapes.get((b.prompt_len, b.completion_len),
                                                              0) + 1
        labels = split.desirable[b.indices]
        single_class += int(not split.paired and (labels.all() or not labels.any()))
    return {"efficiency": real / padded if padded else 0.0,
            "token_efficiency": real / computed if computed else 0.0, "shapes": shapes,
            "single_class_batches": single_class, "batches": len(plan),
            "filler_rows": sum(layout.global_batch - len(b.indices) for b in plan),
            "remainder_dropped": len(split) - sum(len(b.indices) for b in plan)}


@dataclasses.dataclass
class LengthsOnly(SplitLengths):
    """A split's lengths and labels only: what planning reads."""
    prompt_lengths: np.ndarray
    side_lengths: tuple
    desirable: np.ndarray

    def __len__(self):
        return len(self.prompt_lengths)


def _lengths_split(rng, n, paired, max_p, max_c):
    sides = tuple(rng.integers(1, max_c + 1, n).astype(np.int32) for _ in range(1 + paired))
    return LengthsOnly(rng.integers(1, max_p + 1, n).astype(np.int32), sides,
                       rng.random(n) < rng.random())


CASES = [  # (n, A, M, window, drop_remainder, paired)
    (0, 2, 4, 1, False, False), (1, 2, 4, 1, False, False), (1, 2, 4, 3, False, False),
    (7, 2, 4, 1, True, False), (8, 2, 4, 1, True, False), (8, 2, 4, 2, False, False),
    (9, 1, 1, 1, False, False), (9, 1, 1, 4, False, True), (53, 2, 4, 3, False, False),
    (53, 2, 4, 3, True, False), (64, 2, 4, 8, False, False), (65, 2, 4, 8, False, True),
    (1000, 4, 8, 1, False, False), (1000, 4, 8, 2, True, True), (1000, 4, 8, 5, False, False),
    (1000, 4, 8, 50, False, False), (997, 1, 32, 7, True, False),
]


@pytest.mark.parametrize("n,a,m,window,drop,paired", CASES)
def test_vectorised_planner_equals_the_loop_reference(n, a, m, window, drop, paired):
    rng = np.random.default_rng([n, a, m, window, drop, paired])
    for trial in range(3):
        max_p, max_c = [(32, 64), (16, 16), (5, 64)][trial]   # up to the caps
        split = _lengths_split(rng, n, paired, max_p, max_c)
        layout = make_layout(a, m, window=window, drop_remainder=drop)
        seed, epoch, stream = int(rng.integers(0, 2 ** 31)), int(rng.integers(0, 5)), 3 + 2 * trial
        plan = batching.plan_epoch(split.prompt_lengths, split.completion_lengths, layout,
                                   seed=seed, epoch=epoch, stream=stream)
        reference = reference_plan_epoch(split.prompt_lengths, split.completion_lengths, layout,
                                         seed=seed, epoch=epoch, stream=stream)
        assert len(plan) == len(reference) == batching.batches_per_epoch(n, layout)
        for got, want in zip(plan, reference):
            np.testing.assert_array_equal(got.indices, want.indices)
            assert (got.prompt_len, got.completion_len) == (want.prompt_len, want.completion_len)
        assert batching.plan_stats(split, plan, layout) == reference_plan_stats(split, reference,
                                                                                layout)


def test_kl_rows_of_a_last_partial_batch_wrap_around_the_real_examples():
    """5 real examples in a [A=2, M=4] batch: microbatch 0 holds examples 0, 2, 4 then a
    filler, microbatch 1 holds 1, 3 then fillers. Each real slot's KL completion is the next
    REAL slot's example (the step's `kl_partners`), never a filler copy; with two processes
    each gets its share of the same global pairing."""
    planned = batching.PlannedBatch(indices=np.array([10, 11, 12, 13, 14]), prompt_len=16,
                                    completion_len=16)
    _, valid = batching.slot_sources(5, make_layout())
    assert valid.tolist() == [[True, True, True, False], [True, True, False, False]]
    kl = batching.kl_rows(planned, make_layout())
    slots = batching.global_slots(planned, make_layout())
    assert slots[valid].tolist() == [10, 12, 14, 11, 13]
    assert kl[0, :3].tolist() == [12, 14, 10] and kl[1, :2].tolist() == [13, 11]
    halves = [batching.kl_rows(planned, make_layout(index=i, count=2)) for i in range(2)]
    assert np.concatenate(halves, axis=1).tolist() == kl.tolist()
