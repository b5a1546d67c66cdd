"""Pretrained Hugging Face folders (Llama, Qwen2, LLaDA, Dream) -> dlm's transformer.

A folder holds ``config.json`` and ``model.safetensors`` or a sharded
``model.safetensors.index.json``; nothing is unpickled and no remote code runs. Each family
is a `Family`: how its ``config.json`` maps to dlm's model keys (`dlm/models/backbone.py`),
which process decodes it, and the name of every tensor:

- ``llama`` (`LlamaForCausalLM`) and ``qwen2`` (`Qwen2ForCausalLM`, q/k/v biases): causal
  LMs, decoded by the `ar` process; RMSNorm, SwiGLU, grouped-query heads, RoPE.
- ``llada`` (`LLaDAModelLM`, OLMo-style names under ``model.transformer.``): the same
  stack with bidirectional attention, a masked-diffusion (`mdlm`) model whose mask token is
  the config's ``mask_token_id`` (126336).
- ``dream`` (`DreamModel`, Qwen2 names, mask token 151666): bidirectional, and its position
  i predicts token i + 1 (`model.shift_logits`).

dlm's Dense kernels are [in, out], so every linear weight is transposed. RoPE is the
rotate-half convention of these models, so q and k need no permutation. Tensors are read
one at a time (`tensors`, numpy; bfloat16 arrays come back as ml_dtypes' bfloat16) and put
straight onto their devices (`params`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers as hf_tokenizers
from safetensors import safe_open

from dlm.data.tokenizers import PretrainedTokenizer
from dlm.models import masks
from dlm.models import registry as model_registry

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

Path = tuple[str, ...]  # a Flax parameter path, e.g. ("blocks_0", "attn", "q", "kernel")


@dataclasses.dataclass(frozen=True)
class Family:
    """One pretrained layout: `architectures` (config.json's) it reads, the dlm `process`
    that decodes it ('ar' or 'mdlm'), `model` (config.json -> dlm model keys) and `names`
    (config.json, layer index -> {tensor name: (Flax path, transposed)} of one block, and
    the same for the global tensors with index None)."""

    name: str
    architectures: tuple[str, ...]
    process: str
    model: Callable[[Mapping[str, Any], str], dict]
    names: Callable[[Mapping[str, Any], int | None], dict[str, tuple[Path, bool]]]
    default_mask_id: int | None = None


def _get(hf: Mapping[str, Any], key: str, source: str, *, default=None, kind=int):
    value = hf.get(key, default)
    if value is None:
        raise ValueError(f"{source}: config.json has no {key!r}")
    if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{source}: config.json {key}={value!r} must be a positive int")
    if kind is float and (not isinstance(value, int | float) or value <= 0):
        raise ValueError(f"{source}: config.json {key}={value!r} must be a positive number")
    return value


def _rope(hf: Mapping[str, Any], source: str) -> dict:
    """dlm's rope keys from `rope_theta` / `rope_scaling` (transformers 4) or
    `rope_parameters` (transformers 5)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    base = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type")) or params.get("rope_type", "default")
    factor = scaling.get("factor", params.get("factor", 1.0))
    rope = {"rope_base": float(base), "rope_scaling": "none", "rope_factor": 1.0,
            "rope_original_len": 0}
    if kind == "default":
        return rope
    if kind not in ("linear", "dynamic"):
        raise ValueError(f"{source}: config.json rope type {kind!r} is not supported; "
                         "supported: default, linear, dynamic")
    original = (scaling.get("original_max_position_embeddings")
                or params.get("original_max_position_embeddings")
                or hf.get("max_position_embeddings"))
    rope.update(rope_scaling=kind, rope_factor=float(factor), rope_original_len=int(original))
    return rope


def _llama_model(hf: Mapping[str, Any], source: str, *, biased: bool) -> dict:
    hidden = _get(hf, "hidden_size", source)
    heads = _get(hf, "num_attention_heads", source)
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: config.json hidden_act={hf['hidden_act']!r}; only 'silu' "
                         "(SwiGLU) is supported")
    for key in ("mlp_bias",):
        if hf.get(key):
            raise ValueError(f"{source}: config.json {key}=true is not supported")
    if hf.get("attention_bias") and not biased:
        raise ValueError(f"{source}: config.json attention_bias=true (an o_proj bias) is not "
                         "supported")
    if hf.get("use_sliding_window"):
        raise ValueError(f"{source}: config.json use_sliding_window=true is not supported")
    return {
        "hidden": hidden, "layers": _get(hf, "num_hidden_layers", source), "heads": heads,
        "kv_heads": _get(hf, "num_key_value_heads", source, default=heads),
        "head_dim": _get(hf, "head_dim", source, default=hidden // heads),
        "mlp": "swiglu", "mlp_hidden": _get(hf, "intermediate_size", source),
        "norm": "rmsnorm", "norm_eps": float(_get(hf, "rms_norm_eps", source, kind=float)),
        "qkv_bias": biased, "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "max_len": _get(hf, "max_position_embeddings", source, default=2048),
        "vocab_size": _get(hf, "vocab_size", source), **_rope(hf, source),
    }


def _llama_names(hf: Mapping[str, Any], layer: int | None, *, biased: bool,
                 prefix: str = "model.") -> dict[str, tuple[Path, bool]]:
    if layer is None:
        names = {f"{prefix}embed_tokens.weight": (("embed", "embedding"), False),
                 f"{prefix}norm.weight": (("norm", "scale"), False)}
        if not hf.get("tie_word_embeddings", False):
            names["lm_head.weight"] = (("head", "kernel"), True)
        return names
    t, f = f"{prefix}layers.{layer}.", f"blocks_{layer}"
    names = {
        t + "input_layernorm.weight": ((f, "norm1", "scale"), False),
        t + "post_attention_layernorm.weight": ((f, "norm2", "scale"), False),
        t + "self_attn.o_proj.weight": ((f, "attn", "out", "kernel"), True),
        t + "mlp.gate_proj.weight": ((f, "mlp", "gate", "kernel"), True),
        t + "mlp.up_proj.weight": ((f, "mlp", "up", "kernel"), True),
        t + "mlp.down_proj.weight": ((f, "mlp", "down", "kernel"), True),
    }
    for x in "qkv":
        names[t + f"self_attn.{x}_proj.weight"] = ((f, "attn", x, "kernel"), True)
        if biased:
            names[t + f"self_attn.{x}_proj.bias"] = ((f, "attn", x, "bias"), False)
    return names


def _llada_model(hf: Mapping[str, Any], source: str) -> dict:
    hidden = _get(hf, "d_model", source)
    heads = _get(hf, "n_heads", source)
    for key, allowed in (("block_type", "llama"), ("layer_norm_type", "rms"),
                         ("activation_type", "silu")):
        if hf.get(key, allowed) != allowed:
            raise ValueError(f"{source}: config.json {key}={hf[key]!r}; only {allowed!r} is "
                             "supported")
    for key in ("include_bias", "include_qkv_bias", "scale_logits", "input_emb_norm"):
        if hf.get(key):
            raise ValueError(f"{source}: config.json {key}=true is not supported")
    if hf.get("rope", True) is not True:
        raise ValueError(f"{source}: config.json rope=false (no rotary embedding) is not "
                         "supported")
    ratio = hf.get("mlp_ratio", 4)
    return {
        "hidden": hidden, "layers": _get(hf, "n_layers", source), "heads": heads,
        "kv_heads": _get(hf, "n_kv_heads", source, default=heads), "head_dim": hidden // heads,
        "mlp": "swiglu", "mlp_hidden": _get(hf, "mlp_hidden_size", source, default=ratio * hidden),
        "norm": "rmsnorm", "norm_eps": float(_get(hf, "rms_norm_eps", source, default=1e-5,
                                                  kind=float)),
        "qkv_bias": False, "tie_embeddings": bool(hf.get("weight_tying", False)),
        "max_len": _get(hf, "max_sequence_length", source, default=4096),
        "vocab_size": _get(hf, "embedding_size", source,
                           default=_get(hf, "vocab_size", source)),
        **_rope(hf, source),
    }


def _llada_names(hf: Mapping[str, Any], layer: int | None) -> dict[str, tuple[Path, bool]]:
    p = "model.transformer."
    if layer is None:
        names = {p + "wte.weight": (("embed", "embedding"), False),
                 p + "ln_f.weight": (("norm", "scale"), False)}
        if not hf.get("weight_tying", False):
            names[p + "ff_out.weight"] = (("head", "kernel"), True)
        return names
    t, f = f"{p}blocks.{layer}.", f"blocks_{layer}"
    return {
        t + "attn_norm.weight": ((f, "norm1", "scale"), False),
        t + "q_proj.weight": ((f, "attn", "q", "kernel"), True),
        t + "k_proj.weight": ((f, "attn", "k", "kernel"), True),
        t + "v_proj.weight": ((f, "attn", "v", "kernel"), True),
        t + "attn_out.weight": ((f, "attn", "out", "kernel"), True),
        t + "ff_norm.weight": ((f, "norm2", "scale"), False),
        t + "ff_proj.weight": ((f, "mlp", "gate", "kernel"), True),
        t + "up_proj.weight": ((f, "mlp", "up", "kernel"), True),
        t + "ff_out.weight": ((f, "mlp", "down", "kernel"), True),
    }


def _dream_model(hf, source):
    return {**_llama_model(hf, source, biased=True), "shift_logits": True}


FAMILIES = {
    "llama": Family("llama", ("LlamaForCausalLM",), "ar",
                    lambda hf, s: _llama_model(hf, s, biased=False),
                    lambda hf, i: _llama_names(hf, i, biased=False)),
    "qwen2": Family("qwen2", ("Qwen2ForCausalLM",), "ar",
                    lambda hf, s: _llama_model(hf, s, biased=True),
                    lambda hf, i: _llama_names(hf, i, biased=True)),
    "llada": Family("llada", ("LLaDAModelLM",), "mdlm", _llada_model, _llada_names,
                    default_mask_id=126336),
    "dream": Family("dream", ("DreamModel",), "mdlm", _dream_model,
                    lambda hf, i: _llama_names(hf, i, biased=True), default_mask_id=151666),
}


def supported() -> str:
    return ", ".join(f"{a} ({f.name})" for f in FAMILIES.values() for a in f.architectures)


@dataclasses.dataclass(frozen=True)
class Folder:
    """A pretrained folder, read: its `family`, `hf` config, dlm `model` keys, `mask_id`
    (diffusion families) and the safetensors file of every tensor name."""

    path: pathlib.Path
    family: Family
    hf: Mapping[str, Any]
    model: dict
    mask_id: int | None
    files: Mapping[str, pathlib.Path]

    def names(self) -> dict[str, tuple[Path, bool]]:
        """{tensor name: (Flax path, transposed)} of every tensor the model needs."""
        names = self.family.names(self.hf, None)
        for layer in range(self.model["layers"]):
            names.update(self.family.names(self.hf, layer))
        return names

    def expected_shape(self, path: Path) -> tuple[int, ...]:
        """The torch shape ([out, in] for linear weights) of the tensor at `path`."""
        m = self.model
        D, V, Dh, F = m["hidden"], m["vocab_size"], m["head_dim"], m["mlp_hidden"]
        q, kv = m["heads"] * Dh, m["kv_heads"] * Dh
        leaf = path[-2:]
        table = {("embed", "embedding"): (V, D), ("head", "kernel"): (V, D),
                 ("norm", "scale"): (D,), ("norm1", "scale"): (D,), ("norm2", "scale"): (D,),
                 ("q", "kernel"): (q, D), ("k", "kernel"): (kv, D), ("v", "kernel"): (kv, D),
                 ("q", "bias"): (q,), ("k", "bias"): (kv,), ("v", "bias"): (kv,),
                 ("out", "kernel"): (D, q), ("gate", "kernel"): (F, D),
                 ("up", "kernel"): (F, D), ("down", "kernel"): (D, F)}
        return table[leaf]


def read_folder(folder: str | pathlib.Path) -> Folder:
    """Reads config.json and the safetensors headers; ValueError naming what is wrong."""
    path = pathlib.Path(folder).expanduser()
    config_path = path / CONFIG_FILE
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: is {path} a Hugging Face model "
                                "folder?")
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: invalid JSON ({e})") from None
    source = str(path)
    architectures = hf.get("architectures") or []
    family = next((f for f in FAMILIES.values() if set(architectures) & set(f.architectures)),
                  None)
    if family is None:
        raise ValueError(f"{config_path}: architectures {architectures} is not supported; "
                         f"supported: {supported()}")
    model = family.model(hf, source)
    mask_id = None
    if family.process == "mdlm":
        mask_id = hf.get("mask_token_id", family.default_mask_id)
        if not isinstance(mask_id, int) or not 0 <= mask_id < model["vocab_size"]:
            raise ValueError(f"{config_path}: mask_token_id={mask_id!r} must be a token id "
                             f"below vocab_size {model['vocab_size']}")
    return Folder(path, family, hf, model, mask_id, _tensor_files(path))


def _tensor_files(path: pathlib.Path) -> dict[str, pathlib.Path]:
    """{tensor name: the safetensors file holding it}, from the index or the single file."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index ({e!r})") from None
        files = {name: path / file for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.exists():
                raise FileNotFoundError(f"{index} names {file.name}, which is missing")
        return files
    single = path / WEIGHTS_FILE
    if not single.exists():
        found = sorted(p.name for p in path.glob("*.bin")) + sorted(
            p.name for p in path.glob("*.pt*"))
        extra = (f" ({', '.join(found)} are pickles, which are never read: convert them to "
                 "safetensors)") if found else ""
        raise FileNotFoundError(f"{path} has neither {WEIGHTS_FILE} nor {INDEX_FILE}{extra}")
    with safe_open(str(single), framework="numpy") as f:
        return dict.fromkeys(f.keys(), single)  # noqa: SIM118 (safe_open is not iterable)


def tensors(folder: Folder) -> Iterator[tuple[Path, np.ndarray]]:
    """(Flax path, array in dlm's orientation) for every tensor, read one at a time.

    Raises ValueError naming the tensor when one is missing, unexpected or mis-shaped. A
    tied model may also store ``lm_head.weight``; it must then equal the embedding.
    """
    names = folder.names()
    missing = sorted(set(names) - set(folder.files))
    if missing:
        raise ValueError(f"{folder.path}: tensor {missing[0]} is missing ({len(missing)} "
                         f"missing in all) for a {folder.family.name} model with "
                         f"{folder.model['layers']} layers")
    tied_head = [n for n in ("lm_head.weight", "model.transformer.ff_out.weight")
                 if n in folder.files and n not in names]
    unexpected = sorted(set(folder.files) - set(names) - set(tied_head)
                        - {n for n in folder.files if _IGNORED.match(n)})
    if unexpected:
        raise ValueError(f"{folder.path}: unexpected tensor {unexpected[0]} "
                         f"({len(unexpected)} in all) for a {folder.family.name} model with "
                         f"{folder.model['layers']} layers")
    embedding = None
    for name, (path, transposed) in names.items():
        with safe_open(str(folder.files[name]), framework="numpy") as f:
            array = f.get_tensor(name)
        expected = folder.expected_shape(path)
        if tuple(array.shape) != expected:
            raise ValueError(f"{folder.path}: tensor {name} has shape {tuple(array.shape)}, "
                             f"expected {expected}")
        if path == ("embed", "embedding") and tied_head:
            embedding = array
        yield path, (array.T if transposed else array)
    for name in tied_head:
        with safe_open(str(folder.files[name]), framework="numpy") as f:
            if not np.array_equal(f.get_tensor(name), embedding):
                raise ValueError(f"{folder.path}: {name} differs from the embedding of a "
                                 "model whose config ties them")


# Buffers some checkpoints store beside the parameters (recomputed by dlm).
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def is_pretrained_folder(path: str | pathlib.Path) -> bool:
    """Whether `path` holds a Hugging Face model's config.json (its `architectures`)."""
    config = pathlib.Path(path).expanduser() / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        return "architectures" in json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def load_tokenizer(folder: Folder):
    """The folder's tokenizer (``tokenizer.json``) with the model's special ids: BOS, EOS
    and pad from config.json (else tokenizer_config.json's tokens), the first EOS when
    config.json lists several, the mask id of a diffusion family; the chat template of
    tokenizer_config.json when it has one."""
    path = folder.path / TOKENIZER_FILE
    if not path.is_file():
        others = [p.name for p in (folder.path / "tokenizer.model", folder.path / "vocab.json")
                  if p.is_file()]
        extra = f" ({', '.join(others)} found: save the tokenizer with transformers' fast " \
                "tokenizer to get tokenizer.json)" if others else ""
        raise FileNotFoundError(f"{path} not found: the tokenizer is read from the "
                                f"tokenizers library's file{extra}")
    hf = hf_tokenizers.Tokenizer.from_file(str(path))
    extra = {}
    config_path = folder.path / TOKENIZER_CONFIG_FILE
    if config_path.is_file():
        extra = json.loads(config_path.read_text())

    def special(key: str) -> int | None:
        value = folder.hf.get(f"{key}_token_id")
        if isinstance(value, list):
            value = value[0] if value else None
        if value is None:
            token = extra.get(f"{key}_token")
            token = token.get("content") if isinstance(token, dict) else token
            value = hf.token_to_id(token) if token else None
        return value

    eos = special("eos")
    if eos is None:
        raise ValueError(f"{folder.path}: neither config.json nor {TOKENIZER_CONFIG_FILE} "
                         "names an EOS token")
    bos, pad = special("bos"), special("pad")
    vocab_size = folder.model["vocab_size"]
    mask_id = folder.mask_id if folder.mask_id is not None else vocab_size - 1
    template = extra.get("chat_template")
    return PretrainedTokenizer(hf, vocab_size=vocab_size, bos_id=eos if bos is None else bos,
                               eos_id=eos, pad_id=eos if pad is None else pad, mask_id=mask_id,
                               chat_template=template if isinstance(template, str) else None)


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A pretrained Hugging Face folder (`pretrained.py`) loaded into dlm's transformer."""

    folder: Folder  # family, config.json, mask id
    model_config: Any  # ml_collections.ConfigDict: config.model of the network
    module: Any  # flax.linen.Module
    params: Any


def model_config(folder: Folder):
    """config.model of dlm's transformer for a read pretrained folder (`pretrained.Folder`):
    causal families keep the causal mask, LLaDA and Dream attend bidirectionally."""
    config = model_registry.model_config("micro", "transformer")
    model = {k: v for k, v in folder.model.items() if k != "vocab_size"}
    config.update(model, size="custom", dropout=0.0)
    if folder.family.process == "mdlm":
        config.mask = str(masks.MaskSpec.full())
    return config


def params(folder: Folder, *, param_dtype: str | None = None, shardings=None) -> dict:
    """The folder's weights as dlm's parameter tree, read one tensor at a time and each put
    straight onto its device(s): `shardings` (a tree of `jax.sharding.Sharding` in the
    params' structure; default: the default device). `param_dtype` 'float32' (default) or
    'bfloat16'."""
    dtype = jnp.dtype(param_dtype or "float32")
    if dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"param_dtype={param_dtype!r}; allowed: float32, bfloat16")
    tree: dict = {}
    for path, array in tensors(folder):
        sharding = None
        if shardings is not None:
            sharding = shardings
            for key in path:
                sharding = sharding[key]
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jax.device_put(np.asarray(array).astype(dtype, copy=False), sharding)
    return tree


def load_pretrained(directory, *, param_dtype: str | None = None) -> Pretrained:
    """A Llama / Qwen2 / LLaDA / Dream folder as dlm's transformer with the folder's weights
    (`param_dtype`: 'float32' or 'bfloat16' to cast them to, default float32). Raises
    FileNotFoundError / ValueError naming the file, key or tensor."""
    folder = read_folder(directory)
    config = model_config(folder)
    module = model_registry.build_model(config, folder.model["vocab_size"])
    return Pretrained(folder, config, module, params(folder, param_dtype=param_dtype))
