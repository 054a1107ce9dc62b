"""config.train.metric_names = "trl": TRL 1.16's KTO names, and that they mean what TRL logs."""

import glob
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from configs.base import get_config
from kto_jax.errors import UserError
from kto_jax.losses import add_metrics, kto_loss, summarize_metrics
from kto_jax.train import metric_names
from kto_jax.train import metrics as metrics_lib

TRL_KTO_KEYS = ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "logps/chosen", "logps/rejected")


def test_rename_and_scheme_check():
    row = {"loss": 0.5, "rewards/desirable": 1.0, "rewards/undesirable": -1.0, "logps/desirable": -9.0,
           "logps/undesirable": -12.0, "rewards/margins": 2.0, "kl": 0.1, "lr": 1e-6,
           "tokens_per_s": 10.0}
    assert metric_names.rename(row, "kto_jax") == row
    trl = metric_names.rename(row, "trl")
    assert trl == {"loss": 0.5, "rewards/chosen": 1.0, "rewards/rejected": -1.0, "logps/chosen": -9.0,
                   "logps/rejected": -12.0, "rewards/margins": 2.0, "kl": 0.1, "learning_rate": 1e-6,
                   "tokens_per_s": 10.0}
    assert get_config().train.metric_names == "kto_jax"
    with pytest.raises(UserError, match="config.train.metric_names='TRL'.*kto_jax, trl"):
        metric_names.check_scheme("TRL")


def _tensorboard_tags(logdir: str) -> set[str]:
    """Scalar tags in tensorboardX event files (TFRecord framing: u64 length, u32 crc, data, u32 crc)."""
    from tensorboardX.proto import event_pb2
    tags = set()
    for path in glob.glob(os.path.join(logdir, "events.out.tfevents*")):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            tags.update(v.tag for v in event.summary.value)
            pos += 12 + length + 4
    return tags


def test_logger_writes_trl_names_to_jsonl_and_tensorboard(tmp_path):
    logger = metrics_lib.MetricsLogger(str(tmp_path), total_steps=1, metric_names="trl")
    logger.log_train(1, {"loss": 0.5, "rewards/desirable": 0.2, "logps/undesirable": -3.0, "lr": 1e-6})
    logger.log_eval(1, {"loss": 0.4, "rewards/desirable": 0.1})
    logger.close()
    assert metrics_lib.read_jsonl(str(tmp_path / metrics_lib.METRICS_FILE)) == [
        {"step": 1, "loss": 0.5, "rewards/chosen": 0.2, "logps/rejected": -3.0, "learning_rate": 1e-6}]
    assert metrics_lib.read_jsonl(str(tmp_path / metrics_lib.EVAL_METRICS_FILE)) == [
        {"step": 1, "loss": 0.4, "rewards/chosen": 0.1}]
    # the HF Trainer's TensorBoard callback writes train/X and eval/X: the same tags as TRL's
    assert _tensorboard_tags(str(tmp_path / metrics_lib.TB_DIR)) == {
        "train/loss", "train/rewards/chosen", "train/logps/rejected", "train/learning_rate",
        "eval/loss", "eval/rewards/chosen"}
    with pytest.raises(UserError, match="metric_names"):
        metrics_lib.MetricsLogger(str(tmp_path), total_steps=1, metric_names="hf")


def _microbatch(seed: int, desirable) -> dict:
    rng = np.random.default_rng(seed)
    n = len(desirable)
    f = lambda: rng.normal(-20.0, 3.0, n).astype(np.float32)  # noqa: E731
    return {"policy_logps": f(), "reference_logps": f(), "policy_kl_logps": f(),
            "reference_kl_logps": f(), "desirable": np.asarray(desirable, bool)}


def _ours(microbatches, beta, dw, uw) -> dict:
    """kto-jax's logged row: the loss's additive metrics summed over microbatches, summarized, renamed."""
    summed = None
    for mb in microbatches:
        _, m = kto_loss(*(jnp.asarray(mb[k]) for k in ("policy_logps", "reference_logps", "policy_kl_logps",
                                                        "reference_kl_logps", "desirable")),
                        beta=beta, desirable_weight=dw, undesirable_weight=uw)
        summed = m if summed is None else add_metrics(summed, m)
    return metric_names.rename(summarize_metrics(summed), "trl")


@pytest.mark.parametrize("desirable_per_microbatch", [
    [[1, 0, 1, 1, 0, 0]],                                  # one microbatch
    [[1, 0, 1, 0, 0, 1], [0, 1, 1, 0, 1, 0]],              # two, same class counts (3 + 3)
])
def test_trl_names_mean_what_trl_1_16_kto_logs(desirable_per_microbatch):
    """The same log-probs through TRL 1.16's KTOTrainer._compute_loss and KTOTrainer.log
    (tests/trl_harness.py): every TRL key of our row equals TRL's value. TRL's `loss` is what
    _compute_loss returns, which the HF Trainer averages over the microbatches of a step."""
    trl_harness = pytest.importorskip("trl_harness")
    beta, dw, uw = 0.3, 1.33, 0.8
    mbs = [_microbatch(i, d) for i, d in enumerate(desirable_per_microbatch)]
    losses, logged = trl_harness.trl_kto_logs("kto", mbs, beta=beta, desirable_weight=dw,
                                              undesirable_weight=uw)
    logged["loss"] = float(np.mean(losses))
    ours = _ours(mbs, beta, dw, uw)
    for key in TRL_KTO_KEYS:
        np.testing.assert_allclose(ours[key], logged[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_window_averages_differ_from_trl_only_with_unequal_class_counts():
    """Documented difference (docs/losses.md): TRL averages each class mean per microbatch, then
    over microbatches; kto-jax pools the window (sum / count). With 1 and 3 desirable rows in two
    microbatches, rewards/chosen differs; the pooled value is the mean over all 4 rows."""
    trl_harness = pytest.importorskip("trl_harness")
    beta = 0.3
    mbs = [_microbatch(7, [1, 0, 0, 0]), _microbatch(8, [1, 1, 1, 0])]
    _, logged = trl_harness.trl_kto_logs("kto", mbs, beta=beta)
    ours = _ours(mbs, beta, 1.0, 1.0)
    chosen = [beta * (mb["policy_logps"] - mb["reference_logps"]).astype(np.float64)[mb["desirable"]]
              for mb in mbs]
    np.testing.assert_allclose(ours["rewards/chosen"], np.concatenate(chosen).mean(), rtol=1e-5)
    np.testing.assert_allclose(logged["rewards/chosen"], np.mean([c.mean() for c in chosen]), rtol=1e-6)
    assert abs(ours["rewards/chosen"] - logged["rewards/chosen"]) > 1e-3
