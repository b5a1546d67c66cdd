"""Forward kernel: block-sparse online-softmax attention over compacted key-tile lists.

Two drivers run the same tile arithmetic (`blocks.forward_tile`):

- loop (GPU / interpret): grid (B, H, num_q_tiles); each program holds one query tile and
  walks its list of non-empty key tiles with two `fori_loop`s, PARTIAL tiles (masked) then
  FULL tiles (no mask arithmetic), loading each key/value tile from the full-length refs.
  Empty tiles are never loaded.
- grid (TPU): grid (B, H, num_q_tiles, max_steps) with the lists as scalar-prefetch
  operands; the key/value BlockSpecs index through them, so only listed tiles are copied in,
  and steps past a row's count repeat the last block (no copy) and compute nothing.

Inputs are head-major: q [B, H, Tq, D], k/v [B, K, Tk, D] with Tq/Tk multiples of the
tiles. With `cfg.debug` a visit counter is accumulated in the kernel and returned.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import blocks
from pallas_kernels.config import KernelConfig, compiler_params, out_struct
from pallas_kernels.tiles import make_plan


def _tile_positions(cfg: KernelConfig, q_start, k_start, shape):
    """Absolute query and key positions over a [bq, bk] tile (int32)."""
    q_pos = cfg.q_offset + q_start + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    k_pos = k_start + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    return q_pos, k_pos


def _allowed(cfg: KernelConfig, masked: bool, q_start, k_start, shape, q_seg, kv_seg):
    if not masked:
        return blocks.segment_tile(q_seg, kv_seg)
    q_pos, k_pos = _tile_positions(cfg, q_start, k_start, shape)
    return blocks.allowed_tile(cfg.mask, q_pos, k_pos, cfg.kv_len, cfg.kv_padded, q_seg, kv_seg)


def _loop_kernel(idx_ref, npart_ref, ntot_ref, q_ref, k_ref, v_ref, *refs, cfg: KernelConfig):
    if cfg.has_segments:
        qseg_ref, kvseg_ref, *refs = refs
    o_ref, lse_ref, *count_ref = refs
    bq, bk = cfg.block_q, cfg.block_kv
    i = pl.program_id(2)
    q = q_ref[...]
    q_seg = qseg_ref[...] if cfg.has_segments else None  # [bq, 1]

    def visit(step, carry, masked):
        row_max, row_sum, acc, n = carry
        k_start = pl.multiple_of(idx_ref[i, step] * bk, bk)
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        kv_seg = kvseg_ref[:, pl.ds(k_start, bk)] if cfg.has_segments else None  # [1, bk]
        allowed = _allowed(cfg, masked, i * bq, k_start, (bq, bk), q_seg, kv_seg)
        row_max, row_sum, acc = blocks.forward_tile(q, k, v, allowed, row_max, row_sum, acc,
                                                    cfg.sm_scale)
        return row_max, row_sum, acc, n + 1

    carry = (jnp.full((bq, 1), blocks.MASK_VALUE, jnp.float32),
             jnp.zeros((bq, 1), jnp.float32),
             jnp.zeros(q.shape, jnp.float32),
             jnp.int32(0))
    num_partial, num_total = npart_ref[i], ntot_ref[i]
    carry = jax.lax.fori_loop(0, num_partial, functools.partial(visit, masked=True), carry)
    row_max, row_sum, acc, n = jax.lax.fori_loop(num_partial, num_total,
                                                 functools.partial(visit, masked=False), carry)
    out, lse = blocks.forward_finish(row_max, row_sum, acc)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse
    if count_ref:
        count_ref[0][...] = jnp.full(count_ref[0].shape, n, jnp.int32)


def _grid_kernel(idx_ref, npart_ref, ntot_ref, q_ref, k_ref, v_ref, *refs, cfg: KernelConfig):
    if cfg.has_segments:
        qseg_ref, kvseg_ref, *refs = refs
    o_ref, lse_ref, *refs = refs
    count_ref = refs.pop(0) if cfg.debug else None
    m_scr, l_scr, acc_scr = refs
    bq, bk = cfg.block_q, cfg.block_kv
    i, step = pl.program_id(2), pl.program_id(3)

    @pl.when(step == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, blocks.MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)
        if count_ref is not None:
            count_ref[...] = jnp.zeros(count_ref.shape, jnp.int32)

    def visit(masked):
        q_seg = qseg_ref[:, :1] if cfg.has_segments else None  # [bq, 1]
        kv_seg = kvseg_ref[:1, :] if cfg.has_segments else None  # [1, bk]
        allowed = _allowed(cfg, masked, i * bq, idx_ref[i, step] * bk, (bq, bk), q_seg, kv_seg)
        row_max, row_sum, acc = blocks.forward_tile(
            q_ref[...], k_ref[...], v_ref[...], allowed, m_scr[:, :1], l_scr[:, :1],
            acc_scr[...], cfg.sm_scale)
        m_scr[...] = jnp.broadcast_to(row_max, m_scr.shape)
        l_scr[...] = jnp.broadcast_to(row_sum, l_scr.shape)
        acc_scr[...] = acc
        if count_ref is not None:
            count_ref[...] += 1

    num_partial, num_total = npart_ref[i], ntot_ref[i]
    pl.when(step < num_partial)(lambda: visit(True))
    pl.when((step >= num_partial) & (step < num_total))(lambda: visit(False))

    @pl.when(step == pl.num_programs(3) - 1)
    def _finish():
        out, lse = blocks.forward_finish(m_scr[:, :1], l_scr[:, :1], acc_scr[...])
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def forward(q_BHTD, k_BKSD, v_BKSD, qseg_col, kvseg_row, cfg: KernelConfig):
    """Runs the forward kernel.

    Args:
      q_BHTD: [B, H, Tq, D]; k_BKSD, v_BKSD: [B, K, Tk, D].
      qseg_col: int32 [B, Tq, lanes] or None; kvseg_row: int32 [B, sublanes, Tk] or None.

    Returns:
      (out_BHTD [B, H, Tq, D] in q's dtype, lse_BHT [B, H, Tq] float32, visits) where
      visits is int32 [B, H, num_q_tiles] key tiles visited per program with cfg.debug,
      else None.
    """
    B, H, Tq, D = q_BHTD.shape
    K, Tk = k_BKSD.shape[1], k_BKSD.shape[2]
    G = H // K
    bq, bk = cfg.block_q, cfg.block_kv
    nq = Tq // bq
    lists = make_plan(cfg.mask, cfg.q_len, cfg.kv_len, Tq, Tk, bq, bk, cfg.q_offset).by_query
    prefetch = [jnp.asarray(lists.index_RM), jnp.asarray(lists.num_partial_R),
                jnp.asarray(lists.num_total_R)]
    operands = [q_BHTD, k_BKSD, v_BKSD]
    if cfg.has_segments:
        operands += [qseg_col, kvseg_row]
    lanes = cfg.lanes
    struct = lambda shape, dtype: out_struct(shape, dtype, *operands)
    out_shape = [struct((B, H, Tq, D), q_BHTD.dtype),
                 struct((B, H, Tq, lanes), jnp.float32)]

    if cfg.grid_driver:
        from jax.experimental.pallas import tpu as pltpu

        kv_map = lambda b, h, i, s, idx, *_: (b, h // G, idx[i, s], 0)
        in_specs = [pl.BlockSpec((None, None, bq, D), lambda b, h, i, s, *_: (b, h, i, 0)),
                    pl.BlockSpec((None, None, bk, D), kv_map),
                    pl.BlockSpec((None, None, bk, D), kv_map)]
        if cfg.has_segments:
            in_specs += [
                pl.BlockSpec((None, bq, lanes), lambda b, h, i, s, *_: (b, i, 0)),
                pl.BlockSpec((None, cfg.sublanes, bk),
                             lambda b, h, i, s, idx, *_: (b, 0, idx[i, s])),
            ]
        out_specs = [pl.BlockSpec((None, None, bq, D), lambda b, h, i, s, *_: (b, h, i, 0)),
                     pl.BlockSpec((None, None, bq, lanes), lambda b, h, i, s, *_: (b, h, i, 0))]
        if cfg.debug:
            out_shape.append(struct((B, H, nq, 8, 128), jnp.int32))
            out_specs.append(pl.BlockSpec((None, None, None, 8, 128),
                                          lambda b, h, i, s, *_: (b, h, i, 0, 0)))
        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(B, H, nq, lists.max_steps), in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((bq, 128), jnp.float32),
                            pltpu.VMEM((bq, 128), jnp.float32),
                            pltpu.VMEM((bq, D), jnp.float32)])
        results = pl.pallas_call(
            functools.partial(_grid_kernel, cfg=cfg), out_shape=out_shape, grid_spec=grid_spec,
            compiler_params=compiler_params(
                cfg, ("parallel", "parallel", "parallel", "arbitrary")),
            interpret=cfg.interpret, name="block_sparse_attention_fwd",
        )(*prefetch, *operands)
    else:
        whole = lambda a: pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)
        in_specs = [whole(a) for a in prefetch] + [
            pl.BlockSpec((None, None, bq, D), lambda b, h, i: (b, h, i, 0)),
            pl.BlockSpec((None, None, Tk, D), lambda b, h, i: (b, h // G, 0, 0)),
            pl.BlockSpec((None, None, Tk, D), lambda b, h, i: (b, h // G, 0, 0)),
        ]
        if cfg.has_segments:
            in_specs += [pl.BlockSpec((None, bq, 1), lambda b, h, i: (b, i, 0)),
                         pl.BlockSpec((None, 1, Tk), lambda b, h, i: (b, 0, 0))]
        out_specs = [pl.BlockSpec((None, None, bq, D), lambda b, h, i: (b, h, i, 0)),
                     pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0))]
        if cfg.debug:
            out_shape.append(struct((B, H, nq, 1, 1), jnp.int32))
            out_specs.append(pl.BlockSpec((None, None, None, 1, 1),
                                          lambda b, h, i: (b, h, i, 0, 0)))
        results = pl.pallas_call(
            functools.partial(_loop_kernel, cfg=cfg), out_shape=out_shape, grid=(B, H, nq),
            in_specs=in_specs, out_specs=out_specs,
            compiler_params=compiler_params(cfg, ("parallel", "parallel", "parallel")),
            interpret=cfg.interpret, name="block_sparse_attention_fwd",
        )(*prefetch, *operands)
    out_BHTD, lse_BHTL = results[0], results[1]
    visits = results[2][..., 0, 0] if cfg.debug else None
    return out_BHTD, lse_BHTL[..., 0], visits
