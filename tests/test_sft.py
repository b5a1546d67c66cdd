"""Supervised fine-tuning on prompt/response data: the sequence layout and both fills, the
too-long rule, each process's SFT loss against a hand computation (the prompt contributes
exactly nothing), padding that is never attended, and BD3-LM's prompt ending mid-block."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import ar, bd3lm, mdlm
from dlm.data import sft
from dlm.diffusion import make_process
from dlm.models import build_model

SPECIALS = sft.Specials(bos=1, sep=1, eos=2, pad=0)
V = 11  # ids 0..9 and the mask id 10
MASK = V - 1


def _sequences(fill, seq_len=12, **kwargs):
    prompts = [np.array([5, 6, 7]), np.array([8])]
    responses = [np.array([3, 4]), np.array([9, 9, 3])]
    return sft.PromptResponseSequences(prompts, responses, seq_len, SPECIALS, fill=fill,
                                       **kwargs)


def test_layout_with_the_eos_fill():
    row = _sequences("eos")[0]
    np.testing.assert_array_equal(row["tokens"], [1, 5, 6, 7, 1, 3, 4, 2, 2, 2, 2, 2])
    np.testing.assert_array_equal(row["prompt_mask"], [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(row["loss_mask"], [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(row["valid"], np.ones(12))


def test_layout_with_the_pad_fill():
    row = _sequences("pad")[1]
    np.testing.assert_array_equal(row["tokens"], [1, 8, 1, 9, 9, 3, 2, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(row["prompt_mask"], [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(row["loss_mask"], [0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(row["valid"], [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0])


def test_response_ids_stop_at_the_first_eos():
    row = _sequences("eos")[0]
    np.testing.assert_array_equal(sft.response_ids(row["tokens"], 5, SPECIALS.eos), [3, 4])
    np.testing.assert_array_equal(sft.response_ids(np.array([1, 5, 1, 3, 3]), 3, 2), [3, 3])


def test_too_long_names_the_count_and_the_longest():
    with pytest.raises(ValueError, match=r"1 of 2 examples of the data are longer than "
                                         r"data.seq_len=7 \(the longest: 8 tokens"):
        _sequences("eos", seq_len=7)
    kept = _sequences("eos", seq_len=7, too_long="drop")
    assert (len(kept), kept.dropped) == (1, 1)
    np.testing.assert_array_equal(kept[0]["tokens"], [1, 8, 1, 9, 9, 3, 2])


@pytest.mark.parametrize("key, value, message", [
    ("fill", "zeros", "data.fill='zeros'; allowed: eos, pad"),
    ("too_long", "cut", "data.too_long='cut'; allowed: error, drop"),
])
def test_bad_options_name_the_key(key, value, message):
    kwargs = {"fill": "eos", key: value}
    with pytest.raises(ValueError, match=message):
        _sequences(**kwargs)


def test_pad_unattended_only_for_prompt_response_data_with_the_pad_fill():
    def data(**kw):
        return ml_collections.ConfigDict({"name": "task", "fill": "eos", **kw})

    assert sft.pad_unattended(data(fill="pad"))
    assert not sft.pad_unattended(data())
    assert not sft.pad_unattended(data(name="tiny_shakespeare", fill="pad"))


# ---------------------------------------------------------------- losses


def _batch(fill="eos"):
    rows = [_sequences(fill)[i] for i in range(2)]
    batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
    batch["example_id"] = jnp.arange(2, dtype=jnp.int32)
    return batch


class _Toy:
    """A fixed 'network': logits = E[token] + P[position], recording what it was called with."""

    def __init__(self, seed=0, length=12):
        rng = np.random.default_rng(seed)
        self.E = rng.normal(size=(V, V)).astype(np.float32)
        self.P = rng.normal(size=(2 * length, V)).astype(np.float32)
        self.calls = []

    def __call__(self, tokens_BL, t_B, positions_BL=None, output_len=None, **options):
        self.calls.append({"tokens": np.asarray(tokens_BL), **options})
        positions = np.arange(tokens_BL.shape[1]) if positions_BL is None \
            else np.asarray(positions_BL)
        logits = self.E[np.asarray(tokens_BL)] + self.P[positions][None]
        return jnp.asarray(logits[:, :output_len] if output_len else logits)


def _log_softmax_without_mask(logits):
    logits = np.asarray(logits, np.float64).copy()
    logits[..., MASK] = -np.inf
    return logits - np.log(np.sum(np.exp(logits), axis=-1, keepdims=True))


def _process(method, **overrides):
    config = method.get_config("micro")
    for key, value in overrides.items():
        config[key] = value
    return make_process(config, vocab_size=V)


def test_mdlm_sft_loss_matches_a_hand_computation():
    process, batch, toy = _process(mdlm), _batch(), _Toy()
    loss, metrics = process.loss(toy, batch, jax.random.PRNGKey(3), num_examples=2)
    t_B, xt_BL = process.noised(batch, jax.random.PRNGKey(3), 2)
    xt_BL, tokens = np.asarray(xt_BL), np.asarray(batch["tokens"])
    prompt = np.asarray(batch["prompt_mask"]) > 0
    np.testing.assert_array_equal(xt_BL[prompt], tokens[prompt])  # the prompt stays clean
    np.testing.assert_array_equal(toy.calls[0]["tokens"], xt_BL)  # the network saw x_t
    log_p = _log_softmax_without_mask(toy.E[xt_BL] + toy.P[:12][None])
    weight = np.asarray(process.time_weight(t_B), np.float64)[:, None]
    scored = (xt_BL == MASK) & (np.asarray(batch["loss_mask"]) > 0)
    terms = -weight * np.take_along_axis(log_p, tokens[..., None], -1)[..., 0]
    expected = np.sum(np.where(scored, terms, 0.0))
    np.testing.assert_allclose(float(metrics["loss_sum"]), expected, rtol=1e-5)
    assert float(metrics["token_count"]) == np.sum(np.asarray(batch["loss_mask"]))
    np.testing.assert_allclose(float(loss), expected / metrics["token_count"], rtol=1e-5)


@pytest.mark.parametrize("method", [mdlm, bd3lm, ar], ids=["mdlm", "bd3lm", "ar"])
def test_the_prompt_contributes_exactly_nothing(method):
    """The loss's gradient with respect to the logits at prompt positions is exactly zero,
    for many noise draws."""
    process, batch = _process(method), _batch()
    prompt = np.asarray(batch["prompt_mask"]) > 0
    if method is ar:  # logits at i predict token i + 1: SEP's logits predict the response
        prompt = prompt & np.roll(prompt, -1, axis=1)
    rng_logits = np.random.default_rng(1).normal(size=(2, 12, V)).astype(np.float32)

    def loss_of(logits_BLV, rng):
        def model_fn(tokens_BL, t_B, output_len=None, **options):
            del t_B, options
            return logits_BLV + 0.0 * tokens_BL[:, :12, None]

        return process.loss(model_fn, batch, rng, num_examples=2)[0]

    for seed in range(4):
        grads = jax.grad(loss_of)(jnp.asarray(rng_logits), jax.random.PRNGKey(seed))
        grads = np.asarray(grads)
        assert np.all(grads[prompt] == 0.0)
        assert np.any(grads[~prompt] != 0.0)


def test_ar_sft_loss_is_the_response_cross_entropy():
    process, batch, toy = _process(ar), _batch("pad"), _Toy()
    loss, metrics = process.loss(toy, batch, jax.random.PRNGKey(0), num_examples=2)
    tokens = np.asarray(batch["tokens"])
    log_p = _log_softmax_without_mask(toy.E[tokens] + toy.P[:12][None])
    expected, count = 0.0, 0
    for b, (prompt_len, end) in enumerate([(5, 8), (3, 7)]):  # response + EOS, by hand
        for i in range(prompt_len, end):
            expected -= log_p[b, i - 1, tokens[b, i]]
            count += 1
    assert float(metrics["token_count"]) == count == 7
    np.testing.assert_allclose(float(metrics["loss_sum"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(loss), expected / count, rtol=1e-5)
    np.testing.assert_array_equal(toy.calls[0]["kv_valid_BL"],
                                  np.asarray(batch["valid"]) > 0)


def test_bd3lm_prompt_ending_mid_block_is_clean_context():
    """Block size 4, prompts of 5 and 3 positions: block 1 (positions 4..7) of row 0 holds
    SEP (given) and the response start; row 1's block 0 holds BOS 8 SEP and one response
    position. Given positions are never masked; the response positions of those blocks
    are, at the block's time; the network sees x_t ⊕ x_0 with padding unattended twice."""
    process, batch = _process(bd3lm), _batch("pad")
    prompt = np.asarray(batch["prompt_mask"]) > 0
    masked_response = np.zeros(prompt.shape, int)
    for seed in range(40):
        toy = _Toy()
        losses = process.token_losses(toy, batch, jax.random.PRNGKey(seed), 2)
        call = toy.calls[0]
        xt, x0 = call["tokens"][:, :12], call["tokens"][:, 12:]
        np.testing.assert_array_equal(x0, batch["tokens"])
        np.testing.assert_array_equal(xt[prompt], np.asarray(batch["tokens"])[prompt])
        np.testing.assert_array_equal(call["kv_valid_BL"],
                                      np.tile(np.asarray(batch["valid"]) > 0, (1, 2)))
        assert np.all(np.asarray(losses)[prompt] == 0.0)
        masked_response += (xt == MASK) & ~prompt
    assert masked_response[0, 5] > 0 and masked_response[1, 3] > 0  # the partial blocks


# ---------------------------------------------------------------- padding is never attended


@pytest.mark.parametrize("method", [mdlm, bd3lm, ar], ids=["mdlm", "bd3lm", "ar"])
def test_pads_carry_no_loss_and_are_never_attended(method):
    """With the pad fill, changing the tokens at pad positions changes neither the loss nor
    any logit at a real position (a real network: attention with kv_valid)."""
    config = method.get_config("micro")
    config.model.update(hidden=32, layers=2, heads=2, kv_heads=2, cond_dim=32, dropout=0.0)
    process = make_process(config, vocab_size=V)
    module = build_model(config.model, V)
    batch = _batch("pad")
    params = module.init(jax.random.PRNGKey(0), batch["tokens"],
                         jnp.zeros(2) if method is mdlm else None)["params"]
    # DiT blocks start as the identity (adaLN-zero gates): perturb every weight so that
    # attention mixes positions.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.2 * jax.random.normal(k, p.shape, p.dtype)
                                       for p, k in zip(leaves, keys)])
    outputs = []

    def model_fn(tokens_BL, t_B, **options):
        logits = module.apply({"params": params}, tokens_BL, t_B, train=False, **options)
        outputs.append(logits)
        return logits

    valid = np.asarray(batch["valid"]) > 0
    other = dict(batch)
    other["tokens"] = jnp.where(valid, batch["tokens"], jnp.asarray([[7], [5]]))
    first = process.loss(model_fn, batch, jax.random.PRNGKey(0), num_examples=2)[0]
    second = process.loss(model_fn, other, jax.random.PRNGKey(0), num_examples=2)[0]
    np.testing.assert_allclose(float(first), float(second), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(outputs[0])[valid], np.asarray(outputs[1])[valid],
                               rtol=1e-5, atol=1e-5)
    if method is ar:
        return  # causal: the trailing pads are after every real query anyway
    # Without the mask the same change does move the real positions' logits.
    leaky = [module.apply({"params": params}, x, jnp.full(2, 0.5) if method is mdlm else None,
                          train=False) for x in (batch["tokens"], other["tokens"])]
    assert not np.allclose(np.asarray(leaky[0])[valid], np.asarray(leaky[1])[valid])


def test_sft_configs_fit_every_task_and_name_bad_arguments():
    from configs import sft as sft_config
    from dlm.data import tasks

    for task, seq_len in sft_config.SEQ_LEN.items():
        config = sft_config.get_config(f"bd3lm,{task}")
        assert (config.data.name, config.data.task, config.data.seq_len) == ("task", task,
                                                                              seq_len)
        assert seq_len % config.block_size == 0
        examples = tasks.make_task(task).examples("train", 300, 0)
        assert max(len(e.prompt) + len(e.response) + 3 for e in examples) <= seq_len
    for arg, message in (("mdlm", "PROCESS,TASK"), ("edlm,addition", "process 'edlm'"),
                         ("mdlm,poetry", "task 'poetry'")):
        with pytest.raises(ValueError, match=message):
            sft_config.get_config(arg)


def test_sft_task_options_are_overridable_from_the_command_line():
    """Every task option is a config key, so `--config.data.task_options.K=V` reaches the data
    (a ConfigDict takes no new keys from flags); `{}` and the defaults name the same data."""
    import pathlib

    from absl import flags
    from ml_collections import config_flags

    from dlm.data import conditional, tasks

    path = pathlib.Path(__file__).parents[1] / "configs" / "sft.py"

    def parse(*overrides):
        values, argv = flags.FlagValues(), ["prog", f"--config={path}:mdlm,addition", *overrides]
        config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
        values(argv)
        data = values.config.data
        return conditional._task_config(data.task, data.task_options, 0, (50, 5, 5))

    default, two = parse(), parse("--config.data.task_options.max_digits=2")
    assert default.name == conditional._task_config("addition", {}, 0, (50, 5, 5)).name
    assert two.name != default.name and two.options["max_digits"] == 2

    def largest_operand(options):
        examples = tasks.make_task("addition", **options).examples("train", 50, 0)
        return max(int(n) for e in examples for n in e.prompt.rstrip("=").split("+"))

    assert largest_operand(two.options) < 100 <= largest_operand(default.options)
