"""metrics.jsonl, TensorBoard events and resume truncation."""

import os

from kto_jax.train import metrics as metrics_lib


def test_logger_writes_jsonl_tensorboard_and_truncates_on_resume(tmp_path):
    workdir = str(tmp_path)
    logger = metrics_lib.MetricsLogger(workdir, total_steps=4)
    for step in (1, 2, 3):
        logger.log_train(step, {"loss": 0.5 / step, "lr": 1e-6 * step})
        logger.advance()
    logger.log_eval(2, {"eval/loss": 0.25})
    logger.close()
    path = os.path.join(workdir, metrics_lib.METRICS_FILE)
    lines = metrics_lib.read_jsonl(path)
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert lines[2]["loss"] == 0.5 / 3 and lines[1]["lr"] == 2e-6  # exact float round trip
    assert metrics_lib.read_jsonl(os.path.join(workdir, metrics_lib.EVAL_METRICS_FILE)) == [
        {"step": 2, "eval/loss": 0.25}]
    events = os.listdir(os.path.join(workdir, metrics_lib.TB_DIR))
    assert any(name.startswith("events.out.tfevents") for name in events)

    with open(path, "a", encoding="utf-8") as f:
        f.write('{"step": 4, "lo')  # torn line from a SIGKILL
    resumed = metrics_lib.MetricsLogger(workdir, total_steps=4, start_step=2)
    resumed.log_train(3, {"loss": 0.5 / 3, "lr": 3e-6})
    resumed.close()
    assert metrics_lib.read_jsonl(path) == lines


def test_disabled_logger_writes_nothing(tmp_path):
    logger = metrics_lib.MetricsLogger(str(tmp_path / "w"), total_steps=1, enabled=False)
    logger.log_train(1, {"loss": 1.0})
    logger.close()
    assert not os.path.exists(tmp_path / "w")


def test_the_progress_bar_shows_the_last_finite_loss_and_each_warning_once(tmp_path, capsys):
    logger = metrics_lib.MetricsLogger(str(tmp_path), total_steps=3)
    logger.log_train(1, {"loss": 0.75})
    logger.log_train(2, {"loss": float("nan")})       # e.g. a window without a finite loss
    logger.log_train(3, {"tokens_per_s": 10.0})       # a record without one
    assert logger._bar.postfix.startswith("loss=0.7500")  # pylint: disable=protected-access
    for _ in range(3):
        logger.warn("the training data has no undesirable examples")
    logger.close()
    assert capsys.readouterr().err.count("warning: the training data has no undesirable") == 1
