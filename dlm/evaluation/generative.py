"""Quality and speed of generated samples.

Generative perplexity is the perplexity of the samples under a separate "judge" causal model
(the standard check that samples look like text to another model); alone it rewards dull,
repetitive text, so it is reported with the unigram entropy of each sample, which drops when a
sample repeats itself. Speed is tokens generated per second of sampling wall time, with the
number of network calls (NFE).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dlm.diffusion.autoregressive import Autoregressive
from dlm.parallel import model_fn


def scored_mask(tokens_BL: np.ndarray, *, mask_id: int, pad_id: int | None = None,
                end_id: int | None = None, start_BL: np.ndarray | None = None) -> np.ndarray:
    """bool [B, L]: the tokens that count as text: not mask or pad, and (with `end_id`) not
    after the first `end_id` at or after a True of `start_BL` (default: anywhere)."""
    tokens_BL = np.asarray(tokens_BL)
    keep_BL = tokens_BL != mask_id
    if pad_id is not None:
        keep_BL &= tokens_BL != pad_id
    if end_id is not None:
        searched_BL = np.ones_like(keep_BL) if start_BL is None else np.asarray(start_BL, bool)
        is_end_BL = (tokens_BL == end_id) & searched_BL
        ended_before_BL = np.cumsum(is_end_BL, axis=-1) - is_end_BL > 0
        keep_BL &= ~ended_before_BL
    return keep_BL


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy in nats of the empirical distribution of the tokens of one sample [n]
    (0 for a sample that repeats one token; log n at most)."""
    tokens = np.asarray(tokens).ravel()
    if tokens.size == 0:
        return 0.0
    counts = np.unique(tokens, return_counts=True)[1].astype(np.float64)
    probs = counts / counts.sum()
    return float(-np.sum(probs * np.log(probs)))


def make_judge_nll(judge_module, *, window: int) -> Callable:
    """Jitted `nll(params, tokens_BL, valid_BL) -> (nll_sum_B, count_B)` float32 [B] under a
    causal judge: the summed negative log-likelihood of the valid tokens of each row and how
    many were scored.

    Rows are cut into consecutive windows of `window` tokens (the judge's training length),
    each scored on its own: the first token of a window and tokens next to an invalid one
    are conditioned on, not scored.
    """
    process = Autoregressive(mask_id=judge_module.vocab_size - 1)

    def nll(params, tokens_BL, valid_BL):
        batch, length = tokens_BL.shape
        pad = (-length) % window
        tokens_BL = jnp.pad(tokens_BL, ((0, 0), (0, pad)))
        valid_BL = jnp.pad(valid_BL, ((0, 0), (0, pad)))
        rows = batch * ((length + pad) // window)
        windows = {
            "tokens": tokens_BL.reshape(rows, window),
            "loss_mask": valid_BL.reshape(rows, window).astype(jnp.float32),
            "example_id": jnp.arange(rows, dtype=jnp.int32),
        }
        fn = model_fn(judge_module, params, train=False)
        nll_R, count_R = process.nll(fn, windows, None, num_examples=rows)
        return nll_R.reshape(batch, -1).sum(-1), count_R.reshape(batch, -1).sum(-1)

    return jax.jit(nll)


def generative_perplexity(nll_sums, counts) -> float:
    """exp(total NLL / total scored tokens) over all samples (NaN when nothing was scored)."""
    total = float(np.sum(counts))
    return math.exp(float(np.sum(nll_sums)) / total) if total > 0 else float("nan")


def speed(num_tokens: int, seconds: float, nfe: float | None = None) -> dict[str, float]:
    """Tokens per second, wall time and (when given) mean network calls per sample."""
    metrics = {"tokens_per_second": num_tokens / seconds if seconds > 0 else float("inf"),
               "seconds": seconds}
    if nfe is not None:
        metrics["mean_nfe"] = float(nfe)
    return metrics
