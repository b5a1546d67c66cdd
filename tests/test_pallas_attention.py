"""Pallas block-sparse attention (interpret mode) against the dense XLA reference.

Forward outputs and the gradients of all three inputs are compared on fresh random inputs
for every mask kind, block sizes 1/4/16, head dims 32/64/128, float32 and bfloat16, lengths
that need padding to whole tiles, grouped-query heads and padding keys; the host tile plan is
checked against a brute-force dense mask and the kernels' own visit counters against the
plan; a tiny model trains to the same losses with either implementation; and the kernels
lower for GPU (Triton) and TPU (Mosaic) without a device.
"""

import dataclasses
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import small_config

import pallas_kernels
from configs import ar, mdlm
from dlm.data import pipeline
from dlm.models.attention import attend
from dlm.models.masks import MaskSpec
from dlm.parallel import mesh as mesh_lib
from dlm.training import experiment
from dlm.training.step import make_train_step
from experiments import report
from pallas_kernels import BlockSizes, block_sparse_attention, make_plan, tile_visits
from pallas_kernels.tiles import EMPTY, FULL, PARTIAL

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def random_inputs(seed, B, T, S, H, K, D, dtype, padding):
    """q [B, T, H, D], k/v [B, S, K, D], a cotangent, and kv_valid [B, S] or None."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
    valid = jnp.asarray(rng.random((B, S)) > 0.25) if padding else None
    return normal(B, T, H, D), normal(B, S, K, D), normal(B, S, K, D), normal(B, T, H, D), valid


def dense_reference(q, k, v, cot, allowed_BTS):
    """Float64 numpy attention and its gradients, written out: (out, dq, dk, dv).

    q [B, T, H, D], k/v [B, S, K, D], cot [B, T, H, D], allowed_BTS bool [B, T, S].
    """
    q, k, v, cot = (np.asarray(x, np.float64) for x in (q, k, v, cot))
    B, T, H, D = q.shape
    G = H // k.shape[2]
    k_, v_ = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)  # query head h -> kv head h // G
    allowed = allowed_BTS[:, None]  # [B, 1, T, S]
    s = np.einsum("bthd,bshd->bhts", q, k_) / np.sqrt(D)
    s = np.where(allowed, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(m), m, 0.0))
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)  # fully masked rows stay 0
    out = np.einsum("bhts,bshd->bthd", p, v_)
    dp = np.einsum("bthd,bshd->bhts", cot, v_)
    ds = p * (dp - np.einsum("bthd,bthd->bht", cot, out)[..., None])
    dq = np.einsum("bhts,bshd->bthd", ds, k_) / np.sqrt(D)
    dk_ = np.einsum("bhts,bthd->bshd", ds, q) / np.sqrt(D)
    dv_ = np.einsum("bhts,bthd->bshd", p, cot)
    fold = lambda x: x.reshape(B, x.shape[1], -1, G, D).sum(3)  # sum the G heads of a kv head
    return out, dq, fold(dk_), fold(dv_)


def kernel_and_reference(q, k, v, cot, valid, mask, q_offset, backend, block_sizes):
    """(out, dq, dk, dv) of the kernel and of the float64 dense reference on the same inputs."""
    B, T, _, _ = q.shape
    S = k.shape[1]
    segments = None
    allowed = np.broadcast_to(mask.dense(T, S, q_offset), (B, T, S))
    if valid is not None:
        segments = (jnp.zeros((B, T), jnp.int32), jnp.where(valid, 0, -1))
        allowed = allowed & np.asarray(valid)[:, None, :]

    def kernel(q, k, v):
        out, vjp = jax.vjp(lambda *a: block_sparse_attention(
            *a, mask, segment_ids=segments, q_offset=q_offset, backend=backend,
            block_sizes=block_sizes), q, k, v)
        return (out, *vjp(cot))

    return jax.jit(kernel)(q, k, v), dense_reference(q, k, v, cot, allowed)


# mask, q_len, kv_len, q_offset, head_dim, dtype, padding, (H, K), tiles. Together they cover
# every mask kind, block sizes 1/4/16, head dims 32/64/128, both dtypes, lengths that need
# padding, padding keys, grouped-query heads and a static q_offset; SLOW_CASES add more.
CASES = [
    (MaskSpec.full(), 40, 40, 0, 32, jnp.float32, True, (2, 1), 16),
    (MaskSpec.full(), 64, 64, 0, 128, jnp.bfloat16, False, (2, 2), 16),
    (MaskSpec.causal(), 56, 56, 0, 32, jnp.bfloat16, True, (2, 2), 16),
    (MaskSpec.causal(), 16, 40, 16, 64, jnp.float32, True, (2, 1), 16),
    (MaskSpec.block_causal(1), 24, 24, 0, 32, jnp.float32, False, (2, 2), 8),
    (MaskSpec.block_causal(4), 44, 44, 0, 64, jnp.float32, True, (2, 1), 16),
    (MaskSpec.block_causal(16), 64, 64, 0, 128, jnp.bfloat16, True, (2, 1), 16),
    (MaskSpec.bd3lm(1), 24, 24, 0, 64, jnp.float32, False, (2, 2), 8),
    (MaskSpec.bd3lm(4), 40, 40, 0, 32, jnp.float32, True, (2, 1), 16),
    (MaskSpec.bd3lm(4), 48, 48, 0, 128, jnp.bfloat16, True, (2, 2), 16),
    (MaskSpec.bd3lm(16), 64, 64, 0, 64, jnp.float32, False, (2, 1), 16),
    (MaskSpec.bd3lm(16), 96, 96, 0, 32, jnp.bfloat16, False, (2, 2), 32),
]
SLOW_CASES = [
    (MaskSpec.causal(), 24, 24, 0, 128, jnp.float32, False, (2, 1), 8),
    (MaskSpec.block_causal(4), 8, 24, 8, 32, jnp.float32, False, (2, 2), 8),
    (MaskSpec.block_causal(16), 80, 80, 0, 32, jnp.float32, True, (4, 2), 32),
    (MaskSpec.bd3lm(16), 160, 160, 0, 128, jnp.bfloat16, True, (4, 1), 32),
    (MaskSpec.bd3lm(4), 200, 200, 0, 64, jnp.float32, True, (4, 2), 64),
]
PARAMS = CASES + [pytest.param(c, marks=pytest.mark.slow) for c in SLOW_CASES]


def _case_id(case):
    mask, T, S, off, D, dtype, padding, (H, K), tile = case
    return (f"{mask}-T{T}-S{S}-off{off}-D{D}-{jnp.dtype(dtype).name}-H{H}K{K}-tile{tile}"
            + ("-pad" if padding else ""))


@pytest.mark.parametrize("case", PARAMS, ids=_case_id)
def test_forward_and_gradients_match_dense_reference(case):
    mask, T, S, q_offset, D, dtype, padding, (H, K), tile = case
    seed = zlib.crc32(_case_id(case).encode())
    q, k, v, cot, valid = random_inputs(seed, 2, T, S, H, K, D, dtype, padding)
    got, want = kernel_and_reference(q, k, v, cot, valid, mask, q_offset, "interpret",
                                     BlockSizes(tile, tile))
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == dtype and g.shape == w.shape, name
        assert np.all(np.isfinite(np.asarray(g, np.float32))), name
        assert relative_error(g, w) < TOLERANCE[dtype], (name, relative_error(g, w))


@pytest.mark.parametrize("case", [CASES[9], SLOW_CASES[1]], ids=_case_id)
def test_tpu_style_grid_driver_matches_dense_reference(case):
    mask, T, S, q_offset, D, dtype, padding, (H, K), tile = case
    q, k, v, cot, valid = random_inputs(1, 2, T, S, H, K, D, dtype, padding)
    got, want = kernel_and_reference(q, k, v, cot, valid, mask, q_offset, "tpu_interpret",
                                     BlockSizes(tile, tile))
    for g, w in zip(got, want):
        assert relative_error(g, w) < TOLERANCE[dtype]


def test_fully_masked_rows_give_zeros_and_no_nan():
    B, T, H, K, D = 2, 24, 2, 1, 32
    q, k, v, cot, _ = random_inputs(3, B, T, T, H, K, D, jnp.float32, False)
    valid = jnp.ones((B, T), bool).at[1].set(False)  # batch row 1: every key is padding
    # Query segment 7 exists in no key, so those queries see nothing either.
    q_seg = jnp.zeros((B, T), jnp.int32).at[0, :5].set(7)
    kv_seg = jnp.where(valid, 0, -1)

    def kernel(q, k, v):
        return block_sparse_attention(q, k, v, MaskSpec.bd3lm(4), segment_ids=(q_seg, kv_seg),
                                      backend="interpret", block_sizes=BlockSizes(8, 8))

    out, vjp = jax.vjp(kernel, q, k, v)
    dq, dk, dv = vjp(cot)
    for x in (out, dq, dk, dv):
        assert np.all(np.isfinite(x))
    np.testing.assert_array_equal(out[1], 0.0)
    np.testing.assert_array_equal(out[0, :5], 0.0)
    np.testing.assert_array_equal(dq[1], 0.0)
    np.testing.assert_array_equal(dq[0, :5], 0.0)
    np.testing.assert_array_equal(dk[1], 0.0)
    np.testing.assert_array_equal(dv[1], 0.0)
    assert np.all(np.any(out[0, 5:] != 0, axis=-1))  # the other queries did see keys


def test_attend_with_pallas_equals_attend_with_xla():
    q, k, v, _, valid = random_inputs(5, 2, 32, 32, 4, 2, 16, jnp.float32, True)
    mask = MaskSpec.bd3lm(4)
    got = jax.jit(lambda *a: attend(*a, mask, kv_valid_BS=valid, impl="pallas"))(q, k, v)
    want = jax.jit(lambda *a: attend(*a, mask, kv_valid_BS=valid, impl="xla"))(q, k, v)
    assert relative_error(got, want) < 1e-5


# ---------------------------------------------------------------------------- tile plan


def brute_force_kinds(mask, q_len, kv_len, q_offset, bq, bk):
    """Tile kinds from the dense mask, padded with False to whole tiles."""
    dense = mask.dense(q_len, kv_len, q_offset)
    nq, nk = -(-q_len // bq), -(-kv_len // bk)
    padded = np.zeros((nq * bq, nk * bk), bool)
    padded[:q_len, :kv_len] = dense
    real = np.zeros_like(padded)
    real[:q_len, :kv_len] = True
    kinds = np.zeros((nq, nk), np.int8)
    for i in range(nq):
        for j in range(nk):
            tile = padded[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
            rows = real[i * bq:(i + 1) * bq, 0]
            cols = real[0, j * bk:(j + 1) * bk]
            if tile.any():
                kinds[i, j] = FULL if cols.all() and tile[rows].all() else PARTIAL
    return kinds


PLAN_CASES = [
    (MaskSpec.full(), 40, 40, 0), (MaskSpec.causal(), 64, 64, 0),
    (MaskSpec.causal(), 16, 56, 40), (MaskSpec.block_causal(1), 30, 30, 0),
    (MaskSpec.block_causal(4), 60, 60, 0), (MaskSpec.block_causal(16), 96, 96, 0),
    (MaskSpec.bd3lm(1), 26, 26, 0), (MaskSpec.bd3lm(4), 72, 72, 0),
    (MaskSpec.bd3lm(16), 160, 160, 0),
]


@pytest.mark.parametrize("mask,q_len,kv_len,q_offset", PLAN_CASES, ids=str)
@pytest.mark.parametrize("bq,bk", [(8, 8), (16, 8), (16, 32)])
def test_plan_classifies_tiles_like_the_dense_mask(mask, q_len, kv_len, q_offset, bq, bk):
    q_padded, kv_padded = -(-q_len // bq) * bq, -(-kv_len // bk) * bk
    plan = make_plan(mask, q_len, kv_len, q_padded, kv_padded, bq, bk, q_offset)
    want = brute_force_kinds(mask, q_len, kv_len, q_offset, bq, bk)
    np.testing.assert_array_equal(plan.kinds_QK, want)
    for lists, kinds in ((plan.by_query, want), (plan.by_key, want.T)):
        for r, row in enumerate(kinds):
            n_part, n_tot = lists.num_partial_R[r], lists.num_total_R[r]
            listed = lists.index_RM[r, :n_tot]
            assert list(listed[:n_part]) == list(np.flatnonzero(row == PARTIAL))
            assert list(listed[n_part:]) == list(np.flatnonzero(row == FULL))
            assert set(np.flatnonzero(row == EMPTY)).isdisjoint(listed)


@pytest.mark.parametrize("backend,mask,q_len,padding", [
    ("interpret", MaskSpec.full(), 40, True),
    ("interpret", MaskSpec.causal(), 48, False),
    ("interpret", MaskSpec.block_causal(4), 40, False),
    ("interpret", MaskSpec.bd3lm(4), 64, True),
    ("tpu_interpret", MaskSpec.causal(), 40, True),
    ("tpu_interpret", MaskSpec.bd3lm(4), 64, False),
], ids=str)
def test_kernels_visit_exactly_the_nonempty_tiles(backend, mask, q_len, padding):
    B, H, K, D, bq, bk = 2, 2, 1, 32, 8, 16
    q, k, v, _, valid = random_inputs(0, B, q_len, q_len, H, K, D, jnp.float32, padding)
    segments = None if valid is None else jnp.where(valid, 0, -1)
    visits = tile_visits(q, k, v, mask, segment_ids=segments, backend=backend,
                         block_sizes=BlockSizes(bq, bk, bk, bq))
    nonempty_fwd = np.count_nonzero(brute_force_kinds(mask, q_len, q_len, 0, bq, bk))
    nonempty_bwd = np.count_nonzero(brute_force_kinds(mask, q_len, q_len, 0, bk, bq))
    assert visits.forward == visits.planned_forward == B * H * nonempty_fwd
    assert visits.dq == visits.dkv == visits.planned_backward == B * H * nonempty_bwd
    if mask.kind != "full":
        assert nonempty_fwd < (-(-q_len // bq)) * (-(-q_len // bk))  # something was skipped


# ---------------------------------------------------------------------------- errors


def test_unsupported_inputs_are_refused_clearly():
    q, k, v, _, _ = random_inputs(0, 1, 16, 16, 2, 1, 32, jnp.float32, False)
    with pytest.raises(ValueError, match="static int q_offset"):
        jax.jit(lambda off: block_sparse_attention(q, k, v, "causal", q_offset=off))(3)
    with pytest.raises(ValueError, match="powers of two >= 16"):
        block_sparse_attention(q, k, v, "full", backend="gpu", block_sizes=BlockSizes(24, 32))
    with pytest.raises(ValueError, match="multiples of 128"):
        block_sparse_attention(q, k, v, "full", backend="tpu", block_sizes=BlockSizes(64, 64))
    with pytest.raises(ValueError, match="must divide"):
        block_sparse_attention(q, *random_inputs(0, 1, 16, 16, 2, 3, 32, jnp.float32,
                                                 False)[1:3], "full")
    with pytest.raises(ValueError, match="bd3lm mask"):
        block_sparse_attention(q, k, v, "bd3lm:16")
    with pytest.raises(ValueError, match="unknown pallas backend"):
        block_sparse_attention(q, k, v, "full", backend="cuda")


# ---------------------------------------------------------------------------- lowering


def _export(backend, platform, custom_call):
    """Lowers forward + backward of a bf16 bd3lm:16 call for `platform`; returns the MLIR."""
    B, T, H, K, D = 1, 256, 4, 2, 96
    shapes = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in
              ((B, T, H, D), (B, T, K, D), (B, T, K, D))]
    segments = jax.ShapeDtypeStruct((B, T), jnp.int32)

    def loss(q, k, v, seg):
        out = block_sparse_attention(q, k, v, "bd3lm:16", segment_ids=seg, backend=backend)
        return jnp.sum(out.astype(jnp.float32))

    exported = jax.export.export(
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=[platform],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(custom_call)],
    )(*shapes, segments)
    return exported.mlir_module()


def test_lowers_to_triton_for_gpu_without_a_gpu():
    module = _export("gpu", "cuda", "__gpu$xla.gpu.triton")
    assert module.count("xla.gpu.triton") == 3  # forward, dq, dk/dv


def test_lowers_to_mosaic_for_tpu_without_a_tpu(monkeypatch):
    # Lowering `sign` (from integer floor division in the mask predicate) asks the local TPU
    # for its generation; a CPU has none, so pretend to be a v5e for this lowering-only check.
    from jax._src.pallas.mosaic import lowering, tpu_info

    v5e = tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1)
    monkeypatch.setattr(lowering.tpu_info, "get_tpu_info", lambda *a, **k: v5e)
    module = _export("tpu", "tpu", "tpu_custom_call")
    assert module.count("stablehlo.custom_call @tpu_custom_call") == 3


# ---------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.mark.parametrize("method", [ar, pytest.param(mdlm, marks=pytest.mark.slow)],
                         ids=["ar", "mdlm"])
def test_model_trains_to_the_same_losses_with_pallas_and_xla(data_dir, method, monkeypatch):
    traced = []  # calls of the kernel while tracing, to show the config reached `attend`
    kernel = pallas_kernels.block_sparse_attention
    monkeypatch.setattr(pallas_kernels, "block_sparse_attention",
                        lambda *a, **k: traced.append(1) or kernel(*a, **k))
    mesh = mesh_lib.make_mesh(jax.devices()[:1])
    losses, calls = {}, {}
    for impl in ("xla", "pallas"):
        exp = experiment.build(small_config(data_dir, method, **{
            "model.attention_impl": impl, "model.layers": 1}))
        assert exp.config.model.attention_impl == impl
        exp = dataclasses.replace(exp, mesh=mesh)
        step = make_train_step(exp.model, exp.process, exp.tx, mesh,
                               ema_decay=exp.config.optimizer.ema_decay, grad_accum_steps=1,
                               global_batch=exp.config.data.batch_size,
                               state_sharding=exp.state_sharding())
        it = pipeline.train_iterator(exp.config.data, exp.corpus, seed=0)
        state, losses[impl] = exp.init_state(), []
        for _ in range(3):
            state, metrics = step(state, mesh_lib.global_batch(next(it), mesh))
            losses[impl].append(float(metrics["train/loss"]))
        calls[impl], traced[:] = len(traced), []
    assert calls["xla"] == 0 and calls["pallas"] > 0
    np.testing.assert_allclose(losses["pallas"], losses["xla"], rtol=1e-5)
    assert losses["xla"][2] != losses["xla"][0]


# ---------------------------------------------------------------------------- benchmark


def test_benchmark_refuses_cpu_and_replaces_only_its_section(tmp_path):
    # Subprocesses: the benchmark's absl flags (--out) would clash with other entry points'
    # in this process.
    out = tmp_path / "BENCH.md"
    done = subprocess.run([sys.executable, "-m", "experiments.attention_benchmark",
                           f"--out={out}"], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "not performance figures" in done.stderr
    assert not out.exists()

    out.write_text("# Benchmarks\n\n<!-- begin other -->\nkeep\n<!-- end other -->\n")
    report.write_section(out, "attention", "first")
    report.write_section(out, "attention", "second")
    text = out.read_text()
    assert "keep" in text and "first" not in text
    assert text.count("<!-- begin attention -->\nsecond\n<!-- end attention -->") == 1
