"""Small configs shared by the training tests."""

import json
import pathlib

import ml_collections

from configs import mdlm


def small_config(data_dir, method=mdlm, **overrides) -> ml_collections.ConfigDict:
    config = method.get_config("micro")
    config.model.update(hidden=32, layers=2, heads=2, kv_heads=2, cond_dim=32, dropout=0.0)
    config.data.update(data_dir=str(data_dir), seq_len=32, batch_size=16, eval_batch_size=8)
    config.update(total_steps=6, log_every=1, eval_every=1000, checkpoint_every=3)
    config.optimizer.update(warmup_steps=2, learning_rate=3e-3)
    config.eval.num_batches = 2
    for key, value in overrides.items():
        node = config
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return config


def train_losses(workdir) -> dict[int, float]:
    """{step: train/loss} from workdir/metrics.jsonl; a resumed run overwrites a stopped one."""
    losses = {}
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            losses[row["step"]] = row["train/loss"]
    return losses


def save_run(workdir, config, tokenizer, *, step: int = 0, replace=None):
    """A workdir as training leaves it: config, tokenizer and a checkpoint at `step` of the
    initial state, changed by `replace(module, state) -> state` when given.
    Returns (module, state)."""
    from dlm import parallel, runs
    from dlm.diffusion import make_process
    from dlm.models import build_model
    from dlm.runs import checkpoint
    from dlm.training import experiment, optimizer

    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True)
    (workdir / runs.CONFIG_FILE).write_text(config.to_json_best_effort())
    tokenizer.save(workdir / runs.TOKENIZER_DIR)
    module = build_model(config.model, tokenizer.vocab_size)
    process = make_process(config, vocab_size=tokenizer.vocab_size)
    skeleton = experiment.Experiment(
        config, None, module, process, parallel.make_mesh(),
        optimizer.make_optimizer(config.optimizer, config.total_steps),
        parallel.frozen_modules(process, module, config.model, tokenizer.vocab_size))
    state = skeleton.init_state()
    if replace is not None:
        state = replace(module, state)
    saver = checkpoint.Checkpointer(workdir, keep=1, asynchronous=False)
    saver.save(step, state, None)
    saver.close()
    return module, state
