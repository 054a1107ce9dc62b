"""`online(config, workdir)`: rounds of sample -> judge -> label -> train -> evaluate.

One process, one mesh, no export between rounds:
  sample    the KV-cache sampler (kto_jax/eval/sampling.py) reads the LIVE policy params of
            the train state, on the training mesh and its sharding rules; the key of
            round r is derived from (online.seed, r), so a round's samples are a pure
            function of the weights it starts from and the seed;
  judge     in this process (kto_jax/online/judging.py), verdicts saved as they come;
  label     kto_jax/online/labels.py; the round's files are written BEFORE training;
  train     online.steps_per_round steps of the trainer's own step loop
            (kto_jax/train/loop.py) on the round's examples (any registry loss), through
            the data pipeline;
  evaluate  held-out prompts sampled from the new policy and judged: pass rate with
            its 90% interval, KL to the reference, and the trainer's evaluation
            (kto_jax/train/evaluate.py) of the held-out examples (kto_jax/online/report.py);
  save      a checkpoint at the round's last step (step = round * steps_per_round).

The run itself is the trainer's (`kto_jax.train.run.assemble_run`: mesh, optimizer,
checkpointer, policy, train state, logger, jitted steps, in the trainer's order); this
module adds only what is online: the prompts, the sampler, the judge, the labels, the
round files and the round's report.

The reference pi_ref is the initial policy (online.reference="initial") or a copy of the
policy made at the start of every round ("refresh"; docs/online.md says what each does
to z0 and the KL). Under LoRA (config.lora) the train state holds the frozen base and
the trained adapters (kto_jax/step/adapters.py): the sampler and every forward run the
base with the adapters beside it, never a merged copy of the weights; "initial" is the
base (with the adapters off, or + lora.init_from's frozen adapter), "refresh" the base +
a frozen copy of the adapters as the round starts (only the adapters are copied).

One process: the round files, the judge and the sampler's host loop live in it, so
`online` refuses jax.process_count() > 1 (`check_single_process`); its mesh may span
every device of that process.

Resume: a rerun of the same command restores the last round's checkpoint and starts the
next round; a round interrupted part-way is redone from its start, reusing its sample
file when it is complete (and otherwise regenerating identical samples), and
metrics.jsonl loses the rows written after that checkpoint. So a SIGKILL at any point
and a rerun give the uninterrupted run's samples, labels, metrics and weights.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import ml_collections
import numpy as np

from kto_jax import fs as paths
from kto_jax.data.pipeline import build_datasets
from kto_jax.data.settings import DataSettings
from kto_jax.errors import UserError
from kto_jax.eval.sampling import Sampler
from kto_jax.models import abstract_model, load_tokenizer
from kto_jax.online import labels as labels_lib
from kto_jax.online import report
from kto_jax.online import rounds as files
from kto_jax.online.http_judge import JudgeFailed
from kto_jax.online.judging import PointwiseJudge, make_pointwise_judge, prompt_text
from kto_jax.online.prompts import PromptSets, prompt_sets, round_prompt_ids
from kto_jax.online.settings import OnlineSettings
from kto_jax.step.adapters import frozen_inputs, model_of, policy_params
from kto_jax.step.state import reference_copy
from kto_jax.step.stats import MATCHED_ONLY
from kto_jax.step.train_step import make_reference_step
from kto_jax.train import batches as batches_lib
from kto_jax.train import workdir as layout
from kto_jax.train.distributed import PreemptionGuard
from kto_jax.train.evaluate import evaluate
from kto_jax.train.loop import Segment, run_loop
from kto_jax.train.metrics import read_jsonl
from kto_jax.train.run import (Run, assemble_run, check_model_path, log_lines, lora_summary,
                               saved_state)
from kto_jax.train.settings import RunSettings, read_settings
from kto_jax.train.trainer import export_at_end, run_session

TRAIN_STREAM, HELDOUT_STREAM = 0, 1


class _RoundMarker:
    """What a checkpoint stores as its data position: only the round (the data of a
    round is rebuilt from its files), in the iterator protocol Checkpointer expects."""

    def __init__(self, round_index: int):
        self.round_index = round_index

    def get_state(self) -> dict:
        return {"round": self.round_index}


@dataclasses.dataclass
class OnlineRun:
    """The trainer's run (`run`) and what online rounds add to it."""
    run: Run
    online: OnlineSettings
    logps: dict            # "policy" / "reference": params, batch -> {"reference_logps": [A, M]}
    sampler: Sampler
    judge: PointwiseJudge
    prompts: PromptSets
    start_round: int       # the last round the restored state has finished (0: none)

    @property
    def mesh(self) -> Any:
        return self.run.mesh

    def close(self) -> None:
        """Closes the run (waiting for a checkpoint save in flight) and its logs."""
        self.run.close()


def sample_seed(seed: int, round_index: int, stream: int) -> int:
    """The sampling seed of (online.seed, round, train/held-out stream)."""
    return int(np.random.SeedSequence([seed, round_index, stream]).generate_state(1)[0])


def _round_data(o: OnlineRun, train_file: str, eval_file: str, seed: int,
                unpaired: bool = False) -> DataSettings:
    """The run's data settings reading a round's files as its training (and eval) data;
    `unpaired`: as single completions with their labels whatever the loss (the KL rows).
    They are a policy's samples: an empty completion (end of sequence at once) is its EOS
    token, and warnings never offer loss.auto_weights, which online runs refuse."""
    data = o.run.settings.data.replace(train_path=train_file, eval_path=eval_file,
                                       eval_fraction=0.0, seed=seed, format="auto", num_epochs=1,
                                       empty_completions=True, offer_auto_weights=False)
    return data.replace(paired=False, pack_second=False) if unpaired else data


# ---------------------------------------------------------------- setup

def check_single_process() -> None:
    """UserError when JAX runs in more than one process: an online run is one process."""
    if jax.process_count() > 1:
        raise UserError(
            f"kto-jax online runs in one process, and JAX has {jax.process_count()} here: "
            "the judge, the round files and the sampler's host loop live in that one "
            "process. Start it once, on one host, with its mesh over that host's devices "
            "(config.mesh); multi-host training is `kto-jax train` on examples written by "
            "an online run (WORKDIR/rounds/*/examples.jsonl).")


def setup_online(config: ml_collections.ConfigDict, workdir: str) -> OnlineRun:
    """The trainer's run (`assemble_run`, restored from the last round's checkpoint if any)
    and the prompts, sampler and judge of the rounds."""
    online = OnlineSettings.from_config(config)
    check_model_path(config)
    settings = read_settings(config)  # every shared setting checked, LoRA resolved: before loading
    prompts = prompt_sets(online.prompts_path, online.heldout_prompts_path,
                          online.heldout_fraction, online.seed)
    workdir = paths.resolve(workdir)
    tokenizer = load_tokenizer(settings.model.path)
    run = assemble_run(config, settings, workdir, tokenizer, num_steps=online.num_steps,
                       data=None, train_iter=None, checkpoint_every=online.steps_per_round,
                       adapter_reference=online.reference == "refresh")
    start_round = 0
    if run.resuming:
        start_round = int(run.checkpointer.restore_meta(run.start_step).get(
            "round", run.start_step // online.steps_per_round))
    judge = make_pointwise_judge(online.judge, online, mesh=run.mesh, rules=config.mesh)
    state = run.state
    lora_reference = ("the base + a frozen copy of the adapters as each round starts"
                      if online.reference == "refresh" and state.reference_params is not None
                      else None)
    log_lines(run, [
        f"resuming after round {start_round} (step {run.start_step}) in {workdir}"
        if run.resuming else None,
        run.changes,
        f"online: {len(prompts.train)} training prompts, {prompts.note}; judge {judge.name}; "
        f"reference {online.reference}",
        lora_summary(state, lora_reference, run.model_config) if state.base_params is not None else None])
    # the sampler reads the live policy of the train state (`sample`), never a copy
    sampler = Sampler(abstract_model(run.model_config), tokenizer, mesh=run.mesh,
                      rules=settings.rules, batch_size=online.sample_batch_size, chat=online.chat)
    return OnlineRun(run=run, online=online, logps=_logps_steps(run, settings), sampler=sampler,
                     judge=judge, prompts=prompts, start_round=start_round)


def _logps_steps(run: Run, settings: RunSettings) -> dict:
    """log pi(y|x) of the policy and of the reference, jitted (under LoRA the base is always
    there to compare with); {} when the run has no reference."""
    if run.state.reference_params is None and run.state.base_params is None:
        return {}
    return {name: make_reference_step(MATCHED_ONLY, run.graphdef, settings.step.vocab_chunk,
                                      run.mesh, view(run.graphdef, run.shardings), settings.rules)
            for name, view in (("policy", policy_params), ("reference", frozen_inputs))}


# ---------------------------------------------------------------- sample and judge

def sample(o: OnlineRun, prompt_list: list, prompt_ids: list[int], round_index: int,
           stream: int) -> list[dict]:
    """samples_per_prompt completions of each prompt from the live policy, unjudged."""
    spp, run = o.online.samples_per_prompt, o.run
    o.sampler.set_params(policy_params(run.graphdef, run.state), run.graphdef, model_of)
    expanded = [prompt_list[p] for p in prompt_ids for _ in range(spp)]
    gens = o.sampler.generate(expanded, o.online.sampling,
                              seed=sample_seed(o.online.seed, round_index, stream))
    return [{"round": round_index, "prompt_id": p, "sample": s, "prompt": g.prompt,
             "completion": g.text, "finished": g.finished, "num_tokens": len(g.token_ids)}
            for (p, s), g in zip(((p, s) for p in prompt_ids for s in range(spp)), gens)]


def judge_samples(o: OnlineRun, samples: list[dict], round_index: int) -> list[dict]:
    """The samples with their "score"; verdicts of an earlier, failed attempt are reused,
    and on a judge failure those received are saved before the run stops."""
    partial_path = files.round_file(o.run.workdir, round_index, layout.ROUND_PARTIAL_VERDICTS)
    known = {files.sample_key(r): float(r["score"]) for r in files.read_jsonl(partial_path) or []}
    todo = [i for i, s in enumerate(samples) if files.sample_key(s) not in known]
    if todo:
        try:
            scores = o.judge.scores([prompt_text(samples[i]["prompt"]) for i in todo],
                                    [samples[i]["completion"] for i in todo])
        except JudgeFailed as err:
            for j, score in err.verdicts.items():
                known[files.sample_key(samples[todo[j]])] = float(score)
            files.write_jsonl(partial_path, [{"prompt_id": k[0], "sample": k[1], "score": v}
                                             for k, v in sorted(known.items())])
            raise JudgeFailed(f"{err} Saved {len(known)} verdicts of round {round_index} to "
                              f"{partial_path} and the last checkpoint (round "
                              f"{round_index - 1}); re-run the same command once the judge "
                              "works to resume.", err.verdicts) from None
        for i, score in zip(todo, scores):
            known[files.sample_key(samples[i])] = float(score)
    return [dict(s, score=known[files.sample_key(s)]) for s in samples]


def round_samples(o: OnlineRun, round_index: int) -> list[dict]:
    """The round's judged and labelled samples: from its file if complete, else sampled,
    judged and written (with the round's prompts) before anything trains on them."""
    opts = o.online
    path = files.round_file(o.run.workdir, round_index, layout.ROUND_SAMPLES)
    saved = files.read_jsonl(path)
    if saved is not None:
        return saved
    ids = round_prompt_ids(len(o.prompts.train), opts.prompts_per_round, opts.seed, round_index)
    files.write_jsonl(files.round_file(o.run.workdir, round_index, layout.ROUND_PROMPTS),
                      [{"prompt_id": p, "prompt": o.prompts.train[p]} for p in ids])
    samples = judge_samples(o, sample(o, o.prompts.train, ids, round_index, TRAIN_STREAM),
                            round_index)
    sample_labels = labels_lib.labels(samples, opts.labeling, opts.threshold, opts.k)
    samples = [dict(s, label=lab) for s, lab in zip(samples, sample_labels)]
    files.write_jsonl(path, samples)
    return samples


# ---------------------------------------------------------------- train and evaluate

def _examples(o: OnlineRun, samples: list[dict]) -> list[dict]:
    return labels_lib.examples(samples, [s["label"] for s in samples], o.online.labeling)


def train_round(o: OnlineRun, round_index: int, samples: list[dict],
                guard: PreemptionGuard) -> bool:
    """steps_per_round steps of the trainer's step loop on the round's examples, logged per
    round (rows tagged round and kind "train"); False when SIGTERM stopped it."""
    run, spr = o.run, o.online.steps_per_round
    examples_path = files.round_file(run.workdir, round_index, layout.ROUND_EXAMPLES)
    examples = _examples(o, samples)
    files.write_jsonl(examples_path, examples)
    first_step = (round_index - 1) * spr
    if not examples:
        run.logger.message(f"round {round_index}: no examples (every prompt's samples scored "
                           "the same); no training this round")
        run.logger.advance(spr)
        return True
    data = build_datasets(_round_data(o, examples_path, "", o.online.seed + round_index),
                          run.tokenizer)
    for warning in data.summary.warnings:
        run.logger.warn(warning)
    run.data, run.train_iter, run.window = data, data.train_iter_factory(forever=True), None
    segment = Segment(first_step, first_step + spr, origin=first_step,
                      tags={"round": round_index, "kind": "train"}, checkpoints=False)
    try:
        return run_loop(run, guard, segment) == "done"
    finally:
        run.train_iter.close()
        run.data = run.train_iter = None


def _heldout_logps_kl(o: OnlineRun, heldout_file: str, seed: int) -> float | None:
    """Mean log pi(y|x) - log pi_ref(y|x) over the held-out samples (y ~ pi)."""
    if not o.logps:
        return None
    run = o.run
    data = build_datasets(_round_data(o, heldout_file, heldout_file, seed, unpaired=True),
                          run.tokenizer)
    total, count = 0.0, 0.0
    for local in data.eval_batches():
        batch = batches_lib.to_global(local, run.batch_sharding)
        pol = o.logps["policy"](policy_params(run.graphdef, run.state), batch)
        ref = o.logps["reference"](frozen_inputs(run.graphdef, run.state), batch)
        pol, ref = jax.device_get((pol["reference_logps"], ref["reference_logps"]))
        valid = np.asarray(local["valid"], np.float64)
        total += float((valid * (np.asarray(pol, np.float64) - np.asarray(ref, np.float64))).sum())
        count += float(valid.sum())
    return total / max(count, 1.0)


def _heldout_eval_metrics(o: OnlineRun, examples_file: str, seed: int) -> dict | None:
    """The trainer's evaluation (`kto_jax.train.evaluate`) of the held-out examples."""
    data = build_datasets(_round_data(o, examples_file, examples_file, seed), o.run.tokenizer)
    return evaluate(o.run, data.eval_batches) or None


def heldout_due(online_settings: OnlineSettings, round_index: int) -> bool:
    """Held-out evaluation before round 1, after the last round and every heldout_every."""
    every = online_settings.heldout_every
    return (round_index in (0, online_settings.rounds)
            or (every > 0 and round_index % every == 0))


def evaluate_heldout(o: OnlineRun, round_index: int
                     ) -> tuple[list[dict], dict | None, float | None]:
    """(held-out samples judged, the eval step's metrics on them, KL to the reference)."""
    opts, workdir = o.online, o.run.workdir
    path = files.round_file(workdir, round_index, layout.ROUND_HELDOUT)
    heldout = files.read_jsonl(path)
    if heldout is None:
        ids = list(range(len(o.prompts.heldout)))
        heldout = judge_samples(o, sample(o, o.prompts.heldout, ids, round_index,
                                          HELDOUT_STREAM), round_index)
        heldout = [dict(s, **{"pass": labels_lib.passes(s["score"], opts.threshold)
                              if labels_lib.scored(s) else None}) for s in heldout]
        files.write_jsonl(path, heldout)
    seed = opts.seed + 1000 + round_index
    heldout_labels = labels_lib.labels(heldout, opts.labeling, opts.threshold, opts.k)
    examples = labels_lib.examples(heldout, heldout_labels, opts.labeling)
    examples_path = files.round_file(workdir, round_index, layout.ROUND_HELDOUT_EXAMPLES)
    files.write_jsonl(examples_path, examples)
    eval_metrics = _heldout_eval_metrics(o, examples_path, seed) if examples else None
    kl_path = files.round_file(workdir, round_index, layout.ROUND_HELDOUT_UNPAIRED)
    files.write_jsonl(kl_path, [{"prompt": s["prompt"], "label": bool(s["pass"]),
                                 "completion": labels_lib.as_completion(s["prompt"], s["completion"])}
                                for s in heldout])
    return heldout, eval_metrics, _heldout_logps_kl(o, kl_path, seed)


def evaluate_round(o: OnlineRun, round_index: int, samples: list[dict] | None) -> dict:
    """Logs the round's row (report.round_record) to metrics.jsonl and TensorBoard, and
    the plot; when due, samples the held-out prompts from the current policy and judges
    them first."""
    opts, run = o.online, o.run
    heldout, eval_metrics, kl_ref = None, None, None
    if heldout_due(opts, round_index):
        heldout, eval_metrics, kl_ref = evaluate_heldout(o, round_index)
    pairs = samples is not None and opts.labeling == "pairs"
    row = report.round_record(
        round_index, heldout_scores=None if heldout is None else [s["score"] for s in heldout],
        threshold=opts.threshold,
        train_scores=None if samples is None else [s["score"] for s in samples],
        train_labels=None if samples is None else [s["label"] for s in samples],
        num_pairs=len(_examples(o, samples)) if pairs else None,
        eval_metrics=eval_metrics, kl_ref=kl_ref)
    run.logger.log_train(round_index * opts.steps_per_round, row)
    if heldout is not None:
        run.logger.message(
            f"round {round_index}: held-out pass rate {row['judge/pass_rate']:.3f} "
            f"[{row['judge/pass_rate_low']:.3f}, {row['judge/pass_rate_high']:.3f}] "
            f"(n={row['judge/n']}"
            + (f", {row['judge/unscored']} without a verdict" if row["judge/unscored"] else "")
            + ")" + ("" if kl_ref is None else f", {report.KL_REF_LABEL} {kl_ref:+.4f}"))
    if jax.process_index() == 0:
        rows = read_jsonl(layout.path(run.workdir, layout.METRICS_FILE))
        report.write_plot(rows, layout.path(run.workdir, layout.ONLINE_PLOT),
                          f"kto-jax online: {run.config.loss.name}, reference {opts.reference}")
    return row


# ---------------------------------------------------------------- the rounds

def refresh_reference(o: OnlineRun) -> None:
    """online.reference="refresh": pi_ref becomes a copy of the policy as the round starts
    (under LoRA: of the adapters, in float32; the base is shared)."""
    run = o.run
    if o.online.reference == "refresh" and run.state.reference_params is not None:
        dtype = ("float32" if run.state.base_params is not None
                 else run.settings.step.reference_dtype)
        copier = jax.jit(functools.partial(reference_copy, dtype=dtype),
                         out_shardings=run.shardings.reference_params)
        run.state = run.state.replace(reference_params=copier(run.state.params))


def save_round(o: OnlineRun, round_index: int) -> None:
    """The round's checkpoint, after its evaluation: a resume starts the next round."""
    run = o.run
    step = round_index * o.online.steps_per_round
    run.checkpointer.save(step, saved_state(run.state), _RoundMarker(round_index),
                          run.config_json, meta={"round": round_index}, force=True)


def run_rounds(o: OnlineRun, guard: PreemptionGuard) -> str:
    """Rounds start_round + 1 .. online.rounds; "done" or "preempted"."""
    if o.start_round == 0:
        evaluate_round(o, 0, None)  # the initial policy's pass rate
    for round_index in range(o.start_round + 1, o.online.rounds + 1):
        refresh_reference(o)
        samples = round_samples(o, round_index)
        if not train_round(o, round_index, samples, guard):
            return "preempted"
        evaluate_round(o, round_index, samples)
        save_round(o, round_index)
    return "done"


def online(config: ml_collections.ConfigDict, workdir: str) -> int:
    """Runs (or resumes) the online rounds of `config` in `workdir`; returns 0."""
    check_single_process()
    with run_session(workdir, lambda: setup_online(config, workdir)) as (o, guard):
        try:
            outcome = run_rounds(o, guard)
        finally:
            o.run.checkpointer.wait()  # a judge failure stops after the last round's save
        if outcome == "preempted":
            o.run.logger.message("SIGTERM: stopped; re-run the same command to resume "
                                 "after the last finished round.")
            return 0
        export_at_end(o.run, o.online.num_steps, f"after round {o.online.rounds}")
    return 0
