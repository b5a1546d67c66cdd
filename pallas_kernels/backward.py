"""Backward kernels: dq over each query tile's key-tile list, dk/dv over each key tile's
query-tile list (the transposed plan), both from the forward's log-sum-exp.

delta = rowsum(dO * O) is formed by the caller (one fused elementwise reduction); the
kernels recompute the probabilities tile by tile (FlashAttention-2's backward). Grouped-query
heads: the dk/dv kernel of key/value head kh accumulates over its G = H // K query heads, so
no per-query-head dk/dv is materialised. The drivers are the forward's (see forward.py):
in-kernel loops on GPU / interpret, a scalar-prefetch pipelined grid on TPU.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import blocks
from pallas_kernels.config import KernelConfig, compiler_params, out_struct
from pallas_kernels.forward import _allowed
from pallas_kernels.tiles import make_plan


def _allowed_t(cfg: KernelConfig, masked: bool, q_start, k_start, shape_t, q_seg, kv_seg):
    """The mask of a [bk, bq] (key-major) tile."""
    if not masked:
        return blocks.segment_tile(q_seg, kv_seg)
    k_pos = k_start + jax.lax.broadcasted_iota(jnp.int32, shape_t, 0)
    q_pos = cfg.q_offset + q_start + jax.lax.broadcasted_iota(jnp.int32, shape_t, 1)
    return blocks.allowed_tile(cfg.mask, q_pos, k_pos, cfg.kv_len, cfg.kv_padded, q_seg, kv_seg)


def _visit_lists(idx_ref, npart_ref, ntot_ref, row, visit, carry):
    """Runs visit(step, carry, masked) over a row's PARTIAL then FULL entries."""
    num_partial, num_total = npart_ref[row], ntot_ref[row]
    carry = jax.lax.fori_loop(0, num_partial, functools.partial(visit, masked=True), carry)
    return jax.lax.fori_loop(num_partial, num_total, functools.partial(visit, masked=False),
                             carry)


# ---------------------------------------------------------------------------- loop driver


def _dq_loop_kernel(idx_ref, npart_ref, ntot_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                    delta_ref, *refs, cfg: KernelConfig):
    if cfg.has_segments:
        qseg_ref, kvseg_ref, *refs = refs
    dq_ref, *count_ref = refs
    bq, bk = cfg.block_q_bwd, cfg.block_kv_bwd
    i = pl.program_id(2)
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_seg = qseg_ref[...] if cfg.has_segments else None

    def visit(step, carry, masked):
        dq, n = carry
        k_start = pl.multiple_of(idx_ref[i, step] * bk, bk)
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        kv_seg = kvseg_ref[:, pl.ds(k_start, bk)] if cfg.has_segments else None
        allowed = _allowed(cfg, masked, i * bq, k_start, (bq, bk), q_seg, kv_seg)
        return blocks.dq_tile(q, k, v, do, lse, delta, allowed, dq, cfg.sm_scale), n + 1

    dq, n = _visit_lists(idx_ref, npart_ref, ntot_ref, i, visit,
                         (jnp.zeros(q.shape, jnp.float32), jnp.int32(0)))
    dq_ref[...] = (dq * cfg.sm_scale).astype(dq_ref.dtype)
    if count_ref:
        count_ref[0][...] = jnp.full(count_ref[0].shape, n, jnp.int32)


def _dkv_loop_kernel(idx_ref, npart_ref, ntot_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                     delta_ref, *refs, cfg: KernelConfig, groups: int):
    if cfg.has_segments:
        qseg_ref, kvseg_ref, *refs = refs
    dk_ref, dv_ref, *count_ref = refs
    bq, bk = cfg.block_q_bwd, cfg.block_kv_bwd
    j = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    kv_seg = kvseg_ref[...] if cfg.has_segments else None  # [bk, 1]

    def per_head(g, carry):
        def visit(step, carry, masked):
            dk, dv, n = carry
            q_start = pl.multiple_of(idx_ref[j, step] * bq, bq)
            q = q_ref[g, pl.ds(q_start, bq), :]
            do = do_ref[g, pl.ds(q_start, bq), :]
            lse_row = lse_ref[g, :, pl.ds(q_start, bq)]  # [1, bq]
            delta_row = delta_ref[g, :, pl.ds(q_start, bq)]
            q_seg = qseg_ref[:, pl.ds(q_start, bq)] if cfg.has_segments else None  # [1, bq]
            allowed_t = _allowed_t(cfg, masked, q_start, j * bk, (bk, bq), q_seg, kv_seg)
            dk, dv = blocks.dkv_tile(q, k, v, do, lse_row, delta_row, allowed_t, dk, dv,
                                     cfg.sm_scale)
            return dk, dv, n + 1

        return _visit_lists(idx_ref, npart_ref, ntot_ref, j, visit, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    carry = (zeros, zeros, jnp.int32(0))
    # A static loop over the G query heads: G is small, and a loop-carried ref inside nested
    # fori_loops trips the interpreter's varying-axes check under shard_map.
    for g in range(groups):
        carry = per_head(g, carry)
    dk, dv, n = carry
    dk_ref[...] = (dk * cfg.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    if count_ref:
        count_ref[0][...] = jnp.full(count_ref[0].shape, n, jnp.int32)


# ---------------------------------------------------------------------------- grid driver


def _dq_grid_kernel(idx_ref, npart_ref, ntot_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                    delta_ref, *refs, cfg: KernelConfig):
    if cfg.has_segments:
        qseg_ref, kvseg_ref, *refs = refs
    dq_ref, *refs = refs
    count_ref = refs.pop(0) if cfg.debug else None
    (dq_scr,) = refs
    bq, bk = cfg.block_q_bwd, cfg.block_kv_bwd
    i, step = pl.program_id(2), pl.program_id(3)

    @pl.when(step == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)
        if count_ref is not None:
            count_ref[...] = jnp.zeros(count_ref.shape, jnp.int32)

    def visit(masked):
        q_seg = qseg_ref[:, :1] if cfg.has_segments else None
        kv_seg = kvseg_ref[:1, :] if cfg.has_segments else None
        allowed = _allowed(cfg, masked, i * bq, idx_ref[i, step] * bk, (bq, bk), q_seg, kv_seg)
        dq_scr[...] = blocks.dq_tile(q_ref[...], k_ref[...], v_ref[...], do_ref[...],
                                     lse_ref[:, :1], delta_ref[:, :1], allowed, dq_scr[...],
                                     cfg.sm_scale)
        if count_ref is not None:
            count_ref[...] += 1

    num_partial, num_total = npart_ref[i], ntot_ref[i]
    pl.when(step < num_partial)(lambda: visit(True))
    pl.when((step >= num_partial) & (step < num_total))(lambda: visit(False))

    @pl.when(step == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_scr[...] * cfg.sm_scale).astype(dq_ref.dtype)


def _dkv_grid_kernel(idx_ref, npart_ref, ntot_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                     delta_ref, *refs, cfg: KernelConfig):
    if cfg.has_segments:
        qseg_ref, kvseg_ref, *refs = refs
    dk_ref, dv_ref, *refs = refs
    count_ref = refs.pop(0) if cfg.debug else None
    dk_scr, dv_scr = refs
    bq, bk = cfg.block_q_bwd, cfg.block_kv_bwd
    j, g, step = pl.program_id(2), pl.program_id(3), pl.program_id(4)
    first = (g == 0) & (step == 0)
    last = (g == pl.num_programs(3) - 1) & (step == pl.num_programs(4) - 1)

    @pl.when(first)
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)
        if count_ref is not None:
            count_ref[...] = jnp.zeros(count_ref.shape, jnp.int32)

    def visit(masked):
        q_seg = qseg_ref[:1, :] if cfg.has_segments else None  # [1, bq]
        kv_seg = kvseg_ref[:, :1] if cfg.has_segments else None  # [bk, 1]
        allowed_t = _allowed_t(cfg, masked, idx_ref[j, step] * bq, j * bk, (bk, bq), q_seg,
                               kv_seg)
        dk, dv = blocks.dkv_tile(q_ref[...], k_ref[...], v_ref[...], do_ref[...],
                                 lse_ref[:1, :], delta_ref[:1, :], allowed_t, dk_scr[...],
                                 dv_scr[...], cfg.sm_scale)
        dk_scr[...] = dk
        dv_scr[...] = dv
        if count_ref is not None:
            count_ref[...] += 1

    num_partial, num_total = npart_ref[j], ntot_ref[j]
    pl.when(step < num_partial)(lambda: visit(True))
    pl.when((step >= num_partial) & (step < num_total))(lambda: visit(False))

    @pl.when(last)
    def _finish():
        dk_ref[...] = (dk_scr[...] * cfg.sm_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


# ---------------------------------------------------------------------------- entry point


def backward(q_BHTD, k_BKSD, v_BKSD, do_BHTD, lse_BHT, delta_BHT, qseg_BT, kvseg_BS,
             cfg: KernelConfig):
    """Runs the dq and the dk/dv kernels.

    Args:
      q_BHTD, do_BHTD: [B, H, Tq, D]; k_BKSD, v_BKSD: [B, K, Tk, D].
      lse_BHT, delta_BHT: float32 [B, H, Tq], the forward's log-sum-exp and rowsum(dO * O).
      qseg_BT, kvseg_BS: int32 [B, Tq] and [B, Tk] segment ids, or None.

    Returns:
      (dq_BHTD, dk_BKSD, dv_BKSD, visits) in the inputs' dtypes; visits is (dq visits
      int32 [B, H, num_q_tiles], dk/dv visits int32 [B, K, num_kv_tiles]) with cfg.debug,
      else None.
    """
    B, H, Tq, D = q_BHTD.shape
    K, Tk = k_BKSD.shape[1], k_BKSD.shape[2]
    G = H // K
    bq, bk = cfg.block_q_bwd, cfg.block_kv_bwd
    nq, nk = Tq // bq, Tk // bk
    plan = make_plan(cfg.mask, cfg.q_len, cfg.kv_len, Tq, Tk, bq, bk, cfg.q_offset)
    lanes, sublanes = cfg.lanes, cfg.sublanes
    col = lambda x_BHT: jnp.broadcast_to(x_BHT[..., None], (*x_BHT.shape, lanes))
    row = lambda x_BHT: jnp.broadcast_to(x_BHT[..., None, :], (B, H, sublanes, Tq))
    as_prefetch = lambda lists: [jnp.asarray(lists.index_RM), jnp.asarray(lists.num_partial_R),
                                 jnp.asarray(lists.num_total_R)]
    segs_dq, segs_dkv = [], []
    if cfg.has_segments:
        segs_dq = [jnp.broadcast_to(qseg_BT[:, :, None], (B, Tq, lanes)),
                   jnp.broadcast_to(kvseg_BS[:, None, :], (B, sublanes, Tk))]
        segs_dkv = [jnp.broadcast_to(qseg_BT[:, None, :], (B, sublanes, Tq)),
                    jnp.broadcast_to(kvseg_BS[:, :, None], (B, Tk, lanes))]
    dq_operands = [q_BHTD, k_BKSD, v_BKSD, do_BHTD, col(lse_BHT), col(delta_BHT), *segs_dq]
    dkv_operands = [q_BHTD, k_BKSD, v_BKSD, do_BHTD, row(lse_BHT), row(delta_BHT), *segs_dkv]
    struct = lambda shape, dtype: out_struct(shape, dtype, *dq_operands)
    dq_shape = [struct(q_BHTD.shape, q_BHTD.dtype)]
    dkv_shape = [struct(k_BKSD.shape, k_BKSD.dtype),
                 struct(v_BKSD.shape, v_BKSD.dtype)]
    by_q, by_k = plan.by_query, plan.by_key

    if cfg.grid_driver:
        from jax.experimental.pallas import tpu as pltpu

        # dq: grid (B, H, nq, steps), key tiles through the prefetched lists.
        kv_map = lambda b, h, i, s, idx, *_: (b, h // G, idx[i, s], 0)
        q_map = lambda b, h, i, s, *_: (b, h, i, 0)
        specs = [pl.BlockSpec((None, None, bq, D), q_map),
                 pl.BlockSpec((None, None, bk, D), kv_map),
                 pl.BlockSpec((None, None, bk, D), kv_map),
                 pl.BlockSpec((None, None, bq, D), q_map),
                 pl.BlockSpec((None, None, bq, lanes), q_map),
                 pl.BlockSpec((None, None, bq, lanes), q_map)]
        if cfg.has_segments:
            specs += [pl.BlockSpec((None, bq, lanes), lambda b, h, i, s, *_: (b, i, 0)),
                      pl.BlockSpec((None, sublanes, bk),
                                   lambda b, h, i, s, idx, *_: (b, 0, idx[i, s]))]
        out_specs = [pl.BlockSpec((None, None, bq, D), q_map)]
        if cfg.debug:
            dq_shape.append(struct((B, H, nq, 8, 128), jnp.int32))
            out_specs.append(pl.BlockSpec((None, None, None, 8, 128),
                                          lambda b, h, i, s, *_: (b, h, i, 0, 0)))
        dq_out = pl.pallas_call(
            functools.partial(_dq_grid_kernel, cfg=cfg), out_shape=dq_shape,
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=3, grid=(B, H, nq, by_q.max_steps), in_specs=specs,
                out_specs=out_specs, scratch_shapes=[pltpu.VMEM((bq, D), jnp.float32)]),
            compiler_params=compiler_params(
                cfg, ("parallel", "parallel", "parallel", "arbitrary")),
            interpret=cfg.interpret, name="block_sparse_attention_dq",
        )(*as_prefetch(by_q), *dq_operands)

        # dk/dv: grid (B, K, nk, G, steps), query tiles of head kh * G + g through the lists.
        qt_map = lambda b, kh, j, g, s, idx, *_: (b, kh * G + g, idx[j, s], 0)
        row_map = lambda b, kh, j, g, s, idx, *_: (b, kh * G + g, 0, idx[j, s])
        kv_map = lambda b, kh, j, g, s, *_: (b, kh, j, 0)
        specs = [pl.BlockSpec((None, None, bq, D), qt_map),
                 pl.BlockSpec((None, None, bk, D), kv_map),
                 pl.BlockSpec((None, None, bk, D), kv_map),
                 pl.BlockSpec((None, None, bq, D), qt_map),
                 pl.BlockSpec((None, None, sublanes, bq), row_map),
                 pl.BlockSpec((None, None, sublanes, bq), row_map)]
        if cfg.has_segments:
            specs += [pl.BlockSpec((None, sublanes, bq),
                                   lambda b, kh, j, g, s, idx, *_: (b, 0, idx[j, s])),
                      pl.BlockSpec((None, bk, lanes), lambda b, kh, j, g, s, *_: (b, j, 0))]
        out_specs = [pl.BlockSpec((None, None, bk, D), kv_map),
                     pl.BlockSpec((None, None, bk, D), kv_map)]
        if cfg.debug:
            dkv_shape.append(struct((B, K, nk, 8, 128), jnp.int32))
            out_specs.append(pl.BlockSpec((None, None, None, 8, 128),
                                          lambda b, kh, j, g, s, *_: (b, kh, j, 0, 0)))
        dkv_out = pl.pallas_call(
            functools.partial(_dkv_grid_kernel, cfg=cfg), out_shape=dkv_shape,
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=3, grid=(B, K, nk, G, by_k.max_steps), in_specs=specs,
                out_specs=out_specs, scratch_shapes=[pltpu.VMEM((bk, D), jnp.float32),
                                                     pltpu.VMEM((bk, D), jnp.float32)]),
            compiler_params=compiler_params(
                cfg, ("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
            interpret=cfg.interpret, name="block_sparse_attention_dkv",
        )(*as_prefetch(by_k), *dkv_operands)
    else:
        whole = lambda a: pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)
        # dq: grid (B, H, nq); full-length k/v refs, tiles loaded in the loop.
        q_map = lambda b, h, i: (b, h, i, 0)
        kv_full = pl.BlockSpec((None, None, Tk, D), lambda b, h, i: (b, h // G, 0, 0))
        prefetch = as_prefetch(by_q)
        specs = [whole(a) for a in prefetch] + [
            pl.BlockSpec((None, None, bq, D), q_map), kv_full, kv_full,
            pl.BlockSpec((None, None, bq, D), q_map),
            pl.BlockSpec((None, None, bq, 1), q_map),
            pl.BlockSpec((None, None, bq, 1), q_map)]
        if cfg.has_segments:
            specs += [pl.BlockSpec((None, bq, 1), lambda b, h, i: (b, i, 0)),
                      pl.BlockSpec((None, 1, Tk), lambda b, h, i: (b, 0, 0))]
        out_specs = [pl.BlockSpec((None, None, bq, D), q_map)]
        if cfg.debug:
            dq_shape.append(struct((B, H, nq, 1, 1), jnp.int32))
            out_specs.append(pl.BlockSpec((None, None, None, 1, 1),
                                          lambda b, h, i: (b, h, i, 0, 0)))
        dq_out = pl.pallas_call(
            functools.partial(_dq_loop_kernel, cfg=cfg), out_shape=dq_shape, grid=(B, H, nq),
            in_specs=specs, out_specs=out_specs,
            compiler_params=compiler_params(cfg, ("parallel", "parallel", "parallel")),
            interpret=cfg.interpret, name="block_sparse_attention_dq",
        )(*prefetch, *dq_operands)

        # dk/dv: grid (B, K, nk); the G query heads of kv head kh as one block, walked in-kernel.
        kv_map = lambda b, kh, j: (b, kh, j, 0)
        group = lambda *shape: pl.BlockSpec((None, G, *shape), lambda b, kh, j: (b, kh, 0, 0))
        prefetch = as_prefetch(by_k)
        specs = [whole(a) for a in prefetch] + [
            group(Tq, D), pl.BlockSpec((None, None, bk, D), kv_map),
            pl.BlockSpec((None, None, bk, D), kv_map), group(Tq, D), group(1, Tq),
            group(1, Tq)]
        if cfg.has_segments:
            specs += [pl.BlockSpec((None, 1, Tq), lambda b, kh, j: (b, 0, 0)),
                      pl.BlockSpec((None, bk, 1), lambda b, kh, j: (b, j, 0))]
        out_specs = [pl.BlockSpec((None, None, bk, D), kv_map),
                     pl.BlockSpec((None, None, bk, D), kv_map)]
        if cfg.debug:
            dkv_shape.append(struct((B, K, nk, 1, 1), jnp.int32))
            out_specs.append(pl.BlockSpec((None, None, None, 1, 1),
                                          lambda b, kh, j: (b, kh, j, 0, 0)))
        dkv_out = pl.pallas_call(
            functools.partial(_dkv_loop_kernel, cfg=cfg, groups=G), out_shape=dkv_shape,
            grid=(B, K, nk), in_specs=specs, out_specs=out_specs,
            compiler_params=compiler_params(cfg, ("parallel", "parallel", "parallel")),
            interpret=cfg.interpret, name="block_sparse_attention_dkv",
        )(*prefetch, *dkv_operands)

    visits = (dq_out[1][..., 0, 0], dkv_out[2][..., 0, 0]) if cfg.debug else None
    return dq_out[0], dkv_out[0], dkv_out[1], visits
