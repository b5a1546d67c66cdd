"""The exported directory: config.json, model.safetensors and the tokenizer (numpy only).

An export is a folder holding

- ``config.json``: what the parameters mean (``FORMAT``/``VERSION``, ``architecture`` 'dit'
  or 'transformer', the ``model`` hyper-parameters, the ``process`` with its block size, the
  ``tokenizer``'s special ids, where the weights came from, and the whole dlm run config);
- ``model.safetensors``: every parameter as a float32 tensor under a PyTorch-style name
  (``blocks.0.attn.q.weight`` [out, in], as ``torch.nn.Linear`` stores it);
- ``tokenizer/dlm_tokenizer.json``: dlm's own tokenizer file.

This module knows the names and shapes and reads and writes the files without JAX or torch,
so the PyTorch side and the Flax side check a file against one definition. Nothing here
unpickles: safetensors holds raw tensors and a JSON header.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

FORMAT = "dlm-export"
VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
ARCHITECTURES = ("dit", "transformer")
# The fixed constants of dlm/models/layers.py, written out so a reader needs no dlm code.
NORM_EPS = 1e-5
ROPE_BASE = 10000.0
TIME_FREQUENCY_DIM = 256
TIME_MAX_PERIOD = 10000.0
MODEL_KEYS = ("hidden", "layers", "heads", "kv_heads", "mlp_ratio", "cond_dim", "vocab_size")
# The options of the pretrained families (dlm/models/backbone.py) with dlm's own networks'
# values; an export written before they existed has these. `mlp_hidden` and `head_dim` are
# written resolved (0 would mean mlp_ratio * hidden and hidden / heads).
ARCH_DEFAULTS = {"norm": "layernorm", "norm_eps": NORM_EPS, "mlp": "gelu", "mlp_hidden": 0,
                 "mlp_bias": False, "head_bias": False, "head_dim": 0, "qkv_bias": False,
                 "rope_base": ROPE_BASE, "rope_scaling": "none", "rope_factor": 1.0,
                 "rope_original_len": 0, "tie_embeddings": False, "shift_logits": False}


def arch(model: Mapping[str, Any]) -> dict:
    """The pretrained-family options of config.json's "model", defaults filled in and the
    MLP width and head width resolved."""
    out = {key: model.get(key, default) for key, default in ARCH_DEFAULTS.items()}
    out["mlp_hidden"] = out["mlp_hidden"] or model["mlp_ratio"] * model["hidden"]
    out["head_dim"] = out["head_dim"] or model["hidden"] // model["heads"]
    return out


def unusual_options(model: Mapping[str, Any]) -> dict:
    """The pretrained-family options in which the model differs from dlm's own networks
    (LayerNorm, GELU, RoPE base 1e4...), which the standalone PyTorch reference and the
    Starcoder2 conversion describe: {} for those."""
    plain = arch({**model, **ARCH_DEFAULTS})
    return {key: value for key, value in arch(model).items() if value != plain[key]}


def check_model(model: Mapping[str, Any], source: str = "config.json") -> None:
    """Raises ValueError naming the key when `model` (config.json's "model") is unusable."""
    for key in MODEL_KEYS:
        value = model.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{source}: model.{key} must be a positive int, got {value!r}")
    if model.get("architecture") not in ARCHITECTURES:
        raise ValueError(f"{source}: model.architecture must be one of {ARCHITECTURES}, got "
                         f"{model.get('architecture')!r}")
    if not model.get("head_dim") and (model["hidden"] % model["heads"]
                                      or (model["hidden"] // model["heads"]) % 2):
        raise ValueError(f"{source}: model.hidden ({model['hidden']}) must be an even multiple "
                         f"of model.heads ({model['heads']}) per head")
    head_dim = model.get("head_dim", 0)
    if not isinstance(head_dim, int) or head_dim < 0 or head_dim % 2:
        raise ValueError(f"{source}: model.head_dim ({head_dim!r}) must be even (0: hidden / "
                         "heads)")
    if model.get("norm", "layernorm") not in ("layernorm", "rmsnorm"):
        raise ValueError(f"{source}: model.norm must be 'layernorm' or 'rmsnorm', got "
                         f"{model['norm']!r}")
    if model.get("mlp", "gelu") not in ("gelu", "swiglu"):
        raise ValueError(f"{source}: model.mlp must be 'gelu' or 'swiglu', got "
                         f"{model['mlp']!r}")
    if model["heads"] % model["kv_heads"]:
        raise ValueError(f"{source}: model.kv_heads ({model['kv_heads']}) must divide "
                         f"model.heads ({model['heads']})")


def parameter_table(model: Mapping[str, Any]) -> list[tuple[str, tuple[str, ...], bool,
                                                            tuple[int, ...]]]:
    """Every parameter of the model `model` describes, in a fixed order.

    Returns rows (torch name, Flax path, transposed, torch shape): `transposed` is True for
    Dense kernels, stored [in, out] by Flax and [out, in] under the torch name.
    """
    check_model(model)
    D, C, V = model["hidden"], model["cond_dim"], model["vocab_size"]
    options = arch(model)
    head_dim, M = options["head_dim"], options["mlp_hidden"]
    q, kv = model["heads"] * head_dim, model["kv_heads"] * head_dim
    if options["mlp"] == "swiglu":
        mlp = [("gate", (M, D)), ("up", (M, D)), ("down", (D, M))]
    else:
        mlp = [("fc1", (M, D)), ("fc2", (D, M))]
    rows = [("embed.weight", ("embed", "embedding"), False, (V, D))]
    conditioned = model["architecture"] == "dit"
    if conditioned:
        F = TIME_FREQUENCY_DIM
        rows += [
            ("time_embed.fc1.weight", ("time_embed", "fc1", "kernel"), True, (C, F)),
            ("time_embed.fc1.bias", ("time_embed", "fc1", "bias"), False, (C,)),
            ("time_embed.fc2.weight", ("time_embed", "fc2", "kernel"), True, (C, C)),
            ("time_embed.fc2.bias", ("time_embed", "fc2", "bias"), False, (C,)),
        ]
    for i in range(model["layers"]):
        t, f = f"blocks.{i}.", f"blocks_{i}"
        rows += [
            (t + "norm1.weight", (f, "norm1", "scale"), False, (D,)),
            (t + "attn.q.weight", (f, "attn", "q", "kernel"), True, (q, D)),
            (t + "attn.k.weight", (f, "attn", "k", "kernel"), True, (kv, D)),
            (t + "attn.v.weight", (f, "attn", "v", "kernel"), True, (kv, D)),
        ]
        if options["qkv_bias"]:
            rows += [(t + f"attn.{x}.bias", (f, "attn", x, "bias"), False, (width,))
                     for x, width in (("q", q), ("k", kv), ("v", kv))]
        rows += [
            (t + "attn.out.weight", (f, "attn", "out", "kernel"), True, (D, q)),
            (t + "norm2.weight", (f, "norm2", "scale"), False, (D,)),
        ]
        rows += [(t + f"mlp.{x}.weight", (f, "mlp", x, "kernel"), True, shape)
                 for x, shape in mlp]
        if options["mlp_bias"]:
            rows += [(t + f"mlp.{x}.bias", (f, "mlp", x, "bias"), False, shape[:1])
                     for x, shape in mlp]
        if conditioned:
            rows += [
                (t + "adaln.weight", (f, "adaln", "Dense_0", "kernel"), True, (6 * D, C)),
                (t + "adaln.bias", (f, "adaln", "Dense_0", "bias"), False, (6 * D,)),
            ]
    if conditioned:
        rows += [
            ("final.adaln.weight", ("final", "adaln", "Dense_0", "kernel"), True, (2 * D, C)),
            ("final.adaln.bias", ("final", "adaln", "Dense_0", "bias"), False, (2 * D,)),
            ("final.norm.weight", ("final", "norm", "scale"), False, (D,)),
            ("final.out.weight", ("final", "out", "kernel"), True, (V, D)),
        ]
        if options["head_bias"]:
            rows += [("final.out.bias", ("final", "out", "bias"), False, (V,))]
    else:
        rows += [("norm.weight", ("norm", "scale"), False, (D,))]
        if not options["tie_embeddings"]:
            rows += [("head.weight", ("head", "kernel"), True, (V, D))]
            if options["head_bias"]:
                rows += [("head.bias", ("head", "bias"), False, (V,))]
    return rows


def check_tensors(tensors: Mapping[str, Any], model: Mapping[str, Any], source: str) -> None:
    """Raises ValueError naming the missing, unexpected or misshapen tensors when `tensors`
    (name -> array) are not exactly the parameters that `model` describes."""
    expected = {name: shape for name, _, _, shape in parameter_table(model)}
    missing = [name for name in expected if name not in tensors]
    unexpected = sorted(name for name in tensors if name not in expected)
    shapes = [f"{name}: {tuple(tensors[name].shape)} in the file, {expected[name]} expected"
              for name in expected if name in tensors
              and tuple(tensors[name].shape) != expected[name]]
    problems = []
    if missing:
        problems.append(f"missing {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected {_some(unexpected)}")
    if shapes:
        problems.append(f"wrong shapes: {_some(shapes)}")
    if problems:
        summary = ", ".join(f"{k}={model[k]}" for k in ("architecture",) + MODEL_KEYS)
        raise ValueError(f"{source} does not match its config ({summary}): "
                         + "; ".join(problems))


def _some(items: list[str], limit: int = 6) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def read_config(directory) -> dict:
    """config.json of an export folder; FileNotFoundError / ValueError naming the file."""
    path = pathlib.Path(directory).expanduser() / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"not a dlm export: {path} does not exist")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON (truncated?): {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{path} is not a dlm export config (expected \"format\": "
                         f"\"{FORMAT}\")")
    if config.get("version") != VERSION:
        raise ValueError(f"{path}: export version {config.get('version')!r} is not "
                         f"supported (this dlm reads version {VERSION})")
    if not isinstance(config.get("model"), dict):
        raise ValueError(f"{path} has no \"model\" section")
    check_model(config["model"], str(path))
    return config


def write_config(directory, config: Mapping[str, Any]) -> pathlib.Path:
    path = pathlib.Path(directory) / CONFIG_FILE
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_safetensors(path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as numpy arrays (name -> array).

    Raises FileNotFoundError when it is missing and ValueError naming the file when it is
    truncated or not a safetensors file.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt? "
                         f"{path.stat().st_size} bytes): {e}") from None
    except TypeError as e:  # a dtype numpy lacks, e.g. bfloat16
        raise ValueError(f"{path} holds tensors numpy cannot read ({e}); save them as "
                         "float32") from None


def write_safetensors(path, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Writes float32 contiguous copies of `tensors` with string `metadata`."""
    from safetensors.numpy import save_file

    arrays = {name: np.ascontiguousarray(np.asarray(value, np.float32))
              for name, value in tensors.items()}
    save_file(arrays, str(path), metadata={"format": "pt", **(metadata or {})})


def read_weights(directory, config: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """model.safetensors of an export folder, checked against its config.json."""
    directory = pathlib.Path(directory).expanduser()
    config = read_config(directory) if config is None else config
    path = directory / WEIGHTS_FILE
    tensors = read_safetensors(path)
    check_tensors(tensors, config["model"], str(path))
    return tensors
