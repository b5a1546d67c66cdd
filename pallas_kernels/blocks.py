"""The arithmetic on one (query tile, key tile) pair, shared by every kernel and backend.

The functions take tiles already loaded from refs (how they are loaded is the driver's
business: a loop over a compacted list on GPU / in interpret mode, a pipelined grid on TPU)
and return the updated float32 accumulators. Vectors that broadcast along a tile are kept
2-D ([bq, 1] columns, [1, bq] rows) so that no backend needs a 1-D relayout.

A masked logit is set to MASK_VALUE (finite, so no inf - inf) and its probability to exactly
0, so a query that sees no key keeps a row sum of 0 and outputs 0, and its gradients are 0.
"""

import jax
import jax.numpy as jnp

from dlm.models.masks import MaskSpec

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# Log-sum-exp stored for a row that saw no key: exp(s - EMPTY_ROW_LSE) == 0 for any logit s.
EMPTY_ROW_LSE = 0.7 * float(jnp.finfo(jnp.float32).max)

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


def _dot(a, b, dims):
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def allowed_tile(mask: MaskSpec, q_pos, k_pos, kv_len: int, kv_len_padded: int,
                 q_seg=None, kv_seg=None):
    """Elementwise bool tile: the mask predicate, padding keys and segment equality.

    `q_pos`/`k_pos` are int32 arrays that broadcast to the tile ([bq, 1] and [1, bk], or
    transposed for the dk/dv kernel); `q_seg`/`kv_seg` broadcast the same way.
    """
    allowed = mask.allows(q_pos, k_pos, kv_len)
    if kv_len_padded != kv_len:
        allowed = allowed & (k_pos < kv_len)
    if q_seg is not None:
        allowed = allowed & (q_seg == kv_seg)
    return allowed


def segment_tile(q_seg, kv_seg):
    """The segment-equality tile alone (FULL tiles still honour segments), or None."""
    return None if q_seg is None else q_seg == kv_seg


def forward_tile(q, k, v, allowed, max_prev, sum_prev, acc_prev, sm_scale: float):
    """One online-softmax step. q [bq, D], k/v [bk, D], allowed [bq, bk] bool or None;
    max_prev/sum_prev [bq, 1] are the running row maximum and (rescaled) row sum.

    Returns (row max [bq, 1], row sum [bq, 1], acc [bq, D]), all float32.
    """
    s = _dot(q, k, _NT) * sm_scale
    if allowed is not None:
        s = jnp.where(allowed, s, MASK_VALUE)
    max_next = jnp.maximum(max_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.exp(s - max_next)
    if allowed is not None:
        p = jnp.where(allowed, p, 0.0)
    correction = jnp.exp(max_prev - max_next)
    sum_next = correction * sum_prev + jnp.sum(p, axis=1, keepdims=True)
    acc_next = correction * acc_prev + _dot(p.astype(v.dtype), v, _NN)
    return max_next, sum_next, acc_next


def forward_finish(row_max, row_sum, acc):
    """Returns (out [bq, D] float32, lse [bq, 1] float32); a row that saw no key (row sum 0)
    gives 0 and EMPTY_ROW_LSE."""
    seen = row_sum > 0.0
    safe_sum = jnp.where(seen, row_sum, 1.0)
    out = acc / safe_sum
    lse = jnp.where(seen, row_max + jnp.log(safe_sum), EMPTY_ROW_LSE)
    return out, lse


def dq_tile(q, k, v, do, lse, delta, allowed, dq_prev, sm_scale: float):
    """dq contribution of one key tile. q/do [bq, D], k/v [bk, D], lse/delta [bq, 1].

    Returns dq [bq, D] float32 (unscaled by sm_scale: the caller multiplies once).
    """
    s = _dot(q, k, _NT) * sm_scale
    p = jnp.exp(s - lse)
    if allowed is not None:
        p = jnp.where(allowed, p, 0.0)
    dp = _dot(do, v, _NT)
    ds = p * (dp - delta)
    return dq_prev + _dot(ds.astype(k.dtype), k, _NN)


def dkv_tile(q, k, v, do, lse_row, delta_row, allowed_t, dk_prev, dv_prev, sm_scale: float):
    """dk/dv contribution of one query tile, computed key-major so no operand is transposed
    in memory. q/do [bq, D], k/v [bk, D], lse_row/delta_row [1, bq], allowed_t [bk, bq].

    Returns (dk [bk, D], dv [bk, D]) float32 (dk unscaled by sm_scale).
    """
    s_t = _dot(k, q, _NT) * sm_scale
    p_t = jnp.exp(s_t - lse_row)
    if allowed_t is not None:
        p_t = jnp.where(allowed_t, p_t, 0.0)
    dv = dv_prev + _dot(p_t.astype(do.dtype), do, _NN)
    dp_t = _dot(v, do, _NT)
    ds_t = p_t * (dp_t - delta_row)
    dk = dk_prev + _dot(ds_t.astype(q.dtype), q, _NN)
    return dk, dv
