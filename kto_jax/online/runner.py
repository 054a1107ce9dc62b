"""`online(config, workdir)`: rounds of sample -> judge -> label -> train -> evaluate.

One process, one mesh, no export between rounds:
  sample    the KV-cache sampler (kto_jax/eval/sampling.py) reads the LIVE policy params of
            the train state, on the training mesh and its sharding rules; the key of
            round r is derived from (online.seed, r), so a round's samples are a pure
            function of the weights it starts from and the seed;
  judge     in this process (kto_jax/online/judging.py), verdicts saved as they come;
  label     kto_jax/online/labels.py; the round's files are written BEFORE training;
  train     online.steps_per_round steps of the existing jitted train step on the
            round's examples (any registry loss), through the data pipeline;
  evaluate  held-out prompts sampled from the new policy and judged: pass rate with
            its 90% interval, KL to the reference, reward margins (kto_jax/online/report.py);
  save      a checkpoint at the round's last step (step = round * steps_per_round).

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

import copy
import dataclasses
import functools
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from kto_jax import fs as paths
from kto_jax import sharding as shd
from kto_jax.config import config_to_json
from kto_jax.data.pipeline import build_datasets
from kto_jax.errors import UserError
from kto_jax.eval.sampling import Sampler
from kto_jax.losses.common import add_metrics, summarize_metrics
from kto_jax.losses.registry import get_loss
from kto_jax.models import load_tokenizer
from kto_jax.online import labels as labels_lib
from kto_jax.online import report
from kto_jax.online import rounds as files
from kto_jax.online.http_judge import JudgeFailed
from kto_jax.online.judging import PointwiseJudge, make_pointwise_judge, prompt_text
from kto_jax.online.prompts import PromptSets, prompt_sets, round_prompt_ids
from kto_jax.online.settings import OnlineSettings
from kto_jax.step.adapters import frozen_inputs, model_of, policy_params, resolved_lora
from kto_jax.step.optimizer import make_optimizer
from kto_jax.step.settings import StepSettings
from kto_jax.step.state import TrainState, batch_sharding, reference_copy
from kto_jax.step.train_step import make_eval_step, make_reference_step, make_train_step
from kto_jax.train import batches as batches_lib
from kto_jax.train import metric_names
from kto_jax.train import workdir as layout
from kto_jax.train.checkpoint import Checkpointer
from kto_jax.train.distributed import PreemptionGuard
from kto_jax.train.loop import MetricsWindow
from kto_jax.train.metrics import MetricsLogger, read_jsonl, truncate_after
from kto_jax.train.run import (check_config_changes, check_model_path, initial_state, load_policy,
                               lora_summary, open_logger, resume_state, saved_state,
                               write_run_files)
from kto_jax.train.trainer import export_at_end, run_session

KL_LOSS = "kto_no_z0"  # an unpaired loss without KL pairs: its reference forward is log p(y|x)
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
    config: ml_collections.ConfigDict
    config_json: str
    online: OnlineSettings
    workdir: str
    mesh: Any
    tokenizer: Any
    graphdef: Any
    state: TrainState
    shardings: TrainState
    train_step: Any
    eval_step: Any
    logps: dict            # "policy" / "reference": params, batch -> {"reference_logps": [A, M]}
    sampler: Sampler
    judge: PointwiseJudge
    prompts: PromptSets
    checkpointer: Checkpointer
    logger: MetricsLogger
    start_round: int       # the last round the restored state has finished (0: none)

    def close(self) -> None:
        """Closes the checkpointer (waiting for a save in flight) and the logs."""
        self.checkpointer.close()
        self.logger.close()


def sample_seed(seed: int, round_index: int, stream: int) -> int:
    """The sampling seed of (online.seed, round, train/held-out stream)."""
    return int(np.random.SeedSequence([seed, round_index, stream]).generate_state(1)[0])


def _data_config(config: ml_collections.ConfigDict, train_file: str, eval_file: str, seed: int,
                 loss_name: str | None = None) -> ml_collections.ConfigDict:
    """The run's config reading a round's files as its training (and eval) data."""
    c = copy.deepcopy(config)
    c.data.train_path, c.data.eval_path = train_file, eval_file
    c.data.eval_fraction, c.data.seed, c.data.format = 0.0, seed, "auto"
    c.data.num_epochs = 1
    if loss_name:
        c.loss.name = loss_name
    return c


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
    """Everything the rounds need, restored from the last round's checkpoint if any."""
    online = OnlineSettings.from_config(config)
    check_model_path(config)
    resolved_lora(config, None, get_loss(config.loss.name))  # config.lora errors before loading
    prompts = prompt_sets(online.prompts_path, online.heldout_prompts_path,
                          online.heldout_fraction, online.seed)
    workdir = paths.resolve(workdir)
    tokenizer = load_tokenizer(config.model.path)
    settings = StepSettings.from_config(config)
    config_json = config_to_json(config, loss=settings.hparams)
    mesh = shd.make_mesh(config.mesh)
    judge = make_pointwise_judge(online.judge, online, mesh=mesh, rules=config.mesh)
    tx, schedule = make_optimizer(config.optim, online.num_steps)
    checkpointer = Checkpointer(layout.path(workdir, layout.CHECKPOINT_DIR),
                                every_steps=online.steps_per_round, keep=config.checkpoint.keep,
                                async_save=config.checkpoint.async_save)
    resuming = checkpointer.latest_step() is not None
    changes = check_config_changes(checkpointer, config, config_json, workdir) if resuming else None
    model, model_config = load_policy(config, mesh)
    sampler = Sampler(model, tokenizer, mesh=mesh, rules=config.mesh.rules,
                      batch_size=online.sample_batch_size, chat=online.chat)
    graphdef, state, shardings = initial_state(config, model, tx, mesh)
    del model
    if _adapter_reference_needed(config, online, state):
        state, shardings = _with_adapter_reference(state, shardings)
    start_round, step = 0, 0
    if resuming:
        state, step, _ = resume_state(checkpointer, state, None)
        start_round = int(checkpointer.restore_meta(step).get("round", step // online.steps_per_round))
    else:
        for name in (layout.METRICS_FILE, layout.EVAL_METRICS_FILE):
            truncate_after(layout.path(workdir, name), -1)  # a fresh run: no rows of a dead one
    lora_reference = ("the base + a frozen copy of the adapters as each round starts"
                      if online.reference == "refresh" and state.reference_params is not None
                      else None)
    logger = open_logger(config, workdir, online.num_steps, step, [
        f"resuming after round {start_round} (step {step}) in {workdir}" if resuming else None,
        changes,
        f"online: {len(prompts.train)} training prompts, {prompts.note}; judge {judge.name}; "
        f"reference {online.reference}",
        lora_summary(state, lora_reference) if state.base_params is not None else None])
    write_run_files(workdir, config_json, model_config, tokenizer)
    vocab_chunk = int(config.train.logprob_vocab_chunk)
    logps = {}
    if state.reference_params is not None or state.base_params is not None:
        kl_loss = get_loss(KL_LOSS)  # (under LoRA the base is always there to compare with)
        logps = {name: make_reference_step(kl_loss, graphdef, vocab_chunk, mesh,
                                           view(graphdef, shardings), config.mesh.rules)
                 for name, view in (("policy", policy_params), ("reference", frozen_inputs))}
    return OnlineRun(
        config=config, config_json=config_json, online=online, workdir=workdir, mesh=mesh,
        tokenizer=tokenizer, graphdef=graphdef, state=state, shardings=shardings,
        train_step=make_train_step(config, graphdef, tx, schedule, mesh, shardings, settings),
        eval_step=make_eval_step(config, graphdef, mesh, shardings, settings), logps=logps,
        sampler=sampler, judge=judge, prompts=prompts, checkpointer=checkpointer,
        logger=logger, start_round=start_round)


def _adapter_reference_needed(config: ml_collections.ConfigDict, online: OnlineSettings,
                              state: TrainState) -> bool:
    """LoRA with online.reference="refresh" and a loss that reads pi_ref: the state needs a
    frozen adapter slot (the step's reference is base + state.reference_params) from the
    start, so that the jitted steps see one state structure for the whole run."""
    return (state.base_params is not None and state.reference_params is None
            and online.reference == "refresh" and get_loss(config.loss.name).uses_reference)


def _with_adapter_reference(state: TrainState, shardings: TrainState
                            ) -> tuple[TrainState, TrainState]:
    """(state, shardings) with reference_params = a float32 copy of the adapters, placed
    like them (at round 1 this is base + the initial adapters: the initial policy)."""
    copier = jax.jit(functools.partial(reference_copy, dtype="float32"),
                     out_shardings=shardings.params)
    return (state.replace(reference_params=copier(state.params)),
            shardings.replace(reference_params=shardings.params))


# ---------------------------------------------------------------- sample and judge

def sample(run: OnlineRun, prompt_list: list, prompt_ids: list[int], round_index: int,
           stream: int) -> list[dict]:
    """samples_per_prompt completions of each prompt from the live policy, unjudged."""
    spp = run.online.samples_per_prompt
    run.sampler.set_params(policy_params(run.graphdef, run.state), run.graphdef, model_of)
    expanded = [prompt_list[p] for p in prompt_ids for _ in range(spp)]
    gens = run.sampler.generate(expanded, run.online.sampling,
                                seed=sample_seed(run.online.seed, round_index, stream))
    return [{"round": round_index, "prompt_id": p, "sample": s, "prompt": g.prompt,
             "completion": g.text, "finished": g.finished, "num_tokens": len(g.token_ids)}
            for (p, s), g in zip(((p, s) for p in prompt_ids for s in range(spp)), gens)]


def judge_samples(run: OnlineRun, samples: list[dict], round_index: int) -> list[dict]:
    """The samples with their "score"; verdicts of an earlier, failed attempt are reused,
    and on a judge failure those received are saved before the run stops."""
    partial_path = files.round_file(run.workdir, round_index, layout.ROUND_PARTIAL_VERDICTS)
    known = {files.sample_key(r): float(r["score"]) for r in files.read_jsonl(partial_path) or []}
    todo = [i for i, s in enumerate(samples) if files.sample_key(s) not in known]
    if todo:
        try:
            scores = run.judge.scores([prompt_text(samples[i]["prompt"]) for i in todo],
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


def round_samples(run: OnlineRun, round_index: int) -> list[dict]:
    """The round's judged and labelled samples: from its file if complete, else sampled,
    judged and written (with the round's prompts) before anything trains on them."""
    o = run.online
    path = files.round_file(run.workdir, round_index, layout.ROUND_SAMPLES)
    saved = files.read_jsonl(path)
    if saved is not None:
        return saved
    ids = round_prompt_ids(len(run.prompts.train), o.prompts_per_round, o.seed, round_index)
    files.write_jsonl(files.round_file(run.workdir, round_index, layout.ROUND_PROMPTS),
                      [{"prompt_id": p, "prompt": run.prompts.train[p]} for p in ids])
    samples = judge_samples(run, sample(run, run.prompts.train, ids, round_index, TRAIN_STREAM),
                            round_index)
    sample_labels = labels_lib.labels(samples, o.labeling, o.threshold, o.k)
    samples = [dict(s, label=lab) for s, lab in zip(samples, sample_labels)]
    files.write_jsonl(path, samples)
    return samples


# ---------------------------------------------------------------- train and evaluate

def _examples(run: OnlineRun, samples: list[dict]) -> list[dict]:
    return labels_lib.examples(samples, [s["label"] for s in samples], run.online.labeling)


def train_round(run: OnlineRun, round_index: int, samples: list[dict],
                guard: PreemptionGuard) -> bool:
    """steps_per_round steps on the round's examples; False when SIGTERM stopped it."""
    o, cfg = run.online, run.config.train
    examples_path = files.round_file(run.workdir, round_index, layout.ROUND_EXAMPLES)
    examples = _examples(run, samples)
    files.write_jsonl(examples_path, examples)
    first_step = (round_index - 1) * o.steps_per_round
    if not examples:
        run.logger.message(f"round {round_index}: no examples (every prompt's samples scored "
                           "the same); no training this round")
        run.logger.advance(o.steps_per_round)
        return True
    data = build_datasets(_data_config(run.config, examples_path, "", o.seed + round_index),
                          run.tokenizer)
    for warning in data.summary.warnings:
        run.logger.warn(warning)
    train_iter = data.train_iter_factory(forever=True)
    sharding = batch_sharding(run.mesh, run.config.mesh.rules)
    window, tokens, start = MetricsWindow(), 0, time.perf_counter()
    try:
        for i in range(1, o.steps_per_round + 1):
            if guard.should_stop():
                return False
            batch = batches_lib.to_global(next(train_iter), sharding)
            run.state, metrics = run.train_step(run.state, batch)
            window.add(metrics)
            tokens += batches_lib.padded_tokens(batch)
            if i % int(cfg.log_every) == 0 or i == o.steps_per_round:
                record = window.pop_summary(metric_names.averaging(cfg.metric_names))
                seconds = max(time.perf_counter() - start, 1e-9)
                record.update(round=round_index, kind="train", tokens_per_s=tokens / seconds)
                tokens, start = 0, time.perf_counter()
                run.logger.log_train(first_step + i, record)
            run.logger.advance()
    finally:
        train_iter.close()
    return True


def _heldout_logps_kl(run: OnlineRun, heldout_file: str, seed: int) -> float | None:
    """Mean log pi(y|x) - log pi_ref(y|x) over the held-out samples (y ~ pi)."""
    if not run.logps:
        return None
    data = build_datasets(_data_config(run.config, heldout_file, heldout_file, seed, KL_LOSS),
                          run.tokenizer)
    sharding = batch_sharding(run.mesh, run.config.mesh.rules)
    total, count = 0.0, 0.0
    for local in data.eval_batches():
        batch = batches_lib.to_global(local, sharding)
        pol = run.logps["policy"](policy_params(run.graphdef, run.state), batch)
        ref = run.logps["reference"](frozen_inputs(run.graphdef, run.state), batch)
        pol, ref = jax.device_get((pol["reference_logps"], ref["reference_logps"]))
        valid = np.asarray(local["valid"], np.float64)
        total += float((valid * (np.asarray(pol, np.float64) - np.asarray(ref, np.float64))).sum())
        count += float(valid.sum())
    return total / max(count, 1.0)


def _heldout_eval_metrics(run: OnlineRun, examples_file: str, seed: int) -> dict | None:
    data = build_datasets(_data_config(run.config, examples_file, examples_file, seed),
                          run.tokenizer)
    sharding = batch_sharding(run.mesh, run.config.mesh.rules)
    sums = None
    for local in data.eval_batches():
        metrics = run.eval_step(run.state, batches_lib.to_global(local, sharding))
        sums = metrics if sums is None else add_metrics(sums, metrics)
    return summarize_metrics(jax.device_get(sums)) if sums is not None else None


def heldout_due(online_settings: OnlineSettings, round_index: int) -> bool:
    """Held-out evaluation before round 1, after the last round and every heldout_every."""
    every = online_settings.heldout_every
    return (round_index in (0, online_settings.rounds)
            or (every > 0 and round_index % every == 0))


def evaluate_heldout(run: OnlineRun, round_index: int) -> tuple[list[dict], dict | None, float | None]:
    """(held-out samples judged, the eval step's metrics on them, KL to the reference)."""
    o = run.online
    path = files.round_file(run.workdir, round_index, layout.ROUND_HELDOUT)
    heldout = files.read_jsonl(path)
    if heldout is None:
        ids = list(range(len(run.prompts.heldout)))
        heldout = judge_samples(run, sample(run, run.prompts.heldout, ids, round_index,
                                            HELDOUT_STREAM), round_index)
        heldout = [dict(s, **{"pass": labels_lib.passes(s["score"], o.threshold)}) for s in heldout]
        files.write_jsonl(path, heldout)
    seed = o.seed + 1000 + round_index
    heldout_labels = labels_lib.labels(heldout, o.labeling, o.threshold, o.k)
    examples = labels_lib.examples(heldout, heldout_labels, o.labeling)
    examples_path = files.round_file(run.workdir, round_index, layout.ROUND_HELDOUT_EXAMPLES)
    files.write_jsonl(examples_path, examples)
    eval_metrics = _heldout_eval_metrics(run, examples_path, seed) if examples else None
    kl_path = files.round_file(run.workdir, round_index, layout.ROUND_HELDOUT_UNPAIRED)
    files.write_jsonl(kl_path, [{"prompt": s["prompt"], "label": bool(s["pass"]),
                                 "completion": labels_lib.as_completion(s["prompt"], s["completion"])}
                                for s in heldout])
    return heldout, eval_metrics, _heldout_logps_kl(run, kl_path, seed)


def evaluate_round(run: OnlineRun, round_index: int, samples: list[dict] | None) -> dict:
    """Logs the round's row (report.round_record) to metrics.jsonl and TensorBoard, and
    the plot; when due, samples the held-out prompts from the current policy and judges
    them first."""
    o = run.online
    heldout, eval_metrics, kl_ref = None, None, None
    if heldout_due(o, round_index):
        heldout, eval_metrics, kl_ref = evaluate_heldout(run, round_index)
    row = report.round_record(
        round_index, heldout_scores=None if heldout is None else [s["score"] for s in heldout],
        threshold=o.threshold,
        train_scores=None if samples is None else [s["score"] for s in samples],
        train_labels=None if samples is None else [s["label"] for s in samples],
        num_pairs=len(_examples(run, samples)) if samples is not None and o.labeling == "pairs" else None,
        eval_metrics=eval_metrics, kl_ref=kl_ref)
    run.logger.log_train(round_index * o.steps_per_round, row)
    if heldout is not None:
        run.logger.message(
            f"round {round_index}: held-out pass rate {row['judge/pass_rate']:.3f} "
            f"[{row['judge/pass_rate_low']:.3f}, {row['judge/pass_rate_high']:.3f}] "
            f"(n={len(heldout)})" + ("" if kl_ref is None else f", KL to the reference {kl_ref:.4f}"))
    if jax.process_index() == 0:
        rows = read_jsonl(layout.path(run.workdir, layout.METRICS_FILE))
        report.write_plot(rows, layout.path(run.workdir, layout.ONLINE_PLOT),
                          f"kto-jax online: {run.config.loss.name}, reference {o.reference}")
    return row


# ---------------------------------------------------------------- the rounds

def refresh_reference(run: OnlineRun) -> None:
    """online.reference="refresh": pi_ref becomes a copy of the policy as the round starts
    (under LoRA: of the adapters, in float32; the base is shared)."""
    if run.online.reference == "refresh" and run.state.reference_params is not None:
        dtype = "float32" if run.state.base_params is not None else run.config.reference.param_dtype
        copier = jax.jit(functools.partial(reference_copy, dtype=dtype),
                         out_shardings=run.shardings.reference_params)
        run.state = run.state.replace(reference_params=copier(run.state.params))


def save_round(run: OnlineRun, round_index: int) -> None:
    step = round_index * run.online.steps_per_round
    run.checkpointer.save(step, saved_state(run.state), _RoundMarker(round_index),
                          run.config_json, meta={"round": round_index}, force=True)


def run_rounds(run: OnlineRun, guard: PreemptionGuard) -> str:
    """Rounds start_round + 1 .. online.rounds; "done" or "preempted"."""
    if run.start_round == 0:
        evaluate_round(run, 0, None)  # the initial policy's pass rate
    for round_index in range(run.start_round + 1, run.online.rounds + 1):
        refresh_reference(run)
        samples = round_samples(run, round_index)
        if not train_round(run, round_index, samples, guard):
            return "preempted"
        evaluate_round(run, round_index, samples)
        save_round(run, round_index)
    return "done"


def online(config: ml_collections.ConfigDict, workdir: str) -> int:
    """Runs (or resumes) the online rounds of `config` in `workdir`; returns 0."""
    check_single_process()
    with run_session(workdir, lambda: setup_online(config, workdir)) as (run, guard):
        try:
            outcome = run_rounds(run, guard)
        finally:
            run.checkpointer.wait()  # a judge failure stops after the last round's save
        if outcome == "preempted":
            run.logger.message("SIGTERM: stopped; re-run the same command to resume "
                               "after the last finished round.")
            return 0
        export_at_end(run, run.online.num_steps, f"after round {run.online.rounds}")
    return 0
