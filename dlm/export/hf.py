"""The causal transformer as a Hugging Face `transformers` Starcoder2ForCausalLM.

Why Starcoder2: among the standard decoder-only classes it is the one whose layers are ours
one for one. Each layer is pre-norm and sequential (x + attn(ln1(x)), then + mlp(ln2(x))),
with separate q/k/v/o projections that `use_bias=False` makes bias-free, grouped-query heads
(`num_key_value_heads`), rotary embeddings on the whole head in the rotate-half convention
(base `rope_theta`), and a non-gated MLP c_fc -> GELU -> c_proj whose activation
'gelu_pytorch_tanh' is dlm's tanh GELU; the final norm and an untied, bias-free lm_head
(`tie_word_embeddings=False`) follow, and embeddings are not scaled. The one difference:
its LayerNorms (eps `norm_epsilon` = 1e-5, as dlm's) carry a bias, which is written as
zeros, so the function is exactly dlm's. (GPT-NeoX would also do, but with a fused, per-head
interleaved qkv and biases everywhere that would all be zeros.)

`save_hf` writes the model with `save_pretrained` (safetensors), the tokenizer as a
`PreTrainedTokenizerFast` when it can be expressed as one (GPT-2 BPE, trained BPE and, as a
WordLevel vocabulary over single characters, the char tokenizer), dlm's own tokenizer file
and `dlm_export.json` (the export's config.json), from which `read_hf` maps the weights
back. torch and transformers are imported only by the functions that need them.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from dlm.export import layout

HF_CLASS = "Starcoder2ForCausalLM"
EXPORT_FILE = "dlm_export.json"
HF_WEIGHTS_FILE = "model.safetensors"
# (dlm export name, Starcoder2 name) per layer; LayerNorm biases are added as zeros.
_LAYER_NAMES = (
    ("norm1.weight", "input_layernorm.weight"),
    ("attn.q.weight", "self_attn.q_proj.weight"),
    ("attn.k.weight", "self_attn.k_proj.weight"),
    ("attn.v.weight", "self_attn.v_proj.weight"),
    ("attn.out.weight", "self_attn.o_proj.weight"),
    ("norm2.weight", "post_attention_layernorm.weight"),
    ("mlp.fc1.weight", "mlp.c_fc.weight"),
    ("mlp.fc2.weight", "mlp.c_proj.weight"),
)
_ZERO_BIASES = ("input_layernorm.bias", "post_attention_layernorm.bias")


def check_causal(export: Mapping[str, Any]) -> None:
    """Raises ValueError unless the export is a causal transformer (what --format=hf takes)."""
    model = export["model"]
    if model["architecture"] != "transformer" or model.get("mask", "causal") != "causal":
        process = (export.get("process") or {}).get("name")
        raise ValueError(
            f"--format=hf exports causal transformers (process 'ar'); this run is a "
            f"{model['architecture']!r} with mask {model.get('mask')!r} (process {process!r}): "
            "use --format=torch or --format=safetensors")


def name_map(model: Mapping[str, Any]) -> dict[str, str]:
    """dlm export name -> Starcoder2 state-dict name, for every dlm tensor."""
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "head.weight": "lm_head.weight"}
    for i in range(model["layers"]):
        for ours, theirs in _LAYER_NAMES:
            names[f"blocks.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    return names


def _zero_bias_names(model: Mapping[str, Any]) -> list[str]:
    names = ["model.norm.bias"]
    for i in range(model["layers"]):
        names += [f"model.layers.{i}.{bias}" for bias in _ZERO_BIASES]
    return names


def hf_config(export: Mapping[str, Any]):
    """The `transformers.Starcoder2Config` of a causal export."""
    from transformers import Starcoder2Config

    check_causal(export)
    model, tok = export["model"], export.get("tokenizer") or {}
    return Starcoder2Config(
        vocab_size=model["vocab_size"],
        hidden_size=model["hidden"],
        intermediate_size=model["mlp_ratio"] * model["hidden"],
        num_hidden_layers=model["layers"],
        num_attention_heads=model["heads"],
        num_key_value_heads=model["kv_heads"],
        hidden_act="gelu_pytorch_tanh",
        max_position_embeddings=max(int(export.get("seq_len") or 0), model.get("max_len", 0)),
        norm_epsilon=model.get("norm_eps", layout.NORM_EPS),
        rope_parameters={"rope_type": "default",
                         "rope_theta": float(model.get("rope_base", layout.ROPE_BASE))},
        use_bias=False,
        tie_word_embeddings=False,
        sliding_window=None,
        attention_dropout=0.0,
        residual_dropout=0.0,
        embedding_dropout=0.0,
        bos_token_id=tok.get("bos_id"),
        eos_token_id=tok.get("eos_id"),
        pad_token_id=tok.get("pad_id"),
    )


def hf_tokenizer(tokenizer):
    """dlm's tokenizer as a `PreTrainedTokenizerFast` with the same ids, or None for a kind
    it cannot express. Raises ValueError if the ids would differ."""
    import tokenizers as hf_tokenizers
    from transformers import PreTrainedTokenizerFast

    from dlm.data import tokenizers as dlm_tokenizers

    specials = {"pad_token": dlm_tokenizers.PAD_TEXT, "mask_token": dlm_tokenizers.MASK_TEXT}
    if tokenizer.name in ("gpt2", "bpe"):
        # A copy of dlm's byte-level BPE, from the state it saves itself as.
        backend = hf_tokenizers.Tokenizer.from_str(json.dumps(tokenizer._state()["hf_tokenizer"]))
        missing = [text for text in (dlm_tokenizers.PAD_TEXT, dlm_tokenizers.MASK_TEXT)
                   if backend.token_to_id(text) is None]
        backend.add_special_tokens([hf_tokenizers.AddedToken(t, special=True) for t in missing])
        specials.update(bos_token=dlm_tokenizers.ENDOFTEXT, eos_token=dlm_tokenizers.ENDOFTEXT)
    elif tokenizer.name == "char":
        texts = list(tokenizer.chars) + [dlm_tokenizers.PAD_TEXT, "<bos>", "<eos>", "<unk>",
                                         dlm_tokenizers.MASK_TEXT]
        backend = hf_tokenizers.Tokenizer(hf_tokenizers.models.WordLevel(
            {text: i for i, text in enumerate(texts)}, unk_token="<unk>"))
        # Every character is its own word; decoding concatenates them.
        backend.pre_tokenizer = hf_tokenizers.pre_tokenizers.Split(
            hf_tokenizers.Regex(r"[\s\S]"), behavior="isolated")
        backend.decoder = hf_tokenizers.decoders.Fuse()
        backend.add_special_tokens([hf_tokenizers.AddedToken(t, special=True)
                                    for t in texts[len(tokenizer.chars):]])
        specials.update(bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    else:
        return None
    expected = {specials["pad_token"]: tokenizer.pad_id,
                specials["mask_token"]: tokenizer.mask_id,
                specials["eos_token"]: tokenizer.eos_id}
    got = {text: backend.token_to_id(text) for text in expected}
    if got != expected or backend.get_vocab_size(with_added_tokens=True) != tokenizer.vocab_size:
        raise ValueError(f"the Hugging Face tokenizer would not keep dlm's ids: {got} vs "
                         f"{expected}, {backend.get_vocab_size()} vs {tokenizer.vocab_size} ids")
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


def save_hf(out, export: Mapping[str, Any], tensors: Mapping[str, np.ndarray],
            tokenizer=None) -> pathlib.Path:
    """Writes a causal export as a Starcoder2ForCausalLM folder (`save_pretrained`) that
    `AutoModelForCausalLM.from_pretrained(out)` loads offline; returns `out`."""
    import torch
    from transformers import Starcoder2ForCausalLM

    check_causal(export)
    layout.check_tensors(tensors, export["model"], "the exported tensors")
    out = pathlib.Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config(export)
    state = {theirs: torch.from_numpy(np.array(tensors[ours], np.float32))
             for ours, theirs in name_map(export["model"]).items()}
    state.update({name: torch.zeros(export["model"]["hidden"])
                  for name in _zero_bias_names(export["model"])})
    model = Starcoder2ForCausalLM(config)
    model.load_state_dict(state, strict=True)
    model.eval().save_pretrained(out)
    (out / EXPORT_FILE).write_text(json.dumps(export, indent=2, sort_keys=True) + "\n",
                                   encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save(out / layout.TOKENIZER_DIR)
        fast = hf_tokenizer(tokenizer)
        if fast is not None:
            fast.save_pretrained(out)
    return out


def read_hf(directory) -> tuple[dict, dict[str, np.ndarray]]:
    """(export config, tensors under dlm's names) of a folder `save_hf` wrote; numpy only.

    Raises ValueError naming the tensor when a LayerNorm bias is not zero (dlm's norms have
    none) or the weights disagree with the config.
    """
    directory = pathlib.Path(directory).expanduser()
    path = directory / EXPORT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"not a dlm Hugging Face export: {path} does not exist")
    export = json.loads(path.read_text(encoding="utf-8"))
    layout.check_model(export.get("model") or {}, str(path))
    check_causal(export)
    weights = layout.read_safetensors(directory / HF_WEIGHTS_FILE)
    names = name_map(export["model"])
    expected = set(names.values()) | set(_zero_bias_names(export["model"]))
    unexpected = sorted(set(weights) - expected)
    if unexpected:
        raise ValueError(f"{directory / HF_WEIGHTS_FILE}: unexpected tensors {unexpected[:6]}")
    for name in _zero_bias_names(export["model"]):
        if name in weights and np.any(weights[name] != 0):
            raise ValueError(f"{directory / HF_WEIGHTS_FILE}: {name} is not zero, but dlm's "
                             "LayerNorm has no bias")
    tensors = {ours: weights[theirs] for ours, theirs in names.items() if theirs in weights}
    layout.check_tensors(tensors, export["model"], str(directory / HF_WEIGHTS_FILE))
    return export, tensors
