"""Workdir file access: the local / gs:// operations of `kto_jax.fs`, under the trainer's name."""

from kto_jax.fs import (append_text, exists, is_remote, join, local_copy, makedirs,  # noqa: F401
                        read_text, resolve, staged_dir, write_text)
