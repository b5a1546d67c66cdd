"""Pretrained folders (Llama, Qwen2, LLaDA, Dream) against transformers' own modules.

Tiny random models are built by transformers and saved locally; the LLaDA folder renames a
Llama state dict into LLaDA's names and config keys, the Dream folder is a Qwen2 one with
Dream's architecture and mask id. LLaDA and Dream attend bidirectionally: transformers runs
them with an all-zero 4D (additive) attention mask.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from dlm.export.convert import model_section  # noqa: E402
from dlm.models import build_model, model_config  # noqa: E402
from dlm.models.layers import Rope, apply_rope  # noqa: E402
from dlm.runs import pretrained  # noqa: E402
from dlm.runs.pretrained import load_pretrained  # noqa: E402

VOCAB, LENGTH = 61, 12
TOLERANCE = 1e-5  # max |ours - theirs| / max |theirs|, float32


def _common(**overrides):
    return dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                **overrides)


def _save(model, folder):
    torch.manual_seed(0)
    with torch.no_grad():  # larger than transformers' 0.02 init, so the logits are not ~0
        for p in model.parameters():
            p.normal_(0.0, 0.3) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    return model.eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    llama = _save(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **_common(rope_theta=500000.0))), root / "llama")
    qwen = _save(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **_common(tie_word_embeddings=True))), root / "qwen2")
    dream_ref = _save(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **_common(rope_theta=1e6))), root / "dream")
    config = json.loads((root / "dream" / "config.json").read_text())
    config.update(architectures=["DreamModel"], model_type="Dream", mask_token_id=VOCAB - 1)
    (root / "dream" / "config.json").write_text(json.dumps(config))
    _write_llada(root / "llama", root / "llada")
    for family in ("llama", "qwen2", "dream", "llada"):
        _write_tokenizer(root / family)
    return {"root": root, "llama": llama, "qwen2": qwen, "dream": dream_ref}


def _write_tokenizer(folder):
    """The word-level tokenizer ("w0" ..., <s> = 1, </s> = 2) with CHAT_TEMPLATE."""
    from experiments.pretrained_benchmarks import write_word_tokenizer

    write_word_tokenizer(folder, VOCAB, CHAT_TEMPLATE)


# A user turn "w5 w7" renders as "<s> w5 w7 w9" (w9 opening the assistant's turn).
CHAT_TEMPLATE = ("{{ bos_token }} {% for m in messages %}{{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}w9{% endif %}")


def _write_llada(llama_dir, out):
    """A LLaDA-layout folder with the Llama folder's weights under LLaDA's names."""
    out.mkdir()
    hf = json.loads((llama_dir / "config.json").read_text())
    state = load_file(str(llama_dir / "model.safetensors"))
    renamed = {"model.transformer.wte.weight": state.pop("model.embed_tokens.weight"),
               "model.transformer.ln_f.weight": state.pop("model.norm.weight"),
               "model.transformer.ff_out.weight": state.pop("lm_head.weight")}
    inner = {"self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj",
             "self_attn.v_proj": "v_proj", "self_attn.o_proj": "attn_out",
             "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj", "mlp.down_proj": "ff_out",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ff_norm"}
    for name, array in state.items():
        _, _, layer, rest = name.split(".", 3)
        module = rest.rsplit(".", 1)[0]
        renamed[f"model.transformer.blocks.{layer}.{inner[module]}.weight"] = array
    save_file(renamed, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LLaDAModelLM"], "d_model": hf["hidden_size"],
        "n_layers": hf["num_hidden_layers"], "n_heads": hf["num_attention_heads"],
        "n_kv_heads": hf["num_key_value_heads"], "mlp_hidden_size": hf["intermediate_size"],
        "rope_theta": hf["rope_parameters"]["rope_theta"], "rms_norm_eps": hf["rms_norm_eps"],
        "vocab_size": VOCAB, "embedding_size": VOCAB, "mask_token_id": VOCAB - 1,
        "max_sequence_length": 64, "weight_tying": False, "block_type": "llama",
        "layer_norm_type": "rms", "activation_type": "silu", "include_bias": False}))


def _tokens(seed=0, batch=2):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, LENGTH)).astype(np.int32)


def _ours(folder, tokens, **options):
    loaded = load_pretrained(folder, **options)
    apply = jax.jit(lambda p, x: loaded.module.apply({"params": p}, x, train=False))
    return np.asarray(apply(loaded.params, tokens)), loaded


def _theirs(model, tokens, bidirectional=False):
    with torch.no_grad():
        ids = torch.from_numpy(tokens).long()
        mask = torch.zeros(tokens.shape[0], 1, LENGTH, LENGTH) if bidirectional else None
        return model(ids, attention_mask=mask).logits.numpy()


def _rel(ours, theirs):
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_causal_logits_match_transformers(folders, family):
    ours, loaded = _ours(folders["root"] / family, _tokens())
    assert loaded.folder.family.process == "ar"
    assert _rel(ours, _theirs(folders[family], _tokens())) <= TOLERANCE
    tied = family == "qwen2"
    assert ("head" in loaded.params) is not tied
    assert ("bias" in loaded.params["blocks_0"]["attn"]["q"]) is tied  # Qwen2's q/k/v bias


def test_llada_layout_is_bidirectional_llama(folders):
    ours, loaded = _ours(folders["root"] / "llada", _tokens())
    assert loaded.folder.family.name == "llada" and loaded.folder.mask_id == VOCAB - 1
    assert loaded.model_config.rope_base == 500000.0
    theirs = _theirs(folders["llama"], _tokens(), bidirectional=True)
    assert _rel(ours, theirs) <= TOLERANCE
    # Bidirectional indeed: the causal logits differ (except at the last position).
    assert _rel(ours[:, :-1], _theirs(folders["llama"], _tokens())[:, :-1]) > 1e-2


def test_dream_logits_are_shifted_bidirectional_qwen2(folders):
    ours, loaded = _ours(folders["root"] / "dream", _tokens())
    assert loaded.model_config.shift_logits and loaded.folder.mask_id == VOCAB - 1
    theirs = _theirs(folders["dream"], _tokens(), bidirectional=True)
    # Position i reads the prediction made at i - 1 (Dream's own generate shifts the same).
    assert _rel(ours[:, 1:], theirs[:, :-1]) <= TOLERANCE
    np.testing.assert_allclose(ours[:, 0], theirs[:, 0], rtol=0, atol=1e-5 * np.abs(theirs).max())


def test_sharded_index_and_bfloat16_files(folders, tmp_path):
    source = folders["root"] / "llama"
    single, _ = _ours(source, _tokens())
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(source / "config.json", sharded)
    state = load_file(str(source / "model.safetensors"))
    names = sorted(state)
    weight_map = {}
    for index, part in enumerate((names[::2], names[1::2])):
        file = f"model-{index + 1:05d}-of-00002.safetensors"
        save_file({n: state[n] for n in part}, str(sharded / file))
        weight_map.update(dict.fromkeys(part, file))
    (sharded / pretrained.INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    ours, _ = _ours(sharded, _tokens())
    np.testing.assert_array_equal(ours, single)

    bf16 = tmp_path / "bf16"
    folders["llama"].to(torch.bfloat16).save_pretrained(bf16)
    folders["llama"].to(torch.float32)
    loaded = load_pretrained(bf16, param_dtype="bfloat16")
    kernel = loaded.params["blocks_1"]["mlp"]["down"]["kernel"]
    assert kernel.dtype == jnp.bfloat16
    expected = state["model.layers.1.mlp.down_proj.weight"].T.astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(kernel, np.float32), expected.astype(np.float32))


# --- sampling on imported models ---------------------------------------------------------


def _reference_greedy(model, prompt, new_tokens):
    """Greedy decoding by full forwards of transformers' model, the last id (which dlm keeps
    as the never-produced id of a causal LM) excluded."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1].clone()
            logits[VOCAB - 1] = -float("inf")
            ids.append(int(logits.argmax()))
    return ids


def _draw(folder, name, prompt, length, **options):
    from dlm import runs, sampling

    run = runs.load_run(folder)
    sampler = runs.make_sampler(name, overrides=options)
    drawn = sampling.draw(sampler, run.network, run.params, jax.random.PRNGKey(0),
                          batch_size=1, length=length, prompt=np.asarray(prompt, np.int32))
    return np.asarray(drawn.output.tokens_BL[0]).tolist(), int(drawn.output.nfe_B[0]), run


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_ar_sampler_on_an_imported_causal_lm_is_its_greedy_decode(folders, family):
    prompt = [1, 17, 5, 33]
    tokens, nfe, run = _draw(folders["root"] / family, "ar", prompt, LENGTH, temperature=0.0)
    assert run.step == 0 and run.tokenizer.eos_id == 2
    assert tokens == _reference_greedy(folders[family], prompt, LENGTH - len(prompt))


def _reference_llada(model, prompt, gen_length, block_length, steps, mask_id):
    """LLaDA's low-confidence remasking (its `generate`, temperature 0) by full
    bidirectional forwards of transformers' model. One departure, which dlm makes too: the
    mask token is excluded from the prediction and from the confidence's softmax."""
    x = torch.tensor([list(prompt) + [mask_id] * gen_length])
    blocks = gen_length // block_length
    per_block = steps // blocks
    attention = torch.zeros(1, 1, x.shape[1], x.shape[1])
    with torch.no_grad():
        for b in range(blocks):
            end = len(prompt) + (b + 1) * block_length
            masked = int((x[0, end - block_length:end] == mask_id).sum())
            counts = [masked // per_block + (i < masked % per_block) for i in range(per_block)]
            for count in counts:
                logits = model(x, attention_mask=attention).logits[0]
                logits[:, mask_id] = -float("inf")
                probs = torch.softmax(logits, -1)
                x0 = probs.argmax(-1)
                confidence = probs.gather(-1, x0[:, None])[:, 0]
                confidence[end:] = -float("inf")
                confidence[x[0] != mask_id] = -float("inf")
                chosen = torch.topk(confidence, count).indices
                x[0, chosen] = x0[chosen]
    return x[0].tolist()


def test_llada_sampler_on_an_imported_llada_is_llada_generate(folders):
    prompt, gen, block, steps = [1, 17, 5, 33], 8, 4, 8
    tokens, nfe, run = _draw(folders["root"] / "llada", "llada", prompt, len(prompt) + gen,
                             steps=steps, block_length=block)
    assert run.network.vocab.mask_id == VOCAB - 1 and nfe == steps
    expected = _reference_llada(folders["llama"], prompt, gen, block, steps, VOCAB - 1)
    assert tokens == expected


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_every_denoiser_sampler_runs_on_an_imported_diffusion_model(folders, family):
    """With its published defaults (and a few steps): every position decoded, none the mask."""
    from dlm import runs, sampling

    run = runs.load_run(folders["root"] / family)
    prompt = np.asarray([1, 17, 5, 33], np.int32)
    for name in ("mdlm", "ddpm_cache", "first_hitting", "llada", "dream", "fast_dllm"):
        options = {"steps": 4} if "steps" in sampling.options(name) else {}
        if name == "llada":
            options["block_length"] = 4
        out = sampling.draw(runs.make_sampler(name, overrides=options), run.network,
                            run.params, jax.random.PRNGKey(1), batch_size=2, length=LENGTH,
                            prompt=prompt).output
        tokens = np.asarray(out.tokens_BL)
        assert (tokens[:, :4] == prompt).all() and not (tokens == VOCAB - 1).any(), name
    with pytest.raises(ValueError, match="sampler 'ar' cannot sample"):
        sampling.draw(runs.make_sampler("ar"), run.network, run.params, jax.random.PRNGKey(0),
                      batch_size=1, length=LENGTH, prompt=prompt)


def test_tensor_parallel_equals_one_device(folders):
    """8 fake CPU devices as model=4 x data=2: the same logits and greedy samples."""
    from dlm import runs, sampling
    from dlm.parallel import MODEL_AXIS
    from dlm.runs import loading

    tokens = _tokens(batch=4)
    for family, sampler, options in (("llama", "ar", {"temperature": 0.0}),
                                     ("llada", "llada", {"steps": 8, "block_length": 4})):
        one = runs.load_run(folders["root"] / family)
        split = runs.load_run(folders["root"] / family, model_parallel=4)
        q = split.params["blocks_0"]["attn"]["q"]["kernel"]
        assert tuple(q.sharding.spec) == (None, MODEL_AXIS) and len(q.addressable_shards) == 8
        assert q.addressable_shards[0].data.shape == (32, 8)
        logits = [np.asarray(jax.jit(run.module.apply)({"params": run.params}, tokens))
                  for run in (one, split)]
        np.testing.assert_allclose(logits[1], logits[0], rtol=1e-5,
                                   atol=1e-5 * np.abs(logits[0]).max())
        drawn = []
        for run in (one, split):
            out = sampling.draw(runs.make_sampler(sampler, overrides=options), run.network,
                                run.params, jax.random.PRNGKey(0), batch_size=4,
                                length=LENGTH, prompt=np.asarray([1, 17, 5, 33], np.int32),
                                sharding=loading.batch_sharding(run, 4))
            drawn.append(np.asarray(out.output.tokens_BL))
        np.testing.assert_array_equal(drawn[1], drawn[0])
    with pytest.raises(ValueError, match="model_parallel=3 must be a positive int dividing"):
        runs.load_run(folders["root"] / "llama", model_parallel=3)


def test_chat_prompts_and_task_answers_from_a_pretrained_folder(folders, tmp_path):
    from dlm import runs
    from dlm.data import sft, tokenizers

    files = runs.read_run(folders["root"] / "llada")
    assert sft.chat_prompt(files.tokenizer, "w5 w7").tolist() == [1, 5, 7, 9]
    plain = tokenizers.CharTokenizer.from_text("ab")
    with pytest.raises(ValueError, match="--chat needs a chat template"):
        sft.chat_prompt(plain, "a")

    out = tmp_path / "samples.jsonl"
    runs.sample_to_file(str(folders["root"] / "llama"), "ar", str(out), num_samples=2,
                        length=LENGTH, prompt="w5 w7", chat=True,
                        overrides={"temperature": 0.0})
    record = json.loads(out.read_text().splitlines()[0])
    assert record["prompt_tokens"] == [1, 5, 7, 9]

    summary = runs.evaluate_task(str(folders["root"] / "llada"), "llada", task="addition",
                                 num_examples=3, batch_size=3, length=LENGTH,
                                 max_new_tokens=4, steps=4, chat=True,
                                 overrides={"block_length": 4})
    assert summary["task"] == "addition" and summary["num_examples"] == 3
    assert summary["mean_nfe"] == 4
    with pytest.raises(ValueError, match="pretrained folder, which has no task data: name one "
                                         "of the generated tasks with --task"):
        runs.evaluate_task(str(folders["root"] / "llada"), "llada", num_examples=3)
    with pytest.raises(ValueError, match="--task must name a generated task"):
        runs.evaluate_task(str(folders["root"] / "llada"), "llada", task="gsm8k",
                           num_examples=3)


def test_pretrained_tokenizer_reads_the_folder_and_round_trips(folders, tmp_path):
    from dlm.data import sft
    from dlm.data.tokenizers import load_tokenizer
    from dlm.runs import read_run

    files = read_run(folders["root"] / "qwen2")  # config.json names no special ids
    tokenizer = files.tokenizer
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 2)
    assert tokenizer.mask_id == VOCAB - 1 and tokenizer.chat_template == CHAT_TEMPLATE
    ids = tokenizer.encode("w5 <s> w7")
    assert ids.tolist() == [5, 1, 7]
    assert tokenizer.decode([5, 7]) == "w5 w7" and tokenizer.decode([5, 2]) == "w5</s>"
    assert tokenizer.sep_id is None  # prompts are BOS prompt, the response right after
    assert sft.encode_prompt(ids, sft.Specials.of(tokenizer)).tolist() == [1, 5, 1, 7]
    assert tokenizer.decode([VOCAB - 1]) == "[MASK]"
    tokenizer.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.encode("w9 w3").tolist() == [9, 3] and again.mask_id == tokenizer.mask_id
    llada = read_run(folders["root"] / "llada")
    assert llada.config.process.mask_id == VOCAB - 1 and llada.process.mask_id == VOCAB - 1
    assert str(llada.config.model.mask) == "full"


# --- RoPE --------------------------------------------------------------------------------


def test_rope_frequencies_follow_their_closed_forms():
    D, base, s, L0 = 16, 500000.0, 4.0, 32
    exponent = np.arange(D // 2) / (D // 2)
    plain = base ** -exponent

    def freq(scaling, positions, factor=s):
        return np.asarray(Rope(base, scaling, factor, L0).inv_freq(D, jnp.asarray(positions)))

    np.testing.assert_allclose(freq("linear", np.arange(8)), plain / s, rtol=1e-6)
    np.testing.assert_allclose(freq("ntk", np.arange(8)),
                               (base * s ** (D / (D - 2))) ** -exponent, rtol=1e-5)
    np.testing.assert_allclose(freq("dynamic", np.arange(L0)), plain, rtol=1e-6)  # L <= L0
    L = 100
    grown = base * (s * L / L0 - (s - 1)) ** (D / (D - 2))
    np.testing.assert_allclose(freq("dynamic", np.arange(L)), grown ** -exponent, rtol=1e-5)
    # Factor 1 is the unscaled rotation exactly (dynamic up to L0 positions).
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 40, 2, D)), jnp.float32)
    plain_rope = apply_rope(x, jnp.arange(40), Rope(base))
    for scaling in ("linear", "ntk"):
        np.testing.assert_array_equal(apply_rope(x, jnp.arange(40), Rope(base, scaling, 1.0)),
                                      plain_rope)
    np.testing.assert_array_equal(
        apply_rope(x[:, :L0], jnp.arange(L0), Rope(base, "dynamic", 1.0, L0)), plain_rope[:, :L0])


@pytest.mark.parametrize("kind", ["linear", "dynamic"])
def test_rope_scaling_matches_transformers(tmp_path, kind):
    # A context of 8 trained positions, run on 12: dynamic NTK has grown its base.
    config = transformers.LlamaConfig(**{**_common(), "max_position_embeddings": 8},
                                      rope_scaling={"rope_type": kind, "factor": 3.0})
    model = _save(transformers.LlamaForCausalLM(config), tmp_path / kind)
    ours, loaded = _ours(tmp_path / kind, _tokens())
    assert (loaded.model_config.rope_scaling, loaded.model_config.rope_factor) == (kind, 3.0)
    assert _rel(ours, _theirs(model, _tokens())) <= TOLERANCE


# --- the network options ----------------------------------------------------------------


def test_shifted_logits_read_the_previous_position():
    config = model_config("micro", "transformer")
    config.update(hidden=16, layers=1, heads=2, kv_heads=2, dropout=0.0, mask="full")
    plain = build_model(config, VOCAB)
    tokens = jnp.asarray(_tokens())
    params = plain.init(jax.random.key(0), tokens)["params"]
    config.shift_logits = True
    shifted = build_model(config, VOCAB).apply({"params": params}, tokens)
    logits = plain.apply({"params": params}, tokens)
    np.testing.assert_array_equal(shifted[:, 1:], logits[:, :-1])
    np.testing.assert_array_equal(shifted[:, 0], logits[:, 0])


def test_tied_head_is_the_embedding_transposed():
    config = model_config("micro", "transformer")
    config.update(hidden=16, layers=1, heads=2, kv_heads=2, dropout=0.0,
                  tie_embeddings=True, norm="rmsnorm", mlp="swiglu", mlp_hidden=24)
    module = build_model(config, VOCAB)
    tokens = jnp.asarray(_tokens())
    params = module.init(jax.random.key(0), tokens)["params"]
    assert set(params["blocks_0"]["mlp"]) == {"gate", "up", "down"}
    untied_config = config.copy_and_resolve_references()
    untied_config.tie_embeddings = False
    untied = build_model(untied_config, VOCAB)
    untied_params = {**params, "head": {"kernel": params["embed"]["embedding"].T}}
    np.testing.assert_allclose(module.apply({"params": params}, tokens),
                               untied.apply({"params": untied_params}, tokens),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("key,value,match", [
    ("norm", "batchnorm", "model.norm"),
    ("mlp", "relu", "model.mlp"),
    ("rope_scaling", "yarn", "model.rope_scaling"),
    ("rope_base", -1.0, "model.rope_base"),
    ("mlp_hidden", -3, "model.mlp_hidden"),
    ("head_dim", 7, "model.head_dim"),
])
def test_bad_network_options_are_named(key, value, match):
    config = model_config("micro", "transformer")
    config[key] = value
    with pytest.raises(ValueError, match=match):
        build_model(config, VOCAB)


def test_dit_refuses_transformer_only_options():
    config = model_config("micro", "dit")
    config.shift_logits = True
    with pytest.raises(ValueError, match="model.shift_logits"):
        build_model(config, VOCAB)


def test_the_export_layout_knows_the_defaults_of_the_network_options():
    from dlm.export import layout
    from dlm.models.registry import ARCH_KEYS

    config = model_config("micro", "transformer")
    assert set(layout.ARCH_DEFAULTS) == set(ARCH_KEYS)
    assert {k: config[k] for k in ARCH_KEYS} == layout.ARCH_DEFAULTS
    assert layout.unusual_options(model_section(config, VOCAB)) == {}


@pytest.mark.parametrize("family", ["llada", "dream", "qwen2"])
def test_an_imported_model_round_trips_through_the_export(folders, tmp_path, family):
    from dlm.export import export_workdir, load_export

    summary = export_workdir(str(folders["root"] / family), tmp_path / family)
    assert summary["format"] == "safetensors" and summary["step"] == 0
    exported = load_export(tmp_path / family)
    imported = load_pretrained(folders["root"] / family)
    jax.tree.map(np.testing.assert_array_equal, exported.params, imported.params)
    tokens = jnp.asarray(_tokens())
    np.testing.assert_array_equal(exported.module.apply({"params": exported.params}, tokens),
                                  imported.module.apply({"params": imported.params}, tokens))
    assert exported.process.mask_id == VOCAB - 1
    assert exported.tokenizer.encode("w5 w7").tolist() == [5, 7]
    with pytest.raises(ValueError, match="--format=torch describes dlm's own networks"):
        export_workdir(str(folders["root"] / family), tmp_path / "torch", fmt="torch")


# --- bad folders -------------------------------------------------------------------------


def _copy(folders, family, tmp_path):
    target = tmp_path / family
    shutil.copytree(folders["root"] / family, target)
    return target


def _edit_tensors(folder, edit):
    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"))


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_bad_folders_name_the_problem(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_pretrained(tmp_path)

    folder = _copy(folders, "llama", tmp_path)
    _edit_config(folder, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        load_pretrained(folder)
    _edit_config(folder, architectures=["LlamaForCausalLM"],
                 rope_scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ValueError, match="rope type 'llama3' is not supported"):
        load_pretrained(folder)
    _edit_config(folder, rope_scaling=None)

    _edit_tensors(folder, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight is "
                                         "missing"):
        load_pretrained(folder)
    shutil.copy(folders["root"] / "llama" / "model.safetensors", folder)
    _edit_tensors(folder, lambda s: s.update(
        {"model.layers.2.mlp.up_proj.weight": np.zeros((40, 32), np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected tensor model\.layers\.2\.mlp\.up_proj"):
        load_pretrained(folder)
    shutil.copy(folders["root"] / "llama" / "model.safetensors", folder)
    _edit_tensors(folder, lambda s: s.update(
        {"model.layers.0.self_attn.k_proj.weight": np.zeros((32, 32), np.float32)}))
    with pytest.raises(ValueError, match=r"k_proj\.weight has shape \(32, 32\), expected "
                                         r"\(16, 32\)"):
        load_pretrained(folder)

    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin are pickles, which are "
                                                "never read"):
        load_pretrained(folder)

    llada = _copy(folders, "llada", tmp_path)
    _edit_config(llada, mask_token_id=VOCAB)
    with pytest.raises(ValueError, match="mask_token_id=61 must be a token id below"):
        load_pretrained(llada)
    _edit_config(llada, mask_token_id=VOCAB - 1, include_qkv_bias=True)
    with pytest.raises(ValueError, match="include_qkv_bias=true is not supported"):
        load_pretrained(llada)
    with pytest.raises(ValueError, match="param_dtype='float16'"):
        load_pretrained(folders["root"] / "llama", param_dtype="float16")

    from dlm.runs import read_run

    (llada / "tokenizer.json").unlink()
    (llada / "tokenizer.model").write_bytes(b"")
    _edit_config(llada, include_qkv_bias=False)
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json not found.*tokenizer\.model "
                                                "found"):
        read_run(llada)
