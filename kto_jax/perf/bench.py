"""The KTO step benchmark: one fixed workload (or real lengths), built and timed on any backend.

Workload (the one TRL's KTO trainer is timed on, so the figures compare; docs/performance.md):
  - a model shape by name (`MODEL_SHAPES`), random init, float32 master weights and
    bfloat16 compute;
  - a synthetic fixed-length batch: every prompt has `prompt_len` real tokens
    (left-padded to a multiple of `bucket`), every completion `completion_len`
    (right-padded likewise), labels alternate desirable / undesirable;
  - global batch = micro_batch x accum (8 x 4 = 32), the KTO loss, AdamW.
With --lengths the examples' lengths are drawn from a real distribution instead, and
--layout picks how the step lays them out (padded rows; packed_shared, the packed layout the
trainer runs for the loss: kl rows beside [x | y] for a loss with z0; or packed segments that
compute x twice): kto_jax/perf/workload.py.

The parameters and optimizer state are created by one jitted initialiser whose
outputs carry the train state's shardings (`kto_jax.step.state.init_sharded_state`),
so an 8B model is born sharded and never sits on one device. The step is the
trainer's own `make_train_step`.

Figures (one JSON line, `BenchResult.to_json`):
  matched tokens/s = global_batch * (prompt_len + completion_len) / median s/step:
      the real (unpadded) tokens of the matched (x, y) sequences the policy trains
      on, exactly how TRL's benchmark counts `tokens_per_s` (its KL batch is not
      counted). The padded shape the step runs on is reported as `padded_seq`.
      `real_tokens_per_s` is the same figure under its --lengths name; `token_efficiency`
      and `fill` say how much of the computed positions were real tokens / not padding;
      `token_efficiency_ceiling` is token_efficiency at fill 100% (real / placed tokens).
  model TFLOP/s and MFU: `kto_jax.step.flops` (PaLM convention: full T x T
      attention, the padded length; a packed layout: its rows, one forward with a
      backward and the reference forward), divided by the device's bf16 peak; and the
      same with TRL's convention (`trl_*`: causal attention halved, each example's
      unpadded length, TRL's parameter count, the padded step's six forward units)
      so the figures line up with TRL's 40%; it counts the same work for every layout.
  trainable parameters: every parameter, or with --lora-rank=R the LoRA adapters alone
      (`params` stays the model's size; FLOPs are counted as for the full step).
  peak memory: the device allocator's peak where it reports one (GPU, TPU), else
      the process's peak resident set size (CPU), and XLA's compiled estimate.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import resource
import statistics
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from kto_jax.perf import aot
from kto_jax.perf import workload
from kto_jax import sharding as shd
from kto_jax.config import config_file
from kto_jax.errors import UserError
from kto_jax.losses.registry import DEFAULT_LOSS, get_loss
from kto_jax.models.config import ATTENTION_IMPLS, REMAT_POLICIES, ModelConfig, preset
from kto_jax.models.transformer import Transformer, abstract_model
from kto_jax.step import flops as flops_lib
from kto_jax.perf import program
from kto_jax.step import train_step as step_lib
from kto_jax.step.optimizer import make_optimizer
from kto_jax.train.settings import RunSettings, read_settings
from kto_jax.models.lora import LoraAdapters, abstract_adapters
from kto_jax.models.lora import validate as validate_lora
from kto_jax.step.adapters import LoraView
from kto_jax.step.state import (batch_sharding, init_sharded_state, reference_copy, split_lora,
                                split_model)

# Bench name -> (kto_jax.models.config preset, overrides). `tiny` is the TRL anchor's tiny shape.
MODEL_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny": ("tiny", {"vocab_size": 6000, "tie_word_embeddings": True}),
    "qwen-0.5b": ("qwen25_0_5b", {}),
    "llama-1b": ("llama32_1b", {}),
    "llama-8b": ("llama3_8b", {}),
}
REFERENCE_MODES = {"on_the_fly": "model", "precomputed": "precomputed"}
GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    """Everything that defines one benchmark run (all reported in the JSON line)."""
    model: str = "llama-1b"
    prompt_len: int = 512          # real prompt tokens per example
    completion_len: int = 511      # real completion tokens per example
    bucket: int = 128              # padded lengths are multiples of this (cuDNN wants 64 | T)
    micro_batch: int = 8
    accum: int = 4
    steps: int = 10                # timed steps
    warmup: int = 3                # untimed steps first (the first one compiles)
    reference: str = "on_the_fly"  # "on_the_fly" | "precomputed"
    attention: str = "auto"        # ModelConfig.attention_impl
    remat: str = "none"            # ModelConfig.remat_policy
    loss: str = DEFAULT_LOSS         # config.loss.name (any unpaired loss)
    dtype: str = "bfloat16"        # compute dtype
    param_dtype: str = "float32"   # master weights
    reference_dtype: str = "bfloat16"
    vocab_chunk: int = 8192        # LM-head columns per log-softmax chunk
    fsdp: int = 1                  # mesh sizes; data takes the remaining devices
    tensor: int = 1
    seed: int = 0
    lora_rank: int = 0             # > 0: train LoRA adapters of this rank (docs/lora.md) on a frozen base
    lengths: str = ""              # "": every example prompt_len + completion_len; else a named
                                   # distribution or a file (kto_jax/perf/workload.py); the lens are then caps
    layout: str = "padded"         # padded | packed | packed_shared (workload.LAYOUTS)
    pack_length: int = 0           # packed rows' length T; 0: chosen (workload.packed_batch)

    def check(self) -> None:
        """UserError for an option the benchmark cannot run."""
        if self.model not in MODEL_SHAPES:
            raise UserError(f"--model {self.model!r}: choose one of {', '.join(MODEL_SHAPES)}")
        if self.reference not in REFERENCE_MODES:
            raise UserError(f"--reference {self.reference!r}: choose one of {', '.join(REFERENCE_MODES)}")
        if self.attention not in ATTENTION_IMPLS or self.remat not in REMAT_POLICIES:
            raise UserError(f"--attention must be one of {ATTENTION_IMPLS} and --remat one of "
                            f"{REMAT_POLICIES}")
        if min(self.prompt_len, self.completion_len, self.bucket, self.accum, self.steps) < 1:
            raise UserError("--prompt-len, --completion-len, --bucket, --accum and --steps must be >= 1")
        if self.warmup < 0:
            raise UserError("--warmup must be >= 0")
        if self.layout not in workload.LAYOUTS:
            raise UserError(f"--layout {self.layout!r}: choose one of {', '.join(workload.LAYOUTS)}")
        if self.pack_length < 0 or (self.pack_length and self.layout == "padded"):
            raise UserError("--pack-length must be >= 0 and is read by --layout packed or "
                            "packed_shared only")
        get_loss(self.loss)  # UserError for an unknown loss name
        if get_loss(self.loss).paired:
            raise UserError(f"--loss {self.loss!r} is paired; the benchmark runs unpaired losses "
                            "(kto and its variants, sft, csft)")

    @property
    def padded_prompt(self) -> int:
        return round_up(self.prompt_len, self.bucket)

    @property
    def padded_completion(self) -> int:
        return round_up(self.completion_len, self.bucket)

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accum


round_up = workload.round_up


# ---------------------------------------------------------------- building the workload

def model_config(opts: BenchOptions) -> ModelConfig:
    name, overrides = MODEL_SHAPES[opts.model]
    return preset(name, **overrides, dtype=opts.dtype, param_dtype=opts.param_dtype,
                  remat_policy=opts.remat, attention_impl=opts.attention)


def run_config(opts: BenchOptions) -> ml_collections.ConfigDict:
    """The run config of the workload: configs/base.py with the benchmark's choices."""
    c = config_file("base")
    c.loss.name = opts.loss
    c.reference.source = REFERENCE_MODES[opts.reference] if get_loss(opts.loss).uses_reference else "none"
    c.reference.param_dtype = opts.reference_dtype
    c.train.micro_batch_size, c.train.global_batch_size = opts.micro_batch, opts.global_batch
    c.train.logprob_vocab_chunk = opts.vocab_chunk
    c.model.dtype, c.model.param_dtype = opts.dtype, opts.param_dtype
    c.model.remat_policy, c.model.attention_impl = opts.remat, opts.attention
    c.optim.warmup_steps, c.optim.schedule = 0, "constant"  # as TRL's anchor
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, opts.fsdp, opts.tensor
    c.lora.rank = opts.lora_rank
    return c


def examples(opts: BenchOptions, vocab_size: int) -> workload.Examples:
    """The global batch's examples: fixed lengths, or drawn from --lengths (capped by the lens)."""
    if not opts.lengths:
        n = opts.global_batch
        return workload.make_examples([opts.prompt_len] * n, [opts.completion_len] * n,
                                      accum=opts.accum, micro_batch=opts.micro_batch,
                                      vocab_size=vocab_size, seed=opts.seed)
    return workload.sample_examples(workload.load_lengths(opts.lengths), accum=opts.accum,
                                    micro_batch=opts.micro_batch, max_prompt=opts.prompt_len,
                                    max_completion=opts.completion_len, vocab_size=vocab_size,
                                    seed=opts.seed)


def workload_batch(opts: BenchOptions, vocab_size: int, groups: int = 1
                   ) -> tuple[dict[str, np.ndarray], workload.TokenCount, workload.Examples]:
    """(batch, token count, examples) of the run: the examples in --layout; `groups`:
    packing groups per microbatch, the batch shards of the mesh."""
    ex = examples(opts, vocab_size)
    batch, count = workload.layout_batch(ex, opts.layout, bucket=opts.bucket,
                                         pack_length=opts.pack_length, groups=groups,
                                         uses_kl=get_loss(opts.loss).uses_kl)
    return batch, count, ex


def synthetic_batch(opts: BenchOptions, vocab_size: int) -> dict[str, np.ndarray]:
    """The fixed-length batch [A, M, ...] of kto_jax/batch.py (left-padded prompts)."""
    return workload_batch(dataclasses.replace(opts, lengths="", layout="padded"), vocab_size)[0]


def init_state(settings: RunSettings, model_cfg: ModelConfig, tx, mesh, seed: int):
    """(graphdef, state, shardings): random params and optimizer state, created sharded; with
    config.lora a random frozen base and fresh adapters (only they have optimizer moments)."""
    lora = settings.lora
    if lora is not None:
        validate_lora(lora, model_cfg, settings.loss)
    if lora is None:
        graphdef, _ = split_model(abstract_model(model_cfg))
        make = lambda: split_model(Transformer(model_cfg, rngs=nnx.Rngs(seed)))[1]
    else:
        graphdef, _ = split_lora(abstract_model(model_cfg), abstract_adapters(model_cfg, lora), lora)
        make = lambda: split_lora(Transformer(model_cfg, rngs=nnx.Rngs(seed)),
                                  LoraAdapters(model_cfg, lora, rngs=nnx.Rngs(lora.seed)), lora)[1]
    state, shardings = init_sharded_state(settings.step, tx, mesh, model_cfg.hidden_size, make)
    return graphdef, state, shardings


def precomputed_reference_logps(settings: RunSettings, graphdef, state, batch,
                                mesh) -> dict[str, jax.Array]:
    """The batch's precomputed reference keys, with the policy's initial params as pi_ref,
    computed by the step's reference forward and placed on the batch's sharding."""
    reference = (LoraView(state.base_params) if state.base_params is not None  # LoRA: the base
                 else reference_copy(state.params, settings.step.reference_dtype))
    fn = step_lib.make_reference_step(settings.loss, graphdef, settings.step.vocab_chunk, mesh,
                                      shd.named_shardings(reference, mesh, settings.rules),
                                      settings.rules)
    with jax.set_mesh(mesh):
        out = fn(reference, batch)
    sharding = batch_sharding(mesh, settings.rules)
    return {k: jax.device_put(v, sharding) for k, v in out.items()}


# ---------------------------------------------------------------- measuring

def peak_memory() -> tuple[float | None, str]:
    """(GiB, source): the first device's allocator peak, else this process's peak RSS."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / GiB, "device peak_bytes_in_use (device 0)"
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kib * 1024 / GiB, "host peak RSS (no device allocator stats)"


def trl_step_flops(model_cfg: ModelConfig, n_params: int, units: int, global_batch: int,
                   seq) -> float:
    """A step's FLOPs as TRL's anchor counts them (causal attention halved, unpadded seq).

    `seq` may be an array of per-example lengths (global_batch 1 each): their sum.
    """
    n_embed = model_cfg.vocab_size * model_cfg.hidden_size
    matmul = n_params - (0 if model_cfg.tie_word_embeddings else n_embed)
    seq = np.asarray(seq, np.float64)
    per_token = 2 * matmul + 2 * 2 * model_cfg.num_layers * seq * model_cfg.hidden_size / 2
    return float(np.sum(units * per_token * global_batch * seq))


def computed_step_flops(dims: flops_lib.ModelDims, loss_obj, reference_source: str,
                        count: workload.TokenCount) -> float:
    """Model FLOPs (PaLM convention, `flops.step_flops`) of the rows the step computes in
    `count`'s layout: the global batch at the padded length, or A x R packed rows of T (one
    policy forward with its backward over the rows, one reference forward), each with its kl
    row of Tk run forward only (packed_shared with z0)."""
    packed = count.layout != "padded"
    rows = count.accum * count.rows if packed else count.accum * count.rows // (
        2 if loss_obj.uses_kl else 1)
    return flops_lib.step_flops(dims, loss=loss_obj, reference_source=reference_source,
                                global_batch=rows, seq_len=count.row_length, packed=packed,
                                kl_len=count.kl_row_length)


def time_steps(step, state, batch, opts: BenchOptions) -> tuple[Any, list[float], list[float], float]:
    """Runs warmup then timed steps, each ended by block_until_ready.

    Returns (state, wall seconds per step, process CPU seconds per step, last loss).
    CPU seconds (all threads of this process) are what a step costs on a shared CPU
    host, where wall time mostly measures the neighbours' load.
    """
    times, cpu, metrics = [], [], None
    for i in range(opts.warmup + opts.steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        if i >= opts.warmup:
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    loss = float(metrics["loss_sum"]) / max(float(metrics["loss_denominator"]), 1.0)
    return state, times, cpu, loss


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    """Builds the workload, times it and returns the JSON line's fields."""
    opts.check()
    model_cfg = model_config(opts)
    config = run_config(opts)
    settings = read_settings(config)
    mesh = shd.make_mesh(config.mesh)
    tx, schedule = make_optimizer(settings.optim, opts.warmup + opts.steps)
    t0 = time.perf_counter()
    graphdef, state, shardings = init_state(settings, model_cfg, tx, mesh, opts.seed)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    host_batch, count, ex = workload_batch(opts, model_cfg.vocab_size,
                                           shd.batch_shards(mesh, settings.rules))
    batch = jax.device_put(host_batch, batch_sharding(mesh, settings.rules))
    if config.reference.source == "precomputed":
        batch = dict(batch, **precomputed_reference_logps(settings, graphdef, state, batch, mesh))
    step = step_lib.make_train_step(settings.step, graphdef, tx, schedule, mesh, shardings)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    state, times, cpu, loss = time_steps(compiled, state, batch, opts)
    result = summarize(opts, model_cfg, config, state, times, loss, compiled, init_s, compile_s,
                       count, ex)
    result["median_cpu_s"] = round(statistics.median(cpu), 4)
    return result


def compile_for_tpu(opts: BenchOptions, topology: str) -> dict[str, Any]:
    """The workload AOT-compiled for a TPU slice on this host (libtpu); per-chip memory as JSON.

    No step runs: these are XLA's buffer sizes for the same program the TPU would
    execute (kto_jax/perf/aot.py), and whether it fits the chip's HBM.
    """
    opts.check()
    if opts.lengths or opts.layout != "padded":
        raise UserError("--topology compiles the fixed workload: drop --lengths and --layout")
    model_cfg, config = model_config(opts), run_config(opts)
    mesh_axes = {"data": -1, "fsdp": opts.fsdp, "tensor": opts.tensor}
    report = aot.compile_for_topology(topology, lambda mesh: program.train_step_program(
        config, model_cfg, mesh, opts.padded_prompt, opts.padded_completion), mesh_axes)
    gib = lambda n: round(n / GiB, 3)
    options = {k: v for k, v in dataclasses.asdict(opts).items() if k not in ("steps", "warmup")}
    return {
        "bench": "kto-jax", "mode": "aot-compile", "jax": jax.__version__, "topology": topology,
        "chips": report.tpu.num_devices, "hbm_gib_per_chip": gib(report.tpu.hbm_bytes),
        "mesh": report.mesh_shape, "model": opts.model, "padded_seq": opts.padded_prompt + opts.padded_completion,
        "global_batch": opts.global_batch, "fits": report.fits, "error": report.error,
        "per_chip_gib": {"arguments": gib(report.argument_bytes), "outputs": gib(report.output_bytes),
                         "aliased": gib(report.alias_bytes), "temporaries": gib(report.temp_bytes),
                         "generated_code": gib(report.generated_code_bytes), "total": gib(report.total_bytes), "xla_peak": gib(report.peak_bytes)},
        "compile_s": round(report.compile_seconds, 1), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "options": options,
    }


def summarize(opts: BenchOptions, model_cfg: ModelConfig, config, state, times: list[float],
              loss: float, compiled, init_s: float, compile_s: float,
              count: workload.TokenCount, ex: workload.Examples) -> dict[str, Any]:
    """The JSON line's fields from the measured step times."""
    device = jax.devices()[0]
    n_devices = jax.device_count()
    step_s = statistics.median(times)
    lengths = ex.prompt_lengths + ex.completion_lengths
    seq = round(count.real_tokens / opts.global_batch, 2) if opts.lengths else int(lengths[0])
    loss_obj = get_loss(opts.loss)
    grad_passes, fwd_passes = flops_lib.forward_passes(loss_obj, config.reference.source)
    dims = flops_lib.ModelDims.of(model_cfg)
    flops = computed_step_flops(dims, loss_obj, config.reference.source, count)
    size = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    n_params = size(state.params if state.base_params is None else state.base_params)
    trainable = size((state.params, state.value_head))
    trl_flops = trl_step_flops(model_cfg, n_params, 3 * grad_passes + fwd_passes, 1, lengths)
    peak = flops_lib.peak_flops_per_device(device.device_kind, device.platform)
    mem_gib, mem_source = peak_memory()
    xla_mem = compiled.memory_analysis()
    xla_gib = None if xla_mem is None else (
        xla_mem.argument_size_in_bytes + xla_mem.output_size_in_bytes - xla_mem.alias_size_in_bytes
        + xla_mem.temp_size_in_bytes) / GiB
    options = {k: v for k, v in dataclasses.asdict(opts).items() if k not in ("steps", "warmup")}
    return {
        "bench": "kto-jax", "jax": jax.__version__, "platform": device.platform,
        "device": device.device_kind, "num_devices": n_devices, "host": platform.node(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "model": opts.model, "params": n_params,
        "trainable_params": trainable, "lora_rank": opts.lora_rank,
        "seq": seq, "padded_seq": count.row_length, "global_batch": opts.global_batch,
        "layout": count.layout, "lengths": opts.lengths or None,
        "truncated_examples": ex.truncated, "rows_per_microbatch": count.rows,
        "kl_row_length": count.kl_row_length,
        "real_tokens": count.real_tokens, "computed_positions": count.computed_positions,
        "token_efficiency": round(count.token_efficiency, 4), "fill": round(count.fill, 4),
        "token_efficiency_ceiling": round(count.token_efficiency_ceiling, 4),
        "steps": len(times), "warmup": opts.warmup, "median_step_s": round(step_s, 6),
        "min_step_s": round(min(times), 6), "max_step_s": round(max(times), 6),
        "tokens_per_s": round(count.real_tokens / step_s, 1),
        "real_tokens_per_s": round(count.real_tokens / step_s, 1),
        "model_flops_per_step": round(flops), "trl_model_flops_per_step": round(trl_flops),
        "model_tflops_per_s": _sig(flops / step_s / 1e12),
        "mfu": None if peak is None else round(flops_lib.mfu(flops, step_s, n_devices, peak), 4),
        "trl_model_tflops_per_s": _sig(trl_flops / step_s / 1e12),
        "trl_mfu": None if peak is None else round(flops_lib.mfu(trl_flops, step_s, n_devices, peak), 4),
        "peak_tflops_per_device": None if peak is None else peak / 1e12,
        "peak_mem_gib": round(mem_gib, 3), "peak_mem_source": mem_source,
        "xla_mem_gib": None if xla_gib is None else round(xla_gib, 3),
        "init_s": round(init_s, 2), "compile_s": round(compile_s, 2),
        "loss": round(loss, 6), "options": options,
    }


def _sig(x: float, digits: int = 4) -> float:
    """x rounded to `digits` significant digits (TFLOP/s spans 1e-3 on CPU to 1e3)."""
    return float(f"{x:.{digits}g}")


def to_json(result: dict[str, Any]) -> str:
    """The one JSON line the command prints."""
    return json.dumps(result, sort_keys=False)
