"""Orbax training checkpoints: train state, data-iterator state and resolved config.

One `CheckpointManager` under WORKDIR/checkpoints holds, per saved step, three items:

  state   the train-state pytree (params, optimizer state, step, RNG), saved
          asynchronously straight from its sharded device buffers;
  data    the grain iterator state, one JSON file per process (each process reads
          its own shard, so each has its own position);
  config  the resolved run config as JSON;
  meta    small JSON the loop needs to continue exactly (e.g. its metrics window).

A resume restores `state` onto the shardings of an *abstract* target
(`jax.ShapeDtypeStruct`s carrying `.sharding`), so no process ever holds the
whole model, and moves the data iterator to exactly the next example. Orbax
writes each step to a temporary directory and renames it when complete, so a
SIGKILL during a save leaves the previous checkpoint as the latest.

Faults (kto_jax/train/checkpoint_faults.py): a newest checkpoint that cannot be
restored is reported in one line, renamed to `<step>.corrupt-<time>` and the next
newest is tried; a failed save (disk full, permission) raises `CheckpointSaveError`
at the next step (async saves fail in a background thread), after removing its
temporary directory, so the last good checkpoint stays the latest.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Callable

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from kto_jax.errors import UserError
from kto_jax.train import checkpoint_faults as faults
from kto_jax import fs as paths

STATE, DATA, CONFIG, META = "state", "data", "config", "meta"


class IteratorSnapshot:
    """The state of a data iterator frozen at save time, in grain's checkpoint protocol.

    grain's `CheckpointHandler` asks its item for `get_state()` (bytes) when the
    write happens; snapshotting first means an async save can never record a
    position the training loop has already moved past. On restore it receives the
    saved bytes through `set_state`, which `apply_to` then hands to the live iterator.
    """

    def __init__(self, state: Any = None):
        self._state = state

    @classmethod
    def of(cls, iterator: Any) -> "IteratorSnapshot":
        return cls(iterator.get_state())

    def get_state(self) -> bytes:
        state = self._state
        if isinstance(state, bytes):
            return state
        if isinstance(state, str):
            return state.encode()
        return json.dumps(state, sort_keys=True).encode()

    def set_state(self, state: bytes) -> None:
        self._state = state

    def start_prefetch(self) -> None:
        """Part of grain's restore protocol; the live iterator prefetches, not the snapshot."""

    def apply_to(self, iterator: Any) -> None:
        """Moves `iterator` to the snapshot's position (dict states as JSON, else bytes)."""
        raw = self.get_state()
        try:
            current = iterator.get_state()
        except Exception:  # an iterator that cannot report a state before its first element
            current = None
        if isinstance(current, (bytes, str)):
            iterator.set_state(raw if isinstance(current, bytes) else raw.decode())
        else:
            iterator.set_state(json.loads(raw.decode()))


def _to_storable(state: Any) -> Any:
    """Typed PRNG keys become their uint32 key data: Orbax stores plain arrays."""
    def leaf(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key_data(x)
        return x
    return jax.tree.map(leaf, state)


def _abstract_storable(abstract_state: Any) -> Any:
    """The storable counterpart of an abstract state (key leaves -> uint32 key data)."""
    def leaf(x):
        if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = jax.eval_shape(jax.random.key_data, x)
            sharding = getattr(x, "sharding", None)
            return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=_key_data_sharding(sharding))
        return x
    return jax.tree.map(leaf, abstract_state)


def _key_data_sharding(sharding):
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,)
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
    return sharding


def _from_storable(restored: Any, abstract_state: Any) -> Any:
    def leaf(x, target):
        if hasattr(target, "dtype") and jax.dtypes.issubdtype(target.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(x, impl=_key_impl(target))
        return x
    return jax.tree.map(leaf, restored, abstract_state)


def _pytree_restore(target: Any, partial: bool = False) -> ocp.args.PyTreeRestore:
    """Restore args placing every array on the sharding its target names."""
    return ocp.args.PyTreeRestore(item=target,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=partial)


def _key_impl(target):
    if isinstance(target, jax.Array):
        return jax.random.key_impl(target)
    # An abstract key has no public accessor for its PRNG implementation.
    return target.dtype._impl  # pylint: disable=protected-access


def abstract_like(state: Any) -> Any:
    """`ShapeDtypeStruct`s (with shardings) describing a concrete state: a restore target."""
    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x
    return jax.tree.map(leaf, state)


class CheckpointSaveError(UserError):
    """A checkpoint could not be written; training must stop (the message says why and where)."""


class Checkpointer:
    """Saves and restores a run's training state under `directory`.

    Args:
      directory: where step directories go (created if missing).
      every_steps: `maybe_save` writes when `step % every_steps == 0`.
      keep: how many of the most recent checkpoints to keep.
      async_save: write in a background thread while training continues.
      read_only: only restore (export): never create, clean up or delete anything
        (an unreadable newest checkpoint is still renamed aside, never deleted).
      log: where one-line warnings go (default: stderr of process 0).
    """

    def __init__(self, directory: str, *, every_steps: int = 1, keep: int = 1,
                 async_save: bool = True, read_only: bool = False,
                 log: Callable[[str], None] = faults.log_line):
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=0 if read_only else max(int(every_steps), 1),
            max_to_keep=None if read_only else max(int(keep), 1),
            enable_async_checkpointing=bool(async_save),
            create=not read_only,
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
        )
        self.directory = paths.resolve(directory)
        self.every_steps = max(int(every_steps), 1)
        self.keep = max(int(keep), 1)
        self._log = log
        self._pending_step: int | None = None   # an async save not yet known to have finished
        self._checkpoint_bytes: int | None = None  # set (and free space checked) at the first save
        self._failed = False
        faults.quiet_orbax_errors()
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=(STATE, DATA, CONFIG, META))

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: Any, config_json: str, *,
             meta: dict | None = None, force: bool = False) -> bool:
        """Saves `step` if it is due (or `force`); returns whether a save started.

        The device buffers are copied before this returns, so the caller may donate
        `state` to the next step at once; the write itself may still be running.
        """
        self.raise_if_save_failed()
        if not force and step % self.every_steps != 0:
            return False
        if step in self._manager.all_steps():
            return False
        storable = _to_storable(state)
        if self._checkpoint_bytes is None:
            self._checkpoint_bytes = faults.state_bytes(storable)
            self._warn_if_low_space()
        args = ocp.args.Composite(**{
            STATE: ocp.args.PyTreeSave(storable),
            DATA: grain.checkpoint.CheckpointSave(IteratorSnapshot.of(data_iterator)),
            CONFIG: ocp.args.JsonSave(json.loads(config_json)),
            META: ocp.args.JsonSave(meta or {}),
        })
        try:
            faults.probe_writable(self.directory)
            started = bool(self._manager.save(int(step), args=args, force=True))
        except Exception as err:  # pylint: disable=broad-except
            self._fail(int(step), err)
        if started:
            self._pending_step = int(step)
        return started

    def raise_if_save_failed(self) -> None:
        """Raises CheckpointSaveError once a background save has failed (cheap; call every step)."""
        if self._pending_step is None or self._manager.is_saving_in_progress():
            return
        self._finish_pending()

    def _finish_pending(self) -> None:
        try:
            self._manager.wait_until_finished()
        except Exception as err:  # pylint: disable=broad-except
            self._fail(self._pending_step, err)
        self._pending_step = None

    def _warn_if_low_space(self) -> None:
        free = faults.free_bytes(self.directory)
        need = self._checkpoint_bytes * self.keep
        if free is not None and free < need:
            self._log(f"warning: {faults.human_bytes(free)} free in {self.directory}, but keeping "
                      f"{self.keep} checkpoint(s) of about {faults.human_bytes(self._checkpoint_bytes)} "
                      f"each needs {faults.human_bytes(need)} (one more while a new one is written).")

    def _fail(self, step: int | None, err: BaseException) -> None:
        """Cleans up after a failed save of `step` and raises CheckpointSaveError."""
        self._failed, self._pending_step = True, None
        if step is not None:
            faults.remove_temporary(self.directory, step)
        size = self._checkpoint_bytes or 0
        free = faults.free_bytes(self.directory)
        room = "" if free is None else f", {faults.human_bytes(free)} free there"
        try:
            self._manager.reload()
            last = self._manager.latest_step()
        except Exception:  # pylint: disable=broad-except
            last = None
        kept = (f"the last good checkpoint, step {last}, is intact" if last is not None
                else "no earlier checkpoint exists")
        raise CheckpointSaveError(
            f"cannot save the checkpoint of step {step} to {self.directory}: "
            f"{faults.save_failure_reason(err)}. One checkpoint needs about "
            f"{faults.human_bytes(size)}{room}; {kept}. Training stopped: free space (or fix the "
            "permissions) and re-run the same command to resume.") from None

    def restore(self, abstract_state: Any, data_iterator: Any = None, *,
                step: int | None = None) -> tuple[Any, int]:
        """Restores the state (onto `abstract_state`'s shardings) and the iterator position.

        Args:
          abstract_state: pytree of `jax.ShapeDtypeStruct` with `.sharding` (or concrete
            arrays, whose shapes/shardings are used) matching the saved state.
          data_iterator: the live iterator to move to the saved position, or None.
          step: which checkpoint; the latest when None.

        Returns:
          (state, step).
        """
        target = _abstract_storable(abstract_like(abstract_state))

        def read(step: int) -> Any:
            self._check_saved_shapes(step, target)
            items = {STATE: _pytree_restore(target)}
            if data_iterator is not None:
                items[DATA] = grain.checkpoint.CheckpointRestore(IteratorSnapshot())
            return self._manager.restore(step, args=ocp.args.Composite(**items))

        restored, step = self.restore_newest(read, step=step)
        if data_iterator is not None:
            restored[DATA].apply_to(data_iterator)
        return _from_storable(restored[STATE], abstract_state), step

    def restore_newest(self, read: Callable[[int], Any], *, step: int | None = None
                       ) -> tuple[Any, int]:
        """(read(step), step) for `step`, or for the newest checkpoint `read` succeeds on.

        A checkpoint `read` fails on (truncated array file, missing metadata) is
        reported in one line and renamed to `<step>.corrupt-<time>`; the next newest
        is tried. A `UserError` from `read` (e.g. a different model) is raised as is.
        """
        if step is not None:
            step = self._resolve_step(step)
            try:
                return read(step), step
            except UserError:
                raise
            except Exception as err:  # pylint: disable=broad-except
                raise UserError(f"checkpoint {paths.join(self.directory, str(step))} cannot be "
                                f"restored: {faults.one_line(err)}") from None
        set_aside = []
        while True:
            step = self._manager.latest_step()
            if step is None:
                raise UserError(f"no checkpoint in {self.directory} can be restored; set aside: "
                                f"{', '.join(set_aside) or 'none'}. Re-run to start from step 0, "
                                "or pass a new --workdir.")
            try:
                return read(step), step
            except UserError:
                raise
            except Exception as err:  # pylint: disable=broad-except
                moved = faults.set_aside(self.directory, step)
                set_aside.append(moved)
                self._manager.reload()
                self._log(f"warning: checkpoint {paths.join(self.directory, str(step))} cannot be "
                          f"restored ({faults.one_line(err)}); set aside as {moved}; trying the "
                          "previous one.")

    def _check_saved_shapes(self, step: int, target: Any) -> None:
        """UserError when the saved state cannot hold `target`'s arrays (another model);
        an exception of another type when the saved metadata is missing (a damaged checkpoint)."""
        from etils import epath  # pylint: disable=import-outside-toplevel
        metadata = ocp.PyTreeCheckpointHandler().metadata(
            epath.Path(paths.join(self.directory, str(step), STATE)))
        tree = getattr(metadata, "tree", metadata)
        saved = Counter(tuple(x.shape) for x in jax.tree.leaves(
            tree, is_leaf=lambda x: hasattr(x, "shape")) if hasattr(x, "shape"))
        wanted = Counter(tuple(x.shape) for x in jax.tree.leaves(target) if hasattr(x, "shape"))
        missing = wanted - saved
        if missing:
            shape = next(iter(missing))
            raise UserError(f"checkpoint {paths.join(self.directory, str(step))} holds no array of "
                            f"shape {shape}, which this run's state has: it was saved by a run of "
                            "another model or optimizer. Use a new --workdir for a different model.")

    def restore_subtree(self, name: str, abstract: Any, *, step: int | None = None) -> tuple[Any, int]:
        """Restores only the top-level field `name` of the saved state (e.g. "params" to export).

        The rest of the state (optimizer moments: twice the parameters) is never read.
        """
        target = {name: _abstract_storable(abstract_like(abstract))}

        def read(step: int) -> Any:
            self._check_saved_shapes(step, target)
            return self._manager.restore(step, args=ocp.args.Composite(
                **{STATE: _pytree_restore(target, partial=True)}))

        restored, step = self.restore_newest(read, step=step)
        return _from_storable(restored[STATE][name], abstract), step

    def restore_config(self, step: int | None = None) -> dict:
        """The resolved config saved with a checkpoint, as a plain dict."""
        return self._restore_json(CONFIG, step)

    def restore_meta(self, step: int | None = None) -> dict:
        """The `meta` dict saved with a checkpoint."""
        return self._restore_json(META, step)

    def _restore_json(self, item: str, step: int | None) -> dict:
        restored, _ = self.restore_newest(lambda s: self._manager.restore(
            s, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()})), step=step)
        return dict(restored[item] or {})

    def state_metadata(self, step: int | None = None) -> Any:
        """The saved state's tree of shapes and dtypes, without reading arrays."""
        step = self._resolve_step(step)
        return self._manager.item_metadata(step)[STATE]

    def _resolve_step(self, step: int | None) -> int:
        steps = self._manager.all_steps()
        if step is None:
            step = self._manager.latest_step()
        if step is None or step not in steps:
            raise UserError(f"no checkpoint for step {step} in {self.directory}; "
                            f"saved steps: {sorted(steps) or 'none'}.")
        return int(step)

    def wait(self) -> None:
        """Blocks until every pending async save is on disk (CheckpointSaveError if one failed)."""
        if self._pending_step is not None:
            self._finish_pending()
        else:
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves, then releases the manager's threads.

        After a failed save (already reported) nothing more is raised.
        """
        try:
            if not self._failed:
                self.wait()
        finally:
            try:
                self._manager.close()
            except Exception:  # pylint: disable=broad-except
                if not self._failed:
                    raise


def numpy_state(state: Any) -> Any:
    """Host copies of every array in `state` (for tests and small exports)."""
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)) if isinstance(x, jax.Array) else x,
                        _to_storable(state))
