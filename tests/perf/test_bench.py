"""`kto-jax bench`: the workload it builds, its FLOP accounting against TRL's published
figures, and one real (tiny, short) run through the CLI that prints one JSON line."""

import dataclasses
import json

import numpy as np
import pytest

from kto_jax.perf import bench
from kto_jax.cli import main as cli_main
from kto_jax.errors import UserError
from kto_jax.losses.registry import get_loss
from kto_jax.step import flops as flops_lib

FIELDS = ("bench", "jax", "platform", "device", "num_devices", "date", "model", "params", "seq",
          "padded_seq", "global_batch", "steps", "warmup", "median_step_s", "tokens_per_s",
          "model_flops_per_step", "trl_model_flops_per_step", "model_tflops_per_s", "mfu",
          "trl_model_tflops_per_s", "trl_mfu", "peak_mem_gib",
          "peak_mem_source", "xla_mem_gib", "compile_s", "loss", "options")


def test_synthetic_batch_is_the_issue_workload_padded_to_buckets():
    opts = bench.BenchOptions(model="tiny")  # defaults: 512 + 511 tokens, 8 x 4, bucket 128
    b = bench.synthetic_batch(opts, vocab_size=6000)
    assert b["prompt_ids"].shape == (4, 8, 512) and b["completion_ids"].shape == (4, 8, 512)
    assert (b["prompt_mask"].sum(-1) == 512).all() and (b["completion_mask"].sum(-1) == 511).all()
    assert (b["completion_mask"][..., -1] == 0).all()  # right padding of the completion
    assert b["desirable"].sum() == 16 and b["valid"].all()
    assert (b["prompt_ids"][b["prompt_mask"] == 1] >= 3).all()
    odd = bench.BenchOptions(prompt_len=300, completion_len=200)
    assert (odd.padded_prompt, odd.padded_completion) == (384, 256)
    b = bench.synthetic_batch(odd, vocab_size=100)
    assert (b["prompt_mask"][..., :84] == 0).all() and (b["prompt_mask"][..., 84:] == 1).all()


def test_trl_flop_convention_reproduces_the_issue_figures():
    """TRL 1.16 on an H200: 1.26 s/step is 26.0k tokens/s and 40% MFU (peak 989 TFLOP/s),
    0.855 s/step precomputed is 38.3k tokens/s. Our TRL-convention count must give the same."""
    opts = bench.BenchOptions(model="llama-1b")
    cfg = bench.model_config(opts)
    n_params = 1_235_814_400  # Llama-3.2-1B, tied embeddings (HF's count)
    seq, g = 1023, 32
    on_the_fly = bench.trl_step_flops(cfg, n_params, 6, g, seq)
    assert g * seq / 1.26 == pytest.approx(26.0e3, rel=2e-3)
    assert g * seq / 0.855 == pytest.approx(38.3e3, rel=2e-3)
    assert on_the_fly / 1.26 / 989e12 == pytest.approx(0.40, abs=0.005)
    # by hand: 6 units x (2 N + 2 L T D) per token x tokens
    assert on_the_fly == pytest.approx(6 * (2 * n_params + 2 * 16 * seq * 2048) * g * seq)
    # the project's own (PaLM) count is close: full T x T attention, padded T = 1024
    dims = flops_lib.ModelDims.from_hf_config(cfg.to_hf())
    palm = flops_lib.step_flops(dims, loss=get_loss("kto"), reference_source="model",
                                global_batch=g, seq_len=1024)
    assert palm / on_the_fly == pytest.approx(1.03, abs=0.01)
    grad, fwd = flops_lib.forward_passes(get_loss("kto"), "precomputed")
    assert 3 * grad + fwd == 4  # TRL's 4 units with precomputed reference log-probs


def test_bad_options_are_user_errors():
    for opts in (bench.BenchOptions(model="gpt-2"), bench.BenchOptions(reference="cached"),
                 bench.BenchOptions(loss="dpo"), bench.BenchOptions(steps=0)):
        with pytest.raises(UserError):
            opts.check()
    assert cli_main(["bench", "--model", "tiny", "--loss", "nope"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["on_the_fly", "precomputed"])
def test_bench_cli_prints_one_json_line_with_every_field(capsys, reference):
    """A real run on the 8 virtual CPU devices (data-parallel mesh), short sequences."""
    argv = ["bench", "--model", "tiny", "--steps", "2", "--warmup", "1", "--prompt-len", "16",
            "--completion-len", "15", "--bucket", "16", "--reference", reference]
    assert cli_main(argv) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == 1
    r = json.loads(lines[0])
    assert all(k in r for k in FIELDS), set(FIELDS) - set(r)
    assert r["platform"] == "cpu" and r["mfu"] is None and r["num_devices"] == 8
    assert (r["seq"], r["padded_seq"], r["global_batch"], r["steps"]) == (31, 32, 32, 2)
    # tiny: embed 6000 x 64 (tied) + 2 layers x (attention 64*16*(4+2+2)+4*16*64, MLP 3*64*128, 2 norms) + norm
    layer = 64 * 16 * 4 + 2 * 64 * 16 * 2 + 4 * 16 * 64 + 3 * 64 * 128 + 2 * 64
    assert r["params"] == 6000 * 64 + 2 * layer + 64
    assert r["tokens_per_s"] == pytest.approx(32 * 31 / r["median_step_s"], rel=2e-3)
    units = 6 if reference == "on_the_fly" else 4
    assert r["trl_model_tflops_per_s"] == pytest.approx(
        units * (2 * r["params"] + 2 * 2 * 31 * 64) * 32 * 31 / r["median_step_s"] / 1e12, rel=0.02)
    assert np.isfinite(r["loss"]) and 0.3 < r["loss"] < 0.7  # random init: about sigmoid(0)=0.5
    assert r["peak_mem_gib"] > 0 and r["options"]["reference"] == reference
    assert r["trainable_params"] == r["params"] and r["lora_rank"] == 0


@pytest.mark.slow
def test_bench_lora_rank_reports_the_adapters_as_trainable(capsys):
    """--lora-rank=8: the base is frozen; trainable = r (in + out) per target per layer."""
    argv = ["bench", "--model", "tiny", "--steps", "1", "--warmup", "1", "--prompt-len", "16",
            "--completion-len", "15", "--bucket", "16", "--lora-rank", "8", "--reference", "precomputed"]
    assert cli_main(argv) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # tiny (D 64, 4 heads x 16, 2 kv heads, F 128): q, k, v, o, gate, up, down
    in_out = (64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64)
    assert r["lora_rank"] == 8 and r["trainable_params"] == 2 * 8 * in_out
    assert r["params"] == 6000 * 64 + 2 * (64 * 16 * 4 + 2 * 64 * 16 * 2 + 4 * 16 * 64 + 3 * 64 * 128 + 2 * 64) + 64
    assert np.isfinite(r["loss"]) and 0.3 < r["loss"] < 0.7


@pytest.mark.slow
@pytest.mark.xdist_group("libtpu")  # libtpu (pytest.ini)
def test_bench_topology_aot_compiles_the_workload_for_a_tpu_slice(capsys):
    """--topology: the same workload compiled for TPU chips on this host; per-chip memory."""
    pytest.importorskip("libtpu", reason="libtpu (the tpu/test extra) is not installed")
    argv = ["bench", "--model", "tiny", "--topology", "v5e-4", "--prompt-len", "16",
            "--completion-len", "15", "--bucket", "16"]
    assert cli_main(argv) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["mode"] == "aot-compile" and r["chips"] == 4 and r["fits"] is True
    assert r["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1} and r["padded_seq"] == 32
    mem = r["per_chip_gib"]
    # donated state: the outputs reuse the arguments' buffers
    assert mem["aliased"] == mem["arguments"] > 0
    assert mem["total"] == pytest.approx(mem["arguments"] + mem["outputs"] - mem["aliased"]
                                         + mem["temporaries"] + mem["generated_code"], abs=0.003)


# ---------------------------------------------------------------- --lengths and --layout

from kto_jax.perf import workload as bw  # noqa: E402
from kto_jax.data import packing  # noqa: E402
from kto_jax.batch import has_kl_stream, step_keys  # noqa: E402


def test_the_shipped_hh_rlhf_histogram_loads_and_samples_within_its_bins():
    d = bw.load_lengths("hh-rlhf")
    assert d.width == 8 and d.count.sum() == 4624  # 2,312 rows x (chosen, rejected)
    p, c = d.sample(20000, np.random.default_rng(0))
    assert p.min() >= 1 and c.min() >= 1
    edges = set(zip(d.prompt.tolist(), d.completion.tolist()))
    assert all((int(a) // 8 * 8, int(b) // 8 * 8) in edges for a, b in zip(p[:2000], c[:2000]))
    # the sample mean follows the histogram's (bin midpoints: lower edge + 3.5)
    mean_p = float((d.count * (d.prompt + 3.5)).sum() / d.count.sum())
    assert p.mean() == pytest.approx(mean_p, rel=0.03)
    assert p.mean() == pytest.approx(125.2, rel=0.05) and c.mean() == pytest.approx(45.8, rel=0.05)


def _hh_rlhf_fills(uses_kl: bool) -> list[float]:
    d = bw.load_lengths("hh-rlhf")
    fills = []
    for seed in range(10):
        ex = bw.sample_examples(d, accum=4, micro_batch=8, max_prompt=512, max_completion=511,
                                vocab_size=100, seed=seed)
        sums = (ex.prompt_lengths + 2 * ex.completion_lengths).reshape(4, 8).sum(1)
        assert sums.max() - sums.min() <= (ex.prompt_lengths + 2 * ex.completion_lengths).max()
        count = bw.layout_batch(ex, "packed_shared", bucket=128, uses_kl=uses_kl)[1]
        assert count.fill == pytest.approx(count.token_efficiency / count.token_efficiency_ceiling)
        fills.append(count.fill)
    return fills


def test_hh_rlhf_packed_rows_fill_nine_tenths_at_the_default_batch():
    """The bench's default batch (8 x 4) on the hh-rlhf histogram: microbatches of even tokens
    (`batching.balance_microbatches`) in rows of the best T give packed token efficiency at
    least 90% of its ceiling (fill = token_efficiency / ceiling), 57% with unbalanced
    microbatches in rows of the longest tree. Held by the [x | y | y_kl] trees before the kl
    rows; today by the rows of a loss without z0 ([x | y])."""
    fills = _hh_rlhf_fills(uses_kl=False)
    assert fills[0] >= 0.9 and np.median(fills) >= 0.9, fills


@pytest.mark.xfail(strict=True, reason="main rows [x | y] beside kl rows are packed by "
                   "max(len(x) + len(y), len(y_kl) / kl_share) per example (packing."
                   "stream_lengths): y_kl is another example's completion, so one stream's "
                   "share is wasted; fill about 0.6 on hh-rlhf at 8 x 4")
def test_hh_rlhf_kl_rows_fill_nine_tenths_at_the_default_batch():
    """The same target for the layout the trainer runs for KTO (kl rows): not met yet."""
    fills = _hh_rlhf_fills(uses_kl=True)
    assert np.median(fills) >= 0.5, fills   # what it does reach
    assert fills[0] >= 0.9 and np.median(fills) >= 0.9, fills


def test_lengths_files_csv_and_jsonl_are_drawn_by_count(tmp_path):
    csv_file = tmp_path / "l.csv"
    csv_file.write_text("prompt_len,completion_len,count\n10,5,3\n20,7,1\n")
    jsonl = tmp_path / "l.jsonl"
    jsonl.write_text('{"prompt_len": 10, "completion_len": 5, "count": 3}\n\n'
                     '{"prompt_len": 20, "completion_len": 7}\n')
    for f in (csv_file, jsonl):
        d = bw.load_lengths(str(f))
        p, c = d.sample(40000, np.random.default_rng(1))
        assert set(zip(p.tolist(), c.tolist())) == {(10, 5), (20, 7)}
        assert (p == 10).mean() == pytest.approx(0.75, abs=0.01)


@pytest.mark.parametrize("name, text, needle", [
    ("a.csv", "prompt,completion\n1,2\n", "header must name prompt_len"),
    ("a.csv", "prompt_len,completion_len\n3,0\n", "row 2 has completion_len='0'"),
    ("a.csv", "prompt_len,completion_len\n3,2.5\n", "completion_len='2.5'"),
    ("a.csv", "prompt_len,completion_len\n", "no rows"),
    ("a.jsonl", '{"prompt_len": 3, "completion_len": 2}\n[1, 2]\n', "line 2 is not a JSON object"),
    ("a.jsonl", '{"prompt_len": 3}\n', "line 1 has completion_len=None"),
    ("a.jsonl", '{"prompt_len": 3, "completion_len": 2, "count": -1}\n', "count=-1"),
    ("a.jsonl", "not json\n", "not readable as JSONL"),
    ("a.json", '{"bins": []}', "not a lengths histogram"),
    ("a.json", '{"bin_width": 8, "bins": [[0, 0, 0]]}', "counts > 0"),
    ("a.txt", "1 2\n", "must be .csv"),
])
def test_bad_lengths_files_are_user_errors_naming_the_file(tmp_path, name, text, needle):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(UserError, match="--lengths") as err:
        bw.load_lengths(str(f))
    assert needle in str(err.value) and str(f) in str(err.value)
    with pytest.raises(UserError, match="neither a named distribution"):
        bw.load_lengths(str(tmp_path / "missing.csv"))


def test_sampled_examples_are_truncated_to_the_caps_and_counted(tmp_path):
    f = tmp_path / "l.csv"
    f.write_text("prompt_len,completion_len\n300,20\n50,90\n")
    ex = bw.sample_examples(bw.load_lengths(str(f)), accum=2, micro_batch=4, max_prompt=100,
                            max_completion=64, vocab_size=50, seed=0)
    p, c = ex.prompt_lengths, ex.completion_lengths
    assert set(zip(p.tolist(), c.tolist())) <= {(100, 20), (50, 64)} and ex.truncated == 8
    assert all(((x >= 3) & (x < 50)).all() for x in ex.prompts + ex.completions)


def _hand_examples(accum=2, micro_batch=4):
    """Microbatch 0: prompts 3, 1, 5, 2 / completions 2, 4, 1, 3; microbatch 1: 6, 2, 1, 4 / 1, 1, 5, 2."""
    return bw.make_examples([3, 1, 5, 2, 6, 2, 1, 4][:accum * micro_batch],
                            [2, 4, 1, 3, 1, 1, 5, 2][:accum * micro_batch],
                            accum=accum, micro_batch=micro_batch, vocab_size=100, seed=3)


def test_padded_layout_by_hand():
    ex = _hand_examples()
    batch, count = bw.layout_batch(ex, "padded", bucket=4)
    assert batch["prompt_ids"].shape == (2, 4, 8) and batch["completion_ids"].shape == (2, 4, 8)
    np.testing.assert_array_equal(batch["prompt_ids"][0, 2, 3:], ex.prompts[2])  # left-padded
    assert (batch["prompt_mask"][0, 2, :3] == 0).all() and (batch["prompt_ids"][0, 2, :3] == 0).all()
    np.testing.assert_array_equal(batch["completion_ids"][1, 2, :5], ex.completions[6])
    assert batch["completion_mask"].sum() == 19 and batch["prompt_mask"].sum() == 24
    real = 24 + 19
    assert (count.real_tokens, count.placed_tokens, count.rows, count.row_length) == (real, 2 * real, 8, 16)
    assert count.computed_positions == 2 * 8 * 16
    assert count.token_efficiency == pytest.approx(43 / 256) and count.fill == pytest.approx(86 / 256)
    assert count.token_efficiency_ceiling == pytest.approx(0.5)  # (x, y) and (x, y_kl): all twice


def test_packed_shared_layout_is_the_trainers_kl_rows_for_a_loss_with_z0():
    """packed_shared for KTO: the pipeline's `pack_streams` of each microbatch, stacked: main
    rows [x | y] beside kl rows of y_kl (the keys kl_row_*), counted with the kl rows."""
    ex = _hand_examples()
    batch, count = bw.layout_batch(ex, "packed_shared", bucket=4, pack_length=12)
    # x + y: 5, 5, 6, 5 and 7, 3, 6, 6 (43 tokens, 19 of them y): kl_share = ceil(16 x 19/43)/16
    # = 0.5, kl rows of 0.5 x 12 rounded up to 8 tokens. Rows are packed by max(x + y,
    # len(y_kl) / 0.5): 8, 5, 6, 5 and 7, 10, 6, 6: 3 rows of 12 in each microbatch
    assert (count.rows, count.row_length, count.kl_row_length) == (3, 12, 8)
    assert (count.real_tokens, count.placed_tokens, count.computed_positions) == (43, 62, 2 * 3 * 20)
    assert count.token_efficiency == pytest.approx(43 / 120) and count.fill == pytest.approx(62 / 120)
    assert count.token_efficiency_ceiling == pytest.approx(43 / 62)  # the y_kl copies stay
    assert has_kl_stream(batch) and batch["kl_row_ids"].shape == (2, 3, 8)
    assert set(batch) == set(step_keys(False, packed=True, kl_stream=True))
    for a in range(2):
        x, y = ex.microbatch(a)
        want = packing.pack_streams(x, y, packing.kl_completions(y), pack_length=12, kl_share=0.5,
                                    num_rows=3, completion_length=8, pad_id=0)
        for k, v in want.items():
            np.testing.assert_array_equal(batch[k][a], v, err_msg=k)
    assert batch["desirable"].tolist() == [[True, False] * 2] * 2 and batch["valid"].all()
    # a loss without z0: rows of [x | y] alone (5 + 6, 5 + 5 and 7 + 3, 6 + 6), no y_kl
    batch, count = bw.layout_batch(ex, "packed_shared", bucket=4, pack_length=12, uses_kl=False)
    assert not has_kl_stream(batch) and batch["kl_mask"].sum() == 0
    assert (count.rows, count.kl_row_length, count.placed_tokens, count.computed_positions) == (
        2, 0, 43, 2 * 2 * 12)
    _, count = bw.layout_batch(ex, "padded", bucket=4, uses_kl=False)
    assert (count.rows, count.placed_tokens) == (4, 43)   # no (x, y_kl) rows


@pytest.mark.slow
@pytest.mark.parametrize("groups", [1, 2])
def test_packed_layout_equals_the_padded_forwards(groups):
    """`packed` ([x | y] and [x | y_kl] segments) through the packed log-probs equals the padded
    step's two forwards, (x, y) and (x, y_kl), per example: the layout is exact."""
    import jax
    from flax import nnx
    from kto_jax.models.logprobs import completion_logps
    from kto_jax.models.config import tiny
    from kto_jax.models.transformer import Transformer
    from kto_jax.models.packed_logprobs import packed_completion_logps

    model = Transformer(tiny(attention_impl="xla"), rngs=nnx.Rngs(0))
    ex = _hand_examples(accum=1, micro_batch=4)
    padded, _ = bw.layout_batch(ex, "padded", bucket=4)
    for layout in ("packed", "packed_shared"):
        packed, count = bw.layout_batch(ex, layout, bucket=4, pack_length=16, groups=groups)
        assert count.rows % groups == 0
        y, y_kl = packed_completion_logps(
            model, {k: jax.numpy.asarray(v[0]) for k, v in packed.items()},
            packing.UNPAIRED_NAMES, groups=groups)
        x, xm = padded["prompt_ids"][0], padded["prompt_mask"][0]
        c, cm = padded["completion_ids"][0], padded["completion_mask"][0]
        want_y = completion_logps(model, x, xm, c, cm).logps
        want_kl = completion_logps(model, x, xm, np.roll(c, -1, 0), np.roll(cm, -1, 0)).logps
        np.testing.assert_allclose(np.asarray(y.logps), np.asarray(want_y), atol=1e-5)
        np.testing.assert_allclose(np.asarray(y_kl.logps), np.asarray(want_kl), atol=1e-5)
    # packed: every prompt twice, no KL tree shared: 2 x 12 prompt + 2 x 10 completion tokens
    assert count.layout == "packed_shared"
    _, count = bw.layout_batch(ex, "packed", bucket=4, pack_length=16, groups=groups)
    assert (count.real_tokens, count.placed_tokens) == (21, 42)


def test_pack_length_too_short_and_unknown_layout_are_user_errors():
    ex = _hand_examples()
    with pytest.raises(UserError, match="--pack-length 8 cannot hold"):
        bw.layout_batch(ex, "packed_shared", bucket=4, pack_length=8)
    with pytest.raises(UserError, match="--layout"):
        bw.layout_batch(ex, "ragged", bucket=4)
    for opts in (bench.BenchOptions(layout="ragged"), bench.BenchOptions(pack_length=256),
                 bench.BenchOptions(layout="packed_shared", pack_length=-1)):
        with pytest.raises(UserError):
            opts.check()
    with pytest.raises(UserError, match="--topology compiles the fixed workload"):
        bench.compile_for_tpu(bench.BenchOptions(model="tiny", lengths="hh-rlhf"), "v5e-8")


def test_trl_flops_of_per_example_lengths_sum_the_examples():
    cfg = bench.model_config(bench.BenchOptions(model="tiny"))
    one = lambda s: bench.trl_step_flops(cfg, 1000, 6, 1, s)
    assert bench.trl_step_flops(cfg, 1000, 6, 1, np.array([10, 30])) == pytest.approx(one(10) + one(30))
    assert bench.trl_step_flops(cfg, 1000, 6, 4, 20) == pytest.approx(4 * one(20))


@pytest.mark.slow
def test_bench_cli_real_lengths_every_layout_same_loss_and_token_accounting(capsys, tmp_path):
    """The three layouts of the same examples through the real step (8 CPU devices: 8 packing
    groups): the first step's loss is the same (float32), the counts are the layouts'."""
    f = tmp_path / "l.jsonl"
    f.write_text('{"prompt_len": 9, "completion_len": 5}\n{"prompt_len": 3, "completion_len": 12}\n')
    argv = ["bench", "--model", "tiny", "--steps", "1", "--warmup", "0", "--dtype", "float32",
            "--lengths", str(f), "--prompt-len", "8", "--completion-len", "12", "--bucket", "8"]
    ex = bench.examples(bench.BenchOptions(lengths=str(f), prompt_len=8, completion_len=12,
                                           bucket=8), vocab_size=6000)
    real = int(ex.prompt_lengths.sum() + ex.completion_lengths.sum())
    out = {}
    for layout in ("padded", "packed_shared", "packed"):
        assert cli_main(argv + ["--layout", layout]) == 0
        r = out[layout] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert r["layout"] == layout and r["lengths"] == str(f) and r["real_tokens"] == real
        assert r["token_efficiency"] == pytest.approx(real / r["computed_positions"], abs=1e-4)
        assert r["token_efficiency_ceiling"] == pytest.approx(r["token_efficiency"] / r["fill"], abs=1e-3)
        assert r["real_tokens_per_s"] == pytest.approx(real / r["median_step_s"], rel=2e-3)
        assert r["truncated_examples"] == int((ex.prompt_lengths == 8).sum())
        assert r["seq"] == pytest.approx(real / 32, abs=0.01)
    assert out["padded"]["padded_seq"] == 8 + 16
    assert out["padded"]["computed_positions"] == 2 * 32 * 24
    # packed_shared (KTO: kl rows): one example per row (8 groups of 1), [x | y] of at most
    # 8 + 12 beside y_kl of at most 12 in its kl row (kl_share = 1/2 here: x + y = 20 or 14
    # tokens, y 12 or 5); both streams are counted
    shared = out["packed_shared"]
    assert shared["rows_per_microbatch"] == 8 and shared["kl_row_length"] > 0
    assert shared["computed_positions"] == 4 * 8 * (shared["padded_seq"] + shared["kl_row_length"])
    assert shared["fill"] == pytest.approx(
        (real + sum(ex.completion_lengths)) / shared["computed_positions"], abs=1e-4)
    assert out["packed"]["fill"] == pytest.approx(2 * real / out["packed"]["computed_positions"], abs=1e-4)
    for layout in ("packed_shared", "packed"):
        assert out[layout]["loss"] == pytest.approx(out["padded"]["loss"], abs=2e-5)
        assert out[layout]["trl_model_flops_per_step"] == out["padded"]["trl_model_flops_per_step"]
    for r in out.values():  # the rate is the step's count over its time (4 significant digits)
        assert r["trl_model_tflops_per_s"] == pytest.approx(
            r["trl_model_flops_per_step"] / r["median_step_s"] / 1e12, rel=1e-3)
        assert r["model_tflops_per_s"] == pytest.approx(r["model_flops_per_step"] / r["median_step_s"] / 1e12,
                                                        rel=1e-3)
    # a loss without z0: [x | y] rows alone (no kl rows), and still the padded step's loss
    no_z0 = {}
    for layout in ("padded", "packed_shared"):
        assert cli_main(argv + ["--layout", layout, "--loss", "kto_no_z0"]) == 0
        no_z0[layout] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert no_z0["packed_shared"]["kl_row_length"] == 0
    assert no_z0["packed_shared"]["fill"] == pytest.approx(
        real / no_z0["packed_shared"]["computed_positions"], abs=1e-4)
    assert no_z0["padded"]["computed_positions"] == 32 * 24
    assert no_z0["packed_shared"]["loss"] == pytest.approx(no_z0["padded"]["loss"], abs=2e-5)
    assert cli_main(argv[:-6] + ["--lengths", str(tmp_path / "nope.csv")]) == 2


def test_computed_flops_count_the_layouts_rows():
    dims = flops_lib.ModelDims.from_hf_config(bench.model_config(bench.BenchOptions(model="tiny")).to_hf())
    kto = get_loss("kto")
    padded = bw.TokenCount("padded", 100, 200, rows=16, row_length=96, accum=4)
    packed = bw.TokenCount("packed_shared", 100, 150, rows=3, row_length=128, accum=4)
    # padded: 32 examples x 6 forward units at 96; packed: 12 rows x (3 + 1) units at 128
    assert bench.computed_step_flops(dims, kto, "model", padded) == pytest.approx(
        32 * 6 * flops_lib.forward_flops(dims, 96))
    assert bench.computed_step_flops(dims, kto, "model", packed) == pytest.approx(
        12 * 4 * flops_lib.forward_flops(dims, 128))
    assert bench.computed_step_flops(dims, kto, "precomputed", packed) == pytest.approx(
        12 * 3 * flops_lib.forward_flops(dims, 128))
    # kl rows of 64 beside the 12 rows: forward only, by the policy and the reference
    streams = bw.TokenCount("packed_shared", 100, 150, rows=3, row_length=128, accum=4, kl_row_length=64)
    kl_forward = (2 * dims.matmul_params() * 64
                  + 4 * dims.layers * dims.heads * dims.head_dim * 64 * (128 + 64))
    assert bench.computed_step_flops(dims, kto, "model", streams) == pytest.approx(
        12 * (4 * flops_lib.forward_flops(dims, 128) + 2 * kl_forward))
    # a loss without z0 runs no (x, y_kl) rows padded: 32 examples x 4 units
    assert bench.computed_step_flops(dims, get_loss("kto_no_z0"), "model", dataclasses.replace(
        padded, rows=8)) == pytest.approx(32 * 4 * flops_lib.forward_flops(dims, 96))
