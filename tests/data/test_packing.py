"""The packer: exact layout of a hand example, first-fit placement, groups, errors, config."""

import ml_collections
import numpy as np
import pytest

from kto_jax.data import packing


def _a(*xs):
    return np.array(xs, np.int32)


def test_hand_example_layout_and_gather_indices():
    # x0=[5,6] y0=[7] ; x1=[8] y1=[9,10]; KL: y2 of 0 is y1, of 1 is y0
    out = packing.pack_unpaired([_a(5, 6), _a(8)], [_a(7), _a(9, 10)], pack_length=12,
                                num_rows=1, completion_length=2, pad_id=0)
    # first-fit decreasing: example 0's tree has 2+1+2=5 tokens, example 1's 1+2+1=4
    np.testing.assert_array_equal(out["packed_ids"][0], [5, 6, 7, 9, 10, 8, 9, 10, 7, 0, 0, 0])
    np.testing.assert_array_equal(out["packed_segment_ids"][0], [1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0, 0])
    np.testing.assert_array_equal(out["packed_branch_ids"][0], [0, 0, 1, 2, 2, 0, 1, 1, 2, 0, 0, 0])
    np.testing.assert_array_equal(out["packed_positions"][0], [0, 1, 2, 2, 3, 0, 1, 2, 1, 0, 0, 0])
    np.testing.assert_array_equal(out["completion_ids"], [[7, 0], [9, 10]])
    np.testing.assert_array_equal(out["kl_ids"], [[9, 10], [7, 0]])
    np.testing.assert_array_equal(out["kl_mask"], [[1, 1], [1, 0]])
    # y0 is predicted by x0's last token (col 1); y_kl of 0 by col 1 then col 3
    np.testing.assert_array_equal(out["completion_index"], [[1, 0], [5, 6]])
    np.testing.assert_array_equal(out["kl_index"], [[1, 3], [5, 0]])
    np.testing.assert_array_equal(out["prompt_length"], [2, 1])


def test_every_example_placed_once_without_overlap_and_groups_stay_apart():
    rng = np.random.default_rng(0)
    m, t, groups = 12, 64, 3
    prompts = [np.full(rng.integers(1, 20), 1 + i, np.int32) for i in range(m)]
    ys = [np.full(rng.integers(1, 15), 100 + i, np.int32) for i in range(m)]
    lengths = np.array([len(p) + len(y) + len(z) for p, y, z in
                        zip(prompts, ys, packing.kl_completions(ys))])
    rows = packing.rows_needed(lengths, t, groups)
    out = packing.pack_unpaired(prompts, ys, pack_length=t, num_rows=rows,
                                completion_length=15, pad_id=0, groups=groups)
    assert (out["packed_segment_ids"] > 0).sum() == lengths.sum()  # nothing dropped or doubled
    per_group = rows // groups
    for i in range(m):
        g = i // (m // groups)
        block = out["packed_ids"][g * per_group:(g + 1) * per_group].reshape(-1)
        # the prompt token id 1+i appears exactly len(prompt) times, all in its group's rows
        assert (block == 1 + i).sum() == len(prompts[i]) == (out["packed_ids"] == 1 + i).sum()
        # gathered label positions: index + 1 holds y_j for j >= 1 (y_0 follows x directly)
        flat = block
        idx = out["completion_index"][i, :len(ys[i])]
        np.testing.assert_array_equal(flat[idx + 1], ys[i])
    # first-fit decreasing never uses more rows than one row per example, and fewer here
    assert rows < m


def test_paired_keys_and_too_few_rows_or_too_long():
    out = packing.pack_paired([_a(1, 2)], [_a(3)], [_a(4, 5)], pack_length=8, num_rows=2,
                              completion_length=2, pad_id=9)
    assert set(packing.ROW_KEYS) | {"chosen_ids", "rejected_index", "prompt_length"} <= set(out)
    np.testing.assert_array_equal(out["packed_ids"][1], [9] * 8)  # the spare row is padding
    with pytest.raises(ValueError, match="needs 2 rows"):
        packing.pack_paired([_a(1, 2, 3)] * 2, [_a(3)] * 2, [_a(4, 5)] * 2, pack_length=8,
                            num_rows=1, completion_length=2, pad_id=0)
    with pytest.raises(ValueError, match="more than pack_length=4"):
        packing.pack_paired([_a(1, 2)], [_a(3)], [_a(4, 5)], pack_length=4, num_rows=1,
                            completion_length=2, pad_id=0)


def _data(**changes):
    return ml_collections.ConfigDict({"packing": True, "pack_length": 2048, "max_length": 1024,
                                      "max_completion_length": 0, **changes})


def test_config_problems_name_the_field_and_the_fix():
    assert packing.config_problems(_data(packing=False, pack_length=7)) == []
    assert "multiple of 128" in packing.config_problems(_data(pack_length=1000))[0]
    assert packing.config_problems(_data(pack_length=0)) == []  # chosen from the data
    assert "must be 0 (chosen from the data)" in packing.config_problems(_data(pack_length=-128))[0]
    assert packing.config_problems(_data()) == []  # the step runs packed batches
    assert packing.config_problems(_data(packing="yes"))[0].startswith("data.packing='yes'")


def test_kl_stream_hand_example_layout_and_gather_indices():
    # the hand example above in the two-stream layout (packing.pack_streams): main rows [x | y],
    # kl rows of y_kl with the example's segment id and positions continuing x
    out = packing.pack_streams([_a(5, 6), _a(8)], [_a(7), _a(9, 10)], packing.kl_completions(
        [_a(7), _a(9, 10)]), pack_length=8, kl_share=0.5, num_rows=1, completion_length=2,
        pad_id=0)
    np.testing.assert_array_equal(out["packed_ids"][0], [5, 6, 7, 8, 9, 10, 0, 0])
    np.testing.assert_array_equal(out["packed_segment_ids"][0], [1, 1, 1, 2, 2, 2, 0, 0])
    np.testing.assert_array_equal(out["packed_branch_ids"][0], [0, 0, 1, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(out["packed_positions"][0], [0, 1, 2, 0, 1, 2, 0, 0])
    # Tk = 0.5 * 8 rounded up to 8
    np.testing.assert_array_equal(out["kl_row_ids"][0], [9, 10, 7, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(out["kl_row_segment_ids"][0], [1, 1, 2, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(out["kl_row_positions"][0], [2, 3, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(out["kl_ids"], [[9, 10], [7, 0]])
    # y0 by x0's last token (col 1); y1 by x1 (col 3) then col 4
    np.testing.assert_array_equal(out["completion_index"], [[1, 0], [3, 4]])
    # y_kl token 0 by x's last token in the main row; token 1 by kl column 0, at T + 0
    np.testing.assert_array_equal(out["kl_index"], [[1, 8], [3, 0]])
    np.testing.assert_array_equal(out["prompt_length"], [2, 1])


def test_stream_lengths_keep_both_streams_within_their_rows():
    rng = np.random.default_rng(1)
    m, t, groups = 24, 64, 2
    prompts = [np.full(rng.integers(1, 30), 1 + i, np.int32) for i in range(m)]
    ys = [np.full(rng.integers(1, 30), 100 + i, np.int32) for i in range(m)]
    kl = packing.kl_completions(ys)
    main, kl_len = (np.array([len(p) + len(y) for p, y in zip(prompts, ys)]),
                    np.array([len(k) for k in kl]))
    share = packing.kl_share_for(main, kl_len)
    assert share == np.ceil(16 * kl_len.sum() / main.sum()) / 16
    rows = packing.rows_needed(packing.stream_lengths(main, kl_len, share), t, groups)
    out = packing.pack_streams(prompts, ys, kl, pack_length=t, kl_share=share, num_rows=rows,
                               completion_length=30, pad_id=0, groups=groups)
    tk = packing.kl_row_length(t, share)
    assert out["kl_row_ids"].shape == (rows, tk) and tk % 8 == 0 and tk >= share * t
    # every token placed once: main rows hold x and y, kl rows y_kl, nothing else
    assert (out["packed_segment_ids"] > 0).sum() == main.sum()
    assert (out["kl_row_segment_ids"] > 0).sum() == kl_len.sum()
    per_group = rows // groups
    for i in range(m):
        g, r = i // (m // groups), None
        flat = np.concatenate([out["packed_ids"][g * per_group:(g + 1) * per_group].reshape(-1),
                               out["kl_row_ids"][g * per_group:(g + 1) * per_group].reshape(-1)])
        # the gathered hidden state before each token j >= 1 is followed by that token
        for name, seq in (("completion", ys[i]), ("kl", kl[i])):
            idx = out[f"{name}_index"][i, 1:len(seq)]
            np.testing.assert_array_equal(flat[idx + 1], seq[1:])
        # y_kl shares its example's row and segment id
        r = np.nonzero((out["packed_ids"] == 1 + i).any(-1))[0]
        assert len(r) == 1
        seg = out["packed_segment_ids"][r[0]][out["packed_ids"][r[0]] == 1 + i][0]
        kl_cols = out["kl_row_segment_ids"][r[0]] == seg
        np.testing.assert_array_equal(out["kl_row_ids"][r[0]][kl_cols], kl[i])
        np.testing.assert_array_equal(out["kl_row_positions"][r[0]][kl_cols],
                                      len(prompts[i]) + np.arange(len(kl[i])))
    with pytest.raises(ValueError, match="needs"):
        packing.pack_streams(prompts, ys, kl, pack_length=t, kl_share=share, num_rows=groups,
                             completion_length=30, pad_id=0, groups=groups)
