"""Mask specs against loop definitions; reference attention against a naive per-head loop."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm.models.attention import attend, mask_array
from dlm.models.masks import MaskSpec, as_mask_spec


def loop_mask(spec: MaskSpec, q_len: int, kv_len: int, q_offset: int) -> np.ndarray:
    """The mask written out element by element, independently of MaskSpec.allows."""
    b = spec.block_size
    out = np.zeros((q_len, kv_len), bool)
    for i in range(q_len):
        p = q_offset + i
        for j in range(kv_len):
            if spec.kind == "full":
                ok = True
            elif spec.kind == "causal":
                ok = j <= p
            elif spec.kind == "block_causal":
                ok = j // b <= p // b
            else:
                L = kv_len // 2
                q_noisy, k_noisy = p < L, j < L
                q_block = (p if q_noisy else p - L) // b
                k_block = (j if k_noisy else j - L) // b
                if q_noisy and k_noisy:
                    ok = q_block == k_block
                elif q_noisy:
                    ok = q_block > k_block
                elif not k_noisy:
                    ok = q_block >= k_block
                else:
                    ok = False
            out[i, j] = ok
    return out


MASK_CASES = [
    (MaskSpec.full(), 5, 7, 0),
    (MaskSpec.full(), 3, 3, 2),
    (MaskSpec.causal(), 6, 6, 0),
    (MaskSpec.causal(), 3, 10, 4),
    (MaskSpec.causal(), 1, 10, 9),
    (MaskSpec.block_causal(2), 8, 8, 0),
    (MaskSpec.block_causal(4), 4, 12, 4),
    (MaskSpec.block_causal(3), 3, 9, 6),
    (MaskSpec.block_causal(1), 5, 5, 0),
    (MaskSpec.bd3lm(2), 8, 8, 0),
    (MaskSpec.bd3lm(4), 16, 16, 0),
    (MaskSpec.bd3lm(1), 6, 6, 0),
    (MaskSpec.bd3lm(3), 12, 12, 0),
    (MaskSpec.bd3lm(5), 20, 20, 0),
    (MaskSpec.bd3lm(8), 16, 16, 0),  # b = L: one block, x_t never sees x_0
    (MaskSpec.bd3lm(1), 32, 32, 0),
]


@pytest.mark.parametrize("spec,q_len,kv_len,q_offset", MASK_CASES, ids=str)
def test_dense_matches_loop_definition(spec, q_len, kv_len, q_offset):
    got = spec.dense(q_len, kv_len, q_offset)
    assert got.dtype == bool and got.shape == (q_len, kv_len)
    np.testing.assert_array_equal(got, loop_mask(spec, q_len, kv_len, q_offset))


@pytest.mark.parametrize("spec,q_len,kv_len,q_offset",
                         [c for c in MASK_CASES if c[0].kind != "bd3lm"], ids=str)
def test_traced_offset_matches_dense(spec, q_len, kv_len, q_offset):
    traced = jax.jit(lambda off: mask_array(spec, q_len, kv_len, off))(jnp.int32(q_offset))
    np.testing.assert_array_equal(traced, spec.dense(q_len, kv_len, q_offset))


def test_bd3lm_mask_written_out():
    # L = 4, b = 2: rows/cols 0-3 are x_t, 4-7 are x_0.
    expected = np.array([
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1, 1],
    ], bool)
    np.testing.assert_array_equal(MaskSpec.bd3lm(2).dense(8, 8), expected)


def test_spec_is_frozen_hashable_and_parses():
    spec = MaskSpec.block_causal(4)
    assert spec == MaskSpec("block_causal", 4) and hash(spec) == hash(MaskSpec("block_causal", 4))
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.block_size = 2
    for s in (MaskSpec.full(), MaskSpec.causal(), spec, MaskSpec.bd3lm(8)):
        assert MaskSpec.parse(str(s)) == s == as_mask_spec(str(s)) == as_mask_spec(s)
    # Usable as a static jit argument.
    f = jax.jit(lambda x, m: x + m.block_size, static_argnums=1)
    assert int(f(jnp.int32(1), spec)) == 5


@pytest.mark.parametrize("make,match", [
    (lambda: MaskSpec("sliding"), "unknown mask kind"),
    (lambda: MaskSpec.block_causal(0), "block_size >= 1"),
    (lambda: MaskSpec.bd3lm(-2), "block_size >= 1"),
    (lambda: MaskSpec("causal", 4), "takes no block_size"),
    (lambda: MaskSpec.parse("block_causal:x"), "cannot parse"),
    (lambda: MaskSpec.block_causal(4).dense(6, 8), "divisible"),
    (lambda: MaskSpec.block_causal(4).dense(4, 8, q_offset=2), "divisible"),
    (lambda: MaskSpec.bd3lm(4).dense(12, 12), "divisible"),
    (lambda: MaskSpec.bd3lm(2).dense(8, 16), "q_len == kv_len"),
    (lambda: MaskSpec.bd3lm(2).dense(8, 8, q_offset=8), "q_offset must be 0"),
    (lambda: MaskSpec.causal().dense(0, 4), ">= 1"),
])
def test_mask_validation_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def naive_attention(q, k, v, allowed_BTS):
    """Per-batch, per-head, per-query loop in float64; a row that sees nothing outputs 0."""
    q, k, v = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (q, k, v))
    B, T, H, D = q.shape
    group = H // k.shape[2]
    out = np.zeros((B, T, H, D))
    for b in range(B):
        for h in range(H):
            kh = h // group
            for i in range(T):
                keys = np.flatnonzero(allowed_BTS[b, i])
                if keys.size == 0:
                    continue
                scores = np.array([q[b, i, h] @ k[b, j, kh] for j in keys]) / math.sqrt(D)
                p = np.exp(scores - scores.max())
                p /= p.sum()
                out[b, i, h] = sum(pj * v[b, j, kh] for pj, j in zip(p, keys))
    return out


def random_qkv(seed, B, T, S, H, K, D, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
                 for shape in ((B, T, H, D), (B, S, K, D), (B, S, K, D)))


# One compiled call per case is cheaper than eager op-by-op dispatch for each new shape.
jit_attend = jax.jit(attend, static_argnames=("mask", "q_offset", "impl"))


@pytest.mark.parametrize("spec,T,S,q_offset", [
    (MaskSpec.full(), 5, 7, 0),
    (MaskSpec.causal(), 8, 8, 0),
    (MaskSpec.causal(), 3, 10, 4),
    (MaskSpec.block_causal(2), 8, 8, 0),
    (MaskSpec.block_causal(4), 4, 12, 4),
    (MaskSpec.bd3lm(2), 8, 8, 0),
], ids=str)
@pytest.mark.parametrize("H,K", [(4, 4), (4, 2), (4, 1)])
def test_attend_matches_naive(spec, T, S, q_offset, H, K):
    q, k, v = random_qkv(0, 2, T, S, H, K, 8)
    out = jit_attend(q, k, v, spec, q_offset=q_offset)
    assert out.shape == q.shape and out.dtype == jnp.float32
    allowed = np.broadcast_to(loop_mask(spec, T, S, q_offset), (2, T, S))
    np.testing.assert_allclose(out, naive_attention(q, k, v, allowed), atol=1e-5, rtol=1e-5)


def test_attend_padding_and_fully_masked_rows():
    T = S = 6
    q, k, v = random_qkv(1, 3, T, S, 4, 2, 8)
    kv_valid = np.array([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], bool)
    spec = MaskSpec.causal()
    out = jit_attend(q, k, v, spec, kv_valid_BS=jnp.asarray(kv_valid))
    allowed = loop_mask(spec, T, S, 0)[None] & kv_valid[:, None, :]
    assert not allowed[0, :2].any() and not allowed[2].any()  # rows that see nothing
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_array_equal(out[0, :2], 0.0)
    np.testing.assert_array_equal(out[2], 0.0)
    np.testing.assert_allclose(out, naive_attention(q, k, v, allowed), atol=1e-5, rtol=1e-5)
    loss = lambda q: attend(q, k, v, spec, kv_valid_BS=jnp.asarray(kv_valid)).sum()
    grad = jax.jit(jax.grad(loss))(q)
    assert np.isfinite(np.asarray(grad)).all()


def dense_softmax_attention(q, k, v, allowed_BTS):
    """A second path in JAX: heads repeated to H, dense masked logits, jax.nn.softmax, rows
    that see nothing zeroed (autodiff through it gives the reference gradients)."""
    B, T, H, D = q.shape
    k, v = (jnp.repeat(a.astype(jnp.float32), H // a.shape[2], axis=2) for a in (k, v))
    logits = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k) / math.sqrt(D)
    allowed = jnp.asarray(allowed_BTS)[:, None]
    probs = jax.nn.softmax(jnp.where(allowed, logits, -1e30), axis=-1)
    probs = probs * jnp.any(allowed, axis=-1, keepdims=True)
    return jnp.einsum("bhts,bshd->bthd", probs, v)


# T >= 128: the static mask is split into query chunks against their key ranges.
CHUNKED_CASES = [
    (MaskSpec.causal(), 128, 128, 0),
    (MaskSpec.block_causal(32), 128, 128, 0),
    (MaskSpec.bd3lm(16), 128, 128, 0),
    (MaskSpec.causal(), 128, 160, 32),
    (MaskSpec.full(), 128, 96, 0),
]


def test_static_mask_tiles():
    from dlm.models.attention import _tiles

    causal = _tiles(loop_mask(MaskSpec.causal(), 256, 256, 0))
    assert causal == [((0, 64), (0, 64)), ((64, 128), (0, 128)), ((128, 192), (0, 192)),
                      ((192, 256), (0, 256))]
    # BD3-LM over x_t ⊕ x_0 (L = 128, b = 16): x_0's queries never read x_t.
    bd3lm = _tiles(loop_mask(MaskSpec.bd3lm(16), 256, 256, 0))
    assert bd3lm[2:] == [((128, 192), (128, 192)), ((192, 256), (128, 256))]
    assert _tiles(loop_mask(MaskSpec.full(), 256, 256, 0)) == [((0, 256), (0, 256))]
    assert _tiles(loop_mask(MaskSpec.causal(), 64, 64, 0)) == [((0, 64), (0, 64))]  # short


@pytest.mark.parametrize("spec,T,S,q_offset", CHUNKED_CASES, ids=str)
def test_attend_chunked_static_mask_matches_naive(spec, T, S, q_offset):
    from dlm.models.attention import _tiles

    tiles = _tiles(loop_mask(spec, T, S, q_offset))
    assert (len(tiles) > 1) == (spec.kind != "full"), tiles  # the chunked path is exercised
    q, k, v = random_qkv(5, 2, T, S, 4, 2, 8)
    kv_valid = np.ones((2, S), bool)
    kv_valid[1, :40] = False  # row 1: the first queries of a causal mask see nothing
    out = jit_attend(q, k, v, spec, q_offset=q_offset, kv_valid_BS=jnp.asarray(kv_valid))
    allowed = loop_mask(spec, T, S, q_offset)[None] & kv_valid[:, None, :]
    np.testing.assert_allclose(out, naive_attention(q, k, v, allowed), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec,T,S,q_offset", [
    (MaskSpec.full(), 6, 6, 0), (MaskSpec.causal(), 8, 8, 0), *CHUNKED_CASES[1:4]], ids=str)
def test_attend_gradients_match_autodiff_of_dense_softmax(spec, T, S, q_offset):
    """The written-out backward pass against autodiff of `dense_softmax_attention`, with
    grouped heads, padding and queries that see no key."""
    q, k, v = random_qkv(6, 2, T, S, 4, 2, 8)
    weights = jnp.asarray(np.random.default_rng(7).standard_normal(q.shape, np.float32))
    kv_valid = np.ones((2, S), bool)
    kv_valid[1, : S // 3] = False
    allowed = loop_mask(spec, T, S, q_offset)[None] & kv_valid[:, None, :]

    def loss_ours(q, k, v):
        return jnp.sum(attend(q, k, v, spec, q_offset=q_offset,
                              kv_valid_BS=jnp.asarray(kv_valid)) * weights)

    def loss_dense(q, k, v):
        return jnp.sum(dense_softmax_attention(q, k, v, allowed) * weights)

    ours = jax.jit(jax.grad(loss_ours, argnums=(0, 1, 2)))(q, k, v)
    reference = jax.jit(jax.grad(loss_dense, argnums=(0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", ours, reference):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5, err_msg=f"d{name}")


def test_attend_bf16_gradients_close_to_float32():
    spec = MaskSpec.bd3lm(16)
    q, k, v = random_qkv(8, 2, 128, 128, 4, 2, 16)
    allowed = loop_mask(spec, 128, 128, 0)[None]
    loss = lambda q, k, v: jnp.sum(attend(q, k, v, spec).astype(jnp.float32))
    ours = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(
        *(a.astype(jnp.bfloat16) for a in (q, k, v)))
    reference = jax.grad(lambda q, k, v: jnp.sum(dense_softmax_attention(q, k, v, allowed)),
                         argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, reference):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=5e-2, rtol=5e-2)


def test_attend_traced_offset_under_jit():
    q, k, v = random_qkv(2, 2, 4, 12, 4, 2, 8)
    spec = MaskSpec.block_causal(4)
    traced = jax.jit(lambda off: attend(q, k, v, spec, q_offset=off))(jnp.int32(4))
    np.testing.assert_allclose(traced, jit_attend(q, k, v, spec, q_offset=4), atol=1e-6)


def test_attend_bf16_inputs_softmax_in_float32():
    q, k, v = random_qkv(3, 2, 8, 8, 4, 2, 16, dtype=jnp.bfloat16)
    spec = MaskSpec.block_causal(2)
    out = jit_attend(q, k, v, spec)
    assert out.dtype == jnp.bfloat16
    allowed = np.broadcast_to(loop_mask(spec, 8, 8, 0), (2, 8, 8))
    np.testing.assert_allclose(np.asarray(out, np.float32), naive_attention(q, k, v, allowed),
                               atol=3e-2, rtol=3e-2)
    jaxpr = jax.make_jaxpr(lambda q, k, v: attend(q, k, v, spec))(q, k, v)
    exp_dtypes = [eqn.outvars[0].aval.dtype for eqn in jaxpr.eqns if eqn.primitive.name == "exp"]
    exp_dtypes += [eqn.outvars[0].aval.dtype for eqn in _inner_eqns(jaxpr.jaxpr)
                   if eqn.primitive.name == "exp"]
    assert exp_dtypes and all(d == jnp.float32 for d in exp_dtypes)


def _inner_eqns(jaxpr):
    """Equations of sub-jaxprs (softmax may sit inside a custom_jvp call)."""
    for eqn in jaxpr.eqns:
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", None)
            if inner is not None:
                inner = getattr(inner, "jaxpr", inner)
                yield from inner.eqns
                yield from _inner_eqns(inner)


def test_attend_impl_dispatch_errors():
    q, k, v = random_qkv(4, 1, 2, 2, 2, 2, 4)
    # A traced offset (KV-cache decoding) takes the reference path under 'pallas' too.
    decode = jax.jit(lambda off, impl: attend(q, k, v, MaskSpec.causal(), q_offset=off,
                                              impl=impl), static_argnums=1)
    np.testing.assert_array_equal(decode(1, "pallas"), decode(1, "xla"))
    with pytest.raises(ValueError, match=r"model\.attention_impl.*xla, pallas"):
        attend(q, k, v, MaskSpec.full(), impl="cudnn")
    with pytest.raises(ValueError, match="must divide"):
        attend(q, *random_qkv(4, 1, 2, 2, 2, 3, 4)[1:], MaskSpec.full())
