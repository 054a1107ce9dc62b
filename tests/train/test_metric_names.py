"""config.train.metric_names = "trl": TRL 1.16's KTO names, and that they mean what TRL logs."""

import glob
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from configs.base import get_config
from kto_jax.errors import UserError
from kto_jax.losses import add_metrics, get_loss, summarize_metrics
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


def _ours(microbatches, beta, dw, uw, averaging="pooled") -> dict:
    """kto-jax's logged row: the registry loss's additive metrics (with its per-microbatch
    means) summed over microbatches, summarized, renamed."""
    hp = get_config().loss
    hp.beta, hp.desirable_weight, hp.undesirable_weight = beta, dw, uw
    summed = None
    for mb in microbatches:
        stats = {k: jnp.asarray(mb[k]) for k in ("policy_logps", "reference_logps", "policy_kl_logps",
                                                  "reference_kl_logps", "desirable")}
        n = len(mb["desirable"])
        stats.update(weight=jnp.ones(n), valid=jnp.ones(n, bool))
        _, m = get_loss("kto")(stats, hp)
        summed = m if summed is None else add_metrics(summed, m)
    return metric_names.rename(summarize_metrics(summed, averaging), "trl")


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


def test_pooled_window_averages_differ_from_trl_only_with_unequal_class_counts():
    """kto-jax's own averaging pools the window (sum / count); TRL averages each class mean
    per microbatch, then over microbatches. With 1 and 3 desirable rows in two
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


def test_trl_scheme_averages_as_trl_does_with_unequal_and_single_class_microbatches():
    """metric_names="trl" -> summarize_metrics(averaging="microbatch"): every TRL key equals
    TRL 1.16's KTOTrainer log over microbatches of unequal class counts, one of them
    desirable-only (no rejected means and no margin from it, in both)."""
    trl_harness = pytest.importorskip("trl_harness")
    beta = 0.3
    mbs = [_microbatch(7, [1, 0, 0, 0]), _microbatch(8, [1, 1, 1, 0]), _microbatch(9, [1, 1, 1, 1])]
    losses, logged = trl_harness.trl_kto_logs("kto", mbs, beta=beta)
    logged["loss"] = float(np.mean(losses))
    ours = _ours(mbs, beta, 1.0, 1.0, averaging=metric_names.averaging("trl"))
    for key in TRL_KTO_KEYS:
        np.testing.assert_allclose(ours[key], logged[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert metric_names.averaging("kto_jax") == "pooled"


def test_a_window_with_one_class_logs_no_margin_and_no_empty_class_mean(tmp_path):
    """z0 edge: one class only in a logged window -> the other class's means and the
    margin are null in metrics.jsonl (absent from the summary), not 0."""
    mbs = [_microbatch(3, [1, 1, 1, 1])]
    for averaging in ("pooled", "microbatch"):
        row = _ours(mbs, 0.1, 1.0, 1.0, averaging)
        assert "rewards/chosen" in row
        assert not {"rewards/rejected", "logps/rejected", "rewards/margins"} & set(row), averaging
    logger = metrics_lib.MetricsLogger(str(tmp_path), total_steps=1)
    logger.log_train(1, {"loss": None, "rewards/desirable": 0.2, "rewards/margins": None})
    logger.close()
    assert metrics_lib.read_jsonl(str(tmp_path / metrics_lib.METRICS_FILE)) == [
        {"step": 1, "loss": None, "rewards/desirable": 0.2, "rewards/margins": None}]
