"""Step shapes chosen from the data (kto_jax/data/shapes.py): buckets and the packed row
length from the training split's lengths, rounded per backend, at most 4 step programs (a
jitted function over 200 steps' batches counts its compilations), explicit settings win,
the smallest legal pack_length from the data's longest example."""

import itertools

import jax
import numpy as np
import pytest

from kto_jax.data import build_datasets, packing, shapes
from kto_jax.errors import UserError
from kto_jax.train.settings import read_data_settings

from conftest import base_config, paired_rows, unpaired_rows, write_jsonl


def _brute_force(maxima, k):
    """The cheapest set of at most k buckets among the values, by trying every subset."""
    values = sorted(set(maxima))
    best = None
    for size in range(1, k + 1):
        for subset in itertools.combinations(values[:-1], size - 1):
            buckets = sorted(subset) + [values[-1]]
            cost = sum(min(b for b in buckets if b >= v) for v in maxima)
            best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_best_buckets_is_the_cheapest_subset(seed):
    maxima = np.random.default_rng(seed).integers(1, 12, 30) * 8
    for k in (1, 2, 3):
        buckets, cost = shapes._best_buckets(maxima, k)  # pylint: disable=protected-access
        assert len(buckets) <= k and buckets[-1] == maxima.max()
        assert cost == sum(min(b for b in buckets if b >= v) for v in maxima)
        assert cost == _brute_force(list(maxima), k)


def test_backend_rounding():
    assert shapes.backend_multiple("cpu") == 4
    assert shapes.backend_multiple("tpu") == shapes.backend_multiple("gpu") == 128


def _data(path, tokenizer, **overrides):
    config = base_config(**{"data.train_path": path, "data.bucket_lengths": (),
                            "data.max_length": 256, "data.max_prompt_length": 128, **overrides})
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 1, 4  # 2 batch shards (groups)
    return build_datasets(read_data_settings(config), tokenizer, process_index=0, process_count=1)


def _compilations(batches) -> int:
    """Programs a jitted function compiles over these batches (one per distinct shape set)."""
    @jax.jit
    def touch(batch):
        return sum(jax.numpy.sum(v.astype(jax.numpy.float32)) for v in batch.values())
    for batch in batches:
        touch(batch)
    return touch._cache_size()  # pylint: disable=protected-access


def test_default_buckets_follow_the_data(tokenizer, tmp_path):
    """Short rows under max_length=256: the chosen buckets are multiples of 4 (CPU) just above
    the data's lengths, not 128 + 256; explicit buckets still win."""
    path = write_jsonl(tmp_path / "u.jsonl", unpaired_rows(64, seed=2))
    data = _data(path, tokenizer)
    plan = data.summary.train.plan
    longest_prompt = max(b["prompt_mask"].sum(-1).max() for b in _iterate(data, 8))
    assert all(p_ % 4 == 0 and c_ % 4 == 0 for p_, c_ in plan["shapes"])
    assert max(p_ for p_, _ in plan["shapes"]) < longest_prompt + 4
    assert len(plan["shapes"]) <= shapes.MAX_SHAPES
    text = "\n".join(data.summary.lines())
    assert "shapes chosen from the data (multiples of 4): prompt buckets" in text
    assert f"padding efficiency {100 * plan['token_efficiency']:.1f}%" in text
    fixed = _data(path, tokenizer, **{"data.bucket_lengths": (128,)})
    assert set(fixed.summary.train.plan["shapes"]) == {(128, 128)}
    assert "shapes chosen" not in "\n".join(fixed.summary.lines())
    assert fixed.summary.train.plan["token_efficiency"] < plan["token_efficiency"] / 3


def _iterate(data, n):
    return list(itertools.islice(iter(data.train_iter_factory(forever=True)), n))


@pytest.mark.parametrize("packed", [False, True])
def test_two_hundred_steps_compile_at_most_four_programs(tokenizer, tmp_path, packed):
    """Lengths spread over a wide range (3 to ~60 words), 200 training steps: at most 4
    step shapes, counted as compilations of a jitted function fed the batches."""
    rows = unpaired_rows(96, seed=5)
    rng = np.random.default_rng(0)
    for row in rows:   # a long tail, so several shapes are worth having
        row["completion"] += " more" * int(rng.integers(0, 40) ** 2 // 40)
    path = write_jsonl(tmp_path / "u.jsonl", rows)
    data = _data(path, tokenizer, **{"data.packing": packed, "data.num_epochs": 100})
    batches = _iterate(data, 200)
    assert len(batches) == 200
    programs = _compilations(batches)
    assert 1 <= programs <= shapes.MAX_SHAPES
    if packed:   # every batch has one of the chosen row shapes (T, R)
        line = data.summary.shapes_line
        assert "packed rows TxR per microbatch" in line
        assert "beside a kl row of" in line   # KTO: the KL completions in kl rows, Tk from T
        kl_rows = {(b["packed_ids"].shape[-1], b["kl_row_ids"].shape[-1]) for b in batches}
        assert len({tk for _, tk in kl_rows}) == len({t for t, _ in kl_rows})
        for b in batches:
            r, t = b["packed_ids"].shape[1:]
            assert f"{t}x{r}" in line


def test_packed_row_length_from_the_longest_example(tokenizer, tmp_path):
    """pack_length=0: T holds the data's longest [x | y | y_kl] tree, a multiple of 4 on CPU,
    far below max_length + max completion; an explicit T below that tree is refused by name."""
    path = write_jsonl(tmp_path / "u.jsonl", unpaired_rows(40, seed=1))
    data = _data(path, tokenizer, **{"data.packing": True})
    batches = _iterate(data, 5)
    t = batches[0]["packed_ids"].shape[-1]
    trees = [(b["packed_segment_ids"] > 0).sum() for b in batches]
    assert t % 4 == 0 and t < 256 + 256 and all(x > 0 for x in trees)
    longest = max(int(b["prompt_length"].max() + b["completion_mask"].sum(-1).max())
                  for b in batches)
    assert t >= longest
    with pytest.raises(UserError, match=r"data.pack_length=128 cannot hold the data's longest "
                                        r"\[x \| y_w \| y_l\] tree, \d+ tokens"):
        rows = paired_rows(20, seed=1)
        rows[3]["chosen"] = " ".join(["sun"] * 100)
        rows[3]["rejected"] = " ".join(["moon"] * 100)
        _data(write_jsonl(tmp_path / "p.jsonl", rows), tokenizer,
              **{"data.packing": True, "data.pack_length": 128, "loss.name": "dpo"})


def test_row_bound_holds_every_microbatch():
    """`most_rows` bounds first-fit's rows for ANY microbatch of trees within the bounds."""
    rng = np.random.default_rng(1)
    for _ in range(200):
        bounds = rng.integers(1, 100, 40)
        t = int(bounds.max()) + int(rng.integers(0, 60))
        most = shapes.most_rows(bounds, t, micro_batch=8, groups=2)
        trees = rng.permutation(bounds)[:8]
        assert packing.microbatch_rows(trees[None], t, 2) <= most


def test_packed_shapes_fill_the_rows_of_hh_rlhf_lengths():
    """4000 examples drawn from the hh-rlhf histogram, 8 x 4, TPU rounding: the chosen row
    shapes hold every batch, at most 4 of them, and fill 85% of the row positions or more
    over the epoch (80% with one T for every batch)."""
    import dataclasses   # pylint: disable=import-outside-toplevel
    from kto_jax.data import batching   # pylint: disable=import-outside-toplevel
    from kto_jax.perf import workload   # pylint: disable=import-outside-toplevel
    from test_batching import LengthsOnly, make_layout   # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(0)
    p, c = workload.load_lengths("hh-rlhf").sample(4000, rng)
    p, c = np.minimum(p, 512).astype(np.int32), np.minimum(c, 511).astype(np.int32)
    split = LengthsOnly(p, (c,), rng.random(4000) < 0.5)
    low = int(shapes.round_up(shapes.tree_bounds(split, True).max(), 128))
    layout = dataclasses.replace(make_layout(4, 8), prompt_buckets=(512,),
                                 completion_buckets=(512,), pack_length=low)
    layout = dataclasses.replace(layout, pack_shapes=shapes.packed_shapes(
        split, layout, multiple=128, seed=0))
    assert 1 < len(layout.pack_shapes) <= shapes.MAX_SHAPES
    plan = batching.plan_epoch(p, c, layout, seed=0, epoch=0)
    packed = batching.plan_stats(split, plan, layout)["packed"]
    assert {(t, r) for _, t, r in packed["rows"]} <= set(layout.pack_shapes)
    assert packed["fill"] >= 0.85, packed
