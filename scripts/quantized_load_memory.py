"""Peak host memory of loading a checkpoint unquantised (bf16) and quantised on the way in.

  python scripts/quantized_load_memory.py --out=/tmp/qload [--hidden=1024 --layers=16]
  python scripts/quantized_load_memory.py --devices=8 --fsdp=8 --loaders=sliced,whole

With `--devices`/`--fsdp` the model is loaded onto that many CPU devices, 'embed' sharded
fsdp ways (and 'vocab', 'mlp', 'heads' too when `--tensor` > 1). `--loaders`: `sliced` reads
each device's blocks from safetensors (what kto-jax does), `whole` reads every tensor whole
and places its shards (what it did before, kept as the path of sources that cannot slice).

Writes a random Llama-shaped bf16 safetensors checkpoint (hundreds of MB by default) once,
then loads it in a fresh process per mode: `hf_io.from_pretrained(param_dtype="bfloat16")`,
and `quantized_base.load_quantized` with int8, nf4 and nf4 + double quantisation, on the
CPU backend (its "device" arrays live in host memory too, so the loaded model counts).
Each worker prints one JSON line: RSS after imports, peak RSS (VmHWM), the peak of its
anonymous RSS (sampled every 2 ms: the checkpoint's memory-mapped pages, which the kernel
may drop, are left out) and its anonymous RSS once loaded (their difference: what the
loader held besides the loaded arrays at its peak), the peak and final bytes of host arrays
(tracemalloc: numpy's buffers, not XLA's), the bytes of the arrays it loaded, and its CPU
seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import tracemalloc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("bf16", "int8", "nf4", "nf4_double")


def write_checkpoint(out: str, hidden: int, layers: int, vocab: int) -> str:
    """A random Llama checkpoint (bf16, untied lm_head, GQA 2:1, F = 4 D) under `out`."""
    import torch
    import transformers
    from safetensors.torch import save_file
    path = os.path.join(out, f"llama_d{hidden}_l{layers}")
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                      num_key_value_heads=hidden // 128, tie_word_embeddings=False,
                                      torch_dtype="bfloat16")
    os.makedirs(path, exist_ok=True)
    config.save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    kv = hidden // 2
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                       p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                       p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (4 * hidden, hidden), p + "mlp.up_proj.weight": (4 * hidden, hidden),
                       p + "mlp.down_proj.weight": (hidden, 4 * hidden)})
    tensors = {name: (0.02 * torch.randn(*shape, generator=g)).to(torch.bfloat16) for name, shape in shapes.items()}
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path


def _status(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


class WholeTensors:
    """A TensorSource that reads tensors whole only (no get_slice): the loader before slicing."""

    def __init__(self, source):
        self.source = source

    def names(self):
        return self.source.names()

    def get(self, name):
        return self.source.get(name)


def worker(mode: str, path: str, loader: str, fsdp: int, tensor: int) -> None:
    """Load `path` in `mode` and print the memory figures as one JSON line."""
    import resource

    import jax
    from flax import nnx
    from kto_jax import sharding as shd
    from kto_jax.models import hf_io, quantized_base
    from kto_jax.models.tensor_source import SafetensorsSource
    mesh = shd.make_mesh({"data": 1, "fsdp": fsdp, "tensor": tensor})
    rules = (("embed", "fsdp"), ("vocab", "tensor"), ("mlp", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"))
    hf_config, source = hf_io.read_hf_config(path), SafetensorsSource(path)
    if loader == "whole":
        source = WholeTensors(source)
    options = dict(mesh=mesh, rules=rules, param_dtype="bfloat16", dtype="bfloat16")
    before = _status("VmRSS")
    peak_anon = [_status("RssAnon")]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], _status("RssAnon"))
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    tracemalloc.start()  # numpy's host arrays (and Python bytes) are traced; XLA's device buffers are not
    cpu0 = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    if mode == "bf16":
        model, _ = hf_io.load_from_source(hf_config, source, **options)
        arrays = jax.tree.leaves(nnx.state(model))
    else:
        scheme, double = mode.removesuffix("_double"), mode.endswith("_double")
        base = quantized_base.load_quantized_from_source(hf_config, source, quantized_base.Quantization(scheme, double),
                                                         **options)
        arrays = jax.tree.leaves((base.params, base.layers))
    jax.block_until_ready(arrays)
    cpu = sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) - cpu0
    traced_now, traced_peak = tracemalloc.get_traced_memory()
    done.set()
    thread.join()
    mib = 1 << 20
    print(json.dumps({"mode": mode, "loader": loader, "devices": len(jax.devices()), "fsdp": fsdp,
                      "tensor": tensor, "rss_after_imports_mib": round(before / mib),
                      "peak_rss_mib": round(_status("VmHWM") / mib), "peak_anon_rss_mib": round(peak_anon[0] / mib),
                      "anon_rss_loaded_mib": round(_status("RssAnon") / mib),
                      "host_arrays_peak_mib": round(traced_peak / mib, 1),
                      "host_arrays_loaded_mib": round(traced_now / mib, 1),
                      "loaded_arrays_mib": round(sum(a.nbytes for a in arrays) / mib),
                      "cpu_s": round(cpu, 1)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/quantized_load_memory")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--loaders", default="sliced")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--fsdp", type=int, default=1)
    parser.add_argument("--tensor", type=int, default=1)
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--loader", default="sliced", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.model, args.loader, args.fsdp, args.tensor)
        return
    path = write_checkpoint(args.out, args.hidden, args.layers, args.vocab)
    size = os.path.getsize(os.path.join(path, "model.safetensors"))
    print(json.dumps({"checkpoint": path, "safetensors_mib": round(size / (1 << 20))}), flush=True)
    # A fixed mmap threshold: glibc returns each freed large block to the system at once, so
    # the anonymous RSS after loading is what is still held, not what malloc kept cached.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO, "MALLOC_MMAP_THRESHOLD_": "131072",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices}"}
    for mode in args.modes.split(","):
        for loader in args.loaders.split(","):  # interleaved: each mode's loaders back to back
            subprocess.run([sys.executable, __file__, f"--worker={mode}", f"--model={path}", f"--loader={loader}",
                            f"--fsdp={args.fsdp}", f"--tensor={args.tensor}"], env=env, check=True)


if __name__ == "__main__":
    main()
