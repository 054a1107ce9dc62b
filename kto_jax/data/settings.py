"""`DataSettings`: what the data pipeline reads of a run, read from its config once.

config.data's fields (configs/base.py documents each), the batch sizes, and what the
pipeline must know of the loss (paired or not, whether packed rows carry a second
completion, whether it weighs its classes) and of the mesh (the packing groups). The
runtime builds it (kto_jax/train/settings.py, `read_settings`); nothing in data/ reads
a config.
"""

from __future__ import annotations

import dataclasses

from kto_jax.batch import BatchSize

# config.data's fields, in configs/base.py's order (`read_settings` copies exactly these)
CONFIG_FIELDS = (
    "train_path", "eval_path", "train_split", "eval_split", "format", "eval_fraction", "seed",
    "max_length", "max_prompt_length", "max_completion_length", "on_overlong",
    "on_prefix_mismatch", "desirable_fraction", "undesirable_fraction", "one_y_per_x",
    "score_threshold", "score_weighting", "bucket_lengths", "bucket_window", "drop_remainder",
    "worker_count", "prefetch", "num_epochs", "reference_logps_path", "packing", "pack_length")


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """config.data, the batch and the loss's and mesh's part in them (module docstring)."""
    batch: BatchSize
    loss_name: str                 # config.loss.name, for messages and the summary
    paired: bool                   # the loss trains on (chosen, rejected) pairs
    pack_second: bool = True       # packed trees carry y_kl or y_l (paired or z0 losses)
    uses_lambda_weights: bool = False   # the loss weighs its classes (eq. 8): eq. 9 applies
    auto_weights: bool = False     # config.loss.auto_weights
    desirable_weight: float = 1.0  # config.loss.desirable_weight (lambda_D)
    undesirable_weight: float = 1.0   # config.loss.undesirable_weight (lambda_U)
    pack_groups: int = 1           # packing groups: the mesh's batch shards (data.packing)
    # A policy's samples (online rounds) rather than a user's file: an empty completion is
    # its end-of-sequence token alone (as TRL tokenizes it), and the eq. 9 warning does not
    # offer loss.auto_weights, which `kto-jax online` refuses.
    empty_completions: bool = False
    offer_auto_weights: bool = True
    train_path: str = ""
    eval_path: str = ""
    train_split: str = "train"
    eval_split: str = "test"
    format: str = "auto"
    eval_fraction: float = 0.05
    seed: int = 0
    max_length: int = 1024
    max_prompt_length: int = 512
    max_completion_length: int = 0
    on_overlong: str = "drop"
    on_prefix_mismatch: str = "drop"
    desirable_fraction: float = 1.0
    undesirable_fraction: float = 1.0
    one_y_per_x: bool = False
    score_threshold: float = 0.0
    score_weighting: bool = False
    bucket_lengths: tuple[int, ...] = ()   # (): chosen from the data (kto_jax/data/shapes.py)
    bucket_window: int = 1
    drop_remainder: bool = False
    worker_count: int = 0
    prefetch: int = 2
    num_epochs: int = 1
    reference_logps_path: str = ""
    packing: bool = False
    pack_length: int = 0                   # 0: chosen from the data
    # the rounding of shapes chosen from the data; 0: the backend's (shapes.backend_multiple)
    shape_multiple: int = 0

    def replace(self, **changes) -> DataSettings:
        return dataclasses.replace(self, **changes)
