"""The protocol through which the trainer, evaluator and sampler use a diffusion process,
and the registry of processes (`config.process.name`).

A process (MDLM, BD3-LM, AR, SDTT, EDLM-NCE, ...) decides how tokens are corrupted, which
network it trains, and how the loss is weighted. It never sees parameters: it calls the
network through a `ModelFn` with params and dropout rng already bound, and any frozen network
it trains against (SDTT's teacher, EDLM-NCE's denoiser) through a `ModelFn` the caller binds
from the process state.

Adding a process is a module with one `Process` subclass registered under its name, a
config in configs/, and its tests; the trainer, evaluator, sampler loading and export read
everything they need from the class:

    @process.PROCESSES.register("my_process")
    @dataclasses.dataclass(frozen=True)
    class MyProcess(process.Process):
        models = ("dit",)
        network_kind = "denoiser"

        @classmethod
        def from_config(cls, config, vocab_size): ...
        def loss(self, model_fn, batch, rng, *, num_examples, state=None, frozen=None): ...
        def nll(self, model_fn, batch, rng, *, num_examples, state=None, frozen=None): ...

The registry is filled when `dlm.diffusion` is imported (its `__init__` imports every
built-in process module); a process defined elsewhere registers itself on import the same way.

Batch layout (a dict):
  tokens       int32 [B, L]
  loss_mask    float32 [B, L]  1 where the loss counts: real tokens of unconditional data;
                               the response and its fill of prompt/response data
  example_id   int32 [B]       the example's index within the GLOBAL batch
  prompt_mask  float32 [B, L]  prompt/response data only (`dlm.data.sft`): 1 on the
                               conditioning positions (BOS prompt SEP), which are never
                               corrupted and never scored
  valid        float32 [B, L]  prompt/response data only: 0 on padding, which no query
                               attends to (pass `attention_options(batch)` to the network)

A process that reads `prompt_mask` and `valid` sets `conditional = True`; the trainer refuses
prompt/response data for any other.

All randomness is per example (keys from `example_keys`, times from
`schedules.stratified_uniform`), so a global batch gives the same numbers whether it runs on
one device or is split across many.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from dlm.registry import Registry

# (tokens_BL int32, t_B float32 | None, **options) -> logits_BLV float32 over the full
# vocabulary, including the mask id (mask_id = V - 1). Options (all optional): positions_BL
# (RoPE positions), mask (a MaskSpec overriding the network's), output_len (logits for the
# first positions only), kv_valid_BL (bool [B, L]: False at keys no query may attend to);
# an energy network (EDLM) takes xt_BL and returns E_B instead.
ModelFn = Callable[..., jax.Array]
Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]

# How samplers see the network a process trains (see `dlm.sampling.networks`): a masked
# denoiser, a block diffusion denoiser, a causal LM, or an energy (EDLM-NCE: not sampled
# from, it corrects a denoiser).
NETWORK_KINDS = ("denoiser", "block", "causal", "energy")


class Process:
    """What every process offers the trainer, evaluator and sampler: a base class whose
    optional hooks have working defaults, so a subclass writes only what it changes.

    Required: the class attributes `models` and `network_kind`, `from_config`, `loss`, `nll`.

    Optional, for a *process state* that training adapts and checkpoints (BD3-LM's clipped
    noise interval; SDTT's teacher and round; EDLM-NCE's frozen denoiser):
    `frozen_networks`, `init_state`, `next_state`, `searches` with `search_statistic` and
    `search_state`, and `round_checkpoint_name`.
    """

    # The model names (`config.model.name`, see `dlm.models.registry`) it can train; the
    # first is the default. Config validation rejects any other.
    models: ClassVar[tuple[str, ...]] = ()
    # One of NETWORK_KINDS: how the samplers (and export) see the trained network.
    network_kind: ClassVar[str] = ""
    # Whether `dlm.export` may write its network for PyTorch users.
    exportable: ClassVar[bool] = False
    # Whether it trains on prompt/response data: reads the batch's `prompt_mask` (never
    # corrupted, never scored) and `valid` (padding never attended).
    conditional: ClassVar[bool] = False

    @classmethod
    def from_config(cls, config, vocab_size: int) -> Process:
        """The process of a run config (V = vocab_size, including the mask id V - 1).
        Raises ValueError naming the offending config key."""
        raise NotImplementedError

    @classmethod
    def check_config(cls, config) -> None:
        """Checks the keys this process reads before anything is built (the config's
        `process.*` and any top-level key it owns); ValueError naming the key. Default:
        nothing beyond what `from_config` checks."""

    def loss(self, model_fn: ModelFn, batch: Batch, rng: jax.Array, *, num_examples: int,
             state: Any = None, frozen: Mapping[str, ModelFn] | None = None
             ) -> tuple[jax.Array, Metrics]:
        """Training loss on this (local) batch under the process state `state`, with the
        frozen networks of `frozen_networks` bound in `frozen` ({name: ModelFn}).

        Returns (loss, metrics): loss is a float32 scalar, sum of per-token losses / number of
        loss tokens in this batch; metrics holds float32 scalars `loss_sum` and `token_count`
        so that the global mean is psum(loss_sum) / psum(token_count). `num_examples` is the
        static global batch size used to stratify per-example randomness.
        """
        raise NotImplementedError

    def nll(self, model_fn: ModelFn, batch: Batch, rng: jax.Array, *, num_examples: int,
            state: Any = None, frozen: Mapping[str, ModelFn] | None = None
            ) -> tuple[jax.Array, jax.Array]:
        """Per-sequence negative log-likelihood in nats (an upper bound for diffusion; an
        estimate for EDLM), under the process state and frozen networks (as in `loss`).

        Returns (nll_sum_B, token_count_B), both float32 [B]: the summed per-token NLL of
        each sequence and the number of tokens it was summed over.
        """
        raise NotImplementedError

    # ---- process state ----------------------------------------------------------------------

    def frozen_networks(self) -> dict[str, str | None]:
        """The frozen networks the process trains against: {state key: model name}, None
        naming the run's own model. Each is a copy of the `config.init_from` run's weights
        (its EMA when it kept one) held in the process state under its key, never trained
        by the optimizer; the caller binds it as `frozen[key]` (a ModelFn, train=False,
        gradient stopped). Default: none."""
        return {}

    def init_state(self, frozen_params: Mapping[str, Any]) -> Any:
        """The process state a run starts from. `frozen_params` holds the params of each of
        `frozen_networks` (the init_from run's weights, or placeholders of their structure
        when the state is only a restore target). Default: None (no state)."""
        del frozen_params
        return None

    def next_state(self, state: Any, params: Any, ema_params: Any, step: jax.Array) -> Any:
        """The state after train step `step` (updates done), inside the jitted train step,
        e.g. to swap a teacher for the student. Default: unchanged."""
        del params, ema_params, step
        return state

    @property
    def searches(self) -> bool:
        """Whether each evaluation recomputes the state by `search_state`. Default: no."""
        return False

    def search_statistic(self, model_fn: ModelFn, batch: Batch, rng: jax.Array, *,
                         num_examples: int, candidate: jax.Array) -> jax.Array:
        """A per-example statistic of `batch` under a candidate state value (jitted over the
        mesh, rows split like the batch); read by `search_state`."""
        raise NotImplementedError

    def search_state(self, statistic_of: Callable[[Any], Any]) -> tuple[Any, dict[str, float]]:
        """(state, metrics) at an evaluation: `statistic_of(candidate)` returns the
        `search_statistic` of the validation batches (fixed noise) for a candidate."""
        raise NotImplementedError

    def round_checkpoint_name(self, step: int) -> str | None:
        """On the host, for processes trained in rounds (SDTT): a name when train step
        `step` ends a round; the trainer then keeps that state as WORKDIR/rounds/NAME, a run
        of its own. Default: None (no rounds)."""
        del step
        return None


PROCESSES: Registry[type[Process]] = Registry("config.process.name")


def example_keys(rng: jax.Array, example_id_B: jax.Array) -> jax.Array:
    """One key per example, fold_in(rng, example_id); shape [B] (typed) or [B, 2] (raw)."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, example_id_B)


def given_mask(batch: Batch) -> jax.Array | None:
    """bool [B, L]: the batch's conditioning positions (prompt/response data), else None."""
    prompt_mask = batch.get("prompt_mask")
    return None if prompt_mask is None else prompt_mask > 0


def attention_options(batch: Batch, copies: int = 1) -> dict[str, jax.Array]:
    """The ModelFn options that keep padding out of attention: {'kv_valid_BL': ...} when
    the batch marks padding (`valid`), else {}. `copies` > 1 repeats it along the length
    (BD3-LM's x_t ⊕ x_0 input)."""
    valid = batch.get("valid")
    if valid is None:
        return {}
    return {"kv_valid_BL": jnp.tile(valid > 0, (1, copies))}


def exclude_token(logits_BLV: jax.Array, token_id: int) -> jax.Array:
    """float32 logits_BLV with column `token_id` set to -inf (zero probability)."""
    logits_BLV = logits_BLV.astype(jnp.float32)
    is_token_V = jnp.arange(logits_BLV.shape[-1]) == token_id
    return jnp.where(is_token_V, -jnp.inf, logits_BLV)


def mask_id_of(config, vocab_size: int) -> int:
    """The mask id of a run config: `process.mask_id`, where -1 (the default, and what a
    run saved before the key existed reads) is the last id V - 1. ValueError naming the key
    when it is not a token id."""
    mask_id = config.process.get("mask_id", -1)
    if mask_id == -1:
        return vocab_size - 1
    if not isinstance(mask_id, int) or isinstance(mask_id, bool) or not 0 <= mask_id < vocab_size:
        raise ValueError(f"process.mask_id={mask_id!r} must be -1 (the last id) or a token id "
                         f"below the vocabulary size {vocab_size}")
    return mask_id


def process_class(config) -> type[Process]:
    """The registered class named by `config.process.name` (ValueError listing the names)."""
    return PROCESSES.get(config.process.get("name", None))


def make_process(config, *, vocab_size: int | None = None) -> Process:
    """The process named by `config.process.name` (one of `PROCESSES`).

    `vocab_size` (V, including the mask token, mask_id = V - 1) defaults to
    `config.model.vocab_size`. Raises ValueError naming the offending config key.
    """
    cls = process_class(config)
    if vocab_size is None:
        model_config = config.get("model", None)
        vocab_size = None if model_config is None else model_config.get("vocab_size", None)
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"model.vocab_size={vocab_size!r} must be an int >= 2")
    cls.check_config(config)
    return cls.from_config(config, vocab_size)
