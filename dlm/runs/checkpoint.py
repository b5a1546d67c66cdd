"""Orbax checkpoints of the train state and the data iterator, written atomically and
verified before they are read.

Orbax writes each step into a temporary folder and renames it when complete, so a run
killed mid-save leaves the previous checkpoint intact and the half-written one is ignored
(and cleaned up) by the next run. Saves are asynchronous: training continues while the
previous step is written; `close()` waits for the last one.

Integrity: once a step's save has completed, process 0 writes its manifest,
`checkpoints/<step>/dlm_manifest.json` (every file's size and CRC-32), atomically (a
temporary file renamed). Every restore verifies the manifest first; a file that is missing,
truncated, overwritten or changed makes the step *damaged* (`CheckpointError`, naming the
file and the intact steps). A step without a manifest (written before manifests existed, or
by a run killed between the save and its manifest) is *unverified*: it is read as before, and
a failure to read it is a damaged step too. Training resumes from the newest intact step
(`Checkpointer.restore_latest`) and moves newer damaged steps to `checkpoints_damaged/`,
out of the rotation, never deleting them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import zlib

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

MANIFEST_FILE = "dlm_manifest.json"
DAMAGED_DIR = "checkpoints_damaged"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names it and the intact steps."""


def _crc32(path: pathlib.Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_manifest(step_dir: pathlib.Path) -> None:
    """Writes `step_dir/dlm_manifest.json`: {relative path: [size, crc32]} of every file in
    the step's folder, atomically."""
    files = {str(path.relative_to(step_dir)): [path.stat().st_size, _crc32(path)]
             for path in sorted(step_dir.rglob("*"))
             if path.is_file() and path.name != MANIFEST_FILE and not path.name.endswith(".tmp")}
    tmp = step_dir / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps({"version": 1, "files": files}, indent=0))
    os.replace(tmp, step_dir / MANIFEST_FILE)


def verify(step_dir: pathlib.Path) -> str | None:
    """None when `step_dir` matches its manifest, else what is wrong. Raises
    FileNotFoundError when it has no manifest (an unverified step)."""
    manifest = step_dir / MANIFEST_FILE
    if not manifest.is_file():
        raise FileNotFoundError(f"{step_dir} has no {MANIFEST_FILE}")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST_FILE} is not readable"
    for name, (size, crc) in files.items():
        path = step_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
        if _crc32(path) != crc:
            return f"{name} differs from what was written (CRC-32)"
    return None


class Checkpointer:
    """Keeps the newest `keep` checkpoints under `WORKDIR/checkpoints/<step>`, each with its
    manifest once written."""

    def __init__(self, workdir: str | pathlib.Path, keep: int, *, asynchronous: bool = True):
        directory = pathlib.Path(workdir).expanduser().resolve() / "checkpoints"
        self._pending: int | None = None  # a step whose save may still be in flight
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
        """Starts writing `state` (and the iterator position) as checkpoint `step`, after the
        previous save completed and got its manifest."""
        self.wait()
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        try:
            self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as error:
            raise self._save_failed(step, error) from error
        self._pending = step

    def _save_failed(self, step: int, error: Exception) -> CheckpointError:
        """The error of a save that failed (disk full, permissions), naming the intact
        checkpoints a later run resumes from."""
        intact = [s for s in sorted(set(self.all_steps()) - {step})
                  if self.step_dir(s).is_dir() and self.status(s) in (None, "unverified")]
        resume = (f"checkpoints {', '.join(map(str, intact))} are intact: fix the cause and "
                  f"run again to resume from {intact[-1]}" if intact else
                  "no earlier checkpoint exists: fix the cause and run again")
        return CheckpointError(f"saving checkpoint {step} in {self.directory} failed "
                               f"({type(error).__name__}: {str(error)[:300]}); {resume}")

    def step_dir(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def status(self, step: int) -> str | None:
        """None for an intact step, 'unverified' for one without a manifest, else what is
        wrong with it."""
        try:
            return verify(self.step_dir(step))
        except FileNotFoundError:
            return "unverified"

    def check(self, step: int) -> None:
        """Raises CheckpointError when checkpoint `step` does not match its manifest."""
        problem = self.status(step)
        if problem not in (None, "unverified"):
            raise CheckpointError(self._damaged_message(step, problem))

    def _damaged_message(self, step: int, problem: str) -> str:
        others = [s for s in self.all_steps() if s != step
                  and self.status(s) in (None, "unverified")]
        fix = (f"intact: {', '.join(map(str, others))} (e.g. --checkpoint_step={others[-1]})"
               if others else "no other checkpoint is intact")
        return f"checkpoint {step} in {self.directory} is damaged ({problem}); {fix}"

    def restore_latest(self, abstract_state, data_iterator=None):
        """(state, step) from the newest checkpoint that verifies (or, without a manifest,
        reads), or (None, None) when there is none at all. Newer damaged steps are logged and
        moved to WORKDIR/checkpoints_damaged/ (process 0), out of the rotation. Raises
        CheckpointError listing each step and why when no checkpoint can be used; an intact
        step that does not read (the config's model differs from the run's) raises as is."""
        problems = {}
        for step in sorted(self.all_steps(), reverse=True):
            problem = self.status(step)
            if problem == "unverified":
                logging.warning("checkpoint %d has no manifest (written before manifests, or "
                                "the run stopped before writing it): reading it unverified",
                                step)
            if problem in (None, "unverified"):
                try:
                    state = self.restore(step, abstract_state, data_iterator, verified=True)
                except Exception as error:
                    if problem is None:  # intact files that do not read (another model's
                        raise  # tree): not damage, so nothing is skipped or moved
                    problem = f"unreadable: {type(error).__name__}: {str(error)[:300]}"
                else:
                    self._move_damaged(problems)
                    return state, step
            logging.warning("checkpoint %d in %s is damaged (%s); trying the previous one",
                            step, self.directory, problem)
            problems[step] = problem
        if problems:
            listing = "; ".join(f"{step}: {why}" for step, why in problems.items())
            raise CheckpointError(f"no checkpoint in {self.directory} can be used: {listing}")
        return None, None

    def _move_damaged(self, problems: dict[int, str]) -> None:
        """Moves the damaged steps to WORKDIR/checkpoints_damaged/<step> (process 0)."""
        if not problems:
            return
        if jax.process_index() == 0:
            target = self.directory.parent / DAMAGED_DIR
            target.mkdir(exist_ok=True)
            for step in problems:
                destination = target / str(step)
                suffix = 0
                while destination.exists():
                    suffix += 1
                    destination = target / f"{step}.{suffix}"
                os.replace(self.step_dir(step), destination)
                logging.warning("moved damaged checkpoint %d to %s", step, destination)
        from dlm.parallel import distributed

        distributed.barrier("dlm_damaged_checkpoints_moved")
        self._manager.reload()

    def restore(self, step: int, abstract_state, data_iterator=None, *, verified: bool = False):
        """Returns the state saved at `step`; also moves `data_iterator` to its position.

        `abstract_state` gives the structure, shapes, dtypes and shardings to restore into
        (e.g. `jax.eval_shape` of the initial state with shardings attached). The step is
        checked against its manifest first (unless `verified`): CheckpointError if damaged.
        """
        if not verified:
            self.check(step)
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
        """Waits for the save in flight, then writes its manifest (process 0). Raises
        CheckpointError when that save failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as error:
            step, self._pending = self._pending, None
            raise self._save_failed(step, error) from error
        if self._pending is not None:
            step_dir = self.step_dir(self._pending)
            if jax.process_index() == 0 and step_dir.is_dir():
                write_manifest(step_dir)
            self._pending = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            try:
                self._manager.close()
            except Exception:  # noqa: BLE001 (the save's own error is already raised)
                logging.warning("closing the checkpoint manager failed", exc_info=True)


def restore_from_workdir(workdir, abstract_state, *, step: int | None = None):
    """Returns (state, step) of checkpoint `step` (default: the latest) in `workdir`.

    Raises FileNotFoundError naming the available steps when there is no such checkpoint.
    """
    checkpointer = Checkpointer(workdir, keep=1_000_000)  # reading only: never deletes
    try:
        step = _existing_step(checkpointer, step)
        return _read(checkpointer, step,
                     lambda: checkpointer.restore(step, abstract_state, verified=True)), step
    finally:
        checkpointer.close()


def _read(checkpointer: Checkpointer, step: int, read):
    """`read()` of checkpoint `step` after checking its manifest; a failure to read an
    unverified step is a CheckpointError naming it (and the intact steps)."""
    problem = checkpointer.status(step)
    if problem not in (None, "unverified"):
        raise CheckpointError(checkpointer._damaged_message(step, problem))
    if problem == "unverified":
        logging.warning("checkpoint %d in %s has no manifest (saved before manifests, or the "
                        "run stopped before writing it): reading it unverified", step,
                        checkpointer.directory)
    try:
        return read()
    except CheckpointError:
        raise
    except Exception as error:
        if problem != "unverified":
            raise  # verified files that do not read: not damage (e.g. another model's tree)
        raise CheckpointError(checkpointer._damaged_message(
            step, f"unreadable: {type(error).__name__}: {str(error)[:300]}")) from error


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
        path = checkpointer.step_dir(step) / "state"
        restored = _read(checkpointer, step, lambda: _read_fields(path, abstract_fields))
    finally:
        checkpointer.close()
    missing = [f"{k}.{jax.tree_util.keystr(key_path, simple=True, separator='.')}"
               for k, value in restored.items()
               for key_path, leaf in jax.tree_util.tree_leaves_with_path(value)
               if isinstance(leaf, jax.ShapeDtypeStruct)]
    if missing:  # a partial restore leaves what the checkpoint lacks abstract
        raise ValueError(f"checkpoint {step} in {checkpointer.directory} lacks "
                         f"{len(missing)} arrays of the expected structure: {missing[:6]}")
    return {k: restored.get(k) for k in abstract_fields}, step


def _read_fields(path: pathlib.Path, abstract_fields: dict) -> dict:
    with ocp.PyTreeCheckpointer() as reader:
        saved = reader.metadata(path).item_metadata
        present = {k: v for k, v in abstract_fields.items()
                   if k in saved and jax.tree.leaves(saved[k])}
        return reader.restore(path, args=ocp.args.PyTreeRestore(
            item=present, restore_args=ocp.checkpoint_utils.construct_restore_args(present),
            partial_restore=True))


def abstract_like(state):
    """Shape/dtype/sharding skeleton of `state` for `Checkpointer.restore`."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
