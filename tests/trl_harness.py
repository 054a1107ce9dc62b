"""Run TRL 1.16's own loss and metric code on given per-sequence log-probs.

TRL computes its DPO and KTO losses inside `DPOTrainer._compute_loss` and
`KTOTrainer._compute_loss`, after a model forward. These helpers build a trainer
object without its __init__ (no model, no dataset), set the attributes those
methods read, and pass a stand-in model whose per-token log-probs put each row's
sequence log-prob on its single completion token. TRL's code then sees exactly
the log-probs we give our losses, and what it returns and logs is TRL's own result.
Reference log-probs go in as TRL's precomputed ones (`precompute_ref_log_probs`).
"""

from __future__ import annotations

import types
from collections import defaultdict
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402

_KL_ROW = 1000  # token id offset that marks the KL (mismatched) rows


class _Accelerator:
    """One process: gather and gather_for_metrics return their input."""
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


class _Model(torch.nn.Module):
    """Row i of input_ids starts with token i (or _KL_ROW + i); its log-prob comes from a table."""

    def __init__(self, logps, kl_logps=None):
        super().__init__()
        self.logps = torch.as_tensor(np.asarray(logps, np.float64))
        self.kl_logps = None if kl_logps is None else torch.as_tensor(np.asarray(kl_logps, np.float64))

    def forward(self, input_ids, labels=None, **_):
        rows = input_ids[:, 0]
        table = self.kl_logps if bool((rows >= _KL_ROW).all()) else self.logps
        seq = table[rows % _KL_ROW]
        n, width = input_ids.shape[0], input_ids.shape[1] - 1
        per_token = torch.zeros(n, width, dtype=torch.float64)
        per_token[:, -1] = seq
        return types.SimpleNamespace(log_probs=per_token, entropy=torch.zeros(n, width),
                                     mean_logits=torch.zeros(n, width),
                                     is_top1=torch.zeros(n, width, dtype=torch.bool))


def _ids(n: int, offset: int = 0):
    """[n, 2] ids: token (offset + i), then one completion token."""
    ids = torch.zeros(n, 2, dtype=torch.long)
    ids[:, 0] = torch.arange(n) + offset
    mask = torch.tensor([[0, 1]] * n)
    return ids, mask


def _common(trainer, model) -> None:
    trainer.model = model
    trainer.accelerator = _Accelerator()
    trainer.aux_loss_enabled = False
    trainer.precompute_ref_logps = True
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1


def trl_dpo(loss_type: str, pw, pl, rw, rl, *, beta: float, label_smoothing: float = 0.0,
            discopop_tau: float = 0.05) -> tuple[float, dict]:
    """(loss, logged metrics) of TRL's DPOTrainer with `loss_type` on M pairs of log-probs."""
    trainer = DPOTrainer.__new__(DPOTrainer)
    model = _Model(np.concatenate([pw, pl]))  # TRL's batch is [chosen; rejected]
    _common(trainer, model)
    trainer.ld_alpha = None
    trainer.f_divergence_type = "reverse_kl"
    trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
    trainer.beta, trainer.label_smoothing, trainer.use_weighting = beta, label_smoothing, False
    trainer.args = types.SimpleNamespace(discopop_tau=discopop_tau)
    ids, mask = _ids(2 * len(pw))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask,
              "ref_chosen_logps": torch.as_tensor(np.asarray(rw, np.float64)),
              "ref_rejected_logps": torch.as_tensor(np.asarray(rl, np.float64))}
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in trainer._metrics["train"].items()}


def trl_kto_logs(loss_type: str, microbatches: list[dict], *, beta: float,
                 desirable_weight: float = 1.0, undesirable_weight: float = 1.0
                 ) -> tuple[list[float], dict]:
    """TRL's KTOTrainer on a sequence of microbatches, then its `log`.

    Each microbatch is a dict of numpy arrays: policy_logps, reference_logps,
    policy_kl_logps, reference_kl_logps, desirable. Returns (the loss `_compute_loss`
    returned per microbatch, the metrics `KTOTrainer.log` adds to a log line).
    """
    trainer = KTOTrainer.__new__(KTOTrainer)
    _common(trainer, None)
    trainer.loss_type, trainer.beta, trainer.calculate_KL = loss_type, beta, loss_type == "kto"
    trainer.desirable_weight, trainer.undesirable_weight = desirable_weight, undesirable_weight
    losses = []
    for mb in microbatches:
        model = _Model(mb["policy_logps"], mb["policy_kl_logps"])
        trainer.model = model
        n = len(mb["policy_logps"])
        ids, mask = _ids(n)
        kl_ids, kl_mask = _ids(n, _KL_ROW)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask,
                  "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_ids),
                  "KL_completion_mask": kl_mask,
                  "label": torch.as_tensor(np.asarray(mb["desirable"], bool)),
                  "ref_logps": torch.as_tensor(np.asarray(mb["reference_logps"], np.float64)),
                  "ref_KL_logps": torch.as_tensor(np.asarray(mb["reference_kl_logps"], np.float64))}
        losses.append(float(trainer._compute_loss(model, inputs, return_outputs=False)))
    logged = {}
    with mock.patch("transformers.Trainer.log", lambda self, logs, start_time=None: logged.update(logs)):
        trainer.model = torch.nn.Module()  # KTOTrainer.log reads model.training (True: "train")
        KTOTrainer.log(trainer, {})
    return losses, logged


def trl_bco(microbatches: list[dict], *, beta: float) -> tuple[list[float], list[float]]:
    """TRL's BCO on a sequence of training microbatches: (loss per microbatch, delta per microbatch).

    TRL 1.16 no longer ships `BCOTrainer`, so this restates, in torch, what its last
    version (trl/trainer/bco_trainer.py `bco_loss` + trl/trainer/utils.py `RunningMoments`)
    computes: the batch is split into chosen and rejected rows; the running moments
    are updated with the concatenated rewards beta (log pi - log ref) (mean 0, var 1,
    count 1e-24 at the start; batch moments by `torch.var_mean(unbiased=False)`; the
    parallel-moments update), and THEN delta = the running mean is used for this
    microbatch's loss, `nanmean` over its rows. Each microbatch is a dict of numpy
    arrays policy_logps, reference_logps, desirable (its real rows only).
    """
    mean, var, count = 0.0, 1.0, 1e-24
    losses, deltas = [], []
    for mb in microbatches:
        label = torch.as_tensor(np.asarray(mb["desirable"], bool))
        logratios = (torch.as_tensor(np.asarray(mb["policy_logps"], np.float32))
                     - torch.as_tensor(np.asarray(mb["reference_logps"], np.float32)))
        chosen_rewards, rejected_rewards = beta * logratios[label], beta * logratios[~label]
        xs = torch.cat((chosen_rewards, rejected_rewards), 0)
        xs_var, xs_mean = torch.var_mean(xs, unbiased=False)
        xs_count = xs.numel()
        step = xs_mean.float() - mean
        total = count + xs_count
        var = (var * count + step ** 2 * count * xs_count / total + xs_var.float() * xs_count) / total
        mean = mean + step * xs_count / total
        count = total
        delta = torch.as_tensor(mean)
        losses_mb = torch.cat((-torch.nn.functional.logsigmoid(chosen_rewards - delta),
                               -torch.nn.functional.logsigmoid(-(rejected_rewards - delta))), 0)
        losses.append(float(losses_mb.nanmean()))
        deltas.append(float(delta))
    return losses, deltas
