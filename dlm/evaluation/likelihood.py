"""Likelihood evaluation: the per-token NELBO (diffusion) or exact NLL (AR) of a split.

Reported per token in nats, bits and perplexity, with the standard error of the per-token
estimate over sequences (which, for a diffusion bound, includes its Monte-Carlo noise).
The evaluation RNG is fixed by a seed and keyed by batch and example, so two runs (or two
checkpoints) are scored on the same noise draws.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from dlm.parallel import DATA_AXIS, frozen_fns, model_fn


def _per_device_nll(params, batch, rng, process_state, *, model, process, frozen,
                    num_examples):
    fn = model_fn(model, params, train=False)
    return process.nll(fn, batch, rng, num_examples=num_examples, state=process_state,
                       frozen=frozen_fns(frozen, process_state))


def make_nll_fn(model, process, mesh, *, global_batch: int, frozen=None):
    """Returns jitted `nll(params, batch, rng, process_state) -> (nll_sum_B, token_count_B)`
    over `mesh` (`process_state`: the run's, e.g. EDLM's frozen denoiser; None for most;
    `frozen`: the Flax modules of the process's frozen networks)."""
    per_device = functools.partial(_per_device_nll, model=model, process=process,
                                   frozen=frozen or {}, num_examples=global_batch)
    return jax.jit(jax.shard_map(per_device, mesh=mesh,
                                 in_specs=(P(), P(DATA_AXIS), P(), P()),
                                 out_specs=(P(DATA_AXIS), P(DATA_AXIS))))


def summarize(nll_sums: np.ndarray, token_counts: np.ndarray) -> dict[str, float]:
    """Per-token NLL in nats/bits/perplexity with a ratio-estimator standard error.

    Args:
      nll_sums: float [N], each sequence's summed NLL (or bound) in nats.
      token_counts: float [N], each sequence's number of scored tokens.
    """
    nll_sums = np.asarray(nll_sums, np.float64)
    token_counts = np.asarray(token_counts, np.float64)
    total = token_counts.sum()
    if total <= 0:
        raise ValueError("evaluation scored no tokens (all positions masked out?)")
    per_token = nll_sums.sum() / total
    n = len(nll_sums)
    residual = nll_sums - per_token * token_counts
    stderr = (math.sqrt((residual**2).sum() / (n * (n - 1))) / token_counts.mean()
              if n > 1 else float("nan"))
    return {
        "eval/nll_nats_per_token": per_token,
        "eval/bits_per_token": per_token / math.log(2),
        "eval/ppl": math.exp(per_token),
        "eval/nll_stderr": stderr,
        "eval/bits_stderr": stderr / math.log(2),
        "eval/tokens": total,
        "eval/sequences": float(n),
    }


def evaluate(nll_fn, params, batches: Iterable[dict], *, seed: int,
             process_state=None) -> dict[str, float]:
    """Scores every batch (global arrays) under the run's `process_state` and returns
    `summarize` of all sequences."""
    rng = jax.random.PRNGKey(seed)
    sums, counts = [], []
    for index, batch in enumerate(batches):
        nll, count = nll_fn(params, batch, jax.random.fold_in(rng, index), process_state)
        nll, count = multihost_utils.process_allgather((nll, count), tiled=True)
        sums.append(np.asarray(nll))
        counts.append(np.asarray(count))
    if not sums:
        raise ValueError("evaluation got no batches")
    return summarize(np.concatenate(sums), np.concatenate(counts))
