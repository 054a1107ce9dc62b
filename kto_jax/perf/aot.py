"""Ahead-of-time compilation for a Cloud TPU slice on a machine without TPUs.

Why: a recipe that does not fit a slice should fail on a laptop in minutes, not on a
reserved pod after the queue. libtpu (the `tpu` extra) can describe any TPU topology
and compile for it from a CPU-only host: `jax.experimental.topologies` hands back
compile-only devices, we build a mesh over them, lower the jitted program with
abstract arguments (`jax.ShapeDtypeStruct` carrying `NamedSharding`s) and read the
per-device buffer sizes from `compiled.memory_analysis()`.

Names follow Cloud TPU accelerator types: `v4-N` and `v5p-N` count TensorCores (two
per chip, one megacore device per chip), `v5e-N` / `v5litepod-N` and `v6e-N` count
chips. A leading `Kx` (e.g. `2xv5p-32`) asks for K slices joined over DCN.

A program whose buffers exceed the chip's HBM is a verdict ("does not fit"), never a
crash: XLA's RESOURCE_EXHAUSTED compile error is caught and reported.

`compile_run_config` is `kto-jax compile`: a run config's real train step
(kto_jax/perf/program.py) compiled for a slice, or the largest microbatch that fits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from kto_jax import sharding as shd
from kto_jax.errors import UserError
from kto_jax.models.config import ModelConfig
from kto_jax.perf import program
from kto_jax.train.distributed import has_tpu_chips
from kto_jax.train.settings import configured_lora

GiB = 1024**3

# Per-chip HBM capacity (bytes) and layout facts per TPU generation.
_GENERATIONS = {
    # name: (libtpu chip name, chip_config_name, 3-D torus?, counts cores?, HBM, largest slice in chips, cloud name)
    "v4": ("v4", "megacore", True, True, 32 * GiB, 4096, "v4"),
    "v5p": ("v5p", "megacore", True, True, 95 * GiB, 8960, "v5p"),
    "v5e": ("v5e", "default", False, False, 16 * GiB, 256, "v5litepod"),
    "v6e": ("v6e", "default", False, False, 32 * GiB, 256, "v6e"),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "v5": "v5p"}

BuildFn = Callable[[Mesh], tuple[Callable[..., Any], Sequence[Any]]]


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """One TPU slice (or several joined over DCN), in the terms libtpu wants."""

    name: str                      # as the user wrote it, e.g. "v5p-32"
    generation: str                # "v4" | "v5p" | "v5e" | "v6e"
    num_chips: int                 # chips per slice; one JAX device per chip
    topology: tuple[int, ...]      # chip grid of one slice, e.g. (2, 2, 4)
    chips_per_host: tuple[int, int, int]
    hbm_bytes: int                 # per chip
    num_slices: int = 1

    @property
    def topology_str(self) -> str:
        return "x".join(str(d) for d in self.topology)

    @property
    def libtpu_topology_name(self) -> str:
        return f"{_GENERATIONS[self.generation][0]}:{self.topology_str}"

    @property
    def chip_config_name(self) -> str:
        return _GENERATIONS[self.generation][1]

    @property
    def accelerator_type(self) -> str:
        """The Cloud TPU accelerator type of one slice (what `gcloud` takes)."""
        cloud, counts_cores = _GENERATIONS[self.generation][6], _GENERATIONS[self.generation][3]
        return f"{cloud}-{self.num_chips * (2 if counts_cores else 1)}"

    @property
    def num_devices(self) -> int:
        return self.num_chips * self.num_slices


def _grid(num_chips: int, three_d: bool) -> tuple[int, ...]:
    """Chip grid of a power-of-two slice: grow from 2x2(x1) by doubling the last smallest side.

    This reproduces Cloud TPU's shapes: v5p-32 -> 2x2x4, v5p-128 -> 4x4x4, v5e-32 -> 4x8.
    """
    if num_chips == 1 and not three_d:
        return (1, 1)
    dims = [2, 2, 1] if three_d else [2, 2]
    while math.prod(dims) < num_chips:
        smallest = min(dims)
        last = max(i for i, d in enumerate(dims) if d == smallest)
        dims[last] *= 2
    return tuple(dims)


def parse_topology(name: str) -> TpuSlice:
    """Parse `v5p-32`, `v5e-32`, `v5litepod-16`, `v4-8`, `v6e-8`, `2xv5p-32` into a TpuSlice."""
    match = re.fullmatch(r"(?:(\d+)x)?([a-z0-9]+)-(\d+)", name.strip().lower())
    if not match:
        raise UserError(f"--topology {name!r} is not a TPU slice name; expected e.g. v5p-32, v5e-16, v4-8, v6e-8 or 2xv5p-32")
    slices, gen, count = int(match.group(1) or 1), _ALIASES.get(match.group(2), match.group(2)), int(match.group(3))
    if gen not in _GENERATIONS:
        raise UserError(f"--topology {name!r}: unknown TPU generation {match.group(2)!r}; known: {', '.join(_GENERATIONS)}")
    _, _, three_d, counts_cores, hbm, max_chips, _ = _GENERATIONS[gen]
    chips = count // 2 if counts_cores else count
    smallest = 4 if three_d else 1
    if (counts_cores and count % 2) or chips < smallest or chips > max_chips or chips & (chips - 1) or chips == 2:
        unit = "TensorCores (2 per chip)" if counts_cores else "chips"
        raise UserError(
            f"--topology {name!r}: {gen} slices count {unit}; the chip count must be a power of two "
            f"between {smallest} and {max_chips} (not 2), e.g. {gen}-{8 if counts_cores else 16}")
    if slices < 1:
        raise UserError(f"--topology {name!r}: the number of slices must be at least 1")
    per_host = (2, 2, 1)
    if not three_d and chips <= 8:
        per_host = {1: (1, 1, 1), 4: (2, 2, 1), 8: (2, 4, 1)}[chips]
    return TpuSlice(name=name, generation=gen, num_chips=chips, topology=_grid(chips, three_d),
                    chips_per_host=per_host, hbm_bytes=hbm, num_slices=slices)


@contextlib.contextmanager
def _libtpu_env_off_tpu(tpu: TpuSlice) -> Iterator[None]:
    """Defaults that keep libtpu from querying the GCE metadata server off a TPU VM.

    They describe this process's (absent) attached TPU, are read once when the plugin
    starts, and are removed again afterwards so nothing else (e.g. jax's cluster
    detection in a child process) mistakes this host for a TPU worker.
    """
    defaults = {"TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
                "TPU_ACCELERATOR_TYPE": tpu.accelerator_type, "TPU_WORKER_HOSTNAMES": "localhost"}
    added = [] if has_tpu_chips() else [k for k in defaults if k not in os.environ]
    os.environ.update({k: defaults[k] for k in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def topology_devices(tpu: TpuSlice) -> list[jax.Device]:
    """Compile-only devices of the slice, from libtpu (the `tpu` extra); no TPU needed."""
    try:
        import libtpu  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
    except ImportError as err:
        raise UserError("compiling for a TPU topology needs libtpu: pip install 'kto-jax[tpu]'") from err
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

    with _libtpu_env_off_tpu(tpu):
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=tpu.libtpu_topology_name, chip_config_name=tpu.chip_config_name,
            chips_per_host_bounds=tpu.chips_per_host, num_slices=tpu.num_slices)
    return list(desc.devices)


def topology_mesh(devices: Sequence[jax.Device], mesh_axes: Mapping[str, int], num_slices: int = 1) -> Mesh:
    """A mesh over `devices` with named axis sizes; one size may be -1 (fills the rest).

    Devices are ordered along the physical torus (`mesh_utils`). With several slices,
    the first axis divisible by `num_slices` (normally `data`) spans the slices over
    DCN and every other axis stays inside a slice on ICI. Axes are Auto (docs/design.md, "Sharding").
    """
    from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel

    names, sizes = tuple(mesh_axes), [int(s) for s in mesh_axes.values()]
    known = math.prod(s for s in sizes if s != -1)
    if sizes.count(-1) > 1 or known <= 0 or len(devices) % known:
        raise UserError(f"mesh {dict(mesh_axes)} does not divide the slice's {len(devices)} devices; "
                        "at most one axis may be -1")
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != len(devices):
        raise UserError(f"mesh {dict(zip(names, sizes))} uses {math.prod(sizes)} devices, the slice has {len(devices)}")
    if num_slices == 1:
        grid = mesh_utils.create_device_mesh(sizes, devices)
    else:
        dcn_axis = next((i for i, s in enumerate(sizes) if s % num_slices == 0), None)
        if dcn_axis is None:
            raise UserError(f"mesh {dict(zip(names, sizes))}: no axis is a multiple of the {num_slices} slices")
        dcn = [num_slices if i == dcn_axis else 1 for i in range(len(sizes))]
        ici = [s // d for s, d in zip(sizes, dcn)]
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    return Mesh(grid, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


@dataclasses.dataclass
class CompileReport:
    """Per-device memory of one compiled program on one slice, and whether it fits in HBM."""

    tpu: TpuSlice
    mesh_shape: dict[str, int]
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0           # outputs that reuse donated argument buffers
    temp_bytes: int = 0
    generated_code_bytes: int = 0
    peak_bytes: int = 0            # XLA's own peak estimate (0 if it gives none)
    lower_seconds: float = 0.0
    compile_seconds: float = 0.0
    error: str | None = None       # XLA's RESOURCE_EXHAUSTED message when it ran out of HBM

    @property
    def total_bytes(self) -> int:
        """Live HBM per device: arguments + outputs - donated aliases + temporaries + code."""
        return (self.argument_bytes + self.output_bytes - self.alias_bytes
                + self.temp_bytes + self.generated_code_bytes)

    @property
    def required_bytes(self) -> int:
        return max(self.total_bytes, self.peak_bytes)

    @property
    def fits(self) -> bool:
        return self.error is None and self.required_bytes <= self.tpu.hbm_bytes

    @property
    def verdict(self) -> str:
        if self.error is not None:
            return f"does not fit: XLA ran out of HBM ({self.error})"
        share = self.required_bytes / self.tpu.hbm_bytes
        return f"{'fits' if self.fits else 'does not fit'} ({share:.0%} of {_gib(self.tpu.hbm_bytes)} HBM per chip)"

    def __str__(self) -> str:
        t = self.tpu
        mesh = " ".join(f"{k}={v}" for k, v in self.mesh_shape.items()
                        if not (k == "expert" and v == 1))  # an expert axis only where it is used
        lines = [f"AOT compile for {t.name}: {t.num_slices} x {t.num_chips} chips, {t.generation} "
                 f"topology {t.topology_str}, mesh {mesh}"]
        if self.error is None:
            rows = [("arguments", self.argument_bytes), ("outputs", self.output_bytes),
                    ("aliased (donated)", -self.alias_bytes), ("temporaries", self.temp_bytes),
                    ("generated code", self.generated_code_bytes), ("total", self.total_bytes),
                    ("peak (XLA)", self.peak_bytes)]
            lines.append("per-device memory:")
            lines += [f"  {label:<18} {_gib(size):>12}" for label, size in rows]
        lines.append(f"verdict: {self.verdict}")
        lines.append(f"lower {self.lower_seconds:.1f} s, compile {self.compile_seconds:.1f} s")
        return "\n".join(lines)


def _gib(size: int) -> str:
    return f"{size / GiB:.3f} GiB" if abs(size) >= GiB / 100 else f"{size / 2**20:.2f} MiB"


def _is_out_of_memory(err: Exception) -> bool:
    return isinstance(err, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(err)


def compile_on_mesh(tpu: TpuSlice, mesh: Mesh, build: BuildFn) -> CompileReport:
    """Lower and compile `build(mesh)`'s program on `mesh` (compile-only TPU devices).

    `build` returns `(fn, abstract_args)`: a jitted function (a plain one is jitted here)
    and its arguments as `jax.ShapeDtypeStruct`s with shardings on `mesh`. As in the
    trainer, `build` runs outside and the lowering inside `jax.set_mesh(mesh)`.
    """
    report = CompileReport(tpu=tpu, mesh_shape=dict(mesh.shape))
    fn, args = build(mesh)
    fn = fn if hasattr(fn, "lower") else jax.jit(fn)
    with jax.set_mesh(mesh):
        start = time.perf_counter()
        lowered = fn.lower(*args)
        report.lower_seconds = time.perf_counter() - start
        start = time.perf_counter()
        try:
            compiled = lowered.compile()
        except Exception as err:  # pylint: disable=broad-except
            if not _is_out_of_memory(err):
                raise
            report.error = str(err).strip().splitlines()[0]
            return report
        finally:
            report.compile_seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    report.argument_bytes = int(stats.argument_size_in_bytes)
    report.output_bytes = int(stats.output_size_in_bytes)
    report.alias_bytes = int(stats.alias_size_in_bytes)
    report.temp_bytes = int(stats.temp_size_in_bytes)
    report.generated_code_bytes = int(stats.generated_code_size_in_bytes)
    report.peak_bytes = int(getattr(stats, "peak_memory_in_bytes", 0) or 0)
    return report


def compile_for_topology(topology: str | TpuSlice, build: BuildFn,
                         mesh_axes: Mapping[str, int] | None = None) -> CompileReport:
    """Compile `build`'s program for a TPU slice and report its per-device memory.

    `mesh_axes` maps mesh axis names to sizes (one may be -1); default: one `data` axis
    over every chip. Example: `compile_for_topology("v5p-32", build, {"data": 1, "fsdp": -1})`.
    """
    tpu = parse_topology(topology) if isinstance(topology, str) else topology
    mesh = topology_mesh(topology_devices(tpu), mesh_axes or {"data": -1}, tpu.num_slices)
    return compile_on_mesh(tpu, mesh, build)


@dataclasses.dataclass
class MicrobatchSearch:
    """Result of `find_max_microbatch`: the largest size that fits and every compile tried."""

    best: int | None
    reports: dict[int, CompileReport]

    def __str__(self) -> str:
        tried = ", ".join(f"{size}: {'fits' if r.fits else 'no'} ({_gib(r.required_bytes) if r.error is None else 'OOM'})"
                          for size, r in sorted(self.reports.items()))
        best = "none fits" if self.best is None else str(self.best)
        return f"largest per-chip microbatch that fits: {best}  [tried {tried}]"


def find_max_microbatch(topology: str | TpuSlice, build: Callable[[Mesh, int], tuple[Callable[..., Any], Sequence[Any]]],
                        mesh_axes: Mapping[str, int] | None = None, *, start: int = 1, limit: int = 256,
                        powers_of_two: bool = True,
                        on_report: Callable[[int, CompileReport], None] | None = None) -> MicrobatchSearch:
    """Largest per-chip microbatch in [start, limit] whose program fits the slice's HBM.

    `build(mesh, size)` returns `(fn, abstract_args)` for `size` examples per chip (the
    caller scales it by the batch-sharding degree). Sizes double from `start` until one
    does not fit; with `powers_of_two=False` the gap to that size is then bisected.
    Memory grows with the microbatch, so the first failure bounds the search.
    `on_report(size, report)` sees each compile as it finishes (they can take minutes).
    """
    tpu = parse_topology(topology) if isinstance(topology, str) else topology
    mesh = topology_mesh(topology_devices(tpu), mesh_axes or {"data": -1}, tpu.num_slices)
    reports: dict[int, CompileReport] = {}

    def fits(size: int) -> bool:
        reports[size] = compile_on_mesh(tpu, mesh, lambda m: build(m, size))
        if on_report is not None:
            on_report(size, reports[size])
        return reports[size].fits

    best, size = None, start
    while size <= limit and fits(size):
        best, size = size, size * 2
    if not powers_of_two and best is not None and size <= limit:
        low, high = best, size  # low fits, high does not
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) else (low, mid)
        best = low
    return MicrobatchSearch(best=best, reports=reports)


# ---------------------------------------------------------------- a run config's train step

def config_mesh_axes(config) -> dict[str, int]:
    """config.mesh's ('data', 'fsdp', 'tensor') sizes; data defaults to -1 (the rest)."""
    return {axis: int(config.mesh.get(axis, -1 if axis == "data" else 1)) for axis in shd.MESH_AXES}


def compile_run_config(config, topology: str, *, model: str | None = None,
                       prompt_len: int | None = None, completion_len: int | None = None,
                       find_microbatch: bool = False, max_microbatch: int = 64,
                       log: Callable[[str], None] = functools.partial(print, flush=True)) -> bool:
    """Compiles `config`'s train step for `topology` and logs each chip's memory; True if it fits.

    The architecture is `model` (a preset) or `program.model_config_of`'s choice; sequences
    are the data pipeline's largest buckets unless `prompt_len` / `completion_len` say
    otherwise. With `find_microbatch`, searches the largest per-chip microbatch up to
    `max_microbatch` (powers of two, the config's accumulation count) and is True when one fits.
    """
    tpu = parse_topology(topology)
    model_config = program.model_config_of(config, model)
    prompt_len, completion_len = program.sequence_lengths(config, prompt_len, completion_len)
    mesh_axes = config_mesh_axes(config)
    log(f"model {model or config.model.path or config.model.preset} ({model_config.num_layers} layers, hidden "
        f"{model_config.hidden_size}), loss {config.loss.name}, {_reference_what(config)}, "
        f"{_training_what(config, model_config)}, sequences {prompt_len}+{completion_len} tokens, topology {tpu.name}")
    if find_microbatch:
        def build(mesh: Mesh, per_chip: int):
            cfg = program.with_microbatch(config, per_chip * shd.batch_shards(mesh, config.mesh.rules))
            return program.train_step_program(cfg, model_config, mesh, prompt_len, completion_len)

        def show(size: int, report: CompileReport) -> None:
            log(f"\n--- per-chip microbatch {size}\n{report}")

        search = find_max_microbatch(tpu, build, mesh_axes, limit=max_microbatch, on_report=show)
        log(f"\n{search}")
        return search.best is not None

    def build_config(mesh: Mesh):
        shards = shd.batch_shards(mesh, config.mesh.rules)
        log(f"microbatch {config.train.micro_batch_size} = {config.train.micro_batch_size / shards:g} "
            f"per chip over {shards} batch shards, {int(config.train.global_batch_size) // int(config.train.micro_batch_size)} "
            "accumulation steps")
        return program.train_step_program(config, model_config, mesh, prompt_len, completion_len)

    report = compile_for_topology(tpu, build_config, mesh_axes)
    log(str(report))
    return report.fits


def _reference_what(config: ml_collections.ConfigDict) -> str:
    """What the compiled step uses as pi_ref: under LoRA the base itself, never a copy."""
    source = config.reference.source
    if source == "precomputed":
        return "reference log-probs precomputed"
    if source != "model":
        return f"reference {source}"
    lora = configured_lora(config)
    if not lora.enabled:
        return "reference a frozen copy of the policy"
    return ("reference the base + the frozen starting adapter" if lora.init_from
            else "reference the base with the adapters off")


def _training_what(config: ml_collections.ConfigDict, model_config: ModelConfig) -> str:
    """'full parameters', 'LoRA r16 (base bfloat16)' or 'QLoRA r16 (nf4 base, rest bfloat16)':
    what the compiled step trains."""
    lora = configured_lora(config)
    if not lora.enabled:
        return "full parameters"
    quantization = model_config.quantization
    base = (f"{quantization.describe()} base, rest {model_config.param_dtype}" if quantization.enabled
            else f"base {model_config.param_dtype}")
    return f"{'QLoRA' if quantization.enabled else 'LoRA'} r{lora.rank or 'from ' + lora.init_from} ({base})"
