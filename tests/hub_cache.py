"""A model placed in a Hugging Face hub cache directory, as `huggingface-cli download` leaves it
(refs/main naming a commit, the files under snapshots/<commit>/), so hub ids resolve offline."""

import os
import shutil

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def place_in_hub_cache(model_dir: str, cache_dir: str, repo_id: str) -> str:
    """Copies the files of `model_dir` into `cache_dir` as the repo `repo_id`; returns the snapshot."""
    repo = os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", COMMIT)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w", encoding="ascii") as f:
        f.write(COMMIT)
    shutil.copytree(model_dir, snapshot, dirs_exist_ok=True)
    return snapshot
