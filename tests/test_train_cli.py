"""The training entry point as a user runs it: CLI overrides, SIGKILL and resume, learning."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import small_config, train_losses

from dlm.training import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(workdir, data_dir, total_steps, config="configs/mdlm.py:micro", **extra):
    overrides = {
        "total_steps": total_steps, "log_every": 1, "checkpoint_every": 2, "eval_every": 1000,
        "data.data_dir": data_dir, "data.seq_len": 32, "data.batch_size": 8,
        "model.hidden": 32, "model.layers": 2, "model.heads": 2, "model.kv_heads": 2,
        "model.cond_dim": 32, "optimizer.warmup_steps": 2, **extra,
    }
    return [sys.executable, "-m", "experiments.train", f"--config={config}",
            f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in overrides.items()]


@pytest.mark.slow  # run by .ci/run after `make test` (make test-slow)
def test_sigkill_mid_run_then_resume_continues_the_same_losses(tmp_path):
    data_dir = str(tmp_path / "tfds")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run(_command(tmp_path / "straight", data_dir, 10), cwd=ROOT, env=env,
                   check=True, capture_output=True)
    killed = subprocess.Popen(_command(tmp_path / "killed", data_dir, 1000), cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed" / "checkpoints" / "4"
    deadline = time.monotonic() + 240
    while not checkpoint.is_dir() and time.monotonic() < deadline and killed.poll() is None:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert checkpoint.is_dir(), "the run never wrote its step-4 checkpoint"
    subprocess.run(_command(tmp_path / "killed", data_dir, 10), cwd=ROOT, env=env, check=True,
                   capture_output=True)
    straight, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "killed")
    assert sorted(resumed) == list(range(1, 11))
    assert [resumed[s] for s in range(5, 11)] == [straight[s] for s in range(5, 11)]


@pytest.mark.slow  # run by .ci/run after `make test` (make test-slow)
def test_bd3lm_trains_from_the_command_line_and_refuses_a_bad_block_size(tmp_path):
    data_dir = str(tmp_path / "tfds")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run(_command(tmp_path / "run", data_dir, 2, "configs/bd3lm.py:micro",
                            block_size=4, eval_every=2, **{"eval.num_batches": 1,
                                                           "process.search_batches": 1}),
                   cwd=ROOT, env=env, check=True, capture_output=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines()]
    assert rows[-1]["step"] == 2 and "clip/min" in rows[-1]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["block_size"] == 4 and config["process"]["name"] == "bd3lm"
    bad = subprocess.run(_command(tmp_path / "bad", data_dir, 2, "configs/bd3lm.py:micro",
                                  block_size=5), cwd=ROOT, env=env, capture_output=True,
                         text=True)
    assert bad.returncode != 0
    assert "config.block_size=5 does not divide config.data.seq_len=32" in bad.stderr


@pytest.mark.parametrize("method", ["mdlm", "ar"])
def test_losses_fall_on_the_bundled_corpus(tmp_path, method):
    from configs import ar, mdlm

    config = small_config(tmp_path / "tfds", {"mdlm": mdlm, "ar": ar}[method],
                          total_steps=150, log_every=150, eval_every=150, checkpoint_every=150)
    config.model.update(hidden=64, heads=4, kv_heads=4, cond_dim=64)
    config.optimizer.update(learning_rate=3e-3, warmup_steps=20)
    config.data.seq_len = 64
    metrics = trainer.train(config, tmp_path / "run")
    # A uniform guess over the 70 symbols costs log(70) = 4.25 nats; 150 steps must learn
    # the character statistics and some of their context.
    limit = {"mdlm": 3.0, "ar": 2.6}[method]
    assert metrics["eval/nll_nats_per_token"] < limit, metrics
