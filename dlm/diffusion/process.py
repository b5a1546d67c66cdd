"""The protocol through which the trainer, evaluator and sampler use a diffusion process.

A process (MDLM, BD3-LM, AR; later EDLM, SDTT) decides how tokens are corrupted, which
attention the network needs and how the loss is weighted. It never sees parameters: it
calls the network through a `ModelFn` with params and dropout rng already bound.

A process may also carry a *process state* that training adapts and checkpoints: BD3-LM's
clipped noise interval, or the frozen network a process trains against (EDLM-NCE's noise
denoiser, SDTT's teacher). Three optional methods handle it (see `dlm.training.trainer`):
- `init_state(source_params)` returns it (no method: None). `source_params` are the weights
  of the run named by `config.init_from` in that run's own structure, or None: then the
  state must still have its full structure (a placeholder), since checkpoints are restored
  into it. `loss` receives the state as `state`.
- `next_state(state, params, ema_params, step)`, inside the jitted train step after each
  update (`step` counts the updates done), e.g. to swap a teacher for the student.
- `search_state`, at each evaluation, recomputes it from validation batches.
- `round_checkpoint_name(step)` (host side), for processes trained in rounds: a name when
  train step `step` ends a round; the trainer then keeps that state as WORKDIR/rounds/NAME.

Batch layout (a dict):
  tokens      int32 [B, L]
  loss_mask   float32 [B, L]   1 for real tokens, 0 for padding
  example_id  int32 [B]        the example's index within the GLOBAL batch

All randomness is per example (keys from `example_keys`, times from
`schedules.stratified_uniform`), so a global batch gives the same numbers whether it runs on
one device or is split across many.
"""

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp

# (tokens_BL int32, t_B float32 | None, **options) -> logits_BLV float32 over the full
# vocabulary, including the mask id (mask_id = V - 1). Options (all optional): positions_BL
# (RoPE positions), mask (a MaskSpec overriding the network's), output_len (logits for the
# first positions only).
ModelFn = Callable[..., jax.Array]
Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]

PROCESSES = ("mdlm", "bd3lm", "ar", "sdtt", "edlm_nce")
ATTENTION_KINDS = ("full", "causal", "bd3lm")


class Process(Protocol):
    """What every process offers the trainer, evaluator and sampler."""

    # Which attention the network needs: one of ATTENTION_KINDS.
    attention_kind: str

    def loss(
        self, model_fn: ModelFn, batch: Batch, rng: jax.Array, *, num_examples: int,
        state: Any = None,
    ) -> tuple[jax.Array, Metrics]:
        """Training loss on this (local) batch under the process state `state`.

        Returns (loss, metrics): loss is a float32 scalar, sum of per-token losses / number of
        loss tokens in this batch; metrics holds float32 scalars `loss_sum` and `token_count`
        so that the global mean is psum(loss_sum) / psum(token_count). `num_examples` is the
        static global batch size used to stratify per-example randomness.
        """
        ...

    def nll(
        self, model_fn: ModelFn, batch: Batch, rng: jax.Array, *, num_examples: int,
        state: Any = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Per-sequence negative log-likelihood in nats (an upper bound for diffusion; an
        estimate for EDLM), under the process state `state` (EDLM's frozen denoiser).

        Returns (nll_sum_B, token_count_B), both float32 [B]: the summed per-token NLL of
        each sequence and the number of tokens it was summed over.
        """
        ...


def initial_state(process: Process, source_params: Any = None) -> Any:
    """The process state a run starts from: `process.init_state(source_params)`, or None."""
    init = getattr(process, "init_state", None)
    return None if init is None else init(source_params)


def next_state(process: Process, state: Any, params: Any, ema_params: Any,
               step: jax.Array) -> Any:
    """The process state after train step `step`: `process.next_state(...)`, or unchanged."""
    advance = getattr(process, "next_state", None)
    return state if advance is None else advance(state, params, ema_params, step)


def round_checkpoint_name(process: Process, step: int) -> str | None:
    """For a process trained in rounds (SDTT): the name under which the state after train step
    `step` is kept when that step ends a round (`process.round_checkpoint_name`), else None."""
    name_of = getattr(process, "round_checkpoint_name", None)
    return None if name_of is None else name_of(step)


def example_keys(rng: jax.Array, example_id_B: jax.Array) -> jax.Array:
    """One key per example, fold_in(rng, example_id); shape [B] (typed) or [B, 2] (raw)."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, example_id_B)


def exclude_token(logits_BLV: jax.Array, token_id: int) -> jax.Array:
    """float32 logits_BLV with column `token_id` set to -inf (zero probability)."""
    logits_BLV = logits_BLV.astype(jnp.float32)
    is_token_V = jnp.arange(logits_BLV.shape[-1]) == token_id
    return jnp.where(is_token_V, -jnp.inf, logits_BLV)


def make_process(config, *, vocab_size: int | None = None) -> Process:
    """The process named by `config.process.name` ('mdlm', 'bd3lm', 'ar', 'sdtt' or
    'edlm_nce').

    `vocab_size` (V, including the mask token, mask_id = V - 1) defaults to
    `config.model.vocab_size`. Raises ValueError naming the offending config key.
    """
    # Imported here: these modules import this one.
    from dlm.diffusion import autoregressive, block, distill, energy, masked, schedules

    name = config.process.get("name", None)
    if name not in PROCESSES:
        raise ValueError(f"process.name={name!r}; allowed values: {', '.join(PROCESSES)}")
    if vocab_size is None:
        model_config = config.get("model", None)
        vocab_size = None if model_config is None else model_config.get("vocab_size", None)
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"model.vocab_size={vocab_size!r} must be an int >= 2")
    mask_id = vocab_size - 1
    if name == "ar":
        return autoregressive.Autoregressive(mask_id=mask_id)

    t_min = float(config.process.get("t_min", 1e-3))
    if not 0.0 < t_min < 1.0:
        raise ValueError(f"process.t_min={t_min} must lie in (0, 1)")
    num_timesteps = config.process.get("num_timesteps", 0)
    if not isinstance(num_timesteps, int) or num_timesteps < 0:
        raise ValueError(
            f"process.num_timesteps={num_timesteps!r} must be an int >= 0 (0: continuous time)"
        )
    if name == "bd3lm":
        return block.from_config(config, schedules.make_schedule(config), mask_id, t_min)
    base = masked.MaskedDiffusion(
        schedule=schedules.make_schedule(config),
        mask_id=mask_id,
        t_min=t_min,
        num_timesteps=num_timesteps,
    )
    if name == "sdtt":  # MDLM distilled by its own teacher network
        from dlm.models import configs as model_configs

        return distill.from_config(config, base,
                                   model_configs.build_model(config.model, vocab_size))
    if name == "edlm_nce":  # an energy network trained against a frozen MDLM denoiser
        return energy.from_config(config, base, vocab_size)
    return base
