"""The device mesh and the one table that maps logical axis names to mesh axes.

Layers name logical axes only ('vocab', 'embed', 'mlp', 'heads', 'kv_heads',
'head_dim', 'layers', 'batch', 'length', and 'expert' for a mixture of experts'
expert weights); `config.mesh.rules` maps each to a mesh axis of ('data', 'fsdp',
'expert', 'tensor'), a tuple of them, or None (replicated), as MaxText does. A
one-device mesh is just a mesh whose axes all have size 1; the 'expert' axis has size 1
unless config.mesh.expert says otherwise (it shards the batch like 'data' and the
experts of each layer: expert parallelism).

Activations are named the same way: the model calls `constrain(x, ('batch',
'length', 'embed'))`, which pins x to that layout on the mesh being traced for,
so XLA gathers the fsdp-sharded weights (ZeRO-3) instead of the activations. The
model stays mesh-agnostic: `constrain` is a no-op unless the caller traces under
a mesh AND a rule table (`activation_sharding(fn, mesh, rules)` wraps a function
to be jitted; the train step, reference and sampling programs use it).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from kto_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "expert", "tensor")
Rules = Sequence[tuple[str, Any]]


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolve ('data', 'fsdp', 'expert', 'tensor') sizes; one -1 takes the devices left over.

    Raises UserError when the sizes do not multiply to `num_devices`.
    """
    shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
    unknown = [i for i, s in enumerate(shape) if s == -1]
    if len(unknown) > 1 or any(s == 0 or s < -1 for s in shape):
        raise UserError(f"mesh sizes {dict(zip(MESH_AXES, shape))}: use positive sizes and at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if unknown:
        if num_devices % known:
            raise UserError(f"mesh sizes {dict(zip(MESH_AXES, shape))} do not divide the {num_devices} devices; "
                            f"make config.mesh.fsdp * config.mesh.expert * config.mesh.tensor a divisor of {num_devices}")
        shape[unknown[0]] = num_devices // known
    if math.prod(shape) != num_devices:
        raise UserError(f"mesh sizes {dict(zip(MESH_AXES, shape))} need {math.prod(shape)} devices but "
                        f"{num_devices} are present; set one of config.mesh.data/fsdp/expert/tensor to -1")
    return tuple(shape)


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh with axes ('data', 'fsdp', 'expert', 'tensor') of Auto type, sizes from `mesh_cfg`.

    Args:
      mesh_cfg: config.mesh (or any mapping/object with data, fsdp, expert, tensor sizes;
        absent ones 1, data -1).
      devices: devices to use; default all of `jax.devices()`.
    """
    devices = list(devices) if devices is not None else jax.devices()
    sizes = {a: _get(mesh_cfg, a, -1 if a == "data" else 1) for a in MESH_AXES}
    shape = mesh_shape(sizes, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def single_device_mesh() -> Mesh:
    """A ('data', 'fsdp', 'expert', 'tensor') mesh of size 1 on the first device."""
    return make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def rules_of(mesh_cfg_or_rules: Any) -> tuple[tuple[str, Any], ...]:
    """The rule table from config.mesh (its `rules`) or from a bare sequence of pairs."""
    rules = _get(mesh_cfg_or_rules, "rules", None)
    if rules is None and not isinstance(mesh_cfg_or_rules, Mapping):
        rules = mesh_cfg_or_rules
    return tuple((str(name), tuple(ax) if isinstance(ax, list) else ax) for name, ax in rules or ())


def logical_to_mesh(logical_axes: Iterable[str | None], rules: Rules,
                    shape: Sequence[int] | None = None, mesh: Mesh | None = None) -> PartitionSpec:
    """PartitionSpec of an array whose dims carry `logical_axes`.

    A logical name without a rule, or mapped to None, is replicated. A mesh axis
    is used by at most one dim (the first that asks); with `mesh`, one the mesh lacks
    (a mesh built without 'expert') is left out. With `shape` and `mesh`, a
    mesh axis whose size does not divide the dim is dropped (that dim is
    replicated) instead of failing, e.g. 2 kv_heads on tensor=4.
    """
    table = dict(rules_of(rules))
    used: set[str] = set()
    spec = []
    for i, name in enumerate(logical_axes):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and (mesh is None or a in mesh.shape))
        if shape is not None and mesh is not None:
            axes = _dividing_axes(axes, shape[i], mesh)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def batch_shards(mesh: Mesh, rules: Rules) -> int:
    """How many ways the 'batch' logical rule splits a batch's example axis on `mesh`."""
    return math.prod(mesh.shape.get(a, 1) for a in batch_axes(rules))


def configured_batch_shards(mesh_cfg: Any, num_devices: int) -> int:
    """`batch_shards` of the mesh `make_mesh(mesh_cfg)` would build on `num_devices` devices,
    without building it (the data pipeline packs one group of rows per batch shard)."""
    sizes = {a: _get(mesh_cfg, a, -1 if a == "data" else 1) for a in MESH_AXES}
    shape = dict(zip(MESH_AXES, mesh_shape(sizes, num_devices)))
    return math.prod(shape[a] for a in batch_axes(rules_of(mesh_cfg)))


def batch_axes(rules: Rules) -> tuple[str, ...]:
    """The mesh axes the 'batch' logical rule maps to (empty: replicated)."""
    spec = logical_to_mesh(("batch",), rules)[0]
    return (spec,) if isinstance(spec, str) else tuple(spec or ())


def _dividing_axes(axes: tuple[str, ...], dim: int, mesh: Mesh) -> tuple[str, ...]:
    kept: list[str] = []
    for a in axes:
        if dim % (math.prod(mesh.shape[k] for k in kept) * mesh.shape[a]) == 0:
            kept.append(a)
    return tuple(kept)


def _logical_axes_of(var: nnx.Variable) -> tuple[str | None, ...]:
    axes = var.get_metadata().get("out_sharding")
    return tuple(axes) if axes else (None,) * len(np.shape(var.get_value()))


def partition_specs(state: Any, rules: Rules, mesh: Mesh | None = None) -> Any:
    """The state's tree with each Variable's value replaced by its PartitionSpec."""
    def spec(x):
        if isinstance(x, nnx.Variable):
            return x.replace(logical_to_mesh(_logical_axes_of(x), rules, np.shape(x.get_value()), mesh))
        return PartitionSpec()
    return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def named_shardings(state: Any, mesh: Mesh, rules: Rules) -> Any:
    """The state's tree with each Variable's value replaced by its NamedSharding on `mesh`.

    `state` is an NNX state (concrete or from `nnx.eval_shape`); the result has the
    same tree structure, so it serves as jit in/out shardings.
    """
    specs = partition_specs(state, rules, mesh)
    return jax.tree.map(lambda p: NamedSharding(mesh, p), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def sharding_for(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                 rules: Rules) -> NamedSharding:
    """NamedSharding of one array with the given logical axes and shape."""
    return NamedSharding(mesh, logical_to_mesh(logical_axes, rules, shape, mesh))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules) -> nnx.Module:
    """Move every Variable of `model` onto its logical sharding (in place); returns the model."""
    state = nnx.state(model)
    shardings = named_shardings(state, mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))
    return model


# ---- activations ----

_ACTIVATION_RULES: contextvars.ContextVar[tuple | None] = contextvars.ContextVar(
    "kto_jax_activation_rules", default=None)


@contextlib.contextmanager
def activation_rules(rules: Rules | None) -> Iterator[None]:
    """While active (at trace time), `constrain` maps logical axes through `rules`."""
    token = _ACTIVATION_RULES.set(None if rules is None else rules_of(rules))
    try:
        yield
    finally:
        _ACTIVATION_RULES.reset(token)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """x pinned to the sharding its logical axes get on the current mesh; else x unchanged.

    A no-op outside `activation_rules` or without a mesh (`jax.set_mesh`), so the
    model runs unchanged on one device and in eager tests. A mesh axis that does
    not divide its dim is dropped (`logical_to_mesh` with the shape).
    """
    rules = _ACTIVATION_RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_mesh(logical_axes, rules, x.shape, mesh))


def current_spec(logical_axes: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec | None:
    """The PartitionSpec `constrain` pins an array of `shape` to on the mesh being traced for;
    None outside `activation_rules` or without a mesh (what a shard_map inside the model reads)."""
    rules = _ACTIVATION_RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return None
    return logical_to_mesh(logical_axes, rules, shape, mesh)


def activation_sharding(fn: Callable, mesh: Mesh, rules: Rules) -> Callable:
    """`fn` that, when traced, runs under `rules` and (if none is set) `mesh`'s abstract mesh.

    Wrap the function given to `jax.jit`, so its activations follow the logical
    rules whether or not the caller entered `jax.set_mesh(mesh)`.
    """
    rules = rules_of(rules)

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        ambient = jax.sharding.get_abstract_mesh()
        with contextlib.ExitStack() as stack:
            stack.enter_context(activation_rules(rules))
            if ambient.empty:
                stack.enter_context(jax.sharding.use_abstract_mesh(mesh.abstract_mesh))
            return fn(*args, **kwargs)
    return traced
