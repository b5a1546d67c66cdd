"""dlm.export: safetensors round trip, PyTorch reference and Hugging Face parity, MDLM import,
experiments.export, and clear errors on bad input."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import save_run, small_config

from configs import ar as ar_config
from configs import bd3lm as bd3lm_config
from configs import mdlm as mdlm_config
from dlm import runs
from dlm.data.tokenizers import CharTokenizer, GPT2Tokenizer
from dlm.export import convert, exporter, hf, layout, torch_reference
from dlm.models import build_model

TEXT = "abcdefgh \n"
REL_TOL = 1e-5  # max |exported - dlm| / max |dlm| in float32


def _tiny(config_module, **overrides):
    """A run config of a dim-32, 2-layer network over TEXT's characters; its tokenizer."""
    config = small_config("/nonexistent", config_module, **overrides)
    config.data.seq_len = 16
    tokenizer = CharTokenizer.from_text(TEXT)
    config.model.vocab_size = tokenizer.vocab_size
    return config, tokenizer


def _random_params(module, seed):
    """Parameters at trained-like scales (the init's zero adaLN / head would make every DiT
    logit 0): kernels N(0, 1/fan_in), norm scales 1 + N(0, 0.1^2), biases N(0, 0.02^2).
    Drawn with numpy over `eval_shape`'s tree: eager JAX would compile every shape."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32),
                            jnp.zeros((1,)))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if path[-1].key == "scale":
            return 1 + 0.1 * noise
        return noise / np.float32(np.sqrt(leaf.shape[0])) if leaf.ndim == 2 else 0.02 * noise

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _logits(module, params, tokens_BL, t_B=None, **options):
    """dlm's logits (jitted: a tiny model compiles faster than it runs op by op)."""
    apply = jax.jit(lambda p, x, t: module.apply({"params": p}, x, t, **options))
    return apply(params, jnp.asarray(tokens_BL), None if t_B is None else jnp.asarray(t_B))


def _export(tmp_path, config_module, seed=1, **overrides):
    """(folder, module, params, export config) of a random tiny network exported to a folder."""
    config, tokenizer = _tiny(config_module, **overrides)
    module = build_model(config.model, tokenizer.vocab_size)
    params = _random_params(module, seed)
    export = convert.export_config(config, tokenizer.vocab_size, tokenizer)
    out = convert.export_params(tmp_path / "export", params, export, tokenizer)
    return out, module, params, export


def _assert_close(theirs, ours):
    errors = exporter.logit_errors(theirs, ours)
    assert errors["max_rel_error"] < REL_TOL, errors
    return errors


def _torch_logits(model, tokens_BL, t_B=None, **kwargs):
    with torch.no_grad():
        t = None if t_B is None else torch.from_numpy(np.asarray(t_B))
        return model(torch.from_numpy(np.asarray(tokens_BL)).long(), t, **kwargs).numpy()


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_torch_reference_reproduces_the_dit(tmp_path, time_conditioning):
    out, module, params, export = _export(tmp_path, mdlm_config,
                                          **{"model.time_conditioning": time_conditioning})
    tokens_BL, t_B = exporter.parity_inputs(export)
    ours = _logits(module, params, tokens_BL, t_B)
    model = torch_reference.load(out)
    assert isinstance(model, torch_reference.DiT)
    _assert_close(_torch_logits(model, tokens_BL, t_B), ours)
    if time_conditioning:  # t matters, so the check above saw the time path
        other = _logits(module, params, tokens_BL, 1 - t_B)
        assert float(jnp.max(jnp.abs(other - ours))) > 1e-3


def test_torch_reference_reproduces_block_masks(tmp_path):
    """A BD3-LM DiT: config.json carries the block size; the reference runs its masks."""
    out, module, params, export = _export(tmp_path, bd3lm_config, block_size=4)
    assert export["process"] == {**export["process"], "name": "bd3lm", "block_size": 4,
                                 "sampling_mask": "block_causal:4"}
    model = torch_reference.load(out)
    tokens_BL, _ = exporter.parity_inputs(export)
    L = tokens_BL.shape[1]
    ours = _logits(module, params, tokens_BL, mask="block_causal:4")
    _assert_close(_torch_logits(model, tokens_BL, mask="block_causal:4"), ours)
    # Training's two streams: x_t ⊕ x_0 under bd3lm:4, positions of x_t twice.
    both_BL = np.concatenate([tokens_BL, tokens_BL[:, ::-1]], axis=1)
    positions_BL = np.concatenate([np.arange(L), np.arange(L)])[None]
    ours = _logits(module, params, both_BL, mask="bd3lm:4",
                        positions_BL=jnp.asarray(positions_BL))
    theirs = _torch_logits(model, both_BL, mask="bd3lm:4",
                           positions_BL=torch.from_numpy(positions_BL))
    _assert_close(theirs, ours)


@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2)])  # (4, 2): grouped-query heads
def test_torch_reference_reproduces_the_causal_transformer(tmp_path, heads, kv_heads):
    out, module, params, export = _export(tmp_path, ar_config, **{"model.heads": heads,
                                                                  "model.kv_heads": kv_heads})
    tokens_BL, _ = exporter.parity_inputs(export)
    model = torch_reference.load(out)
    assert isinstance(model, torch_reference.CausalTransformer)
    _assert_close(_torch_logits(model, tokens_BL), _logits(module, params, tokens_BL))


@pytest.mark.parametrize("config_module", [mdlm_config, ar_config])
def test_safetensors_round_trip_gives_identical_logits(tmp_path, config_module):
    out, module, params, export = _export(tmp_path, config_module)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["config.json", "model.safetensors", "tokenizer/dlm_tokenizer.json"]
    loaded = convert.load_export(out)
    tokens_BL, t_B = exporter.parity_inputs(export)
    ours = _logits(module, params, tokens_BL, t_B)
    again = _logits(loaded.module, loaded.params, tokens_BL, t_B)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(ours))
    assert loaded.tokenizer.encode(TEXT).tolist() == _tiny(config_module)[1].encode(TEXT).tolist()
    assert loaded.config.process.name == config_module.get_config("micro").process.name
    assert loaded.network() is not None  # ready for the samplers


def test_hugging_face_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Starcoder2ForCausalLM

    out, module, params, export = _export(tmp_path, ar_config, **{"model.heads": 4,
                                                                  "model.kv_heads": 2})
    _, tokenizer = _tiny(ar_config)
    hf_dir = hf.save_hf(tmp_path / "hf", export, convert.to_tensors(params, export["model"]),
                        tokenizer)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    assert isinstance(model, Starcoder2ForCausalLM)
    tokens_BL, _ = exporter.parity_inputs(export)
    ours = _logits(module, params, tokens_BL)
    with torch.no_grad():
        theirs = model(torch.from_numpy(tokens_BL).long()).logits.numpy()
    _assert_close(theirs, ours)
    # Back into dlm from the Hugging Face folder: the same parameters, so identical logits.
    loaded = convert.load_export(hf_dir)
    again = _logits(loaded.module, loaded.params, tokens_BL)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(ours))
    # The char tokenizer as a WordLevel tokenizer with dlm's ids, unknown characters included.
    fast = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    text = "ab c\nhz"
    assert fast(text)["input_ids"] == tokenizer.encode(text).tolist()
    assert fast.mask_token_id == tokenizer.mask_id and fast.pad_token_id == tokenizer.pad_id
    assert fast.decode(fast(text)["input_ids"]) == "ab c\nh<unk>"


def test_gpt2_tokenizer_saved_for_hugging_face(shared_data, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = GPT2Tokenizer(shared_data / "tokenizers" / "gpt2")
    hf.hf_tokenizer(tokenizer).save_pretrained(tmp_path)
    fast = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = "Hello world, the quick brown fox. Ünïcode ✓\n"
    assert fast(text)["input_ids"] == tokenizer.encode(text).tolist()
    assert (fast.eos_token_id, fast.pad_token_id, fast.mask_token_id) == (50256, 50257, 50258)
    assert len(fast) == tokenizer.vocab_size


def _mdlm_state_dict(params, heads, *, prefix="backbone."):
    """dlm DiT parameters written in the public MDLM DIT's layout (names, [out, in] weights,
    fused qkv, zero MLP / output biases, the rotary inv_freq buffer)."""
    p = jax.tree.map(np.asarray, params)
    D = p["embed"]["embedding"].shape[1]
    half = D // heads // 2
    state = {
        "vocab_embed.embedding": p["embed"]["embedding"],
        "rotary_emb.inv_freq": 1.0 / 10000.0 ** (np.arange(0, 2 * half, 2) / (2 * half)),
        "output_layer.norm_final.weight": p["final"]["norm"]["scale"],
        "output_layer.linear.weight": p["final"]["out"]["kernel"].T,
        "output_layer.linear.bias": np.zeros(p["final"]["out"]["kernel"].shape[1]),
        "output_layer.adaLN_modulation.weight": p["final"]["adaln"]["Dense_0"]["kernel"].T,
        "output_layer.adaLN_modulation.bias": p["final"]["adaln"]["Dense_0"]["bias"],
    }
    for i, layer in ((0, "fc1"), (2, "fc2")):
        state[f"sigma_map.mlp.{i}.weight"] = p["time_embed"][layer]["kernel"].T
        state[f"sigma_map.mlp.{i}.bias"] = p["time_embed"][layer]["bias"]
    for n in range(len([k for k in p if k.startswith("blocks_")])):
        b = p[f"blocks_{n}"]
        qkv = np.concatenate([b["attn"][x]["kernel"].T for x in "qkv"], axis=0)
        state.update({
            f"blocks.{n}.norm1.weight": b["norm1"]["scale"],
            f"blocks.{n}.attn_qkv.weight": qkv,
            f"blocks.{n}.attn_out.weight": b["attn"]["out"]["kernel"].T,
            f"blocks.{n}.norm2.weight": b["norm2"]["scale"],
            f"blocks.{n}.mlp.0.weight": b["mlp"]["fc1"]["kernel"].T,
            f"blocks.{n}.mlp.0.bias": np.zeros(b["mlp"]["fc1"]["kernel"].shape[1]),
            f"blocks.{n}.mlp.2.weight": b["mlp"]["fc2"]["kernel"].T,
            f"blocks.{n}.mlp.2.bias": np.zeros(D),
            f"blocks.{n}.adaLN_modulation.weight": b["adaln"]["Dense_0"]["kernel"].T,
            f"blocks.{n}.adaLN_modulation.bias": b["adaln"]["Dense_0"]["bias"],
        })
    return {prefix + name: np.asarray(value, np.float32) for name, value in state.items()}


def test_mdlm_layout_imports_exactly(tmp_path):
    config, tokenizer = _tiny(mdlm_config)
    module = build_model(config.model, tokenizer.vocab_size)
    params = _random_params(module, seed=3)
    state = _mdlm_state_dict(params, heads=config.model.heads)
    file = tmp_path / "mdlm.safetensors"
    layout.write_safetensors(file, state)
    out = exporter.import_mdlm(file, tmp_path / "imported")
    loaded = convert.load_export(out)
    assert loaded.export["model"]["heads"] == config.model.heads  # read from inv_freq
    tokens_BL, t_B = exporter.parity_inputs(loaded.export)
    ours = _logits(module, params, tokens_BL[:, :16], t_B)
    again = _logits(loaded.module, loaded.params, tokens_BL[:, :16], t_B)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(ours))

    def fails(state, match, **kwargs):
        with pytest.raises(ValueError, match=match):
            exporter.import_mdlm(state, tmp_path / "bad", **kwargs)

    # Non-zero biases turn on the biased layers: the output bias adds to every logit, an MLP
    # bias changes them (and the plain layers stay exact when the biases are zero, above).
    head = np.linspace(-1, 1, tokenizer.vocab_size).astype(np.float32)
    with_head = exporter.import_mdlm(dict(state, **{"backbone.output_layer.linear.bias": head}),
                                     tmp_path / "head")
    shifted = convert.load_export(with_head)
    assert shifted.export["model"]["head_bias"] and not shifted.export["model"]["mlp_bias"]
    biased_logits = _logits(shifted.module, shifted.params, tokens_BL[:, :16], t_B)
    np.testing.assert_allclose(np.asarray(biased_logits) - np.asarray(ours),
                               np.broadcast_to(head, biased_logits.shape), rtol=0, atol=1e-5)
    mlp_bias = dict(state, **{"backbone.blocks.1.mlp.0.bias": np.full(128, 0.1, np.float32)})
    with_mlp = convert.load_export(exporter.import_mdlm(mlp_bias, tmp_path / "mlp"))
    assert with_mlp.export["model"]["mlp_bias"]
    np.testing.assert_array_equal(with_mlp.params["blocks_1"]["mlp"]["fc1"]["bias"],
                                  np.float32(0.1))
    np.testing.assert_array_equal(with_mlp.params["blocks_0"]["mlp"]["fc2"]["bias"], 0.0)
    assert not np.allclose(_logits(with_mlp.module, with_mlp.params, tokens_BL[:, :16], t_B),
                           ours)
    fails(dict(state, **{"backbone.blocks.0.attn_qkv.bias": np.zeros(96, np.float32)}),
          r"no dlm counterpart: \['blocks\.0\.attn_qkv\.bias'\]")
    no_freq = {k: v for k, v in state.items() if "inv_freq" not in k}
    fails(no_freq, r"rotary_emb\.inv_freq.*pass heads=")
    fails(state, r"heads=4 but .* says 2 heads", heads=4)
    missing = {k: v for k, v in state.items() if "blocks.1.norm2" not in k}
    fails(missing, r"missing blocks\.1\.norm2\.weight")
    with pytest.raises(ValueError, match="sigma"):
        from dlm.export import mdlm

        mdlm.from_state_dict(state, time_conditioning=True)


def test_biased_mlp_is_the_closed_form():
    from dlm.models.layers import MLP

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    mlp = MLP(8, 12, bias=True)
    params = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32),
                          mlp.init(jax.random.key(0), x)["params"])
    h = x @ params["fc1"]["kernel"] + params["fc1"]["bias"]
    gelu = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
    expected = gelu @ params["fc2"]["kernel"] + params["fc2"]["bias"]
    np.testing.assert_allclose(mlp.apply({"params": params}, x), expected, rtol=1e-5, atol=1e-5)


def test_bd3lm_hugging_face_folder_imports_with_its_block_size(shared_data, tmp_path):
    """A folder in the public BD3-LM checkpoints' layout (BD3LMConfig keys, `backbone.`
    names, the clipped-rate buffers) imports as a bd3lm export with the same logits."""
    config, tokenizer = _tiny(bd3lm_config)
    module = build_model(config.model, tokenizer.vocab_size)
    params = _random_params(module, seed=5)
    state = _mdlm_state_dict(params, heads=config.model.heads)
    state.update(sampling_eps_min=np.array(0.3, np.float32),
                 sampling_eps_max=np.array(0.8, np.float32))
    folder = tmp_path / "bd3lm-owt-block_size4"
    folder.mkdir()
    layout.write_safetensors(folder / "model.safetensors", state)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["BD3LM"], "model_type": "bd3lm", "block_size": 4,
        "vocab_size": tokenizer.vocab_size, "model_length": 16, "cross_attn": True,
        "adaln": True, "causal": False, "hidden_dim": config.model.hidden,
        "cond_dim": config.model.cond_dim, "n_blocks": config.model.layers,
        "n_heads": config.model.heads, "time_conditioning": False, "var_min": True}))
    out = exporter.import_mdlm(folder, tmp_path / "imported")
    loaded = convert.load_export(out)
    assert loaded.process.block_size == 4
    np.testing.assert_allclose(loaded.process.clip, (0.3, 0.8), rtol=1e-6)
    assert loaded.config.data.seq_len == 16
    tokens_BL, t_B = exporter.parity_inputs(loaded.export)
    mask = "block_causal:4"
    np.testing.assert_array_equal(
        np.asarray(_logits(loaded.module, loaded.params, tokens_BL, t_B, mask=mask)),
        np.asarray(_logits(module, params, tokens_BL, t_B, mask=mask)))
    (folder / "config.json").write_text(json.dumps({"architectures": ["BD3LM"],
                                                    "time_conditioning": True}))
    with pytest.raises(ValueError, match="time_conditioning=True does not map"):
        exporter.import_mdlm(folder, tmp_path / "bad")


def test_public_mdlm_folder_gets_gpt2_as_its_checkpoint_used_it(shared_data, tmp_path):
    config, _ = _tiny(mdlm_config)
    gpt2_vocab = 50258  # GPT-2's 50257 tokens and the mask
    config.model.update(hidden=16, heads=2, kv_heads=2, layers=1, cond_dim=16)
    module = build_model(config.model, gpt2_vocab)
    params = _random_params(module, seed=2)
    folder = tmp_path / "mdlm-owt"
    folder.mkdir()
    layout.write_safetensors(folder / "model.safetensors", _mdlm_state_dict(params, heads=2))
    (folder / "config.json").write_text(json.dumps(
        {"architectures": ["MDLM"], "n_heads": 2, "model_length": 32}))
    out = exporter.import_mdlm(folder, tmp_path / "imported",
                               gpt2_dir=shared_data / "tokenizers" / "gpt2")
    loaded = convert.load_export(out)
    assert type(loaded.process).__name__ == "MaskedDiffusion"
    tokenizer = loaded.tokenizer
    assert (tokenizer.vocab_size, tokenizer.mask_id, tokenizer.eos_id) == (50258, 50257, 50256)
    assert tokenizer.decode(tokenizer.encode("Hello world")) == "Hello world"
    assert loaded.network().vocab.mask_id == 50257


def test_bad_input_is_reported_clearly(tmp_path):
    out, *_ = _export(tmp_path, ar_config)
    config_file, weights = out / "config.json", out / "model.safetensors"
    good_config, good_weights = config_file.read_text(), weights.read_bytes()

    def edit(**model):
        export = json.loads(good_config)
        export["model"].update(model)
        config_file.write_text(json.dumps(export))

    # A config that does not match the parameters: named tensors and shapes, both loaders.
    edit(layers=3)
    for load in (convert.load_export, torch_reference.load):
        with pytest.raises(ValueError, match=r"missing .*blocks\.2\.norm1\.weight"):
            load(out)
    edit(hidden=64, heads=2, kv_heads=2)
    with pytest.raises(ValueError, match=r"embed\.weight: \(15, 32\) in the file, \(15, 64\)"):
        convert.load_export(out)
    edit(architecture="dit")
    with pytest.raises(ValueError, match=r"missing time_embed\.fc1\.weight.*unexpected head"):
        convert.load_export(out)
    edit(heads=3, kv_heads=3, head_dim=0)  # 0: hidden / heads, which must then divide
    with pytest.raises(ValueError, match=r"model\.hidden \(32\) .* model\.heads \(3\)"):
        convert.load_export(out)
    edit(head_dim=5)
    with pytest.raises(ValueError, match=r"model\.head_dim \(5\) must be even"):
        convert.load_export(out)
    config_file.write_text(good_config[:40])
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        convert.load_export(out)
    with pytest.raises(ValueError, match=r"config\.json is not a dlm export config"):
        torch_reference.load(out)
    config_file.write_text(good_config)

    # A truncated weights file.
    weights.write_bytes(good_weights[: len(good_weights) // 2])
    for load in (convert.load_export, torch_reference.load):
        with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors"):
            load(out)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        convert.load_export(out)
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        convert.load_export(tmp_path / "nowhere")

    # A DiT has no Hugging Face form.
    _, module, params, dit_export = _export(tmp_path / "dit", mdlm_config)
    with pytest.raises(ValueError, match=r"--format=hf exports causal transformers"):
        hf.save_hf(tmp_path / "hf", dit_export, convert.to_tensors(params, dit_export["model"]))
    with pytest.raises(ValueError, match=r"unknown export format 'onnx'; allowed: "
                                         r"safetensors, torch, hf"):
        exporter.export_workdir(tmp_path / "nowhere", tmp_path / "o", "onnx")


def test_no_pickle_anywhere():
    """Only safetensors and JSON are read: no torch.load, pickle or numpy object arrays."""
    root = pathlib.Path(exporter.__file__).parent
    sources = [*root.glob("*.py"), root.parents[1] / "experiments" / "export.py"]
    for path in sources:
        text = path.read_text()
        for banned in ("torch.load(", "import pickle", "allow_pickle=True", "np.load("):
            assert banned not in text, f"{path.name} uses {banned}"


def test_torch_reference_needs_no_jax(tmp_path):
    out, module, params, export = _export(tmp_path, mdlm_config)
    convert.copy_torch_reference(out)
    tokens_BL, t_B = exporter.parity_inputs(export)
    np.save(tmp_path / "tokens.npy", tokens_BL)
    script = (
        "import sys; sys.modules['jax'] = None; sys.modules['flax'] = None\n"
        f"sys.path.insert(0, {str(out)!r})\n"
        "import numpy as np, torch, dlm_torch\n"
        "import dlm.export.torch_reference, dlm.export.hf, dlm.export.mdlm\n"
        f"model = dlm_torch.load({str(out)!r})\n"
        f"tokens = torch.from_numpy(np.load({str(tmp_path / 'tokens.npy')!r})).long()\n"
        "print(model(tokens).abs().max().item())\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = float(jnp.max(jnp.abs(_logits(module, params, tokens_BL))))
    assert abs(float(result.stdout.split()[-1]) - expected) < 1e-5 * expected


def _save_run(workdir, config_module, **overrides):
    """A workdir as training leaves it (config, tokenizer, a checkpoint at step 7), with random
    weights and a different EMA; returns (module, state)."""
    config, tokenizer = _tiny(config_module, **overrides)
    return save_run(workdir, config, tokenizer, step=7, replace=lambda module, state: state.replace(
        params=_random_params(module, 5), ema_params=_random_params(module, 6)))


def _cli(*argv):
    """experiments.export in a subprocess (its absl flags would clash with other entry points
    imported by the test session)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "experiments.export", *argv],
                          capture_output=True, text=True, check=False, timeout=300, env=env,
                          cwd=pathlib.Path(__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """(workdir, state) of a tiny AR run saved at step 7."""
    workdir = tmp_path_factory.mktemp("runs") / "ar"
    _, state = _save_run(workdir, ar_config)
    return workdir, state


def test_export_workdir(saved_run, tmp_path):
    run, state = saved_run
    summary = exporter.export_workdir(run, tmp_path / "torch", "torch")
    assert summary["step"] == 7 and summary["ema"] and summary["architecture"] == "transformer"
    assert summary["max_rel_error"] < REL_TOL, summary
    assert (tmp_path / "torch" / "dlm_torch.py").is_file()
    # The EMA weights by default (as evaluation), with the step they came from.
    loaded = convert.load_export(tmp_path / "torch")
    ema = np.asarray(state.ema_params["head"]["kernel"])
    np.testing.assert_array_equal(np.asarray(loaded.params["head"]["kernel"]), ema)
    assert loaded.export["source"]["step"] == 7 and loaded.export["source"]["ema"]
    with pytest.raises(FileNotFoundError, match=r"nowhere"):
        exporter.export_workdir(tmp_path / "nowhere", tmp_path / "x")
    # A workdir whose config says 3 layers where its checkpoint has 2.
    shutil.copytree(run, tmp_path / "run")
    config_file = tmp_path / "run" / runs.CONFIG_FILE
    config = json.loads(config_file.read_text())
    config["model"]["layers"] = 3
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"(?s)the checkpoint does not match its config\.json "
                                         r"\(architecture=transformer, hidden=32, layers=3.*"
                                         r"params\.blocks_2"):
        exporter.export_workdir(tmp_path / "run", tmp_path / "x")


def test_export_command_line(saved_run, tmp_path):
    run, state = saved_run
    result = _cli(f"--workdir={run}", f"--out={tmp_path / 'hf'}", "--format=hf",
                  "--nouse_ema")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["format"] == "hf" and not summary["ema"], summary
    assert summary["max_rel_error"] < REL_TOL, summary
    assert {"config.json", "model.safetensors", "tokenizer.json", "dlm_export.json"} <= {
        p.name for p in (tmp_path / "hf").iterdir()}
    loaded = convert.load_export(tmp_path / "hf")
    np.testing.assert_array_equal(np.asarray(loaded.params["head"]["kernel"]),
                                  np.asarray(state.params["head"]["kernel"]))
    bad = _cli(f"--workdir={run}", f"--out={tmp_path / 'x'}", "--format=onnx")
    assert bad.returncode != 0
    assert "unknown export format 'onnx'; allowed: safetensors, torch, hf" in bad.stderr
