"""Checkpoint integrity (manifests, fallback to the newest intact step, damaged steps moved
aside) and expected errors as one line from the command line."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import small_config, train_losses

from configs import mdlm
from dlm.data import pipeline
from dlm.runs import checkpoint as checkpoint_lib
from dlm.training import experiment, trainer

# One file of each kind in a checkpoint folder, relative to checkpoints/<step>/.
FILE_KINDS = {
    "array data": lambda step_dir: sorted((step_dir / "state").glob("ocdbt.process_0/d/*"))[0],
    "metadata": lambda step_dir: step_dir / "state" / "_METADATA",
    "sharding": lambda step_dir: step_dir / "state" / "_sharding",
    "data iterator": lambda step_dir: sorted(p for p in (step_dir / "data").rglob("*")
                                             if p.is_file())[0],
}


def _damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "overwrite":  # same size, other bytes
        path.write_bytes(bytes((b + 1) % 256 for b in data) if data else b"x")
    elif how == "truncate":
        path.write_bytes(data[:len(data) // 2])
    else:
        path.unlink()


def _config(data_dir, **overrides):
    return small_config(data_dir, mdlm, **{"total_steps": 4, "checkpoint_every": 2,
                                           "keep_checkpoints": 3, **overrides})


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A 4-step run with checkpoints 2 and 4 (each with its manifest), and its experiment."""
    data_dir = tmp_path_factory.mktemp("tfds")
    workdir = tmp_path_factory.mktemp("runs") / "mdlm"
    trainer.train(_config(data_dir), workdir)
    return data_dir, workdir, experiment.build(_config(data_dir))


def _copy(pristine, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(pristine[1], workdir)
    return workdir


def test_every_saved_step_has_a_manifest_that_verifies(pristine):
    checkpointer = checkpoint_lib.Checkpointer(pristine[1], keep=3)
    try:
        assert checkpointer.all_steps() == [2, 4]
        for step in (2, 4):
            assert (checkpointer.step_dir(step) / checkpoint_lib.MANIFEST_FILE).is_file()
            assert checkpointer.status(step) is None
    finally:
        checkpointer.close()


@pytest.mark.parametrize("how", ["overwrite", "truncate", "delete"])
@pytest.mark.parametrize("kind", list(FILE_KINDS))
def test_a_damaged_newest_step_is_named_skipped_and_moved_aside(pristine, tmp_path, kind, how):
    data_dir, _, exp = pristine
    workdir = _copy(pristine, tmp_path)
    damaged = FILE_KINDS[kind](workdir / "checkpoints" / "4")
    _damage(damaged, how)
    with pytest.raises(checkpoint_lib.CheckpointError,
                       match=r"checkpoint 4 in .* is damaged \(.*\); intact: 2 "
                             r"\(e\.g\. --checkpoint_step=2\)"):
        trainer.evaluate_workdir(workdir)
    checkpointer = checkpoint_lib.Checkpointer(workdir, keep=3)
    try:
        iterator = pipeline.train_iterator(exp.config.data, exp.corpus, seed=0)
        state, step = checkpointer.restore_latest(
            checkpoint_lib.abstract_like(exp.init_state()), iterator)
        assert step == 2 and int(state.step) == 2
        assert checkpointer.all_steps() == [2]  # out of the rotation, not deleted:
    finally:
        checkpointer.close()
    moved = workdir / checkpoint_lib.DAMAGED_DIR / "4"
    assert moved.is_dir() and (moved / damaged.relative_to(workdir / "checkpoints" / "4")
                               ).exists() == (how != "delete")


def test_resume_after_damage_continues_with_the_same_losses(pristine, tmp_path):
    """The issue's case: the newest step's _sharding overwritten. Training the workdir again
    resumes from step 2 and reproduces the straight run's losses of steps 3 and 4."""
    data_dir, source, _ = pristine
    workdir = _copy(pristine, tmp_path)
    (workdir / "checkpoints" / "4" / "state" / "_sharding").write_text("not json")
    straight = train_losses(source)
    trainer.train(_config(data_dir, total_steps=6), workdir)
    resumed = train_losses(workdir)
    assert resumed[3] == straight[3] and resumed[4] == straight[4]
    checkpointer = checkpoint_lib.Checkpointer(workdir, keep=3)
    try:
        assert checkpointer.all_steps() == [2, 4, 6]
        assert all(checkpointer.status(step) is None for step in (2, 4, 6))
    finally:
        checkpointer.close()
    assert (workdir / checkpoint_lib.DAMAGED_DIR / "4").is_dir()


def test_checkpoints_without_a_manifest_still_restore(pristine, tmp_path):
    workdir = _copy(pristine, tmp_path)
    for step in (2, 4):
        os.remove(workdir / "checkpoints" / str(step) / checkpoint_lib.MANIFEST_FILE)
    checkpointer = checkpoint_lib.Checkpointer(workdir, keep=3)
    try:
        assert checkpointer.status(4) == "unverified"
    finally:
        checkpointer.close()
    scored = trainer.evaluate_workdir(workdir)
    assert scored["step"] == 4
    # Unverified and unreadable: damaged all the same, named with the intact steps.
    (workdir / "checkpoints" / "4" / "state" / "_sharding").write_text("not json")
    with pytest.raises(checkpoint_lib.CheckpointError,
                       match=r"checkpoint 4 .* is damaged \(unreadable.*intact: 2"):
        trainer.evaluate_workdir(workdir)


def test_no_intact_checkpoint_lists_each_and_why(pristine, tmp_path):
    _, _, exp = pristine
    workdir = _copy(pristine, tmp_path)
    for step in (2, 4):
        _damage(workdir / "checkpoints" / str(step) / "state" / "_METADATA", "truncate")
    checkpointer = checkpoint_lib.Checkpointer(workdir, keep=3)
    try:
        with pytest.raises(checkpoint_lib.CheckpointError,
                           match=r"no checkpoint .* can be used: 4: .*_METADATA has .* bytes.*"
                                 r"; 2: .*_METADATA"):
            checkpointer.restore_latest(checkpoint_lib.abstract_like(exp.init_state()))
    finally:
        checkpointer.close()


def _cli(module, *argv):
    return subprocess.run([sys.executable, "-m", f"experiments.{module}", *argv],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _one_line(result, program: str, text: str) -> None:
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"experiments.{program}: ") and text in last, last


def test_expected_errors_are_one_line_from_the_command_line(pristine, tmp_path):
    data_dir, _, _ = pristine
    workdir = _copy(pristine, tmp_path)
    (workdir / "checkpoints" / "4" / "state" / "_sharding").write_text("not json")
    _one_line(_cli("evaluate", f"--workdir={workdir}"), "evaluate",
              "checkpoint 4 in")
    _one_line(_cli("train", "--config=configs/mdlm.py:micro", f"--workdir={tmp_path / 'x'}",
                   "--config.data.batch_size=0", f"--config.data.data_dir={data_dir}"),
              "train", "config.data.batch_size=0 must be a positive integer")
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes("caf\xe9 ".encode("latin-1") * 50)
    _one_line(_cli("train", "--config=configs/mdlm.py:micro", f"--workdir={tmp_path / 'y'}",
                   "--config.data.name=text_files", f"--config.data.path={corpus}",
                   f"--config.data.data_dir={tmp_path / 'tfds'}"),
              "train", "is not valid UTF-8")
    verbose = _cli("evaluate", f"--workdir={workdir}", "--verbose")
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr


def test_manifest_files_are_json_with_every_file(pristine):
    step_dir = pristine[1] / "checkpoints" / "4"
    files = json.loads((step_dir / checkpoint_lib.MANIFEST_FILE).read_text())["files"]
    on_disk = {str(p.relative_to(step_dir)) for p in step_dir.rglob("*")
               if p.is_file() and p.name != checkpoint_lib.MANIFEST_FILE}
    assert set(files) == on_disk and any(name.startswith("data/") for name in files)


def _mount_tmpfs(path, size_bytes: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs",
                             str(path)], capture_output=True, text=True)
    return result.returncode == 0


def test_a_full_disk_stops_training_clearly_and_the_run_resumes(pristine, tmp_path):
    """checkpoints/ on a tmpfs with room for what is there and little more: the next save
    fails, training stops with an error naming the intact step, which a later run (with room
    again) resumes from."""
    data_dir, source, _ = pristine
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    shutil.rmtree(workdir / "checkpoints" / "4")
    saved = tmp_path / "saved"
    shutil.move(workdir / "checkpoints", saved)
    # tmpfs allocates whole pages: room for step 2 and half of another such checkpoint.
    pages = sum(-(-p.stat().st_size // 4096) for p in saved.rglob("*") if p.is_file())
    if not _mount_tmpfs(workdir / "checkpoints", 4096 * (pages + pages // 2) + 65536):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        for item in saved.iterdir():
            shutil.copytree(item, workdir / "checkpoints" / item.name)
        with pytest.raises(checkpoint_lib.CheckpointError,
                           match=r"saving checkpoint 4 in .* failed \(.*\); checkpoints 2 are "
                                 r"intact: fix the cause and run again to resume from 2"):
            trainer.train(_config(data_dir), workdir)
        checkpointer = checkpoint_lib.Checkpointer(workdir, keep=3)
        try:
            assert checkpointer.all_steps() == [2] and checkpointer.status(2) is None
        finally:
            checkpointer.close()
        subprocess.run(["mount", "-o", "remount,size=64m", str(workdir / "checkpoints")],
                       check=True)
        trainer.train(_config(data_dir), workdir)
        assert train_losses(workdir)[4] == train_losses(source)[4]
    finally:
        subprocess.run(["umount", "-l", str(workdir / "checkpoints")], check=False)
