"""AOT compile for TPU topologies on this CPU host (kto_jax/perf/aot.py), with libtpu.

The programs are a two-layer MLP train step (forward, backward, SGD update with the
parameters donated), sharded over a (data, fsdp) mesh: the same shape of program
as the real KTO step, small enough to compile in about a second.
"""

import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from kto_jax.perf import aot
from kto_jax.errors import UserError

pytest.importorskip("libtpu", reason="libtpu (the tpu/test extra) is not installed: pip install 'kto-jax[tpu]'")
# every test here loads libtpu: one xdist worker runs them all (pytest.ini)
pytestmark = pytest.mark.xdist_group("libtpu")

MESH = {"data": 2, "fsdp": 2}


def mlp_train_step(params, x):
    """One SGD step on mean((tanh(x w1) w2 - x)^2); x is [batch, seq, embed]."""

    def loss_fn(p):
        hidden = jnp.tanh(x @ p["w1"])
        return jnp.mean((hidden @ p["w2"] - x) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    return jax.tree.map(lambda w, g: w - 0.01 * g, params, grads), loss


def mlp_builder(embed, hidden, batch, seq):
    """build(mesh) for aot: abstract params sharded over fsdp, batch over (data, fsdp)."""

    def build(mesh):
        w = NamedSharding(mesh, P("fsdp", None))
        params = {"w1": jax.ShapeDtypeStruct((embed, hidden), jnp.float32, sharding=w),
                  "w2": jax.ShapeDtypeStruct((hidden, embed), jnp.float32, sharding=w)}
        x = jax.ShapeDtypeStruct((batch, seq, embed), jnp.float32,
                                 sharding=NamedSharding(mesh, P(("data", "fsdp"), None, None)))
        return jax.jit(mlp_train_step, donate_argnums=0), (params, x)

    return build


@pytest.mark.parametrize("name,chips,grid,per_host,cloud,hbm_gib", [
    ("v5p-32", 16, (2, 2, 4), (2, 2, 1), "v5p-32", 95),
    ("v5p-128", 64, (4, 4, 4), (2, 2, 1), "v5p-128", 95),
    ("v5e-32", 32, (4, 8), (2, 2, 1), "v5litepod-32", 16),
    ("v5litepod-16", 16, (4, 4), (2, 2, 1), "v5litepod-16", 16),
    ("v5e-4", 4, (2, 2), (2, 2, 1), "v5litepod-4", 16),
    ("v4-8", 4, (2, 2, 1), (2, 2, 1), "v4-8", 32),
    ("v6e-8", 8, (2, 4), (2, 4, 1), "v6e-8", 32),
    ("v6e-256", 256, (16, 16), (2, 2, 1), "v6e-256", 32),
])
def test_parse_topology_matches_cloud_tpu_shapes(name, chips, grid, per_host, cloud, hbm_gib):
    tpu = aot.parse_topology(name)
    assert (tpu.num_chips, tpu.topology, tpu.chips_per_host) == (chips, grid, per_host)
    assert tpu.accelerator_type == cloud
    assert tpu.hbm_bytes == hbm_gib * 2**30


def test_parse_topology_multislice_and_bad_names():
    tpu = aot.parse_topology("2xv5p-16")
    assert (tpu.num_slices, tpu.num_chips, tpu.num_devices, tpu.libtpu_topology_name) == (2, 8, 16, "v5p:2x2x2")
    for bad in ["v5p", "tpu-8", "v7x-8", "v5p-6", "v5p-4", "v5e-2", "v5e-512", "v4-7", "0xv4-8"]:
        with pytest.raises(UserError, match="--topology"):
            aot.parse_topology(bad)


def test_missing_libtpu_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # makes `import libtpu` raise ImportError
    with pytest.raises(UserError, match=r"kto-jax\[tpu\]"):
        aot.topology_devices(aot.parse_topology("v4-8"))


def test_mesh_sizes_must_cover_the_slice():
    devices = aot.topology_devices(aot.parse_topology("v5e-4"))
    assert dict(aot.topology_mesh(devices, {"data": -1, "fsdp": 2}).shape) == {"data": 2, "fsdp": 2}
    for bad in [{"data": 3, "fsdp": -1}, {"data": 2, "fsdp": 4}, {"data": -1, "fsdp": -1}]:
        with pytest.raises(UserError, match="mesh"):
            aot.topology_mesh(devices, bad)


@pytest.mark.slow
def test_small_train_step_fits_with_exact_argument_bytes():
    embed, hidden, batch, seq = 512, 2048, 8, 256
    report = aot.compile_for_topology("v5e-4", mlp_builder(embed, hidden, batch, seq), MESH)
    param_bytes = 2 * embed * hidden * 4 // MESH["fsdp"]          # per device: fsdp halves
    batch_bytes = batch * seq * embed * 4 // (MESH["data"] * MESH["fsdp"])
    assert report.argument_bytes == param_bytes + batch_bytes
    assert report.alias_bytes == param_bytes                      # donated params reused in place
    assert report.output_bytes >= param_bytes + 4                 # new params + scalar loss
    assert report.generated_code_bytes > 0 and report.peak_bytes > 0
    assert report.total_bytes == (report.argument_bytes + report.output_bytes - report.alias_bytes
                                  + report.temp_bytes + report.generated_code_bytes)
    assert report.fits and report.error is None
    text = str(report)
    assert "v5e-4" in text and "fits" in text and "does not fit" not in text and "temporaries" in text


def test_too_large_program_is_reported_not_raised():
    # w1 and w2 alone: 2 * 32768 * 131072 * 4 B / 2 = 16 GiB per chip > 16 GiB HBM of a v5e.
    report = aot.compile_for_topology("v5e-4", mlp_builder(32768, 131072, 4, 128), MESH)
    assert not report.fits
    assert report.error is not None and "RESOURCE_EXHAUSTED" in report.error
    assert "does not fit" in str(report)


def test_verdict_compares_total_with_chip_hbm():
    # The same small program "fits" on a v4 and not on a pretend chip with 1 MiB of HBM.
    report = aot.compile_for_topology("v4-8", mlp_builder(512, 2048, 8, 256), MESH)
    assert report.fits
    tiny_chip = aot.CompileReport(**{**report.__dict__, "tpu": aot.dataclasses.replace(report.tpu, hbm_bytes=2**20)})
    assert not tiny_chip.fits and "does not fit" in tiny_chip.verdict


@pytest.mark.slow
def test_find_max_microbatch_stops_at_the_hbm_boundary():
    # Activations grow by ~6.8 GiB per example per chip (seq 98304): 1 and 2 fit a v5e's
    # 16 GiB, 4 does not, and bisection finds that 3 does not either. 4 chips (data=2 x
    # fsdp=2) share the batch.
    def build(mesh, per_chip):
        return mlp_builder(1024, 8192, per_chip * 4, 98304)(mesh)

    seen = []
    search = aot.find_max_microbatch("v5e-4", build, MESH, limit=64, powers_of_two=False,
                                     on_report=lambda size, report: seen.append((size, report.fits)))
    assert search.best == 2 and search.reports[2].fits
    assert seen == [(1, True), (2, True), (4, False), (3, False)]   # doubling, then bisection
    per_example = search.reports[2].total_bytes - search.reports[1].total_bytes
    assert 6 * 2**30 < per_example < 7.5 * 2**30
    assert "largest per-chip microbatch that fits: 2" in str(search)


# ---- the real train step: `kto-jax compile` on configs/tiny_cpu.py ------------------------

def _tiny_cpu(**mesh):
    from kto_jax.config import load_config

    overrides = [f"--config.mesh.{axis}={size}" for axis, size in mesh.items()]
    config, _, _ = load_config(["--config=configs/tiny_cpu.py", *overrides])
    return config


@pytest.mark.slow
def test_fsdp_shards_the_real_train_state_across_chips():
    """Per-chip arguments of the KTO train step with fsdp=4: a quarter of the state.

    The state is params, Adam's two moments and the float32 reference: four float32
    copies of the parameters. Widths are multiples of 128 * 4 so every fsdp shard fills
    whole TPU tiles and the byte counts are exact up to the small batch and counters.
    (The replicated layout, data=4, is compiled by the microbatch-search test below.)
    """
    from kto_jax.perf.program import train_step_program
    from kto_jax.models import preset

    c = preset("tiny", vocab_size=1024, hidden_size=512, intermediate_size=1024, num_heads=4,
               num_kv_heads=2, head_dim=128, param_dtype="float32", dtype="float32")
    mesh = {"data": 1, "fsdp": 4, "tensor": 1}
    config = _tiny_cpu(**mesh)
    report = aot.compile_for_topology("v5e-4", lambda m: train_step_program(config, c, m, 24, 48), mesh)
    n_params = (2 * c.vocab_size * c.hidden_size + c.hidden_size
                + c.num_layers * (2 * c.hidden_size + c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
                                  + 3 * c.hidden_size * c.intermediate_size))
    shard_bytes = 4 * n_params * 4 // 4                             # (params, mu, nu, reference) / fsdp
    assert report.fits and report.mesh_shape == mesh
    assert shard_bytes <= report.argument_bytes <= shard_bytes + 2**20  # + batch, step counters, key
    assert 3 * shard_bytes // 4 <= report.alias_bytes <= report.argument_bytes  # params + moments donated


@pytest.mark.slow
def test_compile_command_finds_the_largest_microbatch(capsys):
    from kto_jax import cli

    rc = cli.main(["compile", "--config=configs/tiny_cpu.py", "--topology=v5e-4", "--model=tiny",
                   "--find_microbatch", "--max_microbatch=2"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "sequences 24+48 tokens" in out                          # data.max_prompt_length + max_length
    assert out.count("verdict: fits") == 2 and "per-chip microbatch 2" in out
    assert "largest per-chip microbatch that fits: 2" in out


@pytest.mark.slow
def test_compile_command_reports_a_model_too_large_for_the_slice(capsys):
    from kto_jax import cli

    # Llama-3 70B's float32 params alone are 70 GB per chip on 4 chips with data parallelism.
    rc = cli.main(["compile", "--config=configs/tiny_cpu.py", "--topology=v5e-4", "--model=llama3_70b"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "does not fit" in out and "RESOURCE_EXHAUSTED" in out


def test_compile_command_needs_an_architecture(capsys):
    from kto_jax import cli

    rc = cli.main(["compile", "--config=configs/tiny_cpu.py", "--topology=v5p-32"])   # no path, no preset
    assert rc == 2 and "--model=PRESET" in capsys.readouterr().err
    rc = cli.main(["compile", "--config=configs/tiny_cpu.py", "--topology=v5p-6", "--model=tiny"])
    assert rc == 2 and "--topology 'v5p-6'" in capsys.readouterr().err


def test_architecture_comes_from_flag_then_checkpoint_then_preset(tmp_path):
    import json

    from kto_jax.perf.program import model_config_of
    from kto_jax.config import load_config
    from kto_jax.models import preset

    config, _, _ = load_config(["--config=configs/mistral_7b_kto.py"])
    recipe = model_config_of(config, None)                          # config.model.preset
    assert (recipe.architecture, recipe.sliding_window, recipe.remat_policy) == ("MistralForCausalLM", 4096, "full")
    assert model_config_of(config, "llama3_70b").num_layers == 80  # --model wins
    checkpoint = preset("qwen25_0_5b")
    (tmp_path / "config.json").write_text(json.dumps(checkpoint.to_hf()))
    config.model.path = str(tmp_path)                               # a checkpoint's config.json beats the preset
    from_path = model_config_of(config, None)
    assert from_path == checkpoint.replace(dtype="bfloat16", remat_policy="full")


@pytest.mark.slow
def test_compile_with_packing_lowers_packed_rows(capsys):
    """data.packing: the abstract batch is R rows of data.pack_length tokens per microbatch
    (each example a P + 2C tree, packed per batch shard) plus the per-example arrays, and
    `kto-jax compile` lowers and sizes that step for the TPU."""
    from kto_jax import cli
    from kto_jax.sharding import make_mesh
    from kto_jax.perf import program

    config = _tiny_cpu(data=2, fsdp=1, tensor=1)
    config.data.packing, config.data.pack_length = True, 256
    batch = program.abstract_batch(config, make_mesh(config.mesh, jax.devices()[:2]), 24, 48)
    # micro batch 4 over 2 shards: 2 trees of 24 + 2 * 48 = 120 tokens share one 256-token row
    assert batch["packed_ids"].shape == (2, 2, 256)
    assert batch["completion_index"].shape == batch["kl_ids"].shape == (2, 4, 48)
    assert "prompt_ids" not in batch and batch["prompt_length"].shape == (2, 4)
    rc = cli.main(["compile", "--config=configs/tiny_cpu.py", "--topology=v5e-4", "--model=tiny",
                   "--config.data.packing=True", "--config.data.pack_length=256"])
    assert rc == 0 and "verdict: fits" in capsys.readouterr().out


@pytest.mark.slow
def test_compile_names_the_reference_a_lora_run_uses(capsys):
    """Under LoRA the reference is the base with the adapters off, not a second model."""
    from kto_jax import cli

    rc = cli.main(["compile", "--config=configs/tiny_cpu.py", "--topology=v5e-4", "--model=tiny",
                   "--config.lora.rank=4"])
    first = capsys.readouterr().out.splitlines()[0]
    assert rc == 0
    assert "LoRA r4" in first and "reference the base with the adapters off" in first, first
    rc = cli.main(["compile", "--config=configs/tiny_cpu.py", "--topology=v5e-4", "--model=tiny"])
    first = capsys.readouterr().out.splitlines()[0]
    assert "full parameters" in first and "reference a frozen copy of the policy" in first, first
