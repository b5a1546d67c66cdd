"""The public entry point: block-sparse flash attention with a custom VJP.

`block_sparse_attention` takes the model's [batch, seq, heads, head_dim] layout, pads the
sequences to whole tiles (padded keys are masked, padded queries sliced off) and, on GPU, the
head dimension to a power of two >= 16 (zeros: exact), and calls the Pallas kernels of
forward.py and backward.py on head-major copies.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from dlm.models.masks import MaskSpec, as_mask_spec
from pallas_kernels.backward import backward
from pallas_kernels.config import BlockSizes, KernelConfig, resolve_backend
from pallas_kernels.forward import forward
from pallas_kernels.tiles import make_plan


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q_BHTD, k_BKSD, v_BKSD, qseg_BT, kvseg_BS, cfg: KernelConfig):
    out_BHTD, _ = _attention_fwd(q_BHTD, k_BKSD, v_BKSD, qseg_BT, kvseg_BS, cfg)
    return out_BHTD


def _segment_layouts(qseg_BT, kvseg_BS, cfg: KernelConfig):
    """Segment ids as the forward kernel reads them: q [B, Tq, lanes], kv [B, sublanes, Tk]."""
    if not cfg.has_segments:
        return None, None
    B, Tq = qseg_BT.shape
    Tk = kvseg_BS.shape[1]
    return (jnp.broadcast_to(qseg_BT[:, :, None], (B, Tq, cfg.lanes)),
            jnp.broadcast_to(kvseg_BS[:, None, :], (B, cfg.sublanes, Tk)))


def _attention_fwd(q_BHTD, k_BKSD, v_BKSD, qseg_BT, kvseg_BS, cfg):
    out_BHTD, lse_BHT, _ = forward(q_BHTD, k_BKSD, v_BKSD,
                                   *_segment_layouts(qseg_BT, kvseg_BS, cfg), cfg)
    return out_BHTD, (q_BHTD, k_BKSD, v_BKSD, qseg_BT, kvseg_BS, out_BHTD, lse_BHT)


def _attention_bwd(cfg, residuals, do_BHTD):
    q_BHTD, k_BKSD, v_BKSD, qseg_BT, kvseg_BS, out_BHTD, lse_BHT = residuals
    delta_BHT = jnp.sum(out_BHTD.astype(jnp.float32) * do_BHTD.astype(jnp.float32), axis=-1)
    dq, dk, dv, _ = backward(q_BHTD, k_BKSD, v_BKSD, do_BHTD.astype(q_BHTD.dtype), lse_BHT,
                             delta_BHT, qseg_BT, kvseg_BS, cfg)
    return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _clip_tile(block: int, length: int, backend: str) -> int:
    """A tile no longer than the (rounded-up) sequence, in the shape the backend needs."""
    if backend == "gpu":  # Triton: power-of-two tiles, >= 16 for tl.dot
        if block & (block - 1) or block < 16:
            raise ValueError(f"GPU (Triton) tiles must be powers of two >= 16, got {block}")
        return min(block, max(16, _next_pow2(length)))
    if backend == "tpu":  # Mosaic: tiles are lane dims of the logits, multiples of 128
        if block % 128:
            raise ValueError(f"TPU tiles must be multiples of 128, got {block}")
        return min(block, _round_up(length, 128))
    if block % 8:
        raise ValueError(f"tiles must be multiples of 8, got {block}")
    return min(block, _round_up(length, 8))


def _padded_head_dim(head_dim: int, backend: str) -> int:
    # Triton loads need power-of-two extents and tl.dot a contraction >= 16; zero columns in
    # q/k/v leave the logits unchanged and give zero output columns, sliced off.
    return max(16, _next_pow2(head_dim)) if backend == "gpu" else head_dim


def _normalise_segments(segment_ids, B: int, T: int, S: int):
    """Returns (q_seg [B, T], kv_seg [B, S]) int32, or (None, None)."""
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, tuple | list):
        q_seg, kv_seg = segment_ids
    else:
        if T != S:
            raise ValueError(f"one segment_ids array needs q_len == kv_len, got {T} and {S}; "
                             "pass (q_segment_ids, kv_segment_ids)")
        q_seg = kv_seg = segment_ids
    q_seg, kv_seg = jnp.asarray(q_seg, jnp.int32), jnp.asarray(kv_seg, jnp.int32)
    if q_seg.shape != (B, T) or kv_seg.shape != (B, S):
        raise ValueError(f"segment ids must be [B, T] = {(B, T)} and [B, S] = {(B, S)}, got "
                         f"{q_seg.shape} and {kv_seg.shape}")
    return q_seg, kv_seg


def _prepare(q_BTHD, k_BSKD, v_BSKD, mask, segment_ids, sm_scale, block_sizes, backend,
             q_offset, debug):
    """Validates, pads and transposes. Returns (cfg, head-major operands, segments)."""
    if q_BTHD.ndim != 4 or k_BSKD.ndim != 4 or k_BSKD.shape != v_BSKD.shape:
        raise ValueError(f"expected q [B, T, H, D] and k, v [B, S, K, D], got q {q_BTHD.shape}, "
                         f"k {k_BSKD.shape}, v {v_BSKD.shape}")
    B, T, H, D = q_BTHD.shape
    _, S, K, _ = k_BSKD.shape
    if k_BSKD.shape[0] != B or k_BSKD.shape[3] != D:
        raise ValueError(f"attention shapes disagree: q {q_BTHD.shape}, k {k_BSKD.shape}")
    if H % K:
        raise ValueError(f"{K} key/value heads must divide {H} query heads")
    if not isinstance(q_offset, int | np.integer):
        raise ValueError("block_sparse_attention needs a static int q_offset (a traced KV "
                         "cache length is not supported; decode with the 'xla' attention)")
    mask = as_mask_spec(mask)
    mask.check_lengths(T, S, int(q_offset))
    backend = resolve_backend(backend)
    sizes = block_sizes or BlockSizes.default(backend)
    bq = _clip_tile(sizes.block_q, T, backend)
    bk = _clip_tile(sizes.block_kv, S, backend)
    bq_bwd = _clip_tile(sizes.block_q_bwd or sizes.block_q, T, backend)
    bk_bwd = _clip_tile(sizes.block_kv_bwd or sizes.block_kv, S, backend)
    q_padded = _round_up(T, math.lcm(bq, bq_bwd))
    kv_padded = _round_up(S, math.lcm(bk, bk_bwd))
    q_seg, kv_seg = _normalise_segments(segment_ids, B, T, S)
    d_padded = _padded_head_dim(D, backend)
    cfg = KernelConfig(
        mask=mask, q_len=T, kv_len=S, q_padded=q_padded, kv_padded=kv_padded,
        q_offset=int(q_offset), block_q=bq, block_kv=bk, block_q_bwd=bq_bwd,
        block_kv_bwd=bk_bwd, sm_scale=float(1.0 / math.sqrt(D) if sm_scale is None else sm_scale),
        backend=backend, has_segments=q_seg is not None, debug=debug,
        num_warps=4 if d_padded <= 64 else 8)

    def head_major(x_BLND, length):
        x = jnp.swapaxes(x_BLND, 1, 2)
        return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, d_padded - D)))

    q_BHTD = head_major(q_BTHD, q_padded)
    k_BKSD = head_major(k_BSKD, kv_padded)
    v_BKSD = head_major(v_BSKD, kv_padded)
    if q_seg is not None:
        q_seg = jnp.pad(q_seg, ((0, 0), (0, q_padded - T)))
        kv_seg = jnp.pad(kv_seg, ((0, 0), (0, kv_padded - S)), constant_values=-1)
    return cfg, (q_BHTD, k_BKSD, v_BKSD), (q_seg, kv_seg)


def block_sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: MaskSpec | str,
    *,
    segment_ids=None,
    sm_scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    backend: str = "auto",
    q_offset: int = 0,
) -> jax.Array:
    """Block-sparse flash attention; differentiable (Pallas kernels for dq and dk/dv).

    Args:
      q: [B, T, H, D] queries; k, v: [B, S, K, D] keys and values, K dividing H (query head h
        reads key/value head h // (H // K)). float32 or bfloat16.
      mask: a MaskSpec (or its string, e.g. 'bd3lm:16'); query i sits at q_offset + i.
      segment_ids: None, an int array [B, T] (needs T == S), or a pair (q_ids [B, T],
        kv_ids [B, S]); a query sees only keys of its own segment id. Padding keys take an id
        no query has.
      sm_scale: logit scale, default 1 / sqrt(D).
      block_sizes: tile sizes (BlockSizes), default per backend; clipped to short sequences.
      backend: 'auto' (by platform), 'gpu' (Triton lowering), 'tpu' (Mosaic), 'interpret'
        (the GPU-style kernels run by the Pallas interpreter, any platform) or
        'tpu_interpret' (the TPU-style kernels interpreted).
      q_offset: static int absolute position of the first query.

    Returns:
      [B, T, H, D] in q's dtype. Softmax statistics are float32; a query that sees no key
      outputs 0 (and gets zero gradients).
    """
    cfg, (q_BHTD, k_BKSD, v_BKSD), (q_seg, kv_seg) = _prepare(
        q, k, v, mask, segment_ids, sm_scale, block_sizes, backend, q_offset, debug=False)
    out_BHTD = _attention(q_BHTD, k_BKSD, v_BKSD, q_seg, kv_seg, cfg)
    B, T, H, D = q.shape
    return jnp.swapaxes(out_BHTD[:, :, :T, :D], 1, 2)


@dataclasses.dataclass(frozen=True)
class TileVisits:
    """Key/query tiles the kernels actually visited (counted inside them), summed over
    programs, next to the plan's counts.

    Attributes:
      forward, dq, dkv: visits counted by the forward, dq and dk/dv kernels.
      planned_forward, planned_backward: B * H * (non-empty tiles of the plan) for the forward
        and backward tile sizes.
      config: the KernelConfig used (tile sizes, padded lengths).
    """

    forward: int
    dq: int
    dkv: int
    planned_forward: int
    planned_backward: int
    config: KernelConfig


def tile_visits(q, k, v, mask, *, segment_ids=None, sm_scale=None, block_sizes=None,
                backend="auto", q_offset=0) -> TileVisits:
    """Debug mode: runs the forward and both backward kernels with visit counters.

    Takes the arguments of `block_sparse_attention`; the cotangent is all ones. Returns a
    TileVisits.
    """
    cfg, operands, (q_seg, kv_seg) = _prepare(
        q, k, v, mask, segment_ids, sm_scale, block_sizes, backend, q_offset, debug=True)

    @jax.jit
    def count(q_BHTD, k_BKSD, v_BKSD, q_seg, kv_seg):
        out_BHTD, lse_BHT, fwd_visits = forward(q_BHTD, k_BKSD, v_BKSD,
                                                *_segment_layouts(q_seg, kv_seg, cfg), cfg)
        do_BHTD = jnp.ones_like(out_BHTD)
        delta_BHT = jnp.sum(out_BHTD.astype(jnp.float32), axis=-1)
        *_, (dq_visits, dkv_visits) = backward(q_BHTD, k_BKSD, v_BKSD, do_BHTD, lse_BHT,
                                               delta_BHT, q_seg, kv_seg, cfg)
        return fwd_visits, dq_visits, dkv_visits

    fwd_visits, dq_visits, dkv_visits = count(*operands, q_seg, kv_seg)
    B, _, H, _ = q.shape
    planned = lambda bq, bk: B * H * make_plan(
        cfg.mask, cfg.q_len, cfg.kv_len, cfg.q_padded, cfg.kv_padded, bq, bk,
        cfg.q_offset).num_nonempty
    return TileVisits(
        forward=int(jnp.sum(fwd_visits)), dq=int(jnp.sum(dq_visits)),
        dkv=int(jnp.sum(dkv_visits)),
        planned_forward=planned(cfg.block_q, cfg.block_kv),
        planned_backward=planned(cfg.block_q_bwd, cfg.block_kv_bwd), config=cfg)
