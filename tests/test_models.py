"""Layers, the DiT denoiser, the causal transformer, the KV cache and model construction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm.models import KVCache, build_model, model_config, param_count
from dlm.models.dit import DiT
from dlm.models.layers import Dense, LayerNorm, Rope, apply_rope, project
from dlm.models.transformer import Transformer

VOCAB = 11


def small_config(name, **overrides):
    """A micro config shrunk so each test compiles in about a second."""
    cfg = model_config("micro", name)
    cfg.update(hidden=32, layers=2, heads=4, kv_heads=4, cond_dim=16, dropout=0.0)
    cfg.update(overrides)
    return cfg


def tokens(seed, B, L):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (B, L)), jnp.int32)


def init(model, B=2, L=8, *args):
    """Initialised parameters; jit compiles once instead of dispatching op by op."""
    return jax.jit(model.init)(jax.random.key(0), tokens(0, B, L), *args)


def random_params(model, seed=1, scale=0.2, B=2, L=8, *args):
    """Random parameters of the model's shapes: no zero-initialised layer hides a dependency,
    and no init needs compiling (norm scales are 1 + noise, everything else noise)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), tokens(0, B, L), *args)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        noise = scale * rng.standard_normal(leaf.shape).astype(np.float32)
        is_norm_scale = getattr(path[-1], "key", None) == "scale"
        return jnp.asarray(noise + 1.0 if is_norm_scale else noise)

    return jax.tree_util.tree_map_with_path(fill, shapes)


# --- layers -------------------------------------------------------------------------------


def test_rope_depends_only_on_relative_position():
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32) for _ in range(2))

    def score(m, n):
        rq = apply_rope(q, jnp.array([m]))
        rk = apply_rope(k, jnp.array([n]))
        return float(jnp.sum(rq * rk))

    for m, n in [(0, 3), (7, 10), (100, 103), (513, 516)]:
        np.testing.assert_allclose(score(m, n), score(0, 3), rtol=1e-4, atol=1e-4)
    assert abs(score(0, 3) - score(0, 5)) > 1e-3
    np.testing.assert_allclose(apply_rope(q, jnp.array([0])), q)
    np.testing.assert_allclose(jnp.linalg.norm(apply_rope(q, jnp.array([37]))),
                               jnp.linalg.norm(q), rtol=1e-6)


def test_rope_positions_shapes_and_float32_compute():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5, 3, 8)), jnp.float32)
    pos_T = jnp.arange(5)
    np.testing.assert_array_equal(apply_rope(x, pos_T), apply_rope(x, jnp.stack([pos_T] * 2)))
    x_bf = x.astype(jnp.bfloat16)
    out_bf = apply_rope(x_bf, pos_T + 1000)
    assert out_bf.dtype == jnp.bfloat16
    # Computed in float32 and rounded once: equal to the float32 result cast to bfloat16.
    expected = apply_rope(x_bf.astype(jnp.float32), pos_T + 1000).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(out_bf, np.float32),
                                  np.asarray(expected, np.float32))


@pytest.mark.parametrize("rope", [Rope(), Rope(scaling="linear", factor=2.0),
                                  Rope(scaling="ntk", factor=4.0),
                                  Rope(scaling="dynamic", factor=2.0, original_len=64)],
                         ids=lambda r: r.scaling)
def test_rope_static_positions_equal_traced_positions(rope):
    """Numpy positions (constant tables built at trace time) against the same positions
    traced under jit (tables computed by XLA): the same rotation to float32 rounding."""
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 100, 3, 16)), jnp.float32)
    for pos in (np.arange(100), np.stack([np.arange(100), np.arange(100) + 7])):
        static = jax.jit(lambda x, pos=pos: apply_rope(x, pos, rope))(x)
        traced = jax.jit(lambda x, p: apply_rope(x, p, rope))(x, jnp.asarray(pos))
        # dynamic scaling's traced frequencies are float32 maths, the static ones float64
        atol = 1e-4 if rope.scaling == "dynamic" else 1e-5
        np.testing.assert_allclose(static, traced, rtol=0, atol=atol)
    assert not np.allclose(apply_rope(x, np.arange(100), rope), apply_rope(x, np.arange(100) + 1,
                                                                        rope), atol=1e-3)


def test_layernorm_float32_under_bf16_input():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 3, 16)) * 5 + 3, jnp.bfloat16)
    norm = LayerNorm()
    params = norm.init(jax.random.key(0), x)
    assert params["params"]["scale"].dtype == jnp.float32
    assert "bias" not in params["params"]
    out = norm.apply(params, x)
    assert out.dtype == jnp.float32
    x64 = np.asarray(x, np.float64)
    ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_dense_bias_free_float32_params_compute_dtype():
    layer = Dense(6, jnp.bfloat16)
    x = jnp.ones((2, 4), jnp.float32)
    params = layer.init(jax.random.key(0), x)
    assert set(params["params"]) == {"kernel"}
    assert params["params"]["kernel"].dtype == jnp.float32
    assert layer.apply(params, x).dtype == jnp.bfloat16
    assert Dense(6, jnp.bfloat16, out_dtype=jnp.float32).apply(params, x).dtype == jnp.float32


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_project_gradients_match_autodiff_of_dot(dtype, tol):
    """`project`'s written-out backward pass against autodiff of jnp.dot, on a 3-d input."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 5, 8), np.float32), dtype)
    kernel = jnp.asarray(rng.standard_normal((8, 6), np.float32), dtype)
    weights = jnp.asarray(rng.standard_normal((3, 5, 6), np.float32))
    ours = jax.grad(lambda x, w: jnp.sum(project(x, w) * weights), argnums=(0, 1))(x, kernel)
    dot = lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)
    reference = jax.grad(lambda x, w: jnp.sum(dot(x, w) * weights), argnums=(0, 1))(
        x.astype(jnp.float32), kernel.astype(jnp.float32))
    for a, b in zip(ours, reference):
        assert a.dtype == dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=tol, atol=tol)


def test_project_under_shard_map_sums_the_replicated_kernels_gradient():
    """Data split over 8 devices, kernel replicated: the gradient of the replicated kernel
    comes out summed over the devices, the single-device gradient (the kernel is made
    varying, as jnp.dot does implicitly)."""
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((16, 8), np.float32))
    kernel = jnp.asarray(rng.standard_normal((8, 4), np.float32))

    def per_device(x, kernel):
        return jax.grad(lambda w: jnp.sum(jnp.sin(project(x, w))))(kernel)

    sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"), P()),
                                    out_specs=P()))(x, kernel)
    single = jax.grad(lambda w: jnp.sum(jnp.sin(x @ w)))(kernel)
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-5)


# --- DiT ------------------------------------------------------------------------------------


def test_dit_starts_as_identity_with_zero_logits():
    cfg = small_config("dit")
    model = build_model(cfg, VOCAB)
    params = init(model)
    x = tokens(3, 2, 8)
    logits, state = model.apply(params, x, capture_intermediates=True, mutable=["intermediates"])
    inter = state["intermediates"]
    embedded = inter["embed"]["__call__"][0]
    for i in range(cfg.layers):
        block_out, _ = inter[f"blocks_{i}"]["__call__"][0]
        np.testing.assert_array_equal(block_out, embedded)
    assert logits.shape == (2, 8, VOCAB) and logits.dtype == jnp.float32
    np.testing.assert_array_equal(logits, 0.0)


@pytest.mark.parametrize("name", ["dit", "transformer"])
def test_bf16_compute_float32_params_and_logits(name):
    cfg32 = small_config(name)
    cfg16 = small_config(name, dtype="bfloat16")
    params = random_params(build_model(cfg32, VOCAB))
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    x = tokens(5, 2, 8)
    out32 = build_model(cfg32, VOCAB).apply(params, x)
    out16 = build_model(cfg16, VOCAB).apply(params, x)
    assert out16.shape == out32.shape == (2, 8, VOCAB)
    assert out16.dtype == out32.dtype == jnp.float32
    scale = float(jnp.abs(out32).max())
    np.testing.assert_allclose(out16, out32, atol=0.05 * scale)


def test_dit_every_output_depends_on_every_token():
    model = build_model(small_config("dit"), VOCAB)
    params = random_params(model)
    apply = jax.jit(model.apply)
    x = tokens(6, 1, 6)
    base = apply(params, x)
    for j in range(6):
        changed = apply(params, x.at[0, j].set((x[0, j] + 1) % VOCAB))
        diff_L = jnp.abs(changed - base).max(axis=-1)[0]
        assert bool((diff_L > 1e-6).all()), f"changing token {j} left some outputs unchanged"


def test_transformer_is_causal():
    model = build_model(small_config("transformer"), VOCAB)
    params = random_params(model)
    apply = jax.jit(model.apply)
    x = tokens(7, 1, 6)
    base = apply(params, x)
    for j in range(6):
        changed = apply(params, x.at[0, j].set((x[0, j] + 1) % VOCAB))
        diff_L = np.asarray(jnp.abs(changed - base).max(axis=-1)[0])
        np.testing.assert_allclose(diff_L[:j], 0.0, atol=1e-6)
        assert (diff_L[j:] > 1e-6).all()


def test_time_conditioning():
    model = build_model(small_config("dit", time_conditioning=True), VOCAB)
    params = random_params(model, 1, 0.2, 2, 8, jnp.zeros(2))
    x = tokens(8, 2, 6)
    with pytest.raises(ValueError, match="time_conditioning"):
        model.apply(params, x)
    a = model.apply(params, x, jnp.array([0.1, 0.1]))
    b = model.apply(params, x, jnp.array([0.9, 0.9]))
    assert float(jnp.abs(a - b).max()) > 1e-4
    # Without conditioning t is ignored (MDLM feeds 0); the parameter tree is the same.
    plain = build_model(small_config("dit"), VOCAB)
    np.testing.assert_array_equal(plain.apply(params, x), plain.apply(params, x, jnp.ones(2)))
    np.testing.assert_array_equal(plain.apply(params, x), model.apply(params, x, jnp.zeros(2)))


@pytest.mark.parametrize("name", ["dit", "transformer"])
def test_dropout_only_when_training(name):
    model = build_model(small_config(name, dropout=0.3), VOCAB)
    params = random_params(model)
    x = tokens(9, 2, 8)
    eval_a, eval_b = model.apply(params, x), model.apply(params, x, train=False)
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a = model.apply(params, x, train=True, rngs={"dropout": jax.random.key(1)})
    train_b = model.apply(params, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert float(jnp.abs(train_a - eval_a).max()) > 1e-4
    assert float(jnp.abs(train_a - train_b).max()) > 1e-4


# --- KV cache -------------------------------------------------------------------------------


def decode_in_chunks(model, params, cfg, x_BL, chunks, max_len=16):
    decode = jax.jit(lambda p, t, c: model.apply(p, t, c, method="decode"))
    cache = KVCache.init(cfg, x_BL.shape[0], max_len)
    outs, start = [], 0
    for size in chunks:
        logits, cache = decode(params, x_BL[:, start:start + size], cache)
        outs.append(logits)
        start += size
    assert int(cache.length) == start
    return jnp.concatenate(outs, axis=1)


def test_transformer_decode_matches_full_forward():
    cfg = small_config("transformer", kv_heads=2)
    model = build_model(cfg, VOCAB)
    params = random_params(model)
    x = tokens(10, 2, 10)
    full = model.apply(params, x)
    step_by_step = decode_in_chunks(model, params, cfg, x, [4] + [1] * 6)
    np.testing.assert_allclose(step_by_step, full, atol=1e-5, rtol=1e-5)
    blocks = decode_in_chunks(model, params, cfg, x, [4, 3, 3])
    np.testing.assert_allclose(blocks, full, atol=1e-5, rtol=1e-5)


def test_decode_with_left_padding_matches_unpadded_forward():
    cfg = small_config("transformer")
    model = build_model(cfg, VOCAB)
    params = random_params(model)
    real = tokens(11, 1, 5)
    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), real], axis=1)
    valid = jnp.arange(8)[None] >= 3
    positions = jnp.maximum(jnp.arange(8) - 3, 0)[None]
    cache = KVCache.init(cfg, 1, 8)
    logits, cache = model.apply(params, padded, cache, positions_BT=positions, valid_BT=valid,
                                method="decode")
    np.testing.assert_allclose(logits[:, 3:], model.apply(params, real), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(cache.valid_BS, valid)


def test_dit_block_causal_decode_matches_full_forward():
    cfg = small_config("dit", mask="block_causal:2")
    model = build_model(cfg, VOCAB)
    params = random_params(model)
    x = tokens(12, 2, 8)
    full = model.apply(params, x)
    np.testing.assert_allclose(decode_in_chunks(model, params, cfg, x, [4, 2, 2]), full,
                               atol=1e-5, rtol=1e-5)


# --- sizes and construction -----------------------------------------------------------------


def test_param_counts_are_in_mdlm_ballpark():
    gpt2_vocab = 50258
    counts = {}
    for size in ("tiny", "small"):
        model = build_model(model_config(size, "dit"), gpt2_vocab)
        shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
        counts[size] = param_count(shapes)
    print("DiT parameters with the GPT-2 vocabulary:", counts)
    assert 40e6 < counts["tiny"] < 120e6
    assert 140e6 < counts["small"] < 200e6  # MDLM reports 169M


def test_model_config_sizes_and_build():
    cfg = model_config("micro")
    assert (cfg.hidden, cfg.layers, cfg.heads, cfg.kv_heads) == (128, 4, 4, 4)
    assert (cfg.mlp_ratio, cfg.dropout, cfg.time_conditioning) == (4, 0.1, False)
    assert (cfg.max_len, cfg.dtype, cfg.attention_impl) == (1024, "float32", "xla")
    assert cfg.mask == "full" and model_config("tiny", "transformer").mask == "causal"
    assert (model_config("medium").hidden, model_config("medium").heads) == (1024, 16)
    assert isinstance(build_model(cfg, VOCAB), DiT)
    assert isinstance(build_model(model_config("micro", "transformer"), VOCAB), Transformer)
    params = random_params(build_model(small_config("dit"), VOCAB))
    leaves = jax.tree_util.tree_leaves(params)
    assert param_count(params) == sum(x.size for x in leaves)


@pytest.mark.parametrize("key,value,match", [
    ("name", "rnn", r"model\.name.*dit, transformer"),
    ("size", "huge", r"model\.size.*micro, tiny, small, medium"),
    ("dtype", "float16", r"model\.dtype.*float32, bfloat16"),
    ("attention_impl", "cudnn", r"model\.attention_impl.*xla, pallas"),
    ("heads", 5, r"model\.hidden .* model\.heads"),
    ("kv_heads", 3, r"model\.kv_heads .* model\.heads"),
    ("layers", 0, r"model\.layers"),
    ("dropout", 1.0, r"model\.dropout"),
    ("mask", "sliding", r"model\.mask"),
])
def test_build_model_errors_name_the_key(key, value, match):
    cfg = model_config("micro")
    with cfg.ignore_type():
        cfg[key] = value
    with pytest.raises(ValueError, match=match):
        build_model(cfg, VOCAB)


def test_unknown_size_in_model_config():
    with pytest.raises(ValueError, match=r"model\.size"):
        model_config("giant")
