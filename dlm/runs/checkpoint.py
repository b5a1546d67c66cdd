"""Orbax checkpoints of the train state and the data iterator, written atomically.

Orbax writes each step into a temporary folder and renames it when complete, so a run
killed mid-save leaves the previous checkpoint intact and the half-written one is ignored
(and cleaned up) by the next run. Saves are asynchronous: training continues while the
previous step is written; `close()` waits for the last one.
"""

from __future__ import annotations

import dataclasses
import pathlib

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Keeps the newest `keep` checkpoints under `WORKDIR/checkpoints/<step>`."""

    def __init__(self, workdir: str | pathlib.Path, keep: int, *, asynchronous: bool = True):
        directory = pathlib.Path(workdir).expanduser().resolve() / "checkpoints"
        self._manager = ocp.CheckpointManager(
            directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=asynchronous),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
            },
        )

    @property
    def directory(self) -> pathlib.Path:
        return pathlib.Path(str(self._manager.directory))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, data_iterator: grain.DatasetIterator | None) -> None:
        """Starts writing `state` (and the iterator position) as checkpoint `step`."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state, data_iterator=None):
        """Returns the state saved at `step`; also moves `data_iterator` to its position.

        `abstract_state` gives the structure, shapes, dtypes and shardings to restore into
        (e.g. `jax.eval_shape` of the initial state with shardings attached).
        """
        target, absent = abstract_state, {}
        if dataclasses.is_dataclass(abstract_state):
            # A field that is None now and was not saved (e.g. `process_state`, added after
            # the checkpoint was written) is left out of the restore and kept as None.
            saved = self._manager.item_metadata(step)["state"]
            fields = {f.name: getattr(abstract_state, f.name)
                      for f in dataclasses.fields(abstract_state)}
            absent = {k: v for k, v in fields.items() if v is None and k not in saved}
            if absent:
                target = {k: v for k, v in fields.items() if k not in absent}
        items = {"state": ocp.args.StandardRestore(target)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))["state"]
        return abstract_state.replace(**restored) if absent else restored

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def restore_from_workdir(workdir, abstract_state, *, step: int | None = None):
    """Returns (state, step) of checkpoint `step` (default: the latest) in `workdir`.

    Raises FileNotFoundError naming the available steps when there is no such checkpoint.
    """
    checkpointer = Checkpointer(workdir, keep=1_000_000)  # reading only: never deletes
    try:
        step = _existing_step(checkpointer, step)
        return checkpointer.restore(step, abstract_state), step
    finally:
        checkpointer.close()


def _existing_step(checkpointer: Checkpointer, step: int | None) -> int:
    """`step`, or the latest when None; FileNotFoundError naming the available steps."""
    step = checkpointer.latest_step() if step is None else step
    if step is None or step not in checkpointer.all_steps():
        raise FileNotFoundError(f"no checkpoint {step} in {checkpointer.directory}; "
                                f"available: {checkpointer.all_steps()}")
    return step


def restore_fields(workdir, abstract_fields: dict, *, step: int | None = None
                   ) -> tuple[dict, int]:
    """Returns ({field: value}, step) for some fields of a saved train state (e.g. params and
    ema_params), whatever the rest of the saved state holds; a field the checkpoint lacks (or
    saved as None) comes back as None.

    Raises FileNotFoundError naming the available steps when there is no such checkpoint.
    """
    checkpointer = Checkpointer(workdir, keep=1_000_000)  # reading only: never deletes
    try:
        step = _existing_step(checkpointer, step)
        path = checkpointer.directory / str(step) / "state"
    finally:
        checkpointer.close()
    with ocp.PyTreeCheckpointer() as reader:
        saved = reader.metadata(path).item_metadata
        present = {k: v for k, v in abstract_fields.items()
                   if k in saved and jax.tree.leaves(saved[k])}
        restored = reader.restore(path, args=ocp.args.PyTreeRestore(
            item=present, restore_args=ocp.checkpoint_utils.construct_restore_args(present),
            partial_restore=True))
    missing = [f"{k}.{jax.tree_util.keystr(path, simple=True, separator='.')}"
               for k in present
               for path, leaf in jax.tree_util.tree_leaves_with_path(restored.get(k))
               if isinstance(leaf, jax.ShapeDtypeStruct)]
    if missing:  # a partial restore leaves what the checkpoint lacks abstract
        raise ValueError(f"checkpoint {step} in {checkpointer.directory} lacks "
                         f"{len(missing)} arrays of the expected structure: {missing[:6]}")
    return {k: restored.get(k) for k in abstract_fields}, step


def abstract_like(state):
    """Shape/dtype/sharding skeleton of `state` for `Checkpointer.restore`."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
