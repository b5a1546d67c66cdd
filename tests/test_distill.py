"""SDTT: the distillation loss, the teacher's targets, rounds, resume and loading a student."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import small_config

from configs import mdlm, sdtt
from dlm import parallel, runs
from dlm.data import pipeline
from dlm.diffusion import distill
from dlm.diffusion import process as process_lib
from dlm.models import registry as model_registry
from dlm.parallel import mesh as mesh_lib
from dlm.parallel import model_fn
from dlm.runs import checkpoint as checkpoint_lib
from dlm.runs import drawing
from dlm.sampling import networks
from dlm.training import config_validation, experiment, trainer
from dlm.training.step import make_train_step

VOCAB = 11
BATCH, LENGTH = 4, 16


def _process(**process_overrides):
    config = small_config("/unused", sdtt, init_from="/teacher", **{
        f"process.{k}": v for k, v in process_overrides.items()})
    return process_lib.make_process(config, vocab_size=VOCAB)


# The network SDTT distils: the run's own DiT (its teacher is a frozen copy of it).
MODULE = model_registry.build_model(small_config("/unused", sdtt).model, VOCAB)


def _teacher_state(proc, teacher):
    return proc.init_state({"teacher": teacher})


def _frozen(state):
    return parallel.frozen_fns({"teacher": MODULE}, state)


def _batch(seed=0):
    tokens_BL = jax.random.randint(jax.random.PRNGKey(seed), (BATCH, LENGTH), 0, VOCAB - 1)
    return {"tokens": tokens_BL, "loss_mask": jnp.ones((BATCH, LENGTH), jnp.float32),
            "example_id": jnp.arange(BATCH, dtype=jnp.int32)}


def _params(proc, seed):
    """Fresh weights plus noise: the zero-initialised output layer alone gives uniform logits."""
    params = model_registry.init_params(MODULE, LENGTH, jax.random.PRNGKey(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(100 + seed), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape, x.dtype)
                                     for x, k in zip(leaves, keys)])


def _losses(proc, student, state):
    """{divergence: (loss, metrics)} of `proc` with each divergence, in one compilation."""
    @jax.jit
    def losses(student, state):
        fn = model_fn(MODULE, student, train=False)
        return {name: dataclasses.replace(proc, divergence=name).loss(
            fn, _batch(), jax.random.PRNGKey(1), num_examples=BATCH, state=state,
            frozen=_frozen(state))
            for name in distill.DIVERGENCES}

    return losses(student, state)


def test_student_equal_to_teacher_with_tiny_dt_has_zero_loss():
    proc = _process(teacher_steps=2**26, round_steps=1000)
    teacher = _params(proc, 0)
    state = _teacher_state(proc, teacher)
    same, other = _losses(proc, teacher, state), _losses(proc, _params(proc, 1), state)
    for name in distill.DIVERGENCES:
        loss, metrics = same[name]
        assert float(metrics["token_count"]) > 0
        assert abs(float(loss)) < 1e-5, name
        assert float(other[name][0]) > 1e-3, name  # a different student is penalised


def test_gradients_are_finite_and_reach_only_the_student():
    proc = _process(teacher_steps=8)
    student, teacher = _params(proc, 1), _params(proc, 0)

    @jax.jit
    def grads(student, teacher):
        def loss_of(student, teacher, name):
            fn = model_fn(MODULE, student, train=False)
            state = {"teacher": teacher, "round": jnp.int32(1)}
            return dataclasses.replace(proc, divergence=name).loss(
                fn, _batch(), jax.random.PRNGKey(1), num_examples=BATCH, state=state,
                frozen=_frozen(state))[0]

        return {name: jax.grad(loss_of, argnums=(0, 1))(student, teacher, name)
                for name in distill.DIVERGENCES}

    for name, (grad_student, grad_teacher) in grads(student, teacher).items():
        leaves = jax.tree.leaves(grad_student)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves), name
        assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0, name
        assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grad_teacher))


def test_divergences_agree_with_their_definitions():
    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(5), (2, 3)), rng.dirichlet(np.ones(5), (2, 3))
    lp, lq = jnp.log(p), jnp.log(q)
    np.testing.assert_allclose(distill.divergence("reverse_kl", lp, lq),
                               np.sum(q * np.log(q / p), -1), rtol=1e-5)
    np.testing.assert_allclose(distill.divergence("forward_kl", lp, lq),
                               np.sum(p * np.log(p / q), -1), rtol=1e-5)
    np.testing.assert_allclose(distill.divergence("mse", lp, lq),
                               np.mean(np.log(q / p) ** 2, -1), rtol=1e-5)
    np.testing.assert_allclose(distill.divergence("tvd", lp, lq),
                               0.5 * np.sum(np.abs(p - q), -1), rtol=1e-5)


def test_targets_come_from_the_step_that_revealed_each_position():
    """A toy teacher whose prediction encodes how many positions its input still masks: each
    target must be the prediction of the step that revealed the position, or the last."""
    proc = _process(distill_steps=3)
    mask_id = proc.mask_id

    def teacher_fn(tokens_BL, t_B):
        del t_B
        open_B = jnp.sum(tokens_BL == mask_id, axis=-1)
        logits_BV = jax.nn.one_hot(open_B % (VOCAB - 1), VOCAB) * 5.0
        return jnp.broadcast_to(logits_BV[:, None], (*tokens_BL.shape, VOCAB))

    tokens_BL = _batch()["tokens"]
    xt_BL = jnp.where(jnp.arange(LENGTH) % 4 == 0, tokens_BL, mask_id)  # 12 of 16 masked
    t_B = jnp.full((BATCH,), 0.9)
    target_BLK, reveal_BL = proc.teacher_targets(
        teacher_fn, xt_BL, t_B, jnp.float32(0.3), jax.random.PRNGKey(0), jnp.arange(BATCH))
    reveal_BL = np.asarray(reveal_BL)
    assert set(np.unique(reveal_BL)) <= {-1, 0, 1, 2, 3}
    assert np.all((reveal_BL == -1) == (np.asarray(xt_BL) != mask_id))
    assert np.any(reveal_BL == 0) and np.any(reveal_BL == 1) and np.any(reveal_BL >= 2)
    for b in range(BATCH):
        # Open positions before step j: those not revealed at an earlier step.
        open_before = [int(np.sum(reveal_BL[b] >= j)) for j in range(3)]
        for i in range(LENGTH):
            step = min(reveal_BL[b, i], 2)
            if step < 0:
                continue
            expected = open_before[step] % (VOCAB - 1)
            assert int(jnp.argmax(target_BLK[b, i])) == expected


def test_round_schedule_doubles_dt_and_swaps_the_teacher():
    proc = _process(round_steps=3, teacher_steps=64)
    teacher, student, ema = _params(proc, 0), _params(proc, 1), _params(proc, 2)
    state = _teacher_state(proc, teacher)
    step_sizes = []
    for step in range(1, 10):
        step_sizes.append(float(proc.step_size(state["round"])))
        state = proc.next_state(state, student, ema, jnp.int32(step))
        swapped = step % 3 == 0
        assert int(state["round"]) == step // 3
        expected = ema if step >= 3 else teacher
        jax.tree.map(np.testing.assert_array_equal, state["teacher"], expected)
        name = proc.round_checkpoint_name(step)
        assert name == (f"{64 // (2 * 2 ** (step // 3 - 1))}_steps" if swapped else None)
    assert step_sizes == [1 / 64] * 3 + [2 / 64] * 3 + [4 / 64] * 3
    # Without EMA the student's own weights become the teacher.
    no_ema = _process(round_steps=3, teacher_from_ema=False)
    state = no_ema.next_state(_teacher_state(no_ema, teacher), student, ema, jnp.int32(3))
    jax.tree.map(np.testing.assert_array_equal, state["teacher"], student)


@pytest.mark.parametrize("key,value,message", [
    ("init_from", "", "init_from"),
    ("process.divergence", "kl", "process.divergence"),
    ("process.round_steps", 0, "process.round_steps"),
    ("process.distill_steps", 1, "process.distill_steps"),
    ("process.teacher_steps", 4, "process.teacher_steps=4"),
])
def test_bad_sdtt_configs_name_the_key(key, value, message):
    overrides = {"init_from": "/teacher", "total_steps": 6, "process.round_steps": 2,
                 key: value}
    with pytest.raises(ValueError, match=message):
        config_validation.validate(small_config("/unused", sdtt, **overrides))


def test_a_teacher_of_another_size_is_refused():
    proc = _process()
    other = model_registry.build_model(
        small_config("/unused", mdlm, **{"model.hidden": 16}).model, VOCAB)
    with pytest.raises(ValueError, match="config.model must match"):
        parallel.frozen_params(proc, {"teacher": MODULE}, LENGTH,
                               model_registry.init_params(other, LENGTH, jax.random.PRNGKey(0)))


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """An MDLM run's workdir (config, tokenizer and a checkpoint of its initial state): all
    that init_from reads, without training it."""
    data_dir = tmp_path_factory.mktemp("tfds")
    workdir = tmp_path_factory.mktemp("runs") / "mdlm"
    exp = experiment.build(small_config(data_dir, mdlm))
    runs.save_run_files(exp.config, exp.tokenizer, workdir)
    checkpointer = checkpoint_lib.Checkpointer(workdir, keep=1, asynchronous=False)
    checkpointer.save(2, exp.init_state(), None)
    checkpointer.close()
    return data_dir, workdir


def _sdtt_config(teacher_run, **overrides):
    data_dir, workdir = teacher_run
    settings = {"init_from": str(workdir), "total_steps": 6, "checkpoint_every": 3,
                "process.round_steps": 2, "process.teacher_steps": 32, **overrides}
    return small_config(data_dir, sdtt, **settings)


@pytest.mark.slow  # run by .ci/run after `make test` (make test-slow)
def test_rounds_survive_a_checkpoint_in_the_middle_of_a_round(teacher_run, tmp_path):
    """Train steps through the real step function: the first teacher is the MDLM run's
    weights, the teacher becomes the student's EMA every 2 steps, and 3 steps + checkpoint +
    restore + 3 steps equals 6 steps bit for bit."""
    exp = experiment.build(_sdtt_config(teacher_run))
    checkpointer = checkpoint_lib.Checkpointer(tmp_path / "sdtt", keep=2, asynchronous=False)
    initial = trainer._restore_or_init(exp, checkpointer, None)
    source, _ = runs.load_weights(teacher_run[1], exp.mesh)
    for tree in (initial.process_state["teacher"], initial.params):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(tree),
                     jax.device_get(source))
    step_fn = make_train_step(exp.model, exp.process, exp.tx, exp.mesh,
                              ema_decay=exp.config.optimizer.ema_decay, grad_accum_steps=1,
                              global_batch=exp.config.data.batch_size,
                              state_sharding=exp.state_sharding(), frozen=exp.frozen)
    iterator = pipeline.train_iterator(exp.config.data, exp.corpus, seed=0)
    batches = [mesh_lib.global_batch(next(iterator), exp.mesh) for _ in range(6)]
    copy = jax.tree.map(jnp.copy, initial)  # the step donates its input

    straight, rounds, teachers, emas = initial, [], [], []
    for batch in batches:
        straight, _ = step_fn(straight, batch)
        host = jax.device_get(straight)
        rounds.append(int(host.process_state["round"]))
        teachers.append(host.process_state["teacher"])
        emas.append(host.ema_params)
    assert rounds == [0, 1, 1, 2, 2, 3]
    for step, teacher in enumerate(teachers, start=1):
        last_swap = 2 * (step // 2)
        expected = source if last_swap == 0 else emas[last_swap - 1]
        jax.tree.map(np.testing.assert_array_equal, teacher, jax.device_get(expected))

    resumed = copy
    for batch in batches[:3]:
        resumed, _ = step_fn(resumed, batch)
    checkpointer.save(3, resumed, None)
    checkpointer.wait()
    resumed = checkpointer.restore(3, checkpoint_lib.abstract_like(exp.init_state()))
    checkpointer.close()
    assert int(resumed.process_state["round"]) == 1
    for batch in batches[3:]:
        resumed, _ = step_fn(resumed, batch)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed),
                 jax.device_get(straight))


def _restore(config, workdir, step):
    exp = experiment.build(config)
    abstract = checkpoint_lib.abstract_like(exp.init_state())
    return jax.device_get(checkpoint_lib.restore_from_workdir(workdir, abstract, step=step)[0])


@pytest.mark.slow
def test_trainer_keeps_each_rounds_student_and_resumes_mid_round(teacher_run, tmp_path):
    config = _sdtt_config(teacher_run)
    trainer.train(config, tmp_path / "straight")
    config.total_steps = 3  # "killed" in the middle of round 1 (steps 3-4)
    trainer.train(config, tmp_path / "resumed")
    config.total_steps = 6
    trainer.train(config, tmp_path / "resumed")
    final = _restore(config, tmp_path / "straight", 6)
    jax.tree.map(np.testing.assert_array_equal, final,
                 _restore(config, tmp_path / "resumed", 6))
    rounds = tmp_path / "straight" / runs.ROUNDS_DIR
    assert sorted(p.name for p in rounds.iterdir()) == ["16_steps", "4_steps", "8_steps"]
    for name, step in [("16_steps", 2), ("8_steps", 4), ("4_steps", 6)]:
        assert int(_restore(config, rounds / name, None).step) == step
    jax.tree.map(np.testing.assert_array_equal, _restore(config, rounds / "4_steps", None),
                 final)
    jax.tree.map(np.testing.assert_array_equal,
                 _restore(config, rounds / "8_steps", None),
                 _restore(config, tmp_path / "resumed" / runs.ROUNDS_DIR / "8_steps", None))
    out = tmp_path / "samples.jsonl"
    summary = runs.sample_to_file(str(rounds / "8_steps"), "mdlm", str(out), num_samples=2,
                                  length=32, steps=8, batch_size=2)
    assert summary["num_samples"] == 2 and summary["mean_nfe"] <= 9
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(len(r["tokens"]) == 32 for r in rows)


def test_a_kept_student_loads_as_a_masked_diffusion_run(teacher_run, tmp_path):
    """A round's directory (written as the trainer does) is a masked diffusion run."""
    exp = experiment.build(_sdtt_config(teacher_run))
    directory = tmp_path / "run" / runs.ROUNDS_DIR / "8_steps"
    state = exp.init_state()
    trainer._keep_round(exp, directory, 4, state)
    trainer._keep_round(exp, directory, 4, state)  # a resumed run finds it: kept as is
    files = runs.read_run(directory)
    assert files.network_kind == "denoiser"
    drawing.check_compatible(runs.make_sampler("mdlm", 8, {}), files)
    run = runs.load_run(files)
    assert isinstance(run.network, networks.Denoiser) and run.step == 4
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(run.params),
                 jax.device_get(state.ema_params))
