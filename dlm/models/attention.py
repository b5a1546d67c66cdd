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
    G = H // K
    q_BTKGD = q_BTHD.reshape(B, T, K, G, D)
    logits_BKGTS = jnp.einsum(
        "btkgd,bskd->bkgts", q_BTKGD, k_BSKD, preferred_element_type=jnp.float32
    ).astype(jnp.float32) / math.sqrt(D)

    if q_positions_BT is None:
        allowed_BTS = mask_array(mask, T, S, q_offset)[None]
    else:
        k_pos = jnp.arange(S, dtype=jnp.int32)[None, None, :]
        allowed_BTS = mask.allows(q_positions_BT.astype(jnp.int32)[:, :, None], k_pos, S)
        allowed_BTS = jnp.broadcast_to(allowed_BTS, (B, T, S))
    if kv_valid_BS is not None:
        allowed_BTS = allowed_BTS & kv_valid_BS[:, None, :].astype(bool)
    allowed_B11TS = allowed_BTS[:, None, None]
    logits_BKGTS = jnp.where(allowed_B11TS, logits_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1)
    # A fully masked row softmaxes to uniform over finfo.min logits; zeroing it gives 0, not NaN.
    probs_BKGTS = jnp.where(allowed_B11TS, probs_BKGTS, 0.0)
    out_BTKGD = jnp.einsum(
        "bkgts,bskd->btkgd", probs_BKGTS.astype(v_BSKD.dtype), v_BSKD,
        preferred_element_type=jnp.float32,
    )
    return out_BTKGD.reshape(B, T, H, D).astype(q_BTHD.dtype)
