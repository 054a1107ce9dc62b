"""What reaches the console: other packages' start-up noise, stopped where it starts.

Three packages print on every command of an ordinary CPU host, none of it about the run:
- libtpu (the `tpu` extra, which `kto-jax compile` needs): when JAX probes for a TPU on a
  host that has none, libtpu first looks for the slice it belongs to and prints "Failed
  to find host bounds for accelerator type ..." and an `E0000 ... unexpected worker
  hostname` trace. `quiet_third_party` gives it what it looks for, one host
  (TPU_HOST_BOUNDS=1,1,1) named localhost (TPU_WORKER_HOSTNAMES), only where no TPU chip
  is attached and none of these variables is set. libtpu then starts, finds no chip, and
  JAX logs that at INFO level and goes on with the CPU, as it does without libtpu.
- transformers without torch: "PyTorch was not found ...", its one advisory warning
  (TRANSFORMERS_NO_ADVISORY_WARNINGS turns exactly those off). kto-jax needs no torch.
- Orbax, for a checkpoint opened read-only (`kto-jax export`, `sample`, `eval`): "Given
  directory is read only"; `kto_jax.train.checkpoint` drops that record while
  `is_verbose()` is False.

`kto-jax --verbose <command> ...` or KTO_JAX_VERBOSE=1 leaves all of it on. Errors are
never filtered: libtpu on a TPU host, a failing backend, Orbax's own errors are untouched.
"""

from __future__ import annotations

import glob
import importlib.util
import os

VERBOSE_ENV = "KTO_JAX_VERBOSE"
GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips show up as PCI devices of this vendor
# What libtpu reads to find its slice; one set by the user (or a launcher) means "leave it".
LIBTPU_TOPOLOGY_ENV = ("TPU_ACCELERATOR_TYPE", "TPU_HOST_BOUNDS", "TPU_WORKER_HOSTNAMES",
                       "TPU_PROCESS_ADDRESSES", "TPU_WORKER_ID", "TPU_CHIPS_PER_HOST_BOUNDS")
LIBTPU_ONE_HOST = {"TPU_HOST_BOUNDS": "1,1,1", "TPU_WORKER_HOSTNAMES": "localhost"}


def is_verbose() -> bool:
    """Whether other packages' notices should reach the console (KTO_JAX_VERBOSE=1)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def set_verbose() -> None:
    """Turns verbose on for this process and the processes it starts."""
    os.environ[VERBOSE_ENV] = "1"


def has_tpu_chips() -> bool:
    """Whether this host has TPU chips attached, read from PCI without starting a backend.

    Any PCI device of Google's vendor id counts, so a host that might have one is never
    taken for one that has none.
    """
    for vendor_file in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor_file, encoding="ascii") as f:
                if f.read().strip() == GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def libtpu_quiet_env() -> dict[str, str]:
    """The variables `quiet_third_party` would set for libtpu here (empty: none)."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms and "tpu" not in platforms:  # JAX will not start libtpu's backend
        return {}
    if importlib.util.find_spec("libtpu") is None or has_tpu_chips():
        return {}
    if any(name in os.environ for name in LIBTPU_TOPOLOGY_ENV):
        return {}
    return dict(LIBTPU_ONE_HOST)


def quiet_third_party() -> None:
    """Stops the start-up noise above, unless verbose; call before jax or transformers load."""
    if is_verbose():
        return
    os.environ.update(libtpu_quiet_env())
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
