"""Attention dispatch: one entry point, a dense XLA reference and the Pallas kernels."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from dlm.models.masks import MaskSpec

IMPLS = ("xla", "pallas")


def mask_array(mask: MaskSpec, q_len: int, kv_len: int, q_offset=0) -> jax.Array:
    """Returns the mask as a bool array [q_len, kv_len] (True = may attend).

    A Python-int `q_offset` gives a host-computed constant (`MaskSpec.dense`); a traced one (a
    KV cache length inside jit) evaluates the same `MaskSpec.allows` predicate with jnp.
    """
    if isinstance(q_offset, int | np.integer):
        return jnp.asarray(mask.dense(q_len, kv_len, int(q_offset)))
    mask.check_lengths(q_len, kv_len, q_offset=None)
    q_pos = jnp.asarray(q_offset, jnp.int32) + jnp.arange(q_len, dtype=jnp.int32)[:, None]
    k_pos = jnp.arange(kv_len, dtype=jnp.int32)[None, :]
    return jnp.broadcast_to(mask.allows(q_pos, k_pos, kv_len), (q_len, kv_len))


def attend(
    q_BTHD: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    mask: MaskSpec,
    *,
    kv_valid_BS: jax.Array | None = None,
    q_offset=0,
    q_positions_BT: jax.Array | None = None,
    impl: str = "xla",
) -> jax.Array:
    """Scaled dot-product attention, scale 1/sqrt(D), with grouped-query heads: K divides H
    and query head h reads key/value head h // (H // K).

    Args:
      q_BTHD, k_BSKD, v_BSKD: queries [B, T, H, D], keys and values [B, S, K, D].
      mask: which keys each query may see; query i sits at absolute position q_offset + i.
      kv_valid_BS: optional bool [B, S]; False marks padding (or empty cache slots).
      q_offset: int or traced int32 scalar, the absolute position of the first query.
      q_positions_BT: optional int32 [B, T], each query's own absolute position (queries
        gathered from anywhere in the sequence: a partial forward against a cache indexed
        by position); it replaces q_offset for the mask, and the reference is used.
      impl: 'xla' (dense reference) or 'pallas' (pallas_kernels.block_sparse_attention; with
        a traced q_offset, i.e. KV-cache decoding, the reference is used).

    Returns:
      out_BTHD [B, T, H, D] in q's dtype. Logits and softmax are float32; a query that may
      see no key outputs zeros.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown model.attention_impl {impl!r}; allowed: {', '.join(IMPLS)}")
    # The kernel serves whole-sequence passes (training, scoring); KV-cache decoding, whose
    # offset is a traced cache length and whose queries are a few tokens, uses the reference.
    if impl == "pallas" and q_positions_BT is None and isinstance(q_offset, int | np.integer):
        # Imported on use: pallas_kernels itself imports dlm.models.masks.
        from pallas_kernels import block_sparse_attention

        segment_ids = None
        if kv_valid_BS is not None:  # padding keys get a segment id no query has
            q_segments_BT = jnp.zeros(q_BTHD.shape[:2], jnp.int32)
            kv_segments_BS = jnp.where(kv_valid_BS.astype(bool), 0, -1).astype(jnp.int32)
            segment_ids = (q_segments_BT, kv_segments_BS)
        return block_sparse_attention(q_BTHD, k_BSKD, v_BSKD, mask, segment_ids=segment_ids,
                                      q_offset=int(q_offset))
    return _attend_xla(q_BTHD, k_BSKD, v_BSKD, mask, kv_valid_BS, q_offset, q_positions_BT)


def _attend_xla(q_BTHD, k_BSKD, v_BSKD, mask, kv_valid_BS, q_offset, q_positions_BT=None):
    B, T, H, D = q_BTHD.shape
    _, S, K, _ = k_BSKD.shape
    if k_BSKD.shape != v_BSKD.shape or k_BSKD.shape[0] != B or k_BSKD.shape[3] != D:
        raise ValueError(f"attention shapes disagree: q {q_BTHD.shape}, k {k_BSKD.shape}, "
                         f"v {v_BSKD.shape}")
    if H % K:
        raise ValueError(f"{K} key/value heads must divide {H} query heads")
    # The scale goes on q ([B, T, H, D]), not on the [B, H, T, S] logits.
    q_BTKGD = (q_BTHD * jnp.asarray(1 / math.sqrt(D), q_BTHD.dtype)).reshape(B, T, K, H // K, D)
    valid_B1S = None if kv_valid_BS is None else kv_valid_BS[:, None, :].astype(bool)
    if q_positions_BT is not None:
        k_pos = jnp.arange(S, dtype=jnp.int32)[None, None, :]
        allowed_BTS = jnp.broadcast_to(
            mask.allows(q_positions_BT.astype(jnp.int32)[:, :, None], k_pos, S), (B, T, S))
        return _masked(q_BTKGD, k_BSKD, v_BSKD, allowed_BTS, valid_B1S, q_BTHD.dtype)
    if not isinstance(q_offset, int | np.integer):  # a traced offset: a KV-cache step
        allowed_BTS = mask_array(mask, T, S, q_offset)[None]
        return _masked(q_BTKGD, k_BSKD, v_BSKD, allowed_BTS, valid_B1S, q_BTHD.dtype)
    # A static mask: queries in chunks, each against the one key range that holds every key
    # it may see (a causal or block mask's zero tiles are never computed).
    dense_TS = mask.dense(T, S, int(q_offset))
    outs = []
    for (q0, q1), (k0, k1) in _tiles(dense_TS):
        tile_TS = dense_TS[q0:q1, k0:k1]
        allowed = None if tile_TS.all() else jnp.asarray(tile_TS)[None]
        valid = None if valid_B1S is None else valid_B1S[:, :, k0:k1]
        outs.append(_masked(q_BTKGD[:, q0:q1], k_BSKD[:, k0:k1], v_BSKD[:, k0:k1], allowed,
                            valid, q_BTHD.dtype))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


# Query chunks of a static mask: at most this many, each at least this long.
_MAX_CHUNKS, _MIN_CHUNK = 4, 64


def _tiles(dense_TS: np.ndarray) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """[((q0, q1), (k0, k1))]: query chunks and, for each, the smallest key range holding
    every key a query of the chunk may see (an empty one for queries that see none). One
    chunk over every key unless chunking leaves out at least a fifth of the logits."""
    T, S = dense_TS.shape
    whole = [((0, T), (0, S))]
    n = min(_MAX_CHUNKS, T // _MIN_CHUNK)
    if n < 2:
        return whole
    bounds = [T * i // n for i in range(n + 1)]
    tiles, work = [], 0
    for q0, q1 in zip(bounds[:-1], bounds[1:]):
        seen = np.flatnonzero(dense_TS[q0:q1].any(axis=0))
        k0, k1 = (int(seen[0]), int(seen[-1]) + 1) if seen.size else (0, 1)
        tiles.append(((q0, q1), (k0, k1)))
        work += (q1 - q0) * (k1 - k0)
    return tiles if work <= 0.8 * T * S else whole


def _masked(q_BTKGD, k_BSKD, v_BSKD, allowed_bTS, valid_B1S, dtype):
    """Attention of pre-scaled queries under a mask (None: every key), as [B, T, H, D]."""
    if valid_B1S is not None:
        allowed_bTS = valid_B1S if allowed_bTS is None else allowed_bTS & valid_B1S
    out_BTKGD = _softmax_attention(q_BTKGD, k_BSKD, v_BSKD, allowed_bTS)
    B, T, K, G, D = out_BTKGD.shape
    return out_BTKGD.reshape(B, T, K * G, D).astype(dtype)


def _forward(q_BTKGD, k_BSKD, v_BSKD, allowed_bTS):
    """(out [B, T, K, G, D] float32, unnormalised probabilities p [B, K, G, T, S] float32,
    1 / row sum [B, T, K, G, 1], 0 for a query that may see no key).

    The probabilities are exp(logit - row max), normalised on the output rather than on
    the [T, S] tile, which saves a pass over it.
    """
    logits_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_BSKD,
                              preferred_element_type=jnp.float32)
    if allowed_bTS is not None:
        logits_BKGTS = jnp.where(allowed_bTS[:, None, None], logits_BKGTS,
                                 jnp.finfo(jnp.float32).min)
    p_BKGTS = jnp.exp(logits_BKGTS - jnp.max(logits_BKGTS, axis=-1, keepdims=True))
    inv_sum_BTKG1 = jnp.transpose(1.0 / jnp.sum(p_BKGTS, axis=-1), (0, 3, 1, 2))[..., None]
    if allowed_bTS is not None:  # a fully masked row's probabilities are uniform: zero it
        inv_sum_BTKG1 = inv_sum_BTKG1 * jnp.any(allowed_bTS, axis=-1)[:, :, None, None, None]
    out_BTKGD = jnp.einsum("bkgts,bskd->btkgd", p_BKGTS.astype(v_BSKD.dtype), v_BSKD,
                           preferred_element_type=jnp.float32) * inv_sum_BTKG1
    return out_BTKGD, p_BKGTS, inv_sum_BTKG1


@jax.custom_vjp
def _softmax_attention(q_BTKGD, k_BSKD, v_BSKD, allowed_bTS):
    """softmax(q k^T masked) v of pre-scaled queries: float32 [B, T, K, G, D].

    The backward pass is written out (as flash attention's): dS = P (dP - rowsum(dO O)),
    which reads the [T, S] tile once, where autodiff of the softmax reduces over it again.
    """
    return _forward(q_BTKGD, k_BSKD, v_BSKD, allowed_bTS)[0]


def _softmax_attention_fwd(q_BTKGD, k_BSKD, v_BSKD, allowed_bTS):
    out_BTKGD, p_BKGTS, inv_sum_BTKG1 = _forward(q_BTKGD, k_BSKD, v_BSKD, allowed_bTS)
    return out_BTKGD, (q_BTKGD, k_BSKD, v_BSKD, allowed_bTS, out_BTKGD, p_BKGTS, inv_sum_BTKG1)


def _softmax_attention_bwd(residuals, d_out_BTKGD):
    q_BTKGD, k_BSKD, v_BSKD, allowed_bTS, out_BTKGD, p_BKGTS, inv_sum_BTKG1 = residuals
    d_scaled_BTKGD = d_out_BTKGD * inv_sum_BTKG1  # dO / row sum: P = p / row sum
    dv_BSKD = jnp.einsum("bkgts,btkgd->bskd", p_BKGTS.astype(v_BSKD.dtype),
                         d_scaled_BTKGD.astype(v_BSKD.dtype), preferred_element_type=jnp.float32)
    dp_BKGTS = jnp.einsum("btkgd,bskd->bkgts", d_scaled_BTKGD.astype(v_BSKD.dtype), v_BSKD,
                          preferred_element_type=jnp.float32)
    delta_BTKG1 = jnp.sum(d_out_BTKGD * out_BTKGD, axis=-1, keepdims=True) * inv_sum_BTKG1
    ds_BKGTS = p_BKGTS * (dp_BKGTS - jnp.transpose(delta_BTKG1, (0, 2, 3, 1, 4)))
    dq_BTKGD = jnp.einsum("bkgts,bskd->btkgd", ds_BKGTS.astype(k_BSKD.dtype), k_BSKD,
                          preferred_element_type=jnp.float32)
    dk_BSKD = jnp.einsum("bkgts,btkgd->bskd", ds_BKGTS.astype(q_BTKGD.dtype), q_BTKGD,
                         preferred_element_type=jnp.float32)
    d_allowed = None if allowed_bTS is None else np.zeros(allowed_bTS.shape, jax.dtypes.float0)
    return (dq_BTKGD.astype(q_BTKGD.dtype), dk_BSKD.astype(k_BSKD.dtype),
            dv_BSKD.astype(v_BSKD.dtype), d_allowed)


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)
