"""The frontier sweep: its bookkeeping and resume, the matched-KL summary against hand
computations, the plot, and one real quick run on a tiny model."""

import dataclasses
import json
import math
import os
import sys

import pytest

from cli_runs import cli_env, run_cli
from kto_jax.demo import frontier, frontier_summary, reproduction
from kto_jax.errors import UserError

T90_DF1, T90_DF2 = 6.313752, 2.919986  # two-sided 90% Student t quantiles, 1 and 2 degrees of freedom
SMALL = dataclasses.replace(reproduction.SIZES["quick"], steps=4)


def _rate(rate, n=100):
    return {"rate": rate, "n": n, "successes": rate * n, "low": 0.0, "high": 1.0}


class FakeRunner:
    """Stands in for training and evaluation (this test is about the bookkeeping only):
    point values are a function of (method, seed, step); `fail_after` simulates a kill."""

    def __init__(self, fail_after=None):
        self.calls, self.points, self.fail_after = [], 0, fail_after

    def reference(self, seed):
        return {"pass_rate": _rate(0.3), "kl": 0.0}

    def run(self, method, seed, beta, steps, record):
        self.calls.append((method, seed, beta, list(steps)))
        for step in steps:
            if self.fail_after is not None and self.points == self.fail_after:
                raise KeyboardInterrupt
            offset = list(reproduction.METHODS).index(method)
            record(step, {"pass_rate": _rate(0.3 + 0.05 * step + 0.01 * seed), "kl": step * (1 + offset) / 2,
                          "kl_se": 0.1})
            self.points += 1


def test_eval_steps():
    assert frontier.eval_steps(20, 0) == [5, 10, 15, 20]
    assert frontier.eval_steps(20, 6) == [6, 12, 18, 20]
    assert frontier.eval_steps(1, 0) == [1]
    with pytest.raises(UserError, match="--eval-every 5 is more than the run's 4 steps"):
        frontier.eval_steps(4, 5)
    assert frontier.sweep_flags([2, 4], 0.3) == ("--config.train.eval_every=2", "--config.checkpoint.every_steps=2",
                                                 "--config.checkpoint.keep=4", "--config.loss.beta=0.3")


def test_sweep_bookkeeping_and_resume(tmp_path):
    workdir = str(tmp_path / "sweep")
    methods = ["KTO", "DPO (pairs of the same samples)"]
    kwargs = dict(size=SMALL, seeds=[0, 1], methods=methods, eval_every=2, log=lambda _: None)
    with pytest.raises(KeyboardInterrupt):  # killed after 3 points: they stay in the JSON
        frontier.run_frontier(workdir, runner=FakeRunner(fail_after=3), **kwargs)
    saved = json.load(open(os.path.join(workdir, frontier.RESULTS_FILE)))
    assert [(p["method"], p["seed"], p["step"]) for p in saved["points"]] == [
        ("KTO", 0, 2), ("KTO", 0, 4), ("DPO (pairs of the same samples)", 0, 2)]
    assert saved["settings"]["eval_steps"] == [2, 4] and set(saved["references"]) == {"0"}

    runner = FakeRunner()
    results = frontier.run_frontier(workdir, runner=runner, **kwargs)
    assert runner.calls == [("DPO (pairs of the same samples)", 0, None, [4]),  # only what was missing
                            ("KTO", 1, None, [2, 4]), ("DPO (pairs of the same samples)", 1, None, [2, 4])]
    keys = sorted((p["method"], p["seed"], p["step"]) for p in results["points"])
    assert keys == sorted((m, s, k) for m in methods for s in (0, 1) for k in (2, 4))  # method x seed x step
    assert json.load(open(os.path.join(workdir, frontier.RESULTS_FILE)))["points"] == results["points"]
    assert results["summary"]["methods"]["KTO"]["seeds"] == [0, 1]
    assert results["summary_table"] == frontier_summary.summary_table(results["summary"])
    assert "| KTO (seeds 0, 1) |" in results["summary_table"]

    again = FakeRunner()
    frontier.run_frontier(workdir, runner=again, **kwargs)
    assert again.calls == []

    # beta as a second knob: new keys, so new runs; the old points are kept.
    betas = FakeRunner()
    results = frontier.run_frontier(workdir, runner=betas, betas=[0.2], **{**kwargs, "seeds": [0]})
    assert betas.calls == [("KTO", 0, 0.2, [2, 4]), ("DPO (pairs of the same samples)", 0, 0.2, [2, 4])]
    assert len(results["points"]) == 12

    with pytest.raises(UserError, match="holds a sweep with other settings"):
        frontier.run_frontier(workdir, runner=FakeRunner(), **{**kwargs, "eval_every": 1})
    with pytest.raises(UserError, match="unknown --methods"):
        frontier.run_frontier(workdir, runner=FakeRunner(), **{**kwargs, "methods": ["PPO"]})


def test_finished_reads_the_export_marker(tmp_path):
    """A run stopped by SIGTERM returns normally from the trainer: only hf.step tells."""
    assert not frontier.finished(str(tmp_path), 20)
    (tmp_path / "hf.step").write_text("7\n")
    assert not frontier.finished(str(tmp_path), 20)
    (tmp_path / "hf.step").write_text("20\n")
    assert frontier.finished(str(tmp_path), 20)


def test_main_reports_bad_input_without_traceback(tmp_path, capsys):
    (tmp_path / frontier.RESULTS_FILE).write_text("not json")
    assert frontier.main(["--workdir", str(tmp_path), "--size", "quick"]) == 2
    assert "frontier: error: " in capsys.readouterr().err


def test_combine_equals_one_sweep_over_all_seeds(tmp_path):
    """One process per seed, then --combine: the same points, summary and table as one
    sweep over both seeds; overlapping or mismatched sweeps are refused by name."""
    methods = ["KTO", "DPO (pairs of the same samples)"]
    kwargs = dict(size=SMALL, methods=methods, eval_every=2, log=lambda _: None)
    whole = frontier.run_frontier(str(tmp_path / "both"), seeds=[0, 1], runner=FakeRunner(), **kwargs)
    for seed in (1, 0):
        frontier.run_frontier(str(tmp_path / f"s{seed}"), seeds=[seed], runner=FakeRunner(), **kwargs)

    combined = frontier.combine(str(tmp_path / "out"), [str(tmp_path / "s1"), str(tmp_path / "s0")],
                                log=lambda _: None)
    assert combined["points"] == whole["points"] and combined["references"] == whole["references"]
    assert combined["summary"] == whole["summary"] and combined["summary_table"] == whole["summary_table"]
    assert [s["seeds"] for s in combined["sources"]] == [[1], [0]]
    assert [s["points"] for s in combined["sources"]] == [4, 4]
    assert json.load(open(tmp_path / "out" / frontier.RESULTS_FILE))["points"] == whole["points"]
    assert (tmp_path / "out" / frontier.PLOT_FILE).stat().st_size > 0

    # a continued copy of a sweep holds its points again: the same values are kept once
    again = frontier.combine(str(tmp_path / "x"), [str(tmp_path / "s0"), str(tmp_path / "both")],
                             log=lambda _: None)
    assert again["points"] == whole["points"] and [s["new_points"] for s in again["sources"]] == [4, 4]
    other = json.load(open(tmp_path / "s1" / frontier.RESULTS_FILE))
    other["points"][0]["kl"] += 1.0  # another measurement of the same point
    frontier.save_results(str(tmp_path / "s1" / frontier.RESULTS_FILE), other)
    with pytest.raises(UserError, match=r"\('KTO', 1, None, 2\) differs between .*both and .*s1"):
        frontier.combine(str(tmp_path / "y"), [str(tmp_path / "both"), str(tmp_path / "s1")], log=lambda _: None)
    frontier.run_frontier(str(tmp_path / "other"), seeds=[2], runner=FakeRunner(), **{**kwargs, "eval_every": 4})
    with pytest.raises(UserError, match="other settings"):
        frontier.combine(str(tmp_path / "x"), [str(tmp_path / "s0"), str(tmp_path / "other")], log=lambda _: None)
    with pytest.raises(UserError, match="is also one of --combine's sources"):
        frontier.combine(str(tmp_path / "s0"), [str(tmp_path / "s0")], log=lambda _: None)
    assert frontier.main(["--workdir", str(tmp_path / "x"), "--combine", str(tmp_path / "missing")]) == 2


def test_source_seconds_adds_every_phase():
    results = {"references": {"0": {"seconds": {"data_cpu": 10.0, "data_wall": 12.0}}},
               "points": [{"seconds": {"eval_cpu": 3.0, "eval_wall": 4.0, "train_cpu": 20.0, "train_wall": 30.0}},
                          {"seconds": {"eval_cpu": 2.0, "eval_wall": 5.0}}, {}]}
    assert frontier.source_seconds(results) == {"cpu": 35.0, "wall": 51.0}


def _points(method, seed, pairs):
    return [{"method": method, "seed": seed, "beta": None, "step": i + 1, "kl": kl, "pass_rate": _rate(r)}
            for i, (kl, r) in enumerate(pairs)]


def _hand_sweep():
    return (_points("KTO", 0, [(1.0, 0.40), (3.0, 0.60)])
            + _points("KTO", 1, [(0.5, 0.30), (2.0, 0.60), (4.0, 0.70)])
            + _points("Far", 0, [(10.0, 0.90), (12.0, 0.95)])
            + _points("Far", 1, [(11.0, 0.90), (13.0, 0.95)])
            + _points("DPO", 0, [(6.0, 0.90), (2.0, 0.50)])      # unsorted on purpose
            + _points("DPO", 1, [(1.5, 0.45), (5.0, 0.65)]))


def test_matched_kl_against_hand_computation():
    summary = frontier_summary.matched_kl(_hand_sweep(), order=["KTO", "Far", "DPO"], grid_points=3)
    # KTO spans [max(1, 0.5), min(3, 4)] = [1, 3]; DPO [2, 5]; Far [11, 12] misses both.
    assert summary["methods"]["KTO"]["kl_range"] == (1.0, 3.0)
    assert summary["methods"]["DPO"]["kl_range"] == (2.0, 5.0)
    assert summary["common_range"] == (2.0, 3.0) and summary["grid"] == [2.0, 2.5, 3.0]
    far = summary["methods"]["Far"]
    assert far["reachable"] is False and "at" not in far  # reported, not extrapolated

    kto = summary["methods"]["KTO"]["at"]
    # seed 0 at 2.0: 0.40 + (1/2) 0.20 = 0.50; seed 1 at 2.0: 0.60 (a point).
    assert kto[0]["per_seed"] == pytest.approx({0: 0.50, 1: 0.60})
    # mean 0.55, sd 0.1/sqrt(2), half = t(1) sd / sqrt(2) = t(1) 0.05.
    assert (kto[0]["rate"], kto[0]["low"], kto[0]["high"]) == pytest.approx(
        (0.55, 0.55 - T90_DF1 * 0.05, min(1.0, 0.55 + T90_DF1 * 0.05)), abs=1e-6)
    assert kto[1]["per_seed"] == pytest.approx({0: 0.55, 1: 0.625})   # at 2.5
    assert kto[2]["per_seed"] == pytest.approx({0: 0.60, 1: 0.65})    # at 3.0
    assert kto[0]["vs_baseline"] is None

    dpo = summary["methods"]["DPO"]["at"]
    # seed 1 at 2.0: 0.45 + (0.5 / 3.5) 0.20
    dpo_s1 = 0.45 + 0.5 / 3.5 * 0.20
    assert dpo[0]["per_seed"] == pytest.approx({0: 0.50, 1: dpo_s1})
    diffs = [0.50 - 0.50, dpo_s1 - 0.60]
    mean = sum(diffs) / 2
    half = T90_DF1 * abs(diffs[0] - diffs[1]) / 2  # sd of 2 values = |a - b| / sqrt(2); / sqrt(2) again
    vs = dpo[0]["vs_baseline"]
    assert (vs["diff"], vs["low"], vs["high"]) == pytest.approx((mean, mean - half, mean + half), abs=1e-6)
    assert vs["seeds"] == 2 and vs["separated"] is False


def test_matched_kl_separates_a_consistent_difference_and_handles_one_seed():
    points = []
    for seed, gap in enumerate([0.10, 0.12, 0.14]):
        points += _points("KTO", seed, [(0.0, 0.40), (2.0, 0.60)])
        points += _points("DPO", seed, [(0.0, 0.40 + gap), (2.0, 0.60 + gap)])
    summary = frontier_summary.matched_kl(points, grid_points=2)
    vs = summary["methods"]["DPO"]["at"][1]["vs_baseline"]
    half = T90_DF2 * 0.02 / math.sqrt(3)  # diffs 0.10, 0.12, 0.14: mean 0.12, sd 0.02
    assert (vs["diff"], vs["low"], vs["high"]) == pytest.approx((0.12, 0.12 - half, 0.12 + half), abs=1e-6)
    assert vs["separated"] is True
    table = frontier_summary.summary_table(summary)
    assert "Separated from KTO (interval excludes 0): DPO at KL 0.00; DPO at KL 2.00." in table

    one = frontier_summary.matched_kl(_points("KTO", 0, [(1.0, 0.25), (3.0, 0.75)]), grid_points=3)
    at = one["methods"]["KTO"]["at"][1]  # KL 2.0: 0.5, Wilson interval of 50 of 100
    from kto_jax.eval.stats import wilson_interval
    assert (at["rate"], at["low"], at["high"]) == pytest.approx((0.5, *wilson_interval(50, 100)))


def test_curve_refuses_to_extrapolate():
    curve = frontier_summary.make_curve(_points("KTO", 0, [(2.0, 0.5), (1.0, 0.3), (1.0, 0.5)]))
    assert list(curve.kl) == [1.0, 2.0] and list(curve.rate) == pytest.approx([0.4, 0.5])  # equal KL averaged
    with pytest.raises(ValueError, match="outside"):
        curve.at(2.5)


def test_summary_table_and_plot(tmp_path):
    points = _hand_sweep()
    summary = frontier_summary.matched_kl(points, order=["KTO", "Far", "DPO"], grid_points=3)
    table = frontier_summary.summary_table(summary)
    lines = table.splitlines()
    assert lines[2] == "| method | KL range of its seeds | KL 2.00 | KL 2.50 | KL 3.00 |"
    assert "| Far (seeds 0, 1) |" not in table and "| Far | 11.00-12.00 | not reachable |" in table
    assert lines[4].startswith("| KTO (seeds 0, 1) | 1.00-3.00 | 55.0% [23.4, 86.6] |")
    assert "Not reachable (KL range outside the common range, not extrapolated): Far." in table
    assert "Not separated from KTO: DPO at KL 2.00; DPO at KL 2.50; DPO at KL 3.00." in table
    path = str(tmp_path / "frontier.png")
    results = {"points": points, "references": {"0": {"pass_rate": _rate(0.3)}, "1": {"pass_rate": _rate(0.2)}},
               "summary": summary}
    assert frontier_summary.write_plot(results, path, "test") == path
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 10_000


def test_seed_mean_curve_averages_only_knobs_every_seed_holds():
    """An unfinished sweep: seed 1 lacks step 10, so step 10 is not averaged over seed 0 alone."""
    def point(seed, step, kl, rate):
        return {"method": "KTO", "seed": seed, "beta": None, "step": step, "kl": kl, "pass_rate": _rate(rate)}
    points = [point(0, 5, 1.0, 0.40), point(1, 5, 2.0, 0.50), point(0, 10, 3.0, 0.60),
              point(0, 15, 4.0, 0.70), point(1, 15, 6.0, 0.90)]
    kl, rate = frontier_summary.seed_mean_curve(points)
    assert kl == [1.5, 5.0]
    assert rate == pytest.approx([0.45, 0.80])


# The quick sweep of the test below, in a subprocess (tests/cli_runs.py): its trainer and
# sampler runs stay out of the pytest process. Prints {"results", "logs"} as one JSON line.
_QUICK_SWEEP = """
import dataclasses, json, sys
from kto_jax.demo import frontier, reproduction
workdir, model = sys.argv[1:3]
logs = []
size = dataclasses.replace(reproduction.SIZES["quick"], steps=2)
results = frontier.run_frontier(workdir, size, seeds=[0], methods=["KTO concave"], eval_every=1,
                                model_path=model, log=logs.append)
print(json.dumps({"results": results, "logs": logs}))
"""


def _quick_sweep(workdir, model, cache):
    proc = run_cli([sys.executable, "-c", _QUICK_SWEEP, workdir, model], cli_env(cache, devices=8))
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["results"], out["logs"]


@pytest.mark.slow
def test_quick_sweep_on_a_tiny_model(tiny_dir, compile_cache, tmp_path):
    """The real path end to end: reproduction's data, trainer and evaluation at 2 checkpoints."""
    workdir = str(tmp_path / "frontier")
    size = dataclasses.replace(reproduction.SIZES["quick"], steps=2)
    results, logs = _quick_sweep(workdir, tiny_dir, compile_cache)
    n = size.heldout_prompts * size.heldout_samples
    points = results["points"]
    assert [(p["method"], p["step"]) for p in points] == [("KTO concave", 1), ("KTO concave", 2)]
    for p in points:
        assert p["pass_rate"]["n"] == n and math.isfinite(p["kl"]) and p["kl_se"] >= 0
        assert p["heldout_eval"]["step"] == p["step"] and p["loss_beta"] == 0.5
    run_dir = os.path.join(workdir, "seed-0", "kto_concave")
    assert not os.path.exists(os.path.join(run_dir, "checkpoints"))  # pruned once stored
    for p in points:
        rows = [json.loads(line) for line in open(os.path.join(run_dir, frontier.SAMPLES_FILE.format(step=p["step"])))]
        assert len(rows) == n and p["pass_rate"]["successes"] == sum(r["passes"] for r in rows)
    assert results["references"]["0"]["pass_rate"]["n"] == n
    assert os.path.getsize(os.path.join(workdir, frontier.PLOT_FILE)) > 10_000
    saved = json.load(open(os.path.join(workdir, frontier.RESULTS_FILE)))
    assert saved["points"] == points and "summary" in saved
    again, logs = _quick_sweep(workdir, tiny_dir, compile_cache)
    assert again["points"] == points and not any("==== seed" in line for line in logs)  # nothing re-run

    # A point lost after its run was pruned: the run is trained again, the same point comes back.
    saved["points"] = points[:1]
    frontier.save_results(os.path.join(workdir, frontier.RESULTS_FILE), saved)
    redone, logs = _quick_sweep(workdir, tiny_dir, compile_cache)
    redone = redone["points"]
    assert any("KTO concave: steps [2]" in line for line in logs)
    # the seed's data came from its directory (data.json), not from sampling again
    assert any("(data.json)" in line for line in logs) and not any("sampling" in line for line in logs)
    assert redone[1]["pass_rate"] == points[1]["pass_rate"]
    assert redone[1]["kl"] == pytest.approx(points[1]["kl"], rel=1e-4, abs=1e-5)


def test_seed_data_is_saved_and_reused(tmp_path):
    """save_data / load_data: the same files and reference texts back; a missing file is named."""
    files = {k: str(tmp_path / f"{k}.jsonl") for k in ("train", "heldout", "train_pairs")}
    for path in files.values():
        open(path, "w").write("{}\n")
    data = {"files": {**files, "heldout_pairs": ""}, "before": ["a", "b"], "n_up": 1, "n": 2, "pairs": 1}
    assert reproduction.load_data(str(tmp_path), SMALL) is None
    reproduction.save_data(data, str(tmp_path))
    loaded = reproduction.load_data(str(tmp_path), SMALL)
    assert {k: loaded[k] for k in data} == data
    assert len(loaded["heldout"]) == SMALL.heldout_prompts
    assert reproduction.reference_rate(loaded)["pass_rate"]["n"] == 2
    os.remove(files["train"])
    with pytest.raises(UserError, match="train.jsonl'\\], which are missing"):
        reproduction.load_data(str(tmp_path), SMALL)
