"""Everything a config determines, built once and shared by train, evaluate and sample."""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import flax
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from dlm import config_validation
from dlm.data import pipeline, tokenizers
from dlm.diffusion import process as process_lib
from dlm.evaluation import likelihood
from dlm.models import configs as model_configs
from dlm.training import checkpoint as checkpoint_lib
from dlm.training import mesh as mesh_lib
from dlm.training import optimizer as optimizer_lib
from dlm.training import step as step_lib
from dlm.training.state import TrainState

CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"


@dataclasses.dataclass
class Experiment:
    """The data, tokenizer, network, process, mesh and optimizer of one run."""

    config: ml_collections.ConfigDict
    corpus: pipeline.Corpus
    model: object  # flax.linen.Module
    process: object  # dlm.diffusion.process.Process
    mesh: jax.sharding.Mesh
    tx: object  # optax.GradientTransformation

    @property
    def tokenizer(self) -> tokenizers.Tokenizer:
        return self.corpus.tokenizer

    @functools.cached_property
    def nll_fn(self):
        """The jitted likelihood of one evaluation batch (built once: no recompiles)."""
        return likelihood.make_nll_fn(self.model, self.process, self.mesh,
                                      global_batch=self.config.data.eval_batch_size)

    def state_sharding(self):
        """How the train state lies on the mesh: replicated, or FSDP (`config.fsdp`)."""
        abstract = jax.eval_shape(self._create_state)
        return mesh_lib.state_sharding(abstract, self.mesh, fsdp=self.config.fsdp)

    def init_state(self) -> TrainState:
        """The initial state laid out by `state_sharding` (parameter count logged)."""
        state = jax.jit(self._create_state, out_shardings=self.state_sharding())()
        logging.info("%s %s: %s parameters", self.config.model.name, self.config.model.size,
                     f"{model_configs.param_count(state.params):,}")
        return state

    def _create_state(self) -> TrainState:
        config = self.config
        rng = jax.random.PRNGKey(config.seed)
        init_rng, state_rng = jax.random.split(rng)
        params = model_configs.init_params(self.model, config.data.seq_len, init_rng)
        return TrainState.create(params, self.tx, state_rng,
                                 use_ema=config.optimizer.ema_decay > 0,
                                 process_state=process_lib.initial_state(self.process))

    def search_process_state(self, params, state_sharding=None):
        """(process state, metrics) from the process's `search_state` on validation batches
        (`config.process.search_batches` of them, fixed noise), or None when the process has
        no search configured. `state_sharding` (the train state's) places the result."""
        if not getattr(self.process, "searches", False):
            return None
        config = self.config
        batches = [mesh_lib.global_batch(b, self.mesh) for b in pipeline.eval_batches(
            config.data, self.corpus, config.eval.split,
            num_batches=config.process.get("search_batches", 4))]
        rng = jax.random.PRNGKey(config.eval.seed)

        def statistic_of(argument):
            values = [self._search_fn(params, batch, jax.random.fold_in(rng, i), argument)
                      for i, batch in enumerate(batches)]
            return np.concatenate([np.asarray(multihost_utils.process_allgather(v, tiled=True))
                                   for v in values])

        process_state, metrics = self.process.search_state(statistic_of)
        if state_sharding is not None:
            process_state = jax.device_put(process_state, state_sharding.process_state)
        return process_state, metrics

    @functools.cached_property
    def _search_fn(self):
        """Jitted `(params, batch, rng, argument) -> process.search_statistic` over the mesh."""
        def per_device(params, batch, rng, argument):
            fn = step_lib.model_fn(self.model, params, train=False)
            return self.process.search_statistic(
                fn, batch, rng, num_examples=self.config.data.eval_batch_size, candidate=argument)

        return jax.jit(jax.shard_map(per_device, mesh=self.mesh,
                                     in_specs=(P(), P(step_lib.DATA_AXIS), P(), P()),
                                     out_specs=P(step_lib.DATA_AXIS)))


def build(config: ml_collections.ConfigDict) -> Experiment:
    """Validates `config` and builds the run's parts (prepares the dataset on first use)."""
    config_validation.validate(config)
    corpus = pipeline.load_corpus(config.data)
    config = ml_collections.ConfigDict(config.to_dict())  # a copy we may annotate
    config.model.vocab_size = corpus.tokenizer.vocab_size
    model = model_configs.build_model(config.model, corpus.tokenizer.vocab_size)
    process = process_lib.make_process(config, vocab_size=corpus.tokenizer.vocab_size)
    mesh = mesh_lib.make_mesh()
    per_device = config.data.batch_size // max(jax.device_count(), 1)
    if per_device % config.optimizer.grad_accum_steps:
        raise ValueError(
            f"config.data.batch_size={config.data.batch_size} over {jax.device_count()} "
            f"devices gives {per_device} rows per device, not divisible by "
            f"config.optimizer.grad_accum_steps={config.optimizer.grad_accum_steps}")
    tx = optimizer_lib.make_optimizer(config.optimizer, config.total_steps)
    return Experiment(config, corpus, model, process, mesh, tx)


def save_run_files(experiment: Experiment, workdir: pathlib.Path) -> None:
    """Writes the config and tokenizer beside the checkpoints (process 0 only)."""
    if jax.process_index() != 0:
        return
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / CONFIG_FILE).write_text(experiment.config.to_json_best_effort(indent=2))
    experiment.tokenizer.save(workdir / TOKENIZER_DIR)


def load_weights(workdir: str | pathlib.Path, mesh: jax.sharding.Mesh, *,
                 step: int | None = None) -> tuple[dict, int]:
    """(params, step): the weights of the run in `workdir` (its EMA when it kept one) in
    that run's own structure, replicated over `mesh`; `step` defaults to the latest.

    Raises FileNotFoundError when the workdir, its tokenizer or the checkpoint is missing.
    """
    workdir = pathlib.Path(workdir).expanduser().resolve()
    config = load_config(workdir)
    vocab_size = tokenizers.load_tokenizer(workdir / TOKENIZER_DIR).vocab_size
    module = model_configs.build_model(config.model, vocab_size)
    abstract = jax.eval_shape(functools.partial(
        model_configs.init_params, module, int(config.data.seq_len)), jax.random.PRNGKey(0))
    replicated = jax.sharding.NamedSharding(mesh, P())
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)
    loaded, step = checkpoint_lib.restore_fields(
        workdir, {"params": abstract, "ema_params": abstract}, step=step)
    return (loaded["params"] if loaded["ema_params"] is None else loaded["ema_params"]), step


def merge_params(target, source, *, source_name: str = "the source") -> tuple[dict, int]:
    """(params, copied): `target` with every leaf that `source` has at the same path (and
    shape) replaced by the source's; the others keep their value. Raises ValueError when a
    shared path differs in shape or when no path is shared."""
    target_flat = flax.traverse_util.flatten_dict(target, sep="/")
    source_flat = flax.traverse_util.flatten_dict(source, sep="/")
    shared = target_flat.keys() & source_flat.keys()
    for path in shared:
        if target_flat[path].shape != source_flat[path].shape:
            raise ValueError(
                f"parameter {path} has shape {source_flat[path].shape} in {source_name} but "
                f"{target_flat[path].shape} here: different model sizes or vocabularies")
    if not shared:
        raise ValueError(f"{source_name} shares no parameter with this model "
                         f"(its names: {sorted(source_flat)[:4]}...)")
    merged = {path: source_flat.get(path, value) for path, value in target_flat.items()}
    return flax.traverse_util.unflatten_dict(merged, sep="/"), len(shared)


def load_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The config a run in `workdir` was trained with."""
    path = pathlib.Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir} a dlm training workdir?")
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
    if "vocab_size" in config.model:  # recorded for readers; the tokenizer decides it
        del config.model["vocab_size"]
    return config
