"""Everything a config determines, built once and shared by train, evaluate and sample."""

from __future__ import annotations

import dataclasses
import functools

import flax
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from dlm import parallel
from dlm.data import pipeline, tokenizers
from dlm.diffusion import process as process_lib
from dlm.evaluation import likelihood
from dlm.models import registry as model_registry
from dlm.parallel import distributed
from dlm.training import config_validation
from dlm.training import optimizer as optimizer_lib
from dlm.training.train_state import TrainState


@dataclasses.dataclass
class Experiment:
    """The data, tokenizer, network, process, mesh and optimizer of one run; `frozen` holds
    the Flax modules of the process's frozen networks (`Process.frozen_networks`)."""

    config: ml_collections.ConfigDict
    corpus: pipeline.Corpus
    model: object  # flax.linen.Module
    process: process_lib.Process
    mesh: jax.sharding.Mesh
    tx: object  # optax.GradientTransformation
    frozen: dict = dataclasses.field(default_factory=dict)

    @property
    def tokenizer(self) -> tokenizers.Tokenizer:
        return self.corpus.tokenizer

    @functools.cached_property
    def nll_fn(self):
        """The jitted likelihood of one evaluation batch (built once: no recompiles)."""
        return likelihood.make_nll_fn(self.model, self.process, self.mesh,
                                      global_batch=self.config.data.eval_batch_size,
                                      frozen=self.frozen)

    def state_sharding(self):
        """How the train state lies on the mesh: replicated, or FSDP (`config.fsdp`)."""
        abstract = jax.eval_shape(self._create_state)
        return parallel.state_sharding(abstract, self.mesh, fsdp=self.config.fsdp)

    def init_state(self) -> TrainState:
        """The initial state laid out by `state_sharding` (parameter count logged)."""
        state = jax.jit(self._create_state, out_shardings=self.state_sharding())()
        logging.info("%s %s: %s parameters", self.config.model.name, self.config.model.size,
                     f"{model_registry.param_count(state.params):,}")
        return state

    def _create_state(self) -> TrainState:
        config = self.config
        rng = jax.random.PRNGKey(config.seed)
        init_rng, state_rng = jax.random.split(rng)
        params = model_registry.init_params(self.model, config.data.seq_len, init_rng)
        return TrainState.create(params, self.tx, state_rng,
                                 use_ema=config.optimizer.ema_decay > 0,
                                 process_state=self.initial_process_state())

    def initial_process_state(self, source_params=None):
        """`process.init_state` with its frozen networks set to `source_params` (the
        init_from run's weights, in that run's structure) or, when None, placeholders of
        their structure. ValueError when the source does not fit a frozen network."""
        return self.process.init_state(parallel.frozen_params(
            self.process, self.frozen, int(self.config.data.seq_len), source_params))

    def search_process_state(self, params, state_sharding=None):
        """(process state, metrics) from the process's `search_state` on validation batches
        (`config.process.search_batches` of them, fixed noise), or None when the process has
        no search configured. `state_sharding` (the train state's) places the result."""
        if not self.process.searches:
            return None
        config = self.config
        batches = [parallel.global_batch(b, self.mesh) for b in pipeline.eval_batches(
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
            fn = parallel.model_fn(self.model, params, train=False)
            return self.process.search_statistic(
                fn, batch, rng, num_examples=self.config.data.eval_batch_size, candidate=argument)

        return jax.jit(jax.shard_map(per_device, mesh=self.mesh,
                                     in_specs=(P(), P(parallel.DATA_AXIS), P(), P()),
                                     out_specs=P(parallel.DATA_AXIS)))


def build(config: ml_collections.ConfigDict) -> Experiment:
    """Validates `config` and builds the run's parts (prepares the dataset on first use)."""
    config_validation.validate(config)
    corpus = distributed.main_process_first(lambda: pipeline.load_corpus(config.data),
                                            "dlm_corpus_prepared")
    config = ml_collections.ConfigDict(config.to_dict())  # a copy we may annotate
    config.model.vocab_size = corpus.tokenizer.vocab_size
    model = model_registry.build_model(config.model, corpus.tokenizer.vocab_size)
    process = process_lib.make_process(config, vocab_size=corpus.tokenizer.vocab_size)
    if corpus.conditional and not process.conditional:
        allowed = [name for name, cls in process_lib.PROCESSES.items() if cls.conditional]
        raise ValueError(f"data.name={config.data.name!r} holds prompt/response examples, which "
                         f"process.name={config.process.name!r} does not train on; use one of "
                         f"{', '.join(allowed)}")
    frozen = parallel.frozen_modules(process, model, config.model,
                                     corpus.tokenizer.vocab_size)
    mesh = parallel.make_mesh()
    per_device = config.data.batch_size // max(jax.device_count(), 1)
    if per_device % config.optimizer.grad_accum_steps:
        raise ValueError(
            f"config.data.batch_size={config.data.batch_size} over {jax.device_count()} "
            f"devices gives {per_device} rows per device, not divisible by "
            f"config.optimizer.grad_accum_steps={config.optimizer.grad_accum_steps}")
    tx = optimizer_lib.make_optimizer(config.optimizer, config.total_steps)
    return Experiment(config, corpus, model, process, mesh, tx, frozen)


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
