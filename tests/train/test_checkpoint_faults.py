"""Checkpoint faults through the real Orbax code path: a damaged newest checkpoint is set
aside and the previous one restored; a save onto a full disk or an unwritable directory
raises one CheckpointSaveError, leaves no temporary directory and keeps the last good one."""

import glob
import json
import os
import shutil
import subprocess
import sys

import grain
import jax.numpy as jnp
import numpy as np
import pytest

from kto_jax.errors import UserError
from kto_jax.train.checkpoint import Checkpointer, CheckpointSaveError, abstract_like, numpy_state

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _state(value: float, n: int = 64):
    return {"params": {"w": jnp.full((n, n), value, jnp.float32)}, "step": jnp.int32(int(value))}


def _iterator():
    return iter(grain.MapDataset.range(20).batch(2).to_iter_dataset())


def _save_steps(directory, steps, n=64):
    ck = Checkpointer(directory, keep=len(steps))
    for s in steps:
        assert ck.save(s, _state(s, n), _iterator(), json.dumps({"step": s}))
    ck.close()


def _truncate_largest_array_file(step_dir):
    files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
    biggest = max(files, key=os.path.getsize)
    os.truncate(biggest, os.path.getsize(biggest) // 3)


def _remove_metadata(step_dir):
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


@pytest.mark.parametrize("damage,needle", [(_truncate_largest_array_file, "Error reading"),
                                           (_remove_metadata, "_METADATA")])
def test_damaged_newest_checkpoint_is_set_aside_and_the_previous_restored(tmp_path, capsys, damage,
                                                                          needle):
    directory = str(tmp_path / "ck")
    _save_steps(directory, [1, 2])
    damage(os.path.join(directory, "2"))
    ck = Checkpointer(directory, keep=2)
    restored, step = ck.restore(abstract_like(_state(0)), _iterator())
    ck.close()
    assert step == 1
    np.testing.assert_array_equal(numpy_state(restored)["params"]["w"], np.full((64, 64), 1.0))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no TensorStore spec
    assert f"{directory}/2 cannot be restored" in err[0] and needle in err[0]
    moved = glob.glob(os.path.join(directory, "2.corrupt-*"))
    assert len(moved) == 1 and moved[0] in err[0]
    assert os.path.isdir(os.path.join(moved[0], "state"))  # set aside, not deleted
    assert sorted(os.listdir(directory)) == sorted(["1", os.path.basename(moved[0])])


def test_all_damaged_is_one_user_error(tmp_path):
    directory = str(tmp_path / "ck")
    _save_steps(directory, [1])
    _remove_metadata(os.path.join(directory, "1"))
    ck = Checkpointer(directory, keep=1)
    with pytest.raises(UserError, match=r"no checkpoint in .* can be restored; set aside: .*1\.corrupt-"):
        ck.restore(abstract_like(_state(0)))
    ck.close()


def test_another_model_is_an_error_not_corruption(tmp_path):
    directory = str(tmp_path / "ck")
    _save_steps(directory, [1])
    ck = Checkpointer(directory, keep=1)
    with pytest.raises(UserError, match=r"holds no array of shape \(32, 32\).*another model"):
        ck.restore(abstract_like(_state(0, n=32)))
    ck.close()
    assert os.listdir(directory) == ["1"]  # a good checkpoint is never set aside


def _mount_tmpfs(path, size):
    os.makedirs(path, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill ({proc.stderr.strip() or 'mount failed'}); "
                    "needs root or CAP_SYS_ADMIN")


@pytest.mark.parametrize("async_save", [True, False])
def test_disk_full_stops_with_one_message_and_keeps_the_last_checkpoint(tmp_path, capsys,
                                                                      async_save):
    mount = str(tmp_path / "small")
    _mount_tmpfs(mount, "400k")  # room for one checkpoint of a 256x256 float32 array, not two
    try:
        directory = os.path.join(mount, "ck")
        ck = Checkpointer(directory, keep=2, async_save=async_save)
        state = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(256, 256)), jnp.float32)}
        assert ck.save(1, state, _iterator(), "{}")
        ck.wait()
        with pytest.raises(CheckpointSaveError) as info:
            for step in range(2, 6):  # the loop polls every step; async errors surface at the next
                ck.save(step, state, _iterator(), "{}")
                ck.wait()
        ck.close()  # after the reported failure: no second error
        message = str(info.value)
        assert "step 2" in message and directory in message and "disk full" in message
        assert "needs about 256.0 KiB" in message and "step 1, is intact" in message
        assert "\n" not in message and "Traceback" not in capsys.readouterr().err
        assert sorted(os.listdir(directory)) == ["1"]  # no *.orbax-checkpoint-tmp left
        reader = Checkpointer(directory, read_only=True)
        restored, step = reader.restore(abstract_like(state))
        reader.close()
        assert step == 1
        np.testing.assert_array_equal(numpy_state(restored)["w"], numpy_state(state)["w"])
    finally:
        subprocess.run(["umount", mount], check=False)


def test_low_free_space_warning_reports_the_size_of_one_checkpoint(tmp_path, capsys):
    mount = str(tmp_path / "small")
    _mount_tmpfs(mount, "400k")
    try:
        ck = Checkpointer(os.path.join(mount, "ck"), keep=2, async_save=False)
        state = {"w": jnp.zeros((256, 256), jnp.float32)}
        assert ck.save(1, state, _iterator(), "{}")
        ck.close()
        err = capsys.readouterr().err
        assert "keeping 2 checkpoint(s) of about 256.0 KiB each needs 512.0 KiB" in err
    finally:
        subprocess.run(["umount", mount], check=False)


PERMISSION_SCRIPT = """
import sys, grain, jax.numpy as jnp
from kto_jax.train.checkpoint import Checkpointer, CheckpointSaveError
it = iter(grain.MapDataset.range(4).batch(2).to_iter_dataset())
ck = Checkpointer(sys.argv[1], keep=2, async_save=True)
state = {"w": jnp.ones((64, 64), jnp.float32)}
try:
    for step in range(1, 4):
        ck.save(step, state, it, "{}")
        ck.wait()
except CheckpointSaveError as e:
    print("ERROR", e)
ck.close()
"""


def test_permission_denied_stops_with_one_message(tmp_path):
    """A run directory the user may not write into. Root writes anywhere, so as root the
    child runs without CAP_DAC_OVERRIDE (setpriv), which makes it obey the mode bits."""
    directory = tmp_path / "ck"
    _save_steps(str(directory), [1])
    os.chmod(directory, 0o555)  # read and list, not write
    prefix = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: cannot make a directory unwritable")
        caps = "-dac_override,-dac_read_search"
        prefix = [setpriv, "--bounding-set", caps, "--inh-caps", caps]
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    try:
        proc = subprocess.run([*prefix, sys.executable, "-c", PERMISSION_SCRIPT, str(directory)],
                              env=env, capture_output=True, text=True, timeout=300)
    finally:
        os.chmod(directory, 0o755)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ERROR")]
    assert len(lines) == 1, proc.stdout + proc.stderr[-3000:]
    assert "permission denied" in lines[0] and str(directory) in lines[0], lines[0]
    assert "step 1, is intact" in lines[0]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert sorted(os.listdir(directory)) == ["1"]


def test_only_orbax_noise_is_kept_off_stderr():
    """Uncatchable exceptions of Orbax's coroutines and of a closed event loop are dropped;
    anything else still reaches Python's hook."""
    import os
    import types

    from kto_jax.train.checkpoint_faults import _orbax_noise

    async def read_array():
        raise Exception("Encountered error while reading array index")

    def coroutine_from(filename):
        read_array.__code__ = read_array.__code__.replace(co_filename=filename)
        return read_array()

    orbax_file = os.path.join(os.sep, "site-packages", "orbax", "serialization.py")
    ours = coroutine_from(orbax_file), coroutine_from(os.path.join(os.sep, "src", "mine.py"))
    try:
        error = Exception("Encountered error while reading array index")
        assert _orbax_noise(types.SimpleNamespace(exc_value=error, object=ours[0]))
        assert not _orbax_noise(types.SimpleNamespace(exc_value=error, object=ours[1]))
        closed = RuntimeError("Event loop is closed")
        assert _orbax_noise(types.SimpleNamespace(exc_value=closed, object=None))
        assert not _orbax_noise(types.SimpleNamespace(exc_value=RuntimeError("other"), object=None))
    finally:
        for coroutine in ours:
            coroutine.close()


def test_asyncio_records_of_orbax_tasks_are_dropped():
    """asyncio's 'Task exception was never retrieved' for an Orbax read task is dropped; the
    same record for an exception raised elsewhere is kept."""
    import logging
    import os

    from kto_jax.train.checkpoint_faults import _FILTER

    def raised_in(filename):
        code = compile("raise ValueError('OUT_OF_RANGE')", filename, "exec")
        try:
            exec(code, {})  # pylint: disable=exec-used
        except ValueError as error:
            return error

    def record(error):
        return logging.LogRecord("asyncio", logging.ERROR, "/usr/lib/asyncio/base_events.py", 1,
                                 "Task exception was never retrieved", None,
                                 (type(error), error, error.__traceback__))

    orbax = raised_in(os.path.join(os.sep, "site-packages", "orbax", "serialization.py"))
    assert not _FILTER.filter(record(orbax))
    assert _FILTER.filter(record(raised_in(os.path.join(os.sep, "src", "mine.py"))))
