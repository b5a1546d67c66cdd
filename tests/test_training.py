"""Training: device-count invariance, accumulation, bad steps, resume, and the entry points."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from helpers import small_config

from configs import ar, mdlm
from dlm.data import pipeline
from dlm.parallel import mesh as mesh_lib
from dlm.runs import checkpoint as checkpoint_lib
from dlm.training import config_validation, experiment, trainer
from dlm.training.step import make_train_step


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


def _batches(exp, count, seed=0):
    it = pipeline.train_iterator(exp.config.data, exp.corpus, seed=seed)
    return [next(it) for _ in range(count)]


def _run_steps(exp, mesh, local_batches, grad_accum_steps=1):
    exp = dataclasses.replace(exp, mesh=mesh)
    state = exp.init_state()
    step = make_train_step(exp.model, exp.process, exp.tx, mesh,
                           ema_decay=exp.config.optimizer.ema_decay,
                           grad_accum_steps=grad_accum_steps,
                           global_batch=exp.config.data.batch_size,
                           state_sharding=exp.state_sharding())
    losses = []
    for local in local_batches:
        state, metrics = step(state, mesh_lib.global_batch(local, mesh))
        losses.append(float(metrics["train/loss"]))
    return jax.device_get(state), losses


@pytest.mark.parametrize("method", [mdlm, ar], ids=["mdlm", "ar"])
def test_eight_devices_equal_one_device(data_dir, method):
    exp = experiment.build(small_config(data_dir, method))
    batches = _batches(exp, 3)
    assert jax.device_count() == 8
    state8, losses8 = _run_steps(exp, mesh_lib.make_mesh(), batches)
    state1, losses1 = _run_steps(exp, mesh_lib.make_mesh(jax.devices()[:1]), batches)
    np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
    assert losses8[2] != losses8[0]  # the steps did train
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
                 state8.params, state1.params)


def test_fsdp_shards_the_state_and_matches_replicated_training(data_dir):
    exp = experiment.build(small_config(data_dir, **{"model.hidden": 64}))
    batches = _batches(exp, 2)
    replicated, losses = _run_steps(exp, exp.mesh, batches)
    exp.config.fsdp = True
    sharding = exp.state_sharding()
    mlp_kernel = [s for path, s in jax.tree_util.tree_leaves_with_path(sharding.params)
                  if "mlp" in jax.tree_util.keystr(path)]
    assert mlp_kernel and all("data" in s.spec for s in mlp_kernel)
    mu = jax.tree.leaves(sharding.opt_state)
    assert any(s.spec != () for s in mu)  # Adam moments are sharded too
    sharded, losses_fsdp = _run_steps(exp, exp.mesh, batches)
    np.testing.assert_allclose(losses_fsdp, losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
                 sharded.params, replicated.params)


def test_gradient_accumulation_equals_one_big_step(data_dir):
    exp = experiment.build(small_config(data_dir))
    batches = _batches(exp, 2)
    mesh = mesh_lib.make_mesh(jax.devices()[:2])
    whole, losses_whole = _run_steps(exp, mesh, batches)
    accumulated, losses_accum = _run_steps(exp, mesh, batches, grad_accum_steps=4)
    np.testing.assert_allclose(losses_accum, losses_whole, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
                 accumulated.params, whole.params)


def test_a_nan_batch_is_skipped_and_reported(data_dir):
    exp = experiment.build(small_config(data_dir))
    mesh = exp.mesh
    state = exp.init_state()
    step = make_train_step(exp.model, exp.process, exp.tx, mesh, ema_decay=0.99,
                           grad_accum_steps=1, global_batch=16)
    good, bad = _batches(exp, 2)
    bad = {**bad, "loss_mask": np.where(np.arange(32) == 5, np.nan, bad["loss_mask"])}
    before = jax.device_get(state.params)
    state, metrics = step(state, mesh_lib.global_batch(bad, mesh))
    assert int(metrics["train/skipped"]) == 1 and int(metrics["train/skipped_in_a_row"]) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.ema_params), before)
    state, metrics = step(state, mesh_lib.global_batch(good, mesh))
    assert int(metrics["train/skipped"]) == 0 and int(metrics["train/skipped_in_a_row"]) == 0
    assert np.isfinite(float(metrics["train/loss"]))
    assert int(state.step) == 2


def test_training_halts_after_consecutive_nonfinite_steps(data_dir, tmp_path, monkeypatch):
    real = pipeline.train_iterator

    def poisoned(*args, **kwargs):
        for batch in real(*args, **kwargs):
            yield {**batch, "loss_mask": np.full_like(batch["loss_mask"], np.nan)}

    monkeypatch.setattr(pipeline, "train_iterator", poisoned)
    config = small_config(data_dir, max_consecutive_nonfinite=3, total_steps=20,
                          checkpoint_every=100)
    with pytest.raises(trainer.NonFiniteError, match="3 consecutive steps.*"
                                                    "config.max_consecutive_nonfinite=3"):
        trainer.train(config, tmp_path / "run")


def _losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


def test_resume_continues_bit_for_bit(data_dir, tmp_path):
    config = small_config(data_dir, **{"model.dropout": 0.1})
    trainer.train(config, tmp_path / "straight")
    config.total_steps = 3
    trainer.train(config, tmp_path / "resumed")  # "killed" after the step-3 checkpoint
    config.total_steps = 6
    trainer.train(config, tmp_path / "resumed")
    straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert [resumed[s] for s in range(4, 7)] == [straight[s] for s in range(4, 7)]
    exp = experiment.build(config)
    abstract = checkpoint_lib.abstract_like(exp.init_state())
    a = checkpoint_lib.Checkpointer(tmp_path / "straight", keep=3).restore(6, abstract)
    b = checkpoint_lib.Checkpointer(tmp_path / "resumed", keep=3).restore(6, abstract)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def test_half_written_checkpoint_is_ignored(data_dir, tmp_path):
    config = small_config(data_dir, total_steps=3)
    trainer.train(config, tmp_path / "run")
    junk = tmp_path / "run" / "checkpoints" / "6.orbax-checkpoint-tmp-1234"
    junk.mkdir()
    (junk / "half").write_text("interrupted")
    checkpointer = checkpoint_lib.Checkpointer(tmp_path / "run", keep=3)
    assert checkpointer.latest_step() == 3
    checkpointer.close()
    config.total_steps = 4
    trainer.train(config, tmp_path / "run")
    assert max(_losses(tmp_path / "run")) == 4


def test_evaluate_entry_point_reproduces_the_trainers_numbers(data_dir, tmp_path):
    config = small_config(data_dir, total_steps=4, eval_every=4)
    final = trainer.train(config, tmp_path / "run")
    scored = trainer.evaluate_workdir(tmp_path / "run")
    assert scored["step"] == 4 and scored["split"] == "validation"
    for key in ("eval/nll_nats_per_token", "eval/bits_per_token", "eval/ppl", "eval/nll_stderr"):
        np.testing.assert_allclose(scored[key], final[key], rtol=1e-6)
    np.testing.assert_allclose(scored["eval/bits_per_token"],
                               scored["eval/nll_nats_per_token"] / np.log(2), rtol=1e-12)
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert {"step", "train/loss", "steps_per_sec"} <= set(json.loads(rows[0]))
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_bfloat16_compute_keeps_float32_losses(data_dir):
    exp = experiment.build(small_config(data_dir, **{"model.dtype": "bfloat16"}))
    state, losses = _run_steps(exp, exp.mesh, _batches(exp, 2))
    assert all(np.isfinite(losses))
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(state.params))


@pytest.mark.parametrize("key, value, message", [
    ("process.name", "sedd",
         r"config.process.name='sedd' is not one of \['mdlm', 'bd3lm', 'ar', 'sdtt', 'edlm_nce'\]"),
    ("data.packing", "zip", r"config.data.packing='zip' is not one of \['wrap', 'pad'\]"),
    ("data.batch_size", 0, "config.data.batch_size=0 must be a positive integer"),
    ("model.name", "energy",
     r"config.process.name='mdlm' needs config.model.name in \['dit', 'transformer'\]"),
    ("optimizer.ema_decay", 1.0, r"config.optimizer.ema_decay=1.0 must lie in \[0, 1\)"),
    ("optimizer.grad_accum_steps", 3, "not divisible by config.optimizer.grad_accum_steps=3"),
])
def test_bad_configs_name_the_key(data_dir, key, value, message):
    with pytest.raises(ValueError, match=message):
        config_validation.validate(small_config(data_dir, **{key: value}))


def test_masked_diffusion_on_the_transformer_needs_a_full_mask(data_dir):
    config = small_config(data_dir, **{"model.name": "transformer", "model.mask": "causal"})
    with pytest.raises(ValueError, match="on model.name 'transformer' needs model.mask='full'"):
        config_validation.validate(config)
    config.model.mask = "full"
    config_validation.validate(config)


def test_batch_not_divisible_by_devices_is_refused(data_dir):
    with pytest.raises(ValueError, match=r"data.batch_size=12 is not divisible by the number "
                                         r"of devices \(8\)"):
        trainer.train(small_config(data_dir, **{"data.batch_size": 12}), data_dir / "never")


def test_a_checkpoint_without_a_newer_none_field_still_restores(data_dir, tmp_path):
    # Checkpoints written before TrainState had `process_state` hold no such entry.
    exp = experiment.build(small_config(data_dir))
    state = exp.init_state()
    old_layout = {f: getattr(state, f) for f in ("step", "params", "opt_state", "ema_params",
                                                "rng")}
    checkpointer = checkpoint_lib.Checkpointer(tmp_path, keep=1)
    checkpointer.save(1, old_layout, None)
    checkpointer.close()
    restored, step = checkpoint_lib.restore_from_workdir(
        tmp_path, checkpoint_lib.abstract_like(state))
    assert step == 1 and restored.process_state is None
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params),
                 jax.device_get(state.params))
