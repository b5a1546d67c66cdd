"""The training loop: resume, step, log, evaluate, checkpoint; the same for every process."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from dlm import parallel
from dlm.data import pipeline
from dlm.evaluation import likelihood
from dlm.runs import checkpoint as checkpoint_lib
from dlm.runs import loading
from dlm.runs import workdir as workdir_lib
from dlm.training import experiment as experiment_lib
from dlm.training import metrics as metrics_lib
from dlm.training import optimizer as optimizer_lib
from dlm.training import preemption
from dlm.training.step import make_train_step


class NonFiniteError(RuntimeError):
    """Raised when too many consecutive steps had a non-finite loss or gradient."""


class Preempted(Exception):
    """Training stopped before `config.total_steps` (SIGTERM or the time budget) after every
    process saved checkpoint `step` together; training the same workdir again resumes."""

    def __init__(self, step: int, reason: str, metrics: dict):
        super().__init__(f"stopped at step {step} ({reason}); checkpoint {step} saved: run "
                         "again to resume")
        self.step, self.reason, self.metrics = step, reason, metrics


def evaluate_params(exp: experiment_lib.Experiment, params, *, split: str | None = None,
                    num_batches: int | None = None, process_state=None) -> dict[str, float]:
    """The likelihood metrics of `params` (under the run's `process_state`) on `split`
    (default `config.eval.split`)."""
    config = exp.config
    batches = pipeline.eval_batches(
        config.data, exp.corpus, split or config.eval.split,
        num_batches=config.eval.num_batches if num_batches is None else num_batches)
    return likelihood.evaluate(exp.nll_fn, params,
                               (parallel.global_batch(b, exp.mesh) for b in batches),
                               seed=config.eval.seed, process_state=process_state)


def evaluate_workdir(workdir: str | pathlib.Path, split: str | None = None,
                     checkpoint_step: int | None = None,
                     num_batches: int | None = None) -> dict:
    """Returns the likelihood metrics of the run in `workdir` (plus `step` and `split`)."""
    exp = experiment_lib.build(workdir_lib.load_config(workdir))
    state, step = checkpoint_lib.restore_from_workdir(
        workdir, checkpoint_lib.abstract_like(exp.init_state()), step=checkpoint_step)
    split = split or exp.config.eval.split
    metrics = evaluate_params(exp, state.eval_params(exp.config.eval.use_ema), split=split,
                              num_batches=num_batches, process_state=state.process_state)
    return {"step": step, "split": split, **metrics}


def _restore_or_init(exp, checkpointer, data_iterator):
    state = exp.init_state()
    # The newest intact checkpoint; newer damaged ones are named and moved aside.
    restored, step = checkpointer.restore_latest(checkpoint_lib.abstract_like(state),
                                                 data_iterator)
    if restored is not None:
        logging.info("resuming from %s/%d", checkpointer.directory, step)
        return restored
    if exp.config.init_from:
        # The source's weights (its EMA when it kept one) in its own structure: it may be
        # another process (MDLM -> BD3-LM, EDLM-NCE, SDTT) whose optimizer, process state or
        # even network (EDLM's energy network) differs. Every parameter they share is copied;
        # the process state (a teacher, a frozen denoiser) is built from the source's weights.
        source, step = loading.load_weights(exp.config.init_from, exp.mesh)
        params, copied = experiment_lib.merge_params(
            state.params, source, source_name=f"init_from={exp.config.init_from}")
        logging.info("initialised %d parameter arrays from %s step %d", copied,
                     exp.config.init_from, step)
        # Copies: the train step donates the state, and no two of its leaves may share a
        # buffer (params, EMA and a teacher all start from the source's arrays).
        sharding = exp.state_sharding()
        params = jax.device_put(params, sharding.params, may_alias=False)
        ema = None if state.ema_params is None else jax.tree.map(jnp.copy, params)
        process_state = jax.device_put(exp.initial_process_state(source),
                                       sharding.process_state, may_alias=False)
        state = state.replace(params=params, ema_params=ema, opt_state=exp.tx.init(params),
                              process_state=process_state)
    return state


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
          time_budget: float | None = None) -> dict[str, float]:
    """Trains (or resumes) the run in `workdir` to `config.total_steps`.

    Returns the last logged train metrics merged with the last evaluation. On SIGTERM, or
    `time_budget` seconds after the call, every process finishes its step, the checkpoint
    of that step is saved and `Preempted` is raised (see `dlm.training.preemption`).
    """
    stop = preemption.StopRequest(time_budget)  # the budget's clock starts now
    metrics_lib.quiet_library_logs()
    workdir = pathlib.Path(workdir).expanduser().resolve()
    exp = experiment_lib.build(config)
    config = exp.config
    workdir_lib.save_run_files(config, exp.tokenizer, workdir)
    checkpointer = checkpoint_lib.Checkpointer(workdir, config.keep_checkpoints)
    data_iterator = pipeline.train_iterator(config.data, exp.corpus, seed=config.seed)
    state = _restore_or_init(exp, checkpointer, data_iterator)
    step_fn = make_train_step(exp.model, exp.process, exp.tx, exp.mesh,
                              ema_decay=config.optimizer.ema_decay,
                              grad_accum_steps=config.optimizer.grad_accum_steps,
                              global_batch=config.data.batch_size,
                              state_sharding=exp.state_sharding(), frozen=exp.frozen)
    schedule = optimizer_lib.learning_rate_schedule(config.optimizer, config.total_steps)
    writer = metrics_lib.MetricWriter(workdir)
    start = int(state.step)
    progress = metrics_lib.Progress(start, config.total_steps)
    pending, window, last = None, [], {}
    stopped = None
    try:
        stop.install(exp.mesh)
        for step in range(start + 1, config.total_steps + 1):
            batch = parallel.global_batch(next(data_iterator), exp.mesh)
            state, metrics = step_fn(state, batch)
            # Read the previous step's metrics, so the host never waits for this one.
            if pending is not None:
                window.append(_check_finite(jax.device_get(pending), config))
            pending = metrics
            if step % config.log_every == 0 or step == config.total_steps:
                window.append(_check_finite(jax.device_get(pending), config))
                pending = None
                last = _log_window(window, step, progress, schedule, config)
                window = []
                writer.write(step, last)
            if step % config.eval_every == 0 or step == config.total_steps:
                params = state.eval_params(config.eval.use_ema)
                evaluation = evaluate_params(exp, params, process_state=state.process_state)
                logging.info("step %d  eval %s", step, _fmt(evaluation))
                writer.write(step, evaluation)
                last.update(evaluation)
                searched = exp.search_process_state(params, exp.state_sharding())
                if searched is not None:
                    state = state.replace(process_state=searched[0])
                    logging.info("step %d  process state search %s", step, _fmt(searched[1]))
                    writer.write(step, searched[1])
                    last.update(searched[1])
            # The same answer on every process; a stop at the last step is just the end.
            stopped = stop.poll() if step < config.total_steps else None
            if stopped and pending is not None:  # log the steps since the last log line
                window.append(_check_finite(jax.device_get(pending), config))
                pending = None
                last = _log_window(window, step, progress, schedule, config)
                window = []
                writer.write(step, last)
            if step % config.checkpoint_every == 0 or step == config.total_steps or stopped:
                checkpointer.save(step, state, data_iterator)
            round_name = exp.process.round_checkpoint_name(step)
            if round_name is not None:
                _keep_round(exp, workdir / workdir_lib.ROUNDS_DIR / round_name, step, state)
            if stopped:
                logging.warning("step %d: %s, checkpoint saved; stopping (run again to resume)",
                                step, stopped)
                break
    finally:
        stop.uninstall()
        try:
            checkpointer.close()  # raises CheckpointError when the last save failed
        finally:
            writer.close()
    if stopped:
        raise Preempted(step, stopped, last)
    return last


def _keep_round(exp, directory: pathlib.Path, step: int, state) -> None:
    """Keeps the state that ends a round of a process trained in rounds (SDTT: a student) as
    a run of its own: DIRECTORY/config.json, tokenizer/ and checkpoints/STEP, which evaluate
    and sample load like any workdir. Written synchronously (the next step donates `state`);
    a resumed run that finds the step already there leaves it."""
    workdir_lib.save_run_files(exp.config, exp.tokenizer, directory)
    keeper = checkpoint_lib.Checkpointer(directory, keep=1, asynchronous=False)
    try:
        if step not in keeper.all_steps():
            keeper.save(step, state, None)
    finally:
        keeper.close()
    logging.info("step %d  kept the round's state in %s", step, directory)


def _check_finite(metrics: dict, config) -> dict:
    in_a_row = int(metrics["train/skipped_in_a_row"])
    if metrics["train/skipped"]:
        logging.warning("skipped a step with a non-finite loss or gradient (%d in a row)",
                        in_a_row)
    if in_a_row >= config.max_consecutive_nonfinite:
        raise NonFiniteError(
            f"{in_a_row} consecutive steps had a non-finite loss or gradient "
            f"(config.max_consecutive_nonfinite={config.max_consecutive_nonfinite}); "
            "training stopped. Lower optimizer.learning_rate or check the data.")
    return metrics


def _log_window(window: list[dict], step: int, progress, schedule, config) -> dict:
    losses = np.array([float(m["train/loss"]) for m in window])
    finite = np.isfinite(losses)
    steps_per_sec = progress.report(step, float(losses[finite].mean()) if finite.any()
                                    else float("nan"))
    tokens = float(window[-1]["train/tokens"])
    return {
        "train/loss": float(losses[finite].mean()) if finite.any() else float("nan"),
        "train/grad_norm": float(np.mean([float(m["train/grad_norm"]) for m in window])),
        "train/learning_rate": float(schedule(step)),
        "train/skipped_steps": int(sum(int(m["train/skipped"]) for m in window)),
        "steps_per_sec": steps_per_sec,
        "tokens_per_sec": steps_per_sec * config.data.batch_size * config.data.seq_len,
        "train/loss_tokens_per_step": tokens,
    }


def _fmt(metrics: dict) -> str:
    return "  ".join(f"{k.split('/')[-1]}={v:.4f}" for k, v in metrics.items())
