"""`OnlineSettings`: config.online read once and checked, with one clear error per problem."""

from __future__ import annotations

import dataclasses

import ml_collections

from kto_jax.errors import UserError
from kto_jax.eval.sampling import SamplingSettings
from kto_jax.losses.registry import get_loss
from kto_jax.train.settings import reference_sync

LABELINGS = ("threshold", "top_bottom_k", "pairs")
REFERENCES = ("initial", "refresh")


@dataclasses.dataclass(frozen=True)
class OnlineSettings:
    """config.online, validated against the loss (see configs/base.py for each field)."""
    prompts_path: str
    heldout_prompts_path: str
    heldout_fraction: float
    judge: str
    rounds: int
    prompts_per_round: int
    samples_per_prompt: int
    steps_per_round: int
    seed: int
    sampling: SamplingSettings
    chat: bool
    sample_batch_size: int
    labeling: str
    threshold: float
    k: int
    reference: str
    heldout_every: int
    judge_workers: int
    judge_timeout: float
    judge_retries: int

    @property
    def num_steps(self) -> int:
        """Optimizer steps of the whole run."""
        return self.rounds * self.steps_per_round

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "OnlineSettings":
        check_online_config(config)
        o = config.online
        return cls(
            prompts_path=o.prompts_path, heldout_prompts_path=o.heldout_prompts_path,
            heldout_fraction=float(o.heldout_fraction), judge=o.judge, rounds=int(o.rounds),
            prompts_per_round=int(o.prompts_per_round),
            samples_per_prompt=int(o.samples_per_prompt), steps_per_round=int(o.steps_per_round),
            seed=int(o.seed),
            sampling=SamplingSettings(max_new_tokens=int(o.max_new_tokens),
                                      temperature=float(o.temperature), top_k=int(o.top_k),
                                      top_p=float(o.top_p)),
            chat=bool(o.chat), sample_batch_size=int(o.sample_batch_size), labeling=o.labeling,
            threshold=float(o.threshold), k=int(o.k), reference=o.reference,
            heldout_every=int(o.heldout_every),
            judge_workers=int(o.judge_workers), judge_timeout=float(o.judge_timeout),
            judge_retries=int(o.judge_retries))


def check_online_config(config: ml_collections.ConfigDict) -> None:
    """UserError naming the first bad config.online field (or a clash with config.loss)."""
    if "online" not in config:
        raise UserError("the config has no `online` section: build it on configs/base.py "
                        "(e.g. configs/online_tiny_cpu.py)")
    o = config.online
    problems = []
    if not o.prompts_path:
        problems.append("online.prompts_path is empty: pass --config.online.prompts_path=FILE "
                        "(JSONL with a \"prompt\" per line)")
    if not o.judge:
        problems.append("online.judge is empty: pass --config.online.judge=module:function, "
                        "reward-model:PATH or http[:MODEL]")
    for name in ("rounds", "samples_per_prompt", "steps_per_round", "sample_batch_size",
                 "judge_workers", "max_new_tokens"):
        if int(o[name]) < 1:
            problems.append(f"online.{name}={o[name]} must be at least 1")
    if min(int(o.prompts_per_round), int(o.judge_retries), int(o.heldout_every)) < 0:
        problems.append("online.prompts_per_round, online.judge_retries and online.heldout_every "
                        "must be >= 0")
    if not o.heldout_prompts_path and not 0.0 < float(o.heldout_fraction) < 1.0:
        problems.append(f"online.heldout_fraction={o.heldout_fraction} must lie in (0, 1) when "
                        "online.heldout_prompts_path is empty")
    if float(o.judge_timeout) <= 0:
        problems.append(f"online.judge_timeout={o.judge_timeout} must be > 0 seconds")
    if o.labeling not in LABELINGS:
        problems.append(f"online.labeling={o.labeling!r}: use one of {', '.join(LABELINGS)}")
    if o.reference not in REFERENCES:
        problems.append(f"online.reference={o.reference!r}: use one of {', '.join(REFERENCES)}")
    if float(o.temperature) == 0.0 and int(o.samples_per_prompt) > 1:
        problems.append("online.temperature=0 (greedy) gives samples_per_prompt identical samples: "
                        "set online.temperature > 0 or online.samples_per_prompt=1")
    if o.labeling in ("top_bottom_k", "pairs"):
        need = 2 * int(o.k) if o.labeling == "top_bottom_k" else 2
        if int(o.samples_per_prompt) < need:
            problems.append(f"online.labeling={o.labeling!r} needs online.samples_per_prompt >= "
                            f"{need} (got {o.samples_per_prompt})")
    if o.labeling == "top_bottom_k" and int(o.k) < 1:
        problems.append(f"online.k={o.k} must be at least 1")
    paired = get_loss(config.loss.name).paired
    if paired and o.labeling != "pairs":
        problems.append(f"loss {config.loss.name!r} trains on pairs: set online.labeling=\"pairs\"")
    if not paired and o.labeling == "pairs":
        problems.append(f"online.labeling=\"pairs\" makes (chosen, rejected) pairs, but loss "
                        f"{config.loss.name!r} is unpaired: use \"threshold\" or \"top_bottom_k\"")
    if config.reference.source == "precomputed":
        problems.append("reference.source=\"precomputed\" cannot serve new samples every round: "
                        "use \"model\" with kto-jax online")
    if config.loss.auto_weights:
        problems.append("loss.auto_weights: eq. 9's lambda weights depend on each round's class "
                        "counts, but online rounds train with fixed weights: set "
                        "loss.auto_weights=False and loss.desirable_weight / undesirable_weight")
    if config.data.get("packing", False):
        problems.append("data.packing=True: kto-jax online pads each round's sampled batches "
                        "(set --config.data.packing=False)")
    if reference_sync(config, get_loss(config.loss.name)) is not None:
        problems.append(f"reference syncing (reference.sync_every, or loss {config.loss.name!r}'s "
                        "own) is for offline training: kto-jax online moves pi_ref with "
                        "online.reference=\"refresh\" (set reference.sync_every=0 and another loss)")
    if problems:
        raise UserError("; ".join(problems))
