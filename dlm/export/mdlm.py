"""Importing weights in the layout of the public PyTorch MDLM denoiser (its `DIT`) and of
BD3-LM's (the same DiT, trained with blocks), numpy only.

A source is a safetensors file (or a mapping) of the state dict, or a Hugging Face folder
of the public checkpoints (`kuleshov-group/mdlm-owt`, `kuleshov-group/bd3lm-owt-block_size*`:
config.json with `architectures` ["MDLM"] or ["BD3LM"], `n_heads`, `model_length`,
`block_size`, and model.safetensors). MDLM's DIT and dlm's DiT compute the same function up
to these differences, each handled:

- q, k and v are one fused `blocks.N.attn_qkv.weight` [3D, D] ((three, heads, head_dim) rows),
  split into dlm's `attn.q` / `attn.k` / `attn.v`;
- its MLP (`blocks.N.mlp.0`, `blocks.N.mlp.2`) and output projection (`output_layer.linear`)
  carry biases: non-zero ones turn on dlm's `model.mlp_bias` / `model.head_bias` and map
  onto them; all-zero ones are dropped (the plain DiT, which every export format takes);
- the number of heads is not a parameter: it is read from the length of the
  `rotary_emb.inv_freq` buffer (head_dim / 2), whose values must be dlm's RoPE frequencies,
  or given as `heads`;
- a time-conditioned MDLM feeds sigma(t) (the total noise) to its `sigma_map`, dlm feeds t,
  so only MDLM's default (time_conditioning off: the map reads 0 in both) maps exactly.

Everything else (weight-only LayerNorms with eps 1e-5, rotate-half RoPE with base 10000,
adaLN-zero with a bias, the sinusoidal time features [cos | sin] of width 256 and their
two-layer SiLU MLP, c = silu(sigma_map(.)), tanh GELU, the mask token as the last id) is the
same. Lightning checkpoints prefix names with `backbone.`; that prefix is dropped. BD3-LM's
`sampling_eps_min` / `sampling_eps_max` buffers (its clipped mask rates) become the process's
`clip_min` / `clip_max`.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Mapping

import numpy as np

from dlm.export import layout

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_BLOCK_NAMES = {  # MDLM name inside a block -> dlm export name inside a block
    "norm1.weight": "norm1.weight",
    "attn_out.weight": "attn.out.weight",
    "norm2.weight": "norm2.weight",
    "mlp.0.weight": "mlp.fc1.weight",
    "mlp.2.weight": "mlp.fc2.weight",
    "adaLN_modulation.weight": "adaln.weight",
    "adaLN_modulation.bias": "adaln.bias",
}
_BLOCK_BIASES = {"mlp.0.bias": "mlp.fc1.bias", "mlp.2.bias": "mlp.fc2.bias"}
_GLOBAL_NAMES = {
    "vocab_embed.embedding": "embed.weight",
    "sigma_map.mlp.0.weight": "time_embed.fc1.weight",
    "sigma_map.mlp.0.bias": "time_embed.fc1.bias",
    "sigma_map.mlp.2.weight": "time_embed.fc2.weight",
    "sigma_map.mlp.2.bias": "time_embed.fc2.bias",
    "output_layer.norm_final.weight": "final.norm.weight",
    "output_layer.linear.weight": "final.out.weight",
    "output_layer.adaLN_modulation.weight": "final.adaln.weight",
    "output_layer.adaLN_modulation.bias": "final.adaln.bias",
}
_HEAD_BIAS = ("output_layer.linear.bias", "final.out.bias")
_CLIP_BUFFERS = ("sampling_eps_min", "sampling_eps_max")
_INV_FREQ = "rotary_emb.inv_freq"


def from_state_dict(state: Mapping[str, np.ndarray], *, heads: int | None = None,
                    time_conditioning: bool = False,
                    source: str = "the MDLM state dict") -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json "model" section, tensors under dlm's export names) of an MDLM DIT.

    `state` maps MDLM parameter names (optionally prefixed `backbone.`) to arrays (numpy, or
    anything `np.asarray` reads). Raises ValueError naming the parameter that has no dlm
    counterpart, is missing, has the wrong shape, or is a non-zero bias.
    """
    if time_conditioning:
        raise ValueError("a time-conditioned MDLM DIT reads sigma(t) where dlm's DiT reads t, so "
                         "it does not map onto dlm exactly; only time_conditioning=False does")
    state = {_strip(name): np.asarray(value, np.float32) for name, value in state.items()}
    if "vocab_embed.embedding" not in state:
        raise ValueError(f"{source} has no vocab_embed.embedding: not an MDLM DIT state dict "
                         f"(first names: {sorted(state)[:5]})")
    V, D = state["vocab_embed.embedding"].shape
    layers = 1 + max((int(m.group(1)) for m in map(_BLOCK.match, state) if m), default=-1)
    heads = _heads(state, D, heads, source)
    mlp_biases = [f"blocks.{i}.{b}" for i in range(layers) for b in _BLOCK_BIASES]
    mlp_bias = any(np.any(state[n] != 0) for n in mlp_biases if n in state)
    head_bias = _HEAD_BIAS[0] in state and bool(np.any(state[_HEAD_BIAS[0]] != 0))
    tensors, used = {}, {_INV_FREQ, _HEAD_BIAS[0], *mlp_biases, *_CLIP_BUFFERS}
    if head_bias:
        tensors[_HEAD_BIAS[1]] = state[_HEAD_BIAS[0]]
    for theirs, ours in _GLOBAL_NAMES.items():
        if theirs in state:
            tensors[ours] = state[theirs]
            used.add(theirs)
    for i in range(layers):
        prefix = f"blocks.{i}."
        names = {**_BLOCK_NAMES, **(_BLOCK_BIASES if mlp_bias else {})}
        for theirs, ours in names.items():
            if prefix + theirs in state:
                tensors[prefix + ours] = state[prefix + theirs]
                used.add(prefix + theirs)
        qkv = state.get(prefix + "attn_qkv.weight")
        if qkv is not None:
            used.add(prefix + "attn_qkv.weight")
            if qkv.shape != (3 * D, D):
                raise ValueError(f"{source}: {prefix}attn_qkv.weight has shape {qkv.shape}, "
                                 f"expected {(3 * D, D)}")
            for part, rows in zip("qkv", np.split(qkv, 3, axis=0), strict=True):
                tensors[f"{prefix}attn.{part}.weight"] = rows
    unknown = sorted(set(state) - used)
    if unknown:
        raise ValueError(f"{source}: parameters with no dlm counterpart: {unknown[:6]}")
    fc1 = tensors.get("blocks.0.mlp.fc1.weight")
    mlp_ratio = fc1.shape[0] // D if fc1 is not None and fc1.shape[0] % D == 0 else 4
    cond = tensors.get("time_embed.fc2.weight")
    model = {
        "architecture": "dit", "hidden": int(D), "layers": int(layers), "heads": int(heads),
        "kv_heads": int(heads), "mlp_ratio": int(mlp_ratio),
        "cond_dim": int(cond.shape[0]) if cond is not None else 128,
        "vocab_size": int(V), "time_conditioning": False, "mask": "full",
        "mlp_bias": bool(mlp_bias), "head_bias": bool(head_bias),
        "norm_eps": layout.NORM_EPS, "rope_base": layout.ROPE_BASE,
        "time_frequency_dim": layout.TIME_FREQUENCY_DIM,
        "time_max_period": layout.TIME_MAX_PERIOD, "activation": "gelu_tanh",
        "dtype": "float32", "compute_dtype": "float32", "max_len": 1024,
    }
    layout.check_tensors(tensors, model, source)
    return model, tensors


def export_config(model: dict, *, seq_len: int = 1024, source: str = "",
                  block_size: int | None = None, clip: tuple[float, float] | None = None
                  ) -> dict:
    """A config.json for imported weights: process 'mdlm' (MDLM's default schedule), or
    'bd3lm' with `block_size` and the clipped mask rates `clip`."""
    process = {"name": "mdlm", "block_size": None, "schedule": "loglinear",
               "schedule_eps": 1e-3, "t_min": 1e-3, "num_timesteps": 0}
    if block_size is not None:
        process.update(name="bd3lm", block_size=int(block_size),
                       training_mask=f"bd3lm:{int(block_size)}",
                       sampling_mask=f"block_causal:{int(block_size)}")
        if clip is not None:
            process.update(clip_min=float(clip[0]), clip_max=float(clip[1]))
    return {
        "format": layout.FORMAT, "version": layout.VERSION, "model": model,
        "process": process, "tokenizer": None, "seq_len": int(seq_len),
        "source": {"imported_from": process["name"], "path": source}, "dlm_config": None,
    }


ARCHITECTURES = {"MDLM": "mdlm", "BD3LM": "bd3lm"}


def read_hf_folder(folder) -> tuple[dict[str, np.ndarray], dict]:
    """(state dict, {heads, seq_len, block_size, clip}) of a public MDLM / BD3-LM Hugging Face
    folder (config.json + model.safetensors); ValueError naming the key that does not map."""
    folder = pathlib.Path(folder).expanduser()
    config_path = folder / layout.CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: not a Hugging Face model folder")
    hf = json.loads(config_path.read_text())
    kinds = {ARCHITECTURES[a] for a in hf.get("architectures") or [] if a in ARCHITECTURES}
    if not kinds:
        raise ValueError(f"{config_path}: architectures {hf.get('architectures')} is not one "
                         f"of {sorted(ARCHITECTURES)}")
    for key, wanted in (("time_conditioning", False), ("adaln", True), ("causal", False)):
        if hf.get(key, wanted) != wanted:
            raise ValueError(f"{config_path}: {key}={hf[key]!r} does not map onto dlm's DiT "
                             f"(only {key}={wanted!r} does)")
    state = layout.read_safetensors(folder / layout.WEIGHTS_FILE)
    options = {"heads": hf.get("n_heads"), "seq_len": int(hf.get("model_length", 1024)),
               "block_size": None, "clip": None}
    if kinds == {"bd3lm"}:
        if not hf.get("cross_attn", True):
            raise ValueError(f"{config_path}: cross_attn=false (no x_t + x_0 training pass) "
                             "is not BD3-LM's training layout")
        options["block_size"] = int(hf.get("block_size", 1))
        by_name = {_strip(n): v for n, v in state.items()}
        if all(b in by_name for b in _CLIP_BUFFERS):
            options["clip"] = tuple(float(np.asarray(by_name[b]).reshape(-1)[0])
                                    for b in _CLIP_BUFFERS)
    return state, options


def _strip(name: str) -> str:
    for prefix in ("backbone.", "module."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name


def _heads(state: dict, hidden: int, heads: int | None, source: str) -> int:
    inv_freq = state.get(_INV_FREQ)
    if inv_freq is None:
        if heads is None:
            raise ValueError(f"{source} has no {_INV_FREQ} buffer to read the head count from; "
                             "pass heads=")
        if hidden % heads:
            raise ValueError(f"heads={heads} does not divide the hidden size {hidden}")
        return heads
    head_dim = 2 * inv_freq.shape[0]
    if hidden % head_dim:
        raise ValueError(f"{source}: {_INV_FREQ} has {inv_freq.shape[0]} frequencies, which "
                         f"gives a head dimension {head_dim} that does not divide {hidden}")
    found = hidden // head_dim
    if heads is not None and heads != found:
        raise ValueError(f"heads={heads} but {source}'s {_INV_FREQ} says {found} heads "
                         f"(head dimension {head_dim})")
    half = head_dim // 2
    ours = layout.ROPE_BASE ** (-np.arange(half, dtype=np.float64) / half)
    if not np.allclose(inv_freq, ours, rtol=1e-5):
        raise ValueError(f"{source}: {_INV_FREQ} is not RoPE with base {layout.ROPE_BASE:g} "
                         f"over head dimension {head_dim}")
    return found
