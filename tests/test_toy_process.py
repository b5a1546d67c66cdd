"""A process defined and registered in this file only (no library edit) trains, evaluates,
samples and exports through the normal entry points: adding a process is its module, its
config and its tests. (A library process registers itself at import with
`@process.PROCESSES.register(name)`; this one is registered for the module's tests only, so
that the other tests see the built-in registry.)"""

import dataclasses
import json
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import small_config

from configs import mdlm
from dlm import runs
from dlm.diffusion import masked, process, schedules
from dlm.export import convert, exporter
from dlm.training import config_validation, trainer


@dataclasses.dataclass(frozen=True)
class MaskedCrossEntropy(process.Process):
    """Masked diffusion's corruption with an unweighted loss: the mean cross-entropy of the
    masked tokens (not a likelihood bound; `nll` reports the same per-token estimate)."""

    schedule: schedules.Schedule
    mask_id: int

    models: ClassVar[tuple[str, ...]] = ("dit",)
    network_kind: ClassVar[str] = "denoiser"
    exportable: ClassVar[bool] = True

    @classmethod
    def from_config(cls, config, vocab_size):
        return cls(schedules.make_schedule(config), vocab_size - 1)

    def _token_losses(self, model_fn, batch, rng, num_examples):
        time_rng, mask_rng = jax.random.split(rng)
        t_B = schedules.sample_times(time_rng, batch["example_id"], num_examples, 0.05)
        tokens_BL = batch["tokens"]
        mask_prob_BL = jnp.broadcast_to(self.schedule.mask_prob(t_B)[:, None], tokens_BL.shape)
        xt_BL = masked.mask_tokens(tokens_BL, mask_prob_BL, mask_rng, batch["example_id"],
                                   self.mask_id)
        log_probs_BLV = masked.subs_log_probs(model_fn(xt_BL, t_B), xt_BL, self.mask_id)
        ce_BL = -jnp.take_along_axis(log_probs_BLV, tokens_BL[..., None], axis=-1)[..., 0]
        counted_BL = (xt_BL == self.mask_id) & (batch["loss_mask"] > 0)
        return jnp.where(counted_BL, ce_BL, 0.0), counted_BL.astype(jnp.float32)

    def loss(self, model_fn, batch, rng, *, num_examples, state=None, frozen=None):
        ce_BL, counted_BL = self._token_losses(model_fn, batch, rng, num_examples)
        loss_sum, count = jnp.sum(ce_BL), jnp.sum(counted_BL)
        return loss_sum / jnp.maximum(count, 1.0), {"loss_sum": loss_sum, "token_count": count}

    def nll(self, model_fn, batch, rng, *, num_examples, state=None, frozen=None):
        ce_BL, counted_BL = self._token_losses(model_fn, batch, rng, num_examples)
        return jnp.sum(ce_BL, axis=-1), jnp.sum(counted_BL, axis=-1)


def _config(data_dir, **overrides):
    return small_config(data_dir, mdlm, **{"process.name": "toy_masked_ce", "total_steps": 8,
                                           "checkpoint_every": 8, "eval_every": 8,
                                           **overrides})


@pytest.fixture(scope="module", autouse=True)
def registered():
    process.PROCESSES.register("toy_masked_ce", MaskedCrossEntropy)
    yield
    process.PROCESSES.unregister("toy_masked_ce")


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, registered):
    data_dir = tmp_path_factory.mktemp("tfds")
    workdir = tmp_path_factory.mktemp("runs") / "toy"
    final = trainer.train(_config(data_dir), workdir)
    return data_dir, workdir, final


def test_config_validation_knows_the_registered_process(toy_run):
    data_dir, _, _ = toy_run
    config_validation.validate(_config(data_dir))
    with pytest.raises(ValueError, match=r"'toy_masked_ce' needs config.model.name in \['dit'\]"):
        config_validation.validate(_config(data_dir, **{"model.name": "transformer"}))


def test_trains_and_evaluates_through_the_trainer(toy_run):
    _, workdir, final = toy_run
    losses = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [row["train/loss"] for row in losses if "train/loss" in row]
    assert len(train) == 8 and all(math.isfinite(x) for x in train)
    # Unweighted cross-entropy starts at log(V - 1) (uniform logits without the mask id).
    vocab_size = runs.read_run(workdir).tokenizer.vocab_size
    assert train[0] == pytest.approx(math.log(vocab_size - 1), rel=1e-3)
    assert np.mean(train[-3:]) < train[0]
    scored = trainer.evaluate_workdir(workdir)
    assert scored["step"] == 8
    np.testing.assert_allclose(scored["eval/nll_nats_per_token"],
                               final["eval/nll_nats_per_token"], rtol=1e-5)


def test_samples_through_the_run_loader(toy_run, tmp_path):
    _, workdir, _ = toy_run
    out = tmp_path / "samples.jsonl"
    summary = runs.sample_to_file(str(workdir), "fast_dllm", str(out), num_samples=2,
                                  length=32, batch_size=2)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    mask_id = runs.read_run(workdir).tokenizer.vocab_size - 1
    assert len(records) == 2 and all(len(r["tokens"]) == 32 for r in records)
    assert all(mask_id not in r["tokens"] for r in records)
    assert 1 <= summary["mean_nfe"] <= 32
    with pytest.raises(ValueError, match="cannot sample a masked diffusion run"):
        runs.sample_to_file(str(workdir), "ar", str(out), num_samples=1)


def test_exports_and_loads_back(toy_run, tmp_path):
    _, workdir, _ = toy_run
    exporter.export_workdir(workdir, tmp_path / "export", "safetensors", verify=False)
    exported = convert.load_export(tmp_path / "export")
    assert isinstance(exported.process, MaskedCrossEntropy)
    run = runs.load_run(workdir)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(exported.params),
                 jax.device_get(run.params))
